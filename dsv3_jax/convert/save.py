"""Writing params as a Hugging Face checkpoint folder: `save_hf_checkpoint`, the inverse of
`load_hf_checkpoint` through the same plan (`layout.plan`), tensor by tensor.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

from absl import logging
import flax.linen as nn
import jax
import numpy as np
from tqdm.auto import tqdm

from dsv3_jax.config import ModelConfig
from dsv3_jax.convert import layout
from dsv3_jax.convert import safetensors as st
from dsv3_jax.convert.hf_config import CONFIG_FILE, HFCheckpointError, config_to_hf
from dsv3_jax.convert.layout import INDEX_FILE, SINGLE_FILE
from dsv3_jax.files import atomic_dir
from dsv3_jax.model import tree
from dsv3_jax.ops import fp8

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
_FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
               "weight_block_size": [fp8.BLOCK, fp8.BLOCK]}


@dataclasses.dataclass(frozen=True)
class _Out(st.TensorSpec):
    """One tensor of the exported checkpoint: item `lead` of parameter `path`."""

    path: tuple[str, ...]
    lead: tuple[int, ...]
    transpose: bool
    role: str = "plain"  # "plain", "fp8" (the quantized weight) or "scale" (its weight_scale_inv)


def _sort_key(name: str):
    """Embedding, layers in order (numbers compared as numbers), final norm, head; a weight's
    `_scale_inv` right after it."""
    group = 1 if name.startswith("model.layers.") else {"model.embed_tokens.weight": 0,
                                                        "model.norm.weight": 2}.get(name, 3)
    return (group, [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split(".")])


def _check_params(cfg: ModelConfig, params) -> dict[tuple[str, ...], Any]:
    flat = layout.flat(nn.unbox(params))
    shapes = layout.flat(tree.abstract_params(cfg))
    missing, extra = sorted(set(shapes) - set(flat)), sorted(set(flat) - set(shapes))
    if missing or extra:
        raise HFCheckpointError(
            "save_hf_checkpoint: params do not match DeepSeekV3(cfg): "
            + (f"missing {['/'.join(p) for p in missing[:5]]} " if missing else "")
            + (f"unexpected {['/'.join(p) for p in extra[:5]]} " if extra else "")
            + "(is cfg the config these params were built with, incl. scan_layers?).")
    for p, want in shapes.items():
        if tuple(np.shape(flat[p])) != tuple(want.shape):
            raise HFCheckpointError(f"save_hf_checkpoint: params {'/'.join(p)} has shape "
                                    f"{tuple(np.shape(flat[p]))}; cfg implies {tuple(want.shape)}.")
    return flat


def _outputs(cfg: ModelConfig, flat: dict, quantize: bool, dtype: str | None) -> list[_Out]:
    outs = []
    for leaf in layout.plan(cfg):
        code = "F32" if leaf.is_router_bias else st.dtype_code(dtype or np.dtype(flat[leaf.path].dtype))
        for lead, name in sorted(leaf.sources.items()):
            item = (leaf.path, lead, leaf.transpose)
            if quantize and layout.FP8_WEIGHT.fullmatch(name):
                grid = tuple(-(-d // fp8.BLOCK) for d in leaf.hf_shape)
                outs += [_Out(name, "F8_E4M3", leaf.hf_shape, *item, "fp8"),
                         _Out(name + "_scale_inv", "F32", grid, *item, "scale")]
            else:
                outs.append(_Out(name, code, leaf.hf_shape, *item))
    by_name = {o.name: o for o in outs}
    for copy, shared in layout.mtp_copies(cfg):
        outs.append(dataclasses.replace(by_name[shared], name=copy))
    return sorted(outs, key=lambda o: _sort_key(o.name))


# fp8.weight_quant compiled as written: XLA's algebraic simplifier turns its `/ s` into `* (1 / s)`,
# which differs from the division in the last bit of some scales and values; checkpoints hold the
# divided ones (a loaded FP8 checkpoint saves back to the same bytes).
_weight_quant = jax.jit(fp8.weight_quant, compiler_options={"xla_disable_hlo_passes": "algsimp"})


def quantize_fp8(w) -> tuple[np.ndarray, np.ndarray]:
    """fp8.weight_quant(w) on the host, divisions rounded exactly: w [J, I] (HF orientation) ->
    numpy (q float8_e4m3fn [J, I], scale_inv float32 [ceil(J/128), ceil(I/128)])."""
    return layout.on_host(_weight_quant, w)


def _host_item(flat: dict, path: tuple[str, ...], lead: tuple[int, ...], transpose: bool):
    """Item `lead` of parameter `path` on the host, in HF orientation: a parameter on one CPU
    device is viewed without a copy; otherwise the item is sliced on its devices and only that
    slice is brought to the host."""
    array = flat[path]
    if isinstance(array, jax.Array) and not (
            len(array.devices()) == 1 and next(iter(array.devices())).platform == "cpu"):
        value = np.asarray(array[lead]) if lead else np.asarray(array)
    else:
        value = np.asarray(array)[lead]
    return value.T if transpose else value


def _shards(outs: list[_Out], max_shard_bytes: int) -> list[list[_Out]]:
    shards: list[list[_Out]] = [[]]
    size = 0
    for out in outs:
        if shards[-1] and size + out.nbytes > max_shard_bytes and out.role != "scale":
            shards.append([])
            size = 0
        shards[-1].append(out)
        size += out.nbytes
    return shards


def save_hf_checkpoint(path: str, cfg: ModelConfig, params, *,
                       max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, fp8: bool = False,
                       dtype=None, progress: bool = False) -> str:
    """Writes `params` as a Hugging Face DeepSeek-V3 checkpoint folder that transformers'
    `DeepseekV3ForCausalLM.from_pretrained` loads (and `load_hf_checkpoint` reads back bit for bit).

    Layout: config.json (current transformers style, `rope_parameters`; see `config_to_hf`), and
    model.safetensors, or model-0000i-of-0000N.safetensors + model.safetensors.index.json when the
    tensors exceed `max_shard_bytes` (a shard holds at least one tensor). Tensor names and
    orientation follow `layout` (one tensor per routed expert; the MTP copies written back).

    Args:
      path: a folder that does not exist yet (or is empty); written under a temporary name and
        renamed when complete, so a failed save leaves nothing behind under `path`.
      cfg, params: the model; params unboxed or boxed, on any devices (`scan_layers` either way).
      max_shard_bytes: the size above which a new shard file starts.
      fp8: write the blocks' linear weights (attention, dense MLP, experts, shared experts) as
        F8_E4M3 with the 128x128 float32 block scales `<name>_scale_inv` of `quantize_fp8` and
        DeepSeek's `quantization_config`; the router, eh_proj, norms, embedding and head are not
        quantized.
      dtype: the dtype of the written (unquantized) tensors; None keeps each parameter's own dtype.
        The router bias is always float32.
      progress: show a tqdm bar over the tensors.

    Host memory: one tensor (one expert's matrix, one layer's norm, ...) at a time, plus its FP8
    quantization when `fp8`.

    Returns:
      the folder path.
    """
    path = os.fspath(path)
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise HFCheckpointError(f"save_hf_checkpoint: {path} already exists and is not an empty "
                                "folder; choose a new path (nothing is overwritten).")
    if not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise HFCheckpointError(f"save_hf_checkpoint: max_shard_bytes={max_shard_bytes!r}; use a "
                                "positive number of bytes, e.g. 5 * 2**30.")
    dtype = None if dtype is None else np.dtype(dtype)
    if dtype is not None and dtype.name not in layout.PARAM_DTYPES:
        raise HFCheckpointError(f"save_hf_checkpoint: dtype={dtype.name!r}; use one of "
                                f"{layout.PARAM_DTYPES} or None.")
    if cfg.score_func != "sigmoid":
        logging.warning("save_hf_checkpoint: score_func=%r: the checkpoint records scoring_func and "
                        "topk_method, but transformers' DeepseekV3 implements sigmoid routing only "
                        "and will not reproduce this model's logits.", cfg.score_func)
    flat = _check_params(cfg, params)
    outs = _outputs(cfg, flat, fp8, dtype)
    shards = _shards(outs, max_shard_bytes)
    names = ([SINGLE_FILE] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    write_dtype = np.dtype(dtype or flat[("embed", "embedding")].dtype).name
    # An FP8 weight's q and scale_inv are written in a row (`_sort_key`): quantized once for both.
    quantized = functools.lru_cache(maxsize=1)(lambda *item: quantize_fp8(_host_item(flat, *item)))
    with atomic_dir(path) as partial:  # an empty folder at `path` is replaced, checked above
        bar = tqdm(total=len(outs), desc="saving", unit="tensor", disable=not progress)

        def produce(out: _Out) -> np.ndarray:
            bar.update(1)
            item = (out.path, out.lead, out.transpose)
            if out.role == "plain":
                return _host_item(flat, *item)
            return quantized(*item)[0 if out.role == "fp8" else 1]

        total = sum(st.write_file(os.path.join(partial, fname), shard, produce, {"format": "pt"})
                    for fname, shard in zip(names, shards))
        bar.close()
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(o.nbytes for o in outs)},
                     "weight_map": {o.name: f for f, shard in zip(names, shards) for o in shard}}
            with open(os.path.join(partial, INDEX_FILE), "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2)
        with open(os.path.join(partial, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(config_to_hf(cfg, dtype=write_dtype,
                                   quantization_config=_FP8_CONFIG if fp8 else None), f, indent=2)
    logging.info("wrote %s: %d tensors in %d file(s), %.1f MB", path, len(outs), len(shards), total / 1e6)
    return path

