"""Basic layers: linear projection, RMSNorm, embedding, SwiGLU MLP.

Letters (`dsv3_jax/NOTATION.md`): B, T, D, F, V.

Every parameter is created through `param_with_axes`, so it carries logical axis names that
`dsv3_jax/parallel/mesh.py` maps to mesh axes; nothing here knows about devices or the platform.
XLA partitions the plain matmul; the FP8 one is a kernel call that XLA cannot partition, so it goes
through `parallel/kernel_shards.py`, which runs it once per shard of the mesh in context (if any),
given the kernel's logical axes. Weights are kept in `param_dtype` (fp32 master weights) and cast to
the compute `dtype` at use.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsv3_jax.config import ModelConfig
from dsv3_jax.parallel.kernel_shards import fp8_linear

def param_with_axes(module: nn.Module, name: str, init, shape: Sequence[int],
                    axes: Sequence[str | None], dtype) -> jax.Array:
    """`module.param` whose value carries logical axis names (one per dim of `shape`)."""
    if len(axes) != len(shape):
        raise ValueError(f"{name}: {len(axes)} axis names {axes} for shape {tuple(shape)}")
    return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), dtype)


def constrain_activation(x: jax.Array) -> jax.Array:
    """Pins the sharding of a block-boundary activation [B, T, D] (a no-op without a mesh)."""
    return nn.with_logical_constraint(x, ("activation_batch", "activation_length",
                                          "activation_embed"))


class Linear(nn.Module):
    """y = x @ kernel, kernel [in, out], no bias (DeepSeek-V3 has no linear biases).

    The product is taken in the compute dtype with float32 accumulation and returned in the compute
    dtype, or in `out_dtype` when given (the output head returns float32 logits). With `cfg.fp8` a
    projection with `fp8=True` (the default) goes through `ops.fp8.fp8_linear` instead (FP8 Fprop,
    Dgrad and Wgrad GEMMs, fp32 master weight and gradient), called per shard on a mesh
    (`parallel.kernel_shards.fp8_linear`: rows over the batch axes, `axes` giving the kernel's
    split); the output head sets `fp8=False`, as the recipe keeps it in the compute dtype
    (SPEC.md section 3).
    """

    in_features: int
    features: int
    axes: tuple[str | None, str | None]  # logical names of (in, out)
    cfg: ModelConfig
    out_dtype: str | None = None
    fp8: bool = True  # may run in FP8 when cfg.fp8

    def setup(self):
        self.kernel = param_with_axes(self, "kernel", nn.initializers.normal(self.cfg.init_std),
                                      (self.in_features, self.features), self.axes,
                                      jnp.dtype(self.cfg.param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., in] -> [..., features]."""
        dtype = jnp.dtype(self.cfg.dtype)
        if self.cfg.fp8 and self.fp8:
            out = fp8_linear(x.astype(dtype), self.kernel, self.axes)
            return out.astype(self.out_dtype or dtype)
        out = jnp.dot(x.astype(dtype), self.kernel.astype(dtype),
                      preferred_element_type=jnp.float32)
        return out.astype(self.out_dtype or dtype)


class RMSNorm(nn.Module):
    """y = (x_f32 * rsqrt(mean(x_f32^2) + eps)).astype(x.dtype) * weight (SPEC.md section 2)."""

    axis_name: str | None
    eps: float = 1e-6
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., N] -> [..., N], same dtype."""
        weight = param_with_axes(self, "weight", nn.initializers.ones, (x.shape[-1],),
                                 (self.axis_name,), jnp.dtype(self.param_dtype))
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return normed.astype(x.dtype) * weight.astype(x.dtype)


def rms_norm(cfg: ModelConfig, axis_name: str | None, name: str | None = None) -> RMSNorm:
    return RMSNorm(axis_name=axis_name, eps=cfg.norm_eps, param_dtype=cfg.param_dtype, name=name)


class Embed(nn.Module):
    """Token embedding table [V, D]; lookup returns the compute dtype."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        """tokens int [B, T] -> [B, T, D]."""
        table = param_with_axes(self, "embedding", nn.initializers.normal(self.cfg.init_std),
                                (self.cfg.vocab_size, self.cfg.dim), ("vocab", "embed"),
                                jnp.dtype(self.cfg.param_dtype))
        # Rows are looked up whole: a table whose model dim is split (FSDP) would hand back
        # activations split along D, which the batch-sharded blocks cannot take cheaply.
        table = nn.with_logical_constraint(table, ("vocab", None))
        return jnp.take(table, tokens, axis=0).astype(jnp.dtype(self.cfg.dtype))


class MLP(nn.Module):
    """SwiGLU feed-forward: w2(silu(w1 x) * w3 x). Dense layers and shared experts use it."""

    cfg: ModelConfig
    hidden: int

    def setup(self):
        d = self.cfg.dim
        self.w1 = Linear(d, self.hidden, ("embed", "mlp"), self.cfg)
        self.w3 = Linear(d, self.hidden, ("embed", "mlp"), self.cfg)
        self.w2 = Linear(self.hidden, d, ("mlp", "embed"), self.cfg)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., D] -> [..., D]."""
        return self.w2(nn.silu(self.w1(x)) * self.w3(x))
