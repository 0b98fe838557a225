"""The one plan for load and save: which Hugging Face tensor fills each item of each parameter.

HF name -> our parameter path (`l` an HF layer, `e` an expert). HF linear weights are [J, I] and our
kernels [I, J], so every `.weight` of a linear layer is transposed; norm scales, the embedding
[V, D] and the router bias are copied as they are.

  model.embed_tokens.weight                          embed/embedding
  model.norm.weight                                  norm/weight
  lm_head.weight                                     head/kernel
  model.layers.{l}.input_layernorm.weight            <block>/attn_norm/weight
  model.layers.{l}.post_attention_layernorm.weight   <block>/ffn_norm/weight
    .self_attn.q_a_proj / q_a_layernorm / q_b_proj   <block>/attn/wq_a, q_norm, wq_b
    .self_attn.q_proj        (q_lora_rank null)      <block>/attn/wq
    .self_attn.kv_a_proj_with_mqa / kv_a_layernorm   <block>/attn/wkv_a, kv_norm
    .self_attn.kv_b_proj / o_proj                    <block>/attn/wkv_b, wo
    .mlp.gate_proj / down_proj / up_proj   (dense)   <block>/ffn/w1, w2, w3 /kernel
    .mlp.gate.weight, .mlp.gate.e_score_correction_bias  <block>/ffn/gate/kernel, e_score_correction_bias
    .mlp.experts.{e}.gate_proj / down_proj / up_proj <block>/ffn/w1[e], w2[e], w3[e]  ([E, D, F], [E, F, D])
    .mlp.shared_experts.gate_proj / down_proj / up_proj  <block>/ffn/shared_experts/w1, w2, w3 /kernel

`<block>` is the block that holds HF layer l, as `dsv3_jax/model/tree.py` lays them out
(`tree.blocks(cfg)`: a scanned stack's leaves are indexed by layer on their leading axis). MTP
module k is HF layer n_layers + k: its block tensors map as above, and, under `tree.mtp_path(k)`,

  model.layers.{n_layers+k}.enorm / hnorm / eh_proj  enorm, hnorm, eh_proj  ([2D, D]: input
                                                     concat[enorm(embedding), hnorm(hidden)])
  model.layers.{n_layers+k}.shared_head.norm.weight  norm/weight
  model.layers.{n_layers+k}.embed_tokens.weight, .shared_head.head.weight: copies of the shared
    embedding and head; on load they must equal them and are dropped, on save they are written back.

RoPE needs no permutation: the checkpoints hold DeepSeek's interleaved layout, which both our model
and transformers (`rope_interleave`) rotate as pairs (2i, 2i+1).

FP8 checkpoints (`quantization_config.quant_method == "fp8"`, e4m3) store the linear weights that
`FP8_WEIGHT` names as F8_E4M3 `q` [J, I] beside F32 `<name>_scale_inv`, the block scales of
`ops/fp8.py`'s `weight_quant` (W = fp8.weight_dequant(q, scale_inv); edge blocks are partial).
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import numpy as np

from dsv3_jax.config import ModelConfig
from dsv3_jax.model import tree

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PARAM_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass
class Leaf:
    """One parameter array and the HF tensors that fill it.

    The array's shape is lead + item: `lead` the stacked axes (scanned layers, then experts), each
    index of which is one HF tensor of shape `item` (or item reversed when `transpose`).
    """

    path: tuple[str, ...]
    shape: tuple[int, ...]
    n_lead: int
    transpose: bool
    sources: dict[tuple[int, ...], str] = dataclasses.field(default_factory=dict)

    @property
    def hf_shape(self) -> tuple[int, ...]:
        item = self.shape[self.n_lead:]
        return item[::-1] if self.transpose else item

    @property
    def is_router_bias(self) -> bool:
        return self.path[-1] == tree.ROUTER_BIAS


# (our path under a block, HF name under model.layers.{i}., transposed, one per expert)
_ATTN = [(("attn_norm", "weight"), "input_layernorm.weight", False),
         (("attn", "wkv_a", "kernel"), "self_attn.kv_a_proj_with_mqa.weight", True),
         (("attn", "kv_norm", "weight"), "self_attn.kv_a_layernorm.weight", False),
         (("attn", "wkv_b", "kernel"), "self_attn.kv_b_proj.weight", True),
         (("attn", "wo", "kernel"), "self_attn.o_proj.weight", True),
         (("ffn_norm", "weight"), "post_attention_layernorm.weight", False)]
_Q_LORA = [(("attn", "wq_a", "kernel"), "self_attn.q_a_proj.weight", True),
           (("attn", "q_norm", "weight"), "self_attn.q_a_layernorm.weight", False),
           (("attn", "wq_b", "kernel"), "self_attn.q_b_proj.weight", True)]
_Q_FULL = [(("attn", "wq", "kernel"), "self_attn.q_proj.weight", True)]
_MLP = [(("w1", "kernel"), "gate_proj.weight", True), (("w2", "kernel"), "down_proj.weight", True),
        (("w3", "kernel"), "up_proj.weight", True)]
# Linear weights quantized in DeepSeek's FP8 release (the router, eh_proj, embedding and head are not).
FP8_WEIGHT = re.compile(r"model\.layers\.\d+\.(self_attn\.(q_a_proj|q_b_proj|q_proj|"
                        r"kv_a_proj_with_mqa|kv_b_proj|o_proj)|mlp\.(experts\.\d+\.|"
                        r"shared_experts\.)?(gate_proj|up_proj|down_proj))\.weight")
IGNORABLE = re.compile(r".*\.rotary_emb\.inv_freq")


def _block_entries(cfg: ModelConfig, moe: bool) -> list[tuple[tuple[str, ...], str, bool, bool]]:
    entries = [(p, n, t, False) for p, n, t in _ATTN + (_Q_LORA if cfg.q_lora_rank else _Q_FULL)]
    if not moe:
        return entries + [(("ffn",) + p, "mlp." + n, t, False) for p, n, t in _MLP]
    entries.append((("ffn", "gate", "kernel"), "mlp.gate.weight", True, False))
    if cfg.has_score_correction_bias:
        entries.append((tree.ROUTER_BIAS_PATH, "mlp.gate.e_score_correction_bias", False, False))
    entries += [(("ffn", p[0]), "mlp.experts.{e}." + n, t, True) for p, n, t in _MLP]
    if cfg.n_shared_experts:
        entries += [(("ffn", "shared_experts") + p, "mlp.shared_experts." + n, t, False) for p, n, t in _MLP]
    return entries


def flat(nested, is_leaf=None) -> dict[tuple[str, ...], object]:
    """{path as a tuple of keys: leaf} of a nested dict of parameters."""
    return {tuple(getattr(k, "key", str(k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(nested, is_leaf=is_leaf)[0]}


def plan(cfg: ModelConfig) -> list[Leaf]:
    """Every parameter leaf of DeepSeekV3(cfg), with the HF tensor behind each of its items."""
    shapes = flat(tree.abstract_params(cfg))
    leaves: dict[tuple[str, ...], Leaf] = {}

    def add(path, lead, name, transpose):
        if path not in leaves:
            if path not in shapes:
                raise AssertionError(f"mapping names {path}, which DeepSeekV3({cfg}) lacks")
            leaves[path] = Leaf(path, tuple(shapes[path].shape), len(lead), transpose)
        leaves[path].sources[lead] = name

    add(("embed", "embedding"), (), "model.embed_tokens.weight", False)
    add(("norm", "weight"), (), "model.norm.weight", False)
    add(("head", "kernel"), (), "lm_head.weight", True)

    def add_block(prefix, lead, layer, moe):
        for rel, name, transpose, per_expert in _block_entries(cfg, moe):
            hf = f"model.layers.{layer}.{name}"
            if per_expert:
                for e in range(cfg.n_routed_experts):
                    add(prefix + rel, lead + (e,), hf.format(e=e), transpose)
            else:
                add(prefix + rel, lead, hf, transpose)

    for block in tree.blocks(cfg):
        for j, layer in enumerate(block.layers):
            add_block(block.path, (j,) if block.scanned else (), layer, block.moe)
    for k in range(cfg.mtp_depth):
        layer, prefix = cfg.n_layers + k, tree.mtp_path(k)
        add(prefix + ("enorm", "weight"), (), f"model.layers.{layer}.enorm.weight", False)
        add(prefix + ("hnorm", "weight"), (), f"model.layers.{layer}.hnorm.weight", False)
        add(prefix + ("eh_proj", "kernel"), (), f"model.layers.{layer}.eh_proj.weight", True)
        add(prefix + ("norm", "weight"), (), f"model.layers.{layer}.shared_head.norm.weight", False)
    uncovered = sorted(set(shapes) - set(leaves))
    incomplete = [l.path for l in leaves.values()
                  if len(l.sources) != math.prod(l.shape[:l.n_lead])]
    if uncovered or incomplete:
        raise AssertionError(f"the HF mapping misses parameters {uncovered} / items of {incomplete}")
    return list(leaves.values())


def mtp_copies(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(MTP layer's copy, the shared tensor it copies) per MTP module: its embedding and head."""
    return [(f"model.layers.{cfg.n_layers + k}.{copy}", shared) for k in range(cfg.mtp_depth)
            for copy, shared in (("embed_tokens.weight", "model.embed_tokens.weight"),
                                 ("shared_head.head.weight", "lm_head.weight"))]


def on_host(quantizer, *args, **kwargs) -> tuple[np.ndarray, ...] | np.ndarray:
    """An `ops/fp8.py` quantizer on host arrays, run on the CPU (no round trip through an
    accelerator; the default device where jax has no CPU backend), its outputs as numpy arrays."""
    try:
        device = jax.local_devices(backend="cpu")[0]
    except RuntimeError:
        device = None
    with jax.default_device(device):
        return jax.tree.map(np.asarray, quantizer(*args, **kwargs))
