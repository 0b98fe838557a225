"""Reading a Hugging Face checkpoint folder into (ModelConfig, params): `load_hf_checkpoint`."""

from __future__ import annotations

import dataclasses
import json
import os
import re

from absl import logging
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from dsv3_jax.config import ModelConfig
from dsv3_jax.convert import hf_config, layout
from dsv3_jax.convert import safetensors as st
from dsv3_jax.convert.hf_config import CONFIG_FILE, HFCheckpointError, config_from_hf
from dsv3_jax.convert.layout import INDEX_FILE, SINGLE_FILE, Leaf
from dsv3_jax.model import tree
from dsv3_jax.ops import fp8

_FLOAT_CODES = ("F32", "BF16", "F16", "F64")
_PICKLE = re.compile(r"pytorch_model.*\.bin|.*\.(pt|pth|ckpt|pkl)")


class _Checkpoint:
    """The safetensors files of an HF folder: which file holds each tensor, headers checked."""

    def __init__(self, path: str):
        self.path = path
        self.files: dict[str, st.SafetensorsFile] = {}
        self.where: dict[str, str] = {}
        index = os.path.join(path, INDEX_FILE)
        if os.path.isfile(index):
            self._open_index(index)
        elif os.path.isfile(os.path.join(path, SINGLE_FILE)):
            self.where = dict.fromkeys(self._open(SINGLE_FILE).keys(), SINGLE_FILE)
        else:
            self._refuse_folder()

    def _open(self, name: str) -> st.SafetensorsFile:
        if name not in self.files:
            try:
                self.files[name] = st.SafetensorsFile(os.path.join(self.path, name))
            except st.SafetensorsError as e:
                raise HFCheckpointError(str(e)) from e
        return self.files[name]

    def _open_index(self, index: str) -> None:
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f).get("weight_map")
        except (OSError, json.JSONDecodeError, AttributeError) as e:
            raise HFCheckpointError(f"{index} is not a JSON object with a weight_map ({e}); "
                                    "rewrite it or remove it next to a single model.safetensors.") from e
        if not isinstance(weight_map, dict) or not weight_map:
            raise HFCheckpointError(f"{index}: weight_map must be a non-empty object "
                                    "{tensor name: shard file}.")
        by_file: dict[str, list[str]] = {}
        for tensor, fname in weight_map.items():
            if (not isinstance(fname, str) or os.path.basename(fname) != fname
                    or not fname.endswith(".safetensors")):
                raise HFCheckpointError(f"{index}: tensor {tensor!r} is mapped to {fname!r}; "
                                        "expected a .safetensors file name in the same folder.")
            by_file.setdefault(fname, []).append(tensor)
        missing = sorted(f for f in by_file if not os.path.isfile(os.path.join(self.path, f)))
        if missing:
            f = missing[0]
            raise HFCheckpointError(
                f"{index} names shard file {f} (holding {len(by_file[f])} tensors, e.g. "
                f"{by_file[f][0]!r}), which does not exist in {self.path}"
                + (f" (missing shards: {missing})" if len(missing) > 1 else "")
                + "; the download is incomplete: fetch the missing file(s).")
        for fname, tensors in by_file.items():
            f = self._open(fname)
            for tensor in tensors:
                if tensor not in f:
                    raise HFCheckpointError(f"{index} maps tensor {tensor!r} to {fname}, but that "
                                            "file holds no such tensor; the shard or the index is "
                                            "from another checkpoint.")
                self.where[tensor] = fname

    def _refuse_folder(self):
        names = sorted(os.listdir(self.path))
        pickles = [n for n in names if _PICKLE.fullmatch(n)]
        shards = [n for n in names if n.endswith(".safetensors")]
        if shards:
            raise HFCheckpointError(
                f"{self.path} holds {shards[:3]} but neither {SINGLE_FILE} nor {INDEX_FILE}; a "
                f"sharded checkpoint needs its index (which tensor is in which file): copy "
                f"{INDEX_FILE} from the checkpoint's release.")
        if pickles:
            raise HFCheckpointError(
                f"{self.path} holds {pickles[0]}, a pickle checkpoint: only safetensors are read "
                "(unpickling can run arbitrary code). Convert it with transformers "
                "(`model.save_pretrained(dir, safe_serialization=True)`) and load that folder.")
        raise HFCheckpointError(f"{self.path} holds no {SINGLE_FILE} and no {INDEX_FILE}; it is "
                                "not a Hugging Face safetensors checkpoint.")

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def info(self, name: str) -> st.TensorInfo:
        return self.files[self.where[name]].info(name)

    def read(self, name: str, rows: slice | None = None) -> np.ndarray:
        return self.files[self.where[name]].read(name, rows)


def _open_folder(path: str) -> tuple[dict, str, _Checkpoint]:
    """(config.json as a dict, its path, the tensors); refuses what is not an HF checkpoint."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise HFCheckpointError(f"{path} does not exist; pass a Hugging Face checkpoint folder "
                                f"({CONFIG_FILE} + *.safetensors).")
    if not os.path.isdir(path):
        raise HFCheckpointError(f"{path} is a file; pass the folder that holds {CONFIG_FILE} and "
                                "the *.safetensors files.")
    config_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(config_path):
        pickles = [n for n in sorted(os.listdir(path)) if _PICKLE.fullmatch(n)]
        hint = (f" It holds {pickles[0]}, a pickle checkpoint: only safetensors are read." if pickles else "")
        raise HFCheckpointError(f"{path} is not a Hugging Face checkpoint: it has no {CONFIG_FILE}."
                                f"{hint} Expected {CONFIG_FILE} with {SINGLE_FILE} or {INDEX_FILE} "
                                "and its shards.")
    try:
        with open(config_path, encoding="utf-8") as f:
            hf = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise HFCheckpointError(f"{config_path} is not valid JSON ({e}).") from e
    return hf, config_path, _Checkpoint(path)


def _present_mtp_depth(cfg: ModelConfig, ckpt: _Checkpoint, source: str) -> ModelConfig:
    """cfg with mtp_depth set to the MTP layers the checkpoint holds (config may declare more)."""
    present = [k for k in range(cfg.mtp_depth)
               if f"model.layers.{cfg.n_layers + k}.eh_proj.weight" in ckpt]
    if len(present) == cfg.mtp_depth:
        return cfg
    if not present:
        logging.warning("%s declares num_nextn_predict_layers=%d but the checkpoint holds no MTP "
                        "layer (model.layers.%d.eh_proj.weight is absent); loading without MTP "
                        "(mtp_depth=0).", source, cfg.mtp_depth, cfg.n_layers)
        return cfg.replace(mtp_depth=0)
    absent = sorted(set(range(cfg.mtp_depth)) - set(present))
    raise HFCheckpointError(
        f"{source} declares num_nextn_predict_layers={cfg.mtp_depth} but the checkpoint lacks MTP "
        f"layer(s) {[cfg.n_layers + k for k in absent]} (no model.layers.<i>.eh_proj.weight); the "
        "shards are incomplete, or set num_nextn_predict_layers to the layers present.")


def _check_tensors(plan: list[Leaf], ckpt: _Checkpoint, cfg: ModelConfig,
                   fp8_block: tuple[int, int] | None, source: str) -> None:
    """Every tensor the plan needs is present with its shape and a float (or scaled FP8) dtype, and
    the checkpoint holds nothing else. Refusals name the tensor, its file and what was expected."""
    used: set[str] = set()
    missing: list[str] = []
    for leaf in plan:
        for name in leaf.sources.values():
            if name not in ckpt:
                missing.append(name)
                continue
            used.add(name)
            info, where = ckpt.info(name), f"tensor {name!r} in {ckpt.where[name]}"
            if tuple(info.shape) != leaf.hf_shape:
                raise HFCheckpointError(
                    f"{where} has shape {list(info.shape)}; expected {list(leaf.hf_shape)} for "
                    f"{'/'.join(leaf.path)} from {source} (hidden_size={cfg.dim}, vocab_size="
                    f"{cfg.vocab_size}, q_lora_rank={cfg.q_lora_rank}, kv_lora_rank="
                    f"{cfg.kv_lora_rank}, num_attention_heads={cfg.n_heads}). The tensors and "
                    "config.json belong to different models.")
            if info.dtype == "F8_E4M3":
                used.add(_check_fp8(name, where, info, ckpt, fp8_block, source))
            elif info.dtype not in _FLOAT_CODES:
                raise HFCheckpointError(f"{where} has dtype {info.dtype}; expected a floating-point "
                                        f"dtype ({', '.join(_FLOAT_CODES)}, or F8_E4M3 with a "
                                        "weight_scale_inv).")
    if missing:
        raise HFCheckpointError(
            f"the checkpoint in {ckpt.path} lacks {len(missing)} tensor(s) that {source} implies, "
            f"e.g. {missing[:8]}; the shards are incomplete or belong to another model.")
    for copy, shared in layout.mtp_copies(cfg):
        if copy in ckpt:
            used.add(copy)
            _check_copy(ckpt, copy, shared)
    unexpected = sorted(n for n in ckpt.where
                        if n not in used and not layout.IGNORABLE.fullmatch(n))
    if unexpected:
        raise HFCheckpointError(
            f"the checkpoint in {ckpt.path} holds {len(unexpected)} tensor(s) that {source} does "
            f"not account for, e.g. {unexpected[:8]} (in {ckpt.where[unexpected[0]]}); it is not "
            "a DeepSeek-V3 checkpoint of that config (check num_hidden_layers, "
            "num_nextn_predict_layers, n_routed_experts, q_lora_rank).")


def _check_fp8(name: str, where: str, info: st.TensorInfo, ckpt: _Checkpoint,
               fp8_block: tuple[int, int] | None, source: str) -> str:
    if fp8_block is None:
        raise HFCheckpointError(f"{where} is F8_E4M3 but {source} has no quantization_config; add "
                                "DeepSeek's {\"quant_method\": \"fp8\", \"fmt\": \"e4m3\", "
                                "\"weight_block_size\": [128, 128]}.")
    if len(info.shape) != 2 or not name.endswith(".weight"):
        raise HFCheckpointError(f"{where} is F8_E4M3 with shape {list(info.shape)}; only 2-D "
                                "linear weights can be block-quantized.")
    scale = name + "_scale_inv"
    if scale not in ckpt:
        raise HFCheckpointError(f"{where} is F8_E4M3 but the checkpoint has no {scale!r}, the "
                                "block scales needed to dequantize it.")
    bm, bn = fp8_block
    want = (-(-info.shape[0] // bm), -(-info.shape[1] // bn))
    s_info = ckpt.info(scale)
    if tuple(s_info.shape) != want or s_info.dtype not in _FLOAT_CODES:
        raise HFCheckpointError(
            f"tensor {scale!r} in {ckpt.where[scale]} is {s_info.dtype} {list(s_info.shape)}; "
            f"expected a float tensor of shape {list(want)} (one scale per {bm}x{bn} block of "
            f"{name}, {list(info.shape)}).")
    return scale


def _check_copy(ckpt: _Checkpoint, copy: str, shared: str, rows_per_chunk: int = 1024) -> None:
    """The MTP layer's copy of the embedding / head equals the shared tensor, compared in chunks of
    rows (each chunk mapped on its own, so the check holds a few chunks in memory, not the tensors)."""
    a_info, b_info = ckpt.info(copy), ckpt.info(shared)
    if a_info.shape != b_info.shape:
        raise HFCheckpointError(f"{copy!r} has shape {list(a_info.shape)} but {shared!r}, which it "
                                f"should copy, has {list(b_info.shape)}.")
    for r in range(0, a_info.shape[0], rows_per_chunk):
        rows = slice(r, r + rows_per_chunk)
        if not np.array_equal(np.asarray(ckpt.read(copy, rows), np.float32),
                              np.asarray(ckpt.read(shared, rows), np.float32)):
            raise HFCheckpointError(
                f"{copy!r} ({ckpt.where[copy]}) differs from {shared!r} (rows from {r}): "
                "dsv3_jax's MTP modules share the main embedding and output head (SPEC.md "
                "'Multi-token prediction'), so this checkpoint cannot be represented.")


_BAND_VALUES = 1 << 24  # values one dequantization call may hold (64 MB of float32)


def _dequantize_into(dst: np.ndarray, q_rows: np.ndarray, scale_inv: np.ndarray, row0: int,
                     cols: slice, block: tuple[int, int], transpose: bool) -> None:
    """dst (dst.T when `transpose`) = fp8.weight_dequant of q_rows[:, cols], where q_rows holds rows
    [row0, row0 + len(q_rows)) of the weight, in bands of rows; its columns start at a block edge.
    With square blocks a band starting on a block edge takes whole block rows, up to
    _BAND_VALUES values (one call for most regions); otherwise it lies in one row of bm x bn
    blocks with at most bn rows, dequantized with square bn blocks and one row of scales."""
    bm, bn = block
    lo = cols.start // bn * bn
    view = dst.T if transpose else dst
    whole_rows = max(_BAND_VALUES // max(cols.stop - lo, 1) // bm, 1) * bm
    r = 0
    while r < len(q_rows):
        i = row0 + r
        if bm == bn and i % bm == 0:
            end = r + min(whole_rows, len(q_rows) - r)
        else:
            end = r + min(bn, bm - i % bm, len(q_rows) - r)
        s = scale_inv[i // bm:-(-(row0 + end) // bm) if bm == bn else i // bm + 1,
                      lo // bn:-(-cols.stop // bn)]
        band = layout.on_host(fp8.weight_dequant, q_rows[r:end, lo:cols.stop], s, block=bn)
        view[r:end] = band[:, cols.start - lo:]
        r = end


def _fill(out: np.ndarray, leaf: Leaf, index: tuple[slice, ...], ckpt: _Checkpoint,
          fp8_block: tuple[int, int] | None, keep_fp8: bool, scales: bool = False) -> None:
    """Writes the part `index` of `leaf` into `out` (its shape), reading one source region at a time.

    With `scales`, `leaf` describes the FP8 scale leaf (sources are the `_scale_inv` tensors).
    """
    lead, item = index[:leaf.n_lead], index[leaf.n_lead:]
    hf_region = item[::-1] if leaf.transpose else item
    for pos, name in leaf.sources.items():
        if not all(s.start <= p < s.stop for p, s in zip(pos, lead)):
            continue
        dst = out[tuple(p - s.start for p, s in zip(pos, lead))]
        rows = ckpt.read(name + "_scale_inv" if scales else name, hf_region[0])  # maps only these
        if not scales and rows.dtype == ml_dtypes.float8_e4m3fn and not keep_fp8:
            s = np.asarray(ckpt.read(name + "_scale_inv"), np.float32)
            _dequantize_into(dst, rows, s, hf_region[0].start, hf_region[1], fp8_block, leaf.transpose)
        else:
            region = rows[(slice(None),) + hf_region[1:]]
            dst[...] = region.T if leaf.transpose else region
        del rows


def _put(shape: tuple[int, ...], dtype, sharding: jax.sharding.Sharding, fill) -> jax.Array:
    """A jax.Array of `shape` with `sharding`, built one addressable shard at a time: each unique
    shard is filled on the host, put on its first device, and copied device-to-device to the others
    that hold the same index, so the host holds one shard at a time."""
    by_index: dict[tuple, list] = {}
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        key = tuple(s.indices(d)[:2] for s, d in zip(index, shape))
        by_index.setdefault(key, []).append(device)
    arrays = []
    for key, devices in by_index.items():
        index = tuple(slice(a, b) for a, b in key)
        host = np.empty(tuple(b - a for a, b in key), dtype)
        fill(host, index)
        first = jax.device_put(host, devices[0])
        first.block_until_ready()
        del host
        arrays.append(first)
        arrays += [jax.device_put(first, d) for d in devices[1:]]
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def _shardings(cfg: ModelConfig, mesh) -> dict[tuple[str, ...], jax.sharding.Sharding]:
    """Each parameter's NamedSharding on `mesh`, from its logical axis names and the rules table."""
    from dsv3_jax.parallel.mesh import abstract_with_shardings

    _, shardings = abstract_with_shardings(tree.boxed_init(cfg), mesh)
    return layout.flat(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))


def _set(nested: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        nested = nested.setdefault(key, {})
    nested[path[-1]] = value


def load_hf_checkpoint(path: str, dtype=jnp.float32, *, mesh: jax.sharding.Mesh | None = None,
                       keep_fp8: bool = False, scan_layers: bool = True,
                       progress: bool = False) -> tuple[ModelConfig, dict]:
    """Reads a Hugging Face DeepSeek-V3 checkpoint folder into (ModelConfig, params).

    Args:
      path: folder with config.json and model.safetensors, or shards + model.safetensors.index.json.
      dtype: float32, bfloat16 or float16: the parameters' dtype (ModelConfig.param_dtype is set to
        it); the router's e_score_correction_bias stays float32 as in the model. FP8 weights are
        dequantized in float32 (fp8.weight_dequant), then cast. The compute dtype (ModelConfig.dtype) keeps its default.
      mesh: when given, each parameter is placed straight into its NamedSharding on the mesh (its
        logical axes through dsv3_jax.parallel.mesh.LOGICAL_AXIS_RULES); otherwise on the default
        device.
      keep_fp8: keep FP8 weights quantized. Each parameter filled from F8_E4M3 tensors stays
        float8_e4m3fn in our [I, J] layout (stacked as usual), and a float32 sibling named
        `<leaf>_scale_inv` (`attn/wq_a/kernel_scale_inv`, `ffn/w1_scale_inv`, ...) holds its block
        scales in the same orientation, shape lead + [ceil(I/128), ceil(J/128)]: each item's
        W = fp8.weight_dequant(q, scale_inv). The scales are replicated across the mesh. Such a tree is not accepted by `DeepSeekV3.apply` until an FP8 path exists.
        Without FP8 tensors in the checkpoint this flag changes nothing.
      scan_layers: the layout of the returned tree (ModelConfig.scan_layers): stacked
        `dense_layers/layers/...` (True) or `dense_layers/layers_{i}/...` (False).
      progress: show a tqdm bar over the parameters.

    Returns:
      (cfg, params): params is a nested dict of jax.Arrays with exactly the tree of
      `DeepSeekV3(cfg).init(...)["params"]` (unboxed), plus the scale siblings under keep_fp8.

    Memory: parameters are streamed one at a time and each is assembled one addressable shard at a
    time (a stacked expert array [L, E, D, F] included): a shard is filled on the host from the
    source tensors it covers, one source region at a time, put on its device, then released. Host
    memory beyond the loaded parameters is therefore bounded by one output shard plus the mapped
    pages of one source tensor (only the rows a shard needs are mapped; FP8 dequantization adds a
    band of at most 128 rows in float32); with no mesh the "shard" is the whole parameter. Headers,
    shapes and dtypes are all checked before any weight is read; the MTP layer's copies of the
    embedding and head are compared with the shared ones, chunk by chunk, and dropped.

    Raises:
      HFCheckpointError: naming the file, key or tensor and what was expected.
    """
    dtype_name = np.dtype(dtype).name
    if dtype_name not in layout.PARAM_DTYPES:
        raise HFCheckpointError(f"load_hf_checkpoint: dtype={dtype_name!r}; use one of "
                                f"{layout.PARAM_DTYPES}.")
    hf, source, ckpt = _open_folder(path)
    cfg = config_from_hf(hf, source=source).replace(param_dtype=dtype_name, scan_layers=scan_layers)
    fp8_block = hf_config.fp8_block(hf, source)
    cfg = _present_mtp_depth(cfg, ckpt, source)
    plan = layout.plan(cfg)
    _check_tensors(plan, ckpt, cfg, fp8_block, source)
    shardings = _shardings(cfg, mesh) if mesh is not None else {}
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    replicated = (default if mesh is None
                  else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    params: dict = {}
    for leaf in tqdm(plan, desc="loading", unit="param", disable=not progress):
        names = list(leaf.sources.values())
        is_fp8 = [ckpt.info(n).dtype == "F8_E4M3" for n in names]
        quantized = keep_fp8 and any(is_fp8)
        if quantized and not all(is_fp8):
            raise HFCheckpointError(f"keep_fp8: {'/'.join(leaf.path)} mixes F8_E4M3 and other "
                                    f"tensors (e.g. {names[is_fp8.index(False)]!r}); load with "
                                    "keep_fp8=False to dequantize.")
        out_dtype = np.dtype(ml_dtypes.float8_e4m3fn if quantized else
                             np.float32 if leaf.is_router_bias else dtype_name)
        sharding = shardings.get(leaf.path, default)
        fill = lambda out, index, leaf=leaf, q=quantized: _fill(out, leaf, index, ckpt, fp8_block, q)
        _set(params, leaf.path, _put(leaf.shape, out_dtype, sharding, fill))
        if quantized:  # the scale sibling (see keep_fp8), float32 and replicated
            grid = tuple(-(-d // b) for d, b in zip(leaf.hf_shape, fp8_block))
            scales = dataclasses.replace(
                leaf, shape=leaf.shape[:leaf.n_lead] + (grid[::-1] if leaf.transpose else grid))
            fill = lambda out, index, s=scales: _fill(out, s, index, ckpt, fp8_block, True, True)
            _set(params, leaf.path[:-1] + (leaf.path[-1] + "_scale_inv",),
                 _put(scales.shape, np.dtype(np.float32), replicated, fill))
    return cfg, params

