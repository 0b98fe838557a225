"""The model's own numbers: parameters, training FLOPs per token, latent KV-cache bytes per token.

Everything is read off `jax.eval_shape` of the model's init, so the 671B preset is measured without
allocating a single weight, and the counts follow the code rather than a formula kept beside it.

Definitions (per token):
- total_params: every parameter of the main model (embedding, head, norms, router biases included;
  MTP modules excluded, as in the paper's 671B).
- active_params: total_params with the routed experts scaled by K/E (a token visits K of E experts);
  embedding and head included (the paper's 37B).
- mtp_params: the MTP modules' own parameters (the embedding and head they share are not repeated).
- forward FLOPs = 2 x active matmul parameters (every weight matrix the token multiplies, the router
  and output head included; the embedding lookup, norms and biases are not matmuls)
  + causal attention: per layer 2 x H x (qk_head_dim + v_head_dim) x (seq_len + 1) / 2, the average
  number of keys a query sees. Each MTP module adds its own block, eh_proj and one more pass through
  the shared head. train_flops_per_token = 3 x forward FLOPs of the main model and the MTP modules
  (backward = 2 x forward).
- kv_cache_bytes_per_token: n_layers x (kv_lora_rank + qk_rope_head_dim) x bytes of the compute
  dtype, the absorbed-MLA latent cache of the main model.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import ModelConfig
from dsv3_jax.model import tree

_NOT_MATMUL = ("embedding", "weight", tree.ROUTER_BIAS)  # lookups, norm scales, biases


@dataclasses.dataclass(frozen=True)
class ModelStats:
    total_params: int
    active_params: int
    mtp_params: int
    train_flops_per_token: float
    forward_flops_per_token: float
    kv_cache_bytes_per_token: int
    seq_len: int


def _counts(params, routed_fraction: float) -> tuple[int, float, float]:
    """(all parameters, active parameters, active matmul parameters) of a params subtree."""
    total, active, matmul = 0, 0.0, 0.0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        size = int(np.prod(leaf.shape))
        share = routed_fraction if tree.is_routed_expert(path) else 1.0
        total += size
        active += size * share
        if getattr(path[-1], "key", None) not in _NOT_MATMUL:
            matmul += size * share
    return total, active, matmul


def _attention_flops(cfg: ModelConfig, n_layers: int, seq_len: int) -> float:
    return 2.0 * n_layers * cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim) * (seq_len + 1) / 2


def model_stats(cfg: ModelConfig, seq_len: int = 4096) -> ModelStats:
    """Parameter counts, FLOPs and cache bytes per token of `cfg` at `seq_len` (see module docs)."""
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"model_stats: seq_len={seq_len!r} must be a positive integer.")
    params = tree.abstract_params(cfg)
    main = {k: v for k, v in params.items() if not tree.is_mtp(k)}
    mtp = {k: v for k, v in params.items() if tree.is_mtp(k)}
    fraction = cfg.n_activated_experts / cfg.n_routed_experts
    total, active, matmul = _counts(main, fraction)
    mtp_total, _, mtp_matmul = _counts(mtp, fraction)
    forward = 2.0 * matmul + _attention_flops(cfg, cfg.n_layers, seq_len)
    forward += cfg.mtp_depth * (2.0 * cfg.dim * cfg.vocab_size + _attention_flops(cfg, 1, seq_len))
    forward += 2.0 * mtp_matmul
    cache_bytes = cfg.n_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    cache_bytes *= jnp.dtype(cfg.dtype).itemsize
    return ModelStats(total_params=total, active_params=int(round(active)), mtp_params=mtp_total,
                      train_flops_per_token=3.0 * forward, forward_flops_per_token=forward,
                      kv_cache_bytes_per_token=int(cache_bytes), seq_len=seq_len)


def presets_table(seq_len: int = 4096) -> str:
    """A Markdown table of every preset's numbers, as printed in the README."""
    from dsv3_jax.config import PRESET_NAMES, get_model_config

    rows = ["| preset | total params | active params | MTP params | train GFLOPs/token "
            f"(seq {seq_len}) | latent KV bytes/token |", "|---|---|---|---|---|---|"]
    for name in PRESET_NAMES:
        s = model_stats(get_model_config(name), seq_len)
        rows.append(f"| {name} | {_human(s.total_params)} | {_human(s.active_params)} | "
                    f"{_human(s.mtp_params)} | {s.train_flops_per_token / 1e9:,.2f} | "
                    f"{s.kv_cache_bytes_per_token:,} |")
    return "\n".join(rows)


def _human(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n == 0:
        return "0"
    return f"{n / 1e3:.1f}K"


if __name__ == "__main__":
    print(presets_table())
