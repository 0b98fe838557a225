"""Interleaved rotary position embedding with YaRN frequency interpolation (SPEC.md section 2).

Letters (`dsv3_jax/NOTATION.md`): B, T, H, R rope dims (even), R/2 rotation pairs.

Pairs are dimensions (2i, 2i+1) of the R rope dims, rotated by angle `pos * f_i` with
`f_i = theta^(-2i/R)`. When the model's context exceeds `original_seq_len`, YaRN blends each
frequency between itself and `f_i / rope_factor` along a linear ramp over the pair index:
`f_i' = f_i / s * ramp_i + f_i * (1 - ramp_i)`; the matching attention-scale correction (mscale)
lives in `ModelConfig.softmax_scale`.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import ModelConfig


def yarn_correction_range(cfg: ModelConfig) -> tuple[float, float]:
    """(low, high) pair indices of the YaRN ramp; for the 671B preset (10, 23)."""
    d, base, l0 = cfg.qk_rope_head_dim, cfg.rope_theta, cfg.original_seq_len

    def corr_dim(rotations: float) -> float:
        return d * math.log(l0 / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(corr_dim(cfg.beta_fast)), 0)
    high = min(math.ceil(corr_dim(cfg.beta_slow)), d - 1)
    if low == high:
        high += 0.001
    return low, high


def rope_frequencies(cfg: ModelConfig) -> np.ndarray:
    """Angular frequency of each rotation pair, YaRN-corrected when it applies. float64 [R/2]."""
    d = cfg.qk_rope_head_dim
    freqs = 1.0 / cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
    if cfg.use_yarn:
        low, high = yarn_correction_range(cfg)
        ramp = np.clip((np.arange(d // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
        freqs = freqs / cfg.rope_factor * ramp + freqs * (1.0 - ramp)
    return freqs


def apply_rope(x: jnp.ndarray, positions: jnp.ndarray, freqs: np.ndarray) -> jnp.ndarray:
    """Rotates interleaved pairs of the last axis.

    Args:
      x: [B, T, ..., R] (any number of axes between T and R, e.g. heads).
      positions: int [B, T] absolute positions.
      freqs: [R/2] from `rope_frequencies`.
    Returns:
      x rotated, same shape and dtype; the rotation is computed in float32.
    """
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(freqs, jnp.float32)  # [B,T,R/2]
    angles = angles.reshape(angles.shape[:2] + (1,) * (x.ndim - 3) + angles.shape[-1:])
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    pairs = x.astype(jnp.float32).reshape(x.shape[:-1] + (x.shape[-1] // 2, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
    return rotated.reshape(x.shape).astype(x.dtype)


def yarn_summary(cfg: ModelConfig) -> dict:
    """The RoPE/YaRN constants a model runs with, as plain numbers (logged at a run's start and
    kept in its checkpoints' meta): the report's scale s (rope_factor), alpha (beta_slow), beta
    (beta_fast), sqrt(t) = 0.1 mscale ln s + 1 (the attention-logit factor, applied squared in
    ModelConfig.softmax_scale), the ramp's pair range, and whether YaRN is on at all."""
    summary = {"use_yarn": cfg.use_yarn, "max_seq_len": cfg.max_seq_len,
               "original_seq_len": cfg.original_seq_len, "rope_theta": cfg.rope_theta,
               "softmax_scale": cfg.softmax_scale}
    if cfg.use_yarn:
        low, high = yarn_correction_range(cfg)
        summary.update(scale=cfg.rope_factor, alpha=cfg.beta_slow, beta=cfg.beta_fast,
                       mscale=cfg.mscale, sqrt_t=cfg.yarn_attention_factor,
                       ramp_pairs=[low, high])
    return summary
