"""Multi-head Latent Attention (DeepSeek-V2/V3; SPEC.md section 2).

Letters (`dsv3_jax/NOTATION.md`): B, T query positions, S cache slots,
D, H, N qk nope dim, R rope dim, A = N + R, O v head dim, C kv latent rank, Q q latent rank.

  q        = wq_b(q_norm(wq_a(x)))  or wq(x)          [B, T, H, A]   (q_pe rope'd)
  c_kv|k_pe = wkv_a(x)                               [B, T, C] | [B, T, R]   (k_pe rope'd, 1 head)
  k_nope|v = wkv_b(kv_norm(c_kv))                    [B, T, H, N] | [B, T, H, O]
  out      = wo(softmax(q . [k_nope; k_pe] * scale) v)

Two paths over the same parameters:
- `__call__` (training / prefill) materialises per-head keys and values;
- `decode` (absorbed) caches only `[kv_norm(c_kv) | k_pe]` (C + R values per token) and folds wkv_b
  into the query and output: q_nope' = q_nope W_k [C], o = (P c) W_v^T. The two are equal in exact
  arithmetic; tests check it.
Both attention cores (`ops.attention`, a kernel where the platform has one) are called through
`parallel/kernel_shards.py`, which on a mesh runs them once per shard of (batch, heads).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import ModelConfig
from dsv3_jax.model.layers import Linear, rms_norm
from dsv3_jax.model.rope import apply_rope, rope_frequencies
from dsv3_jax.parallel import kernel_shards


@functools.lru_cache(maxsize=None)
def _frequencies(cfg: ModelConfig) -> np.ndarray:
    return rope_frequencies(cfg)


class MLA(nn.Module):
    cfg: ModelConfig

    def setup(self):
        c = self.cfg
        qk_out = c.n_heads * c.qk_head_dim
        if c.q_lora_rank:
            self.wq_a = Linear(c.dim, c.q_lora_rank, ("embed", "q_lora"), c)
            self.q_norm = rms_norm(c, "q_lora")
            self.wq_b = Linear(c.q_lora_rank, qk_out, ("q_lora", "heads"), c)
        else:
            self.wq = Linear(c.dim, qk_out, ("embed", "heads"), c)
        self.wkv_a = Linear(c.dim, c.kv_lora_rank + c.qk_rope_head_dim, ("embed", "kv_lora"), c)
        self.kv_norm = rms_norm(c, "kv_lora")
        self.wkv_b = Linear(c.kv_lora_rank, c.n_heads * (c.qk_nope_head_dim + c.v_head_dim),
                            ("kv_lora", "heads"), c)
        self.wo = Linear(c.n_heads * c.v_head_dim, c.dim, ("heads", "embed"), c)

    def _queries(self, x, positions):
        """x [B, T, D] -> q_nope [B, T, H, N], q_pe [B, T, H, R] (rope'd)."""
        c = self.cfg
        q = self.wq_b(self.q_norm(self.wq_a(x))) if c.q_lora_rank else self.wq(x)
        q = q.reshape(x.shape[:2] + (c.n_heads, c.qk_head_dim))
        q_nope, q_pe = q[..., :c.qk_nope_head_dim], q[..., c.qk_nope_head_dim:]
        return q_nope, apply_rope(q_pe, positions, _frequencies(c))

    def _latent(self, x, positions):
        """x [B, T, D] -> kv_norm(c_kv) [B, T, C], rope'd k_pe [B, T, R]."""
        c = self.cfg
        kv = self.wkv_a(x)
        c_kv, k_pe = kv[..., :c.kv_lora_rank], kv[..., c.kv_lora_rank:]
        return self.kv_norm(c_kv), apply_rope(k_pe, positions, _frequencies(c))

    def __call__(self, x: jax.Array, positions: jax.Array,
                 segment_ids: jax.Array | None = None) -> jax.Array:
        """Training / prefill path. x [B, T, D], positions int [B, T], segment_ids [B, T] -> [B, T, D]."""
        c = self.cfg
        b, t = x.shape[:2]
        with jax.named_scope("q_proj"):
            q_nope, q_pe = self._queries(x, positions)
        with jax.named_scope("kv_proj"):
            c_kv, k_pe = self._latent(x, positions)
            kv = self.wkv_b(c_kv).reshape(b, t, c.n_heads, c.qk_nope_head_dim + c.v_head_dim)
            k_nope, v = kv[..., :c.qk_nope_head_dim], kv[..., c.qk_nope_head_dim:]
            k_pe = jnp.broadcast_to(k_pe[:, :, None, :], (b, t, c.n_heads, c.qk_rope_head_dim))
        q = jnp.concatenate([q_nope, q_pe], axis=-1)
        k = jnp.concatenate([k_nope, k_pe], axis=-1)
        with jax.named_scope("attention_core"):
            o = kernel_shards.mla_attention(q, k, v, scale=c.softmax_scale, segment_ids=segment_ids)
        return self.wo(o.reshape(b, t, c.n_heads * c.v_head_dim))

    def decode(self, x: jax.Array, positions: jax.Array,
               cache: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Absorbed path over the latent cache.

        Writes the new tokens' `[kv_norm(c_kv) | k_pe]` rows into `cache` at their positions, then
        attends each query to every slot at or before its position.

        Args:
          x: [B, T, D] new tokens (T = 1 for plain decoding, more for chunks or drafts).
          positions: int [B, T] absolute positions, < S.
          cache: [B, S, C + R] this layer's latent cache.
        Returns:
          (out [B, T, D], updated cache [B, S, C + R]).
        """
        c = self.cfg
        b, t = x.shape[:2]
        dtype = jnp.dtype(c.dtype)
        q_nope, q_pe = self._queries(x, positions)
        c_kv, k_pe = self._latent(x, positions)
        rows = jnp.concatenate([c_kv, k_pe], axis=-1).astype(cache.dtype)
        cache = cache.at[jnp.arange(b)[:, None], positions].set(rows)
        w = self.wkv_b.kernel.astype(dtype).reshape(
            c.kv_lora_rank, c.n_heads, c.qk_nope_head_dim + c.v_head_dim)
        w_k, w_v = w[..., :c.qk_nope_head_dim], w[..., c.qk_nope_head_dim:]  # [C, H, N], [C, H, O]
        q_latent = jnp.einsum("bthn,chn->bthc", q_nope, w_k,
                              preferred_element_type=jnp.float32).astype(dtype)
        o_latent = kernel_shards.mla_decode(q_latent, q_pe.astype(dtype), cache, positions,
                                            scale=c.softmax_scale)
        o = jnp.einsum("bthc,cho->btho", o_latent, w_v,
                       preferred_element_type=jnp.float32).astype(dtype)
        return self.wo(o.reshape(b, t, c.n_heads * c.v_head_dim)), cache
