"""MLA attention cores: the one place that chooses an implementation per platform.

Letters (dsv3_jax/NOTATION.md): B batch, T query positions, S key positions or cache slots,
H heads, A qk head dim (nope + rope), O v head dim, C kv latent rank, R qk rope head dim.

Two cores, each with its plain-jnp reference below:
- `mla_attention` (training / prefill): per-head keys and values materialised, causal over index,
  optional segment ids so packed documents never attend across each other.
- `mla_decode` (absorbed form over the latent cache): queries already multiplied into the latent
  space, scored against cached rows `[c (C) | k_pe (R)]` shared by all heads; a cache slot holds the
  token at that absolute position, so a query at position p sees slots 0..p.

Both compute scores and softmax in float32 and return the query dtype. Model code calls these
functions and never asks which platform it runs on. Which implementation runs is decided here, in
`attention_impl` (read at trace time: ops/platform.py):
- Hopper GPU (compute capability 9.x): the Pallas Mosaic GPU kernels
  `ops/pallas/mla_attention_sm90.py` (causal flash attention, forward and backward kernels) and
  `ops/pallas/mla_decode_sm90.py` (flash-decoding over the latent cache), when the dims and dtypes
  meet the kernels' requirements (bf16/f16; head dims multiples of 64; latent rank a multiple of
  128 up to 512); anything else falls back to the reference.
- TPU: the reference (XLA). Splash attention (Pallas Mosaic TPU) is the candidate there; not done.
- CPU and other GPUs: the reference.
DSV3_ATTENTION=reference|sm90 in the environment overrides the choice; "sm90" on a machine without
a GPU runs the kernels in GPU interpret mode (slow; tests and benchmark smoke runs).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv3_jax.ops.platform import forced_impl, gpu_interpret, on_hopper

_IMPLS = ("auto", "sm90", "reference")


def _einsum_f32(spec: str, *operands: jax.Array) -> jax.Array:
    """einsum with float32 inputs and accumulation. Upcasting bf16 operands is exact (their products
    fit in float32), and XLA:CPU cannot run every bf16 x bf16 -> f32 dot layout."""
    return jnp.einsum(spec, *(x.astype(jnp.float32) for x in operands))


def _softmax_f32(scores: jax.Array, mask: jax.Array) -> jax.Array:
    """Masked softmax over the last axis; scores float32. Rows always keep at least one key."""
    return jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1)


def mla_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float,
                            segment_ids: jax.Array | None = None) -> jax.Array:
    """Causal attention with a qk head dim different from the v head dim.

    Args:
      q: [B, T, H, A]; k: [B, T, H, A]; v: [B, T, H, O].
      scale: softmax scale (ModelConfig.softmax_scale).
      segment_ids: optional int [B, T]; a query attends only to keys of its own segment.
    Returns:
      [B, T, H, O] in q's dtype.
    """
    t = q.shape[1]
    scores = _einsum_f32("btha,bsha->bhts", q, k) * scale
    mask = jnp.tril(jnp.ones((t, t), dtype=bool))[None, None]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    probs = _softmax_f32(scores, mask).astype(v.dtype)
    out = _einsum_f32("bhts,bsho->btho", probs, v)
    return out.astype(q.dtype)


def mla_decode_reference(q_latent: jax.Array, q_pe: jax.Array, cache: jax.Array,
                         q_positions: jax.Array, *, scale: float) -> jax.Array:
    """Absorbed MLA attention over the latent cache.

    Args:
      q_latent: [B, T, H, C], q_nope multiplied by each head's W_k (q_nope' in SPEC.md).
      q_pe: [B, T, H, R], rope'd query part.
      cache: [B, S, C + R], rows `[kv_norm(c_kv) | rope'd k_pe]`; slot s holds position s.
      q_positions: int [B, T], absolute position of each query (slots <= it are visible).
      scale: softmax scale.
    Returns:
      [B, T, H, C]: attention-weighted latent rows, to be multiplied by W_v.
    """
    c_rank = q_latent.shape[-1]
    c, k_pe = cache[..., :c_rank], cache[..., c_rank:]
    scores = (_einsum_f32("bthc,bsc->bhts", q_latent, c)
              + _einsum_f32("bthr,bsr->bhts", q_pe, k_pe)) * scale
    slots = jnp.arange(cache.shape[1])
    mask = (slots[None, None, :] <= q_positions[:, :, None])[:, None]  # [B, 1, T, S]
    probs = _softmax_f32(scores, mask).astype(cache.dtype)
    out = _einsum_f32("bhts,bsc->bthc", probs, c)
    return out.astype(q_latent.dtype)


def attention_impl() -> str:
    """"sm90" (the Pallas Mosaic GPU kernels) or "reference" here (module docstring)."""
    return forced_impl("DSV3_ATTENTION", _IMPLS) or ("sm90" if on_hopper() else "reference")


def mla_attention(q, k, v, *, scale, segment_ids=None):
    """Training / prefill attention core; see `mla_attention_reference` for the contract."""
    if attention_impl() == "sm90":
        from dsv3_jax.ops.pallas import mla_attention_sm90  # Mosaic GPU only when used

        if mla_attention_sm90.supports(q.shape, k.shape, v.shape, (q.dtype, k.dtype, v.dtype)):
            return mla_attention_sm90.mla_attention(q, k, v, scale=scale, segment_ids=segment_ids,
                                                    interpret=gpu_interpret())
    return mla_attention_reference(q, k, v, scale=scale, segment_ids=segment_ids)


def mla_decode(q_latent, q_pe, cache, q_positions, *, scale):
    """Latent-cache attention core; see `mla_decode_reference` for the contract."""
    if attention_impl() == "sm90":
        from dsv3_jax.ops.pallas import mla_decode_sm90  # Mosaic GPU only when used

        if mla_decode_sm90.supports(q_latent.shape, q_pe.shape, cache.shape, q_positions.shape,
                                    (q_latent.dtype, q_pe.dtype, cache.dtype)):
            return mla_decode_sm90.mla_decode(q_latent, q_pe, cache, q_positions, scale=scale,
                                              interpret=gpu_interpret())
    return mla_decode_reference(q_latent, q_pe, cache, q_positions, scale=scale)


def mla_attention_kernel(q, k, v, *, scale, segment_ids=None, backward: str = "kernel",
                         **kernel_options):
    """The Hopper flash-attention kernel (`ops/pallas/mla_attention_sm90.py`; its input checks
    apply, no fallback), the contract of `mla_attention_reference`. backward: "kernel" (the dq and
    dkv kernels) or "reference" (dq, dk, dv recomputed through `jax.vjp` of
    `mla_attention_reference`: materialises the [T, T] scores; kept to compare against).
    kernel_options: the kernel's `config` and `interpret`."""
    from dsv3_jax.ops.pallas import mla_attention_sm90  # Mosaic GPU only when used

    if backward not in ("kernel", "reference"):
        raise ValueError(f"mla_attention_sm90: backward={backward!r}; expected 'kernel' or "
                         "'reference'.")
    kernel = lambda q, k, v, seg: mla_attention_sm90.mla_attention(
        q, k, v, scale=scale, segment_ids=seg, **kernel_options)
    if backward == "kernel":
        return kernel(q, k, v, segment_ids)
    flash = jax.custom_vjp(kernel)

    def flash_bwd(residuals, do):  # the reference's dq, dk, dv; none for the segment ids
        *qkv, seg = residuals
        _, vjp = jax.vjp(lambda *a: mla_attention_reference(*a, scale=scale, segment_ids=seg), *qkv)
        return (*vjp(do), None if seg is None else jnp.zeros(seg.shape, jax.dtypes.float0))

    flash.defvjp(lambda *args: (kernel(*args), args), flash_bwd)
    return flash(q, k, v, segment_ids)
