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
functions and never asks which platform it runs on. Which implementation runs is decided here, at
trace time (ops/platform.py reads the machine), fastest proven first:

  mla_attention (training / prefill), forward and backward:
    Hopper GPU (compute capability 9.x):
      1. the Pallas Mosaic GPU kernels `ops/pallas/mla_attention_sm90.py` (causal flash attention,
         forward and dq / dkv backward kernels), where they take the call (bf16/f16; head dims
         multiples of 64 up to 256), behind the safety net below;
      then as any other GPU.
    any NVIDIA GPU:
      2. without segment ids: cuDNN flash attention,
         `jax.nn.dot_product_attention(..., implementation="cudnn", is_causal=True)` with V padded
         with zeros to the qk dim A and the output sliced back to O (cuDNN wants one head dim; the
         zero columns add nothing to P V, and their cotangent is dropped by the slice);
      then as the CPU.
    TPU:
      3. splash attention, jax's Pallas Mosaic TPU kernel, through
         `ops/pallas/splash_attention_tpu.py` (causal, segment ids, the scale folded into q, its
         block sizes from one table), where it takes the call; then as the CPU.
    CPU, and whatever nothing above took:
      4. T >= CHUNKED_MIN_T: the chunked jnp path `ops/chunked_attention.py` (flash attention's
         online softmax over key blocks, causal block skipping, a custom_vjp recomputing the
         probabilities block by block): memory O(T x block), never [B, H, T, T];
      5. shorter: the jnp reference (`mla_attention_reference`; XLA), which materialises the scores.
  mla_decode (latent cache):
    1. Hopper GPU: `ops/pallas/mla_decode_sm90.py` (flash-decoding; latent rank a multiple of 128
       up to 512, rope dim a multiple of 64 dividing it), behind the safety net;
    2. TPU: `ops/pallas/mla_decode_tpu.py` (our Pallas Mosaic TPU kernel, split over cache blocks
       with a log-sum-exp combine), where it takes the call;
    3. S >= CHUNKED_MIN_SLOTS cache slots: the chunked jnp decode (`ops/chunked_attention.py`,
       cache blocks with an online softmax): never [B, H, T, S];
    4. fewer slots: the jnp reference (`mla_decode_reference`).

The thresholds are where the chunked path starts to win on a 2-core CPU (bf16, V3 head dims,
experiments/RESULTS.md): training fwd+bwd at T = 256 the reference 4.3 ms, chunked 6.0 ms; at
T = 1024 83 ms against 60 ms; decode at S = 4096 7.4 ms against 8.3 ms, at S = 8192 33 ms against 11
ms (experiments/bench_mla_attention.py, bench_mla_decode.py). Short sequences keep the
reference, one fused XLA program; on an accelerator without a kernel the block loops only add
sequential steps there. Memory decides beyond: the chunked temporaries are O(T x block).

The safety net (ops/safety_net.py): the first time "auto" dispatch is about to use a GPU path (the
Hopper kernels or cuDNN) for a class of calls (attention: dtype, A, O, segments or not; decode:
dtype, C, R; cuDNN: dtype, A, O), it runs it once at a small shape of the class (B 1, T one kernel
tile) on fresh random inputs against the reference, forward and gradients, at the kernels' stated
tolerance (2^-6 of the largest reference value, tests/test_mla_kernels.py); a path that raises,
hangs or disagrees is skipped with one warning and the next one runs. Verdicts are cached in the
process and on disk. Known-bad toolchains are refused before any probe: CUDA 12.8.0 to 12.9.0,
whose ptxas miscompiles causal masking (jax's own attention_mgpu refuses it too), for both causal
kernels (platform.causal_ptxas_bug). The TPU kernels have no net: no TPU has run them yet (they are
tested in TPU interpret mode and exported for TPU; tests/test_splash_attention.py,
tests/test_mla_decode_tpu.py).

Overrides, read at trace time:
  DSV3_ATTENTION=sm90|cudnn|splash|chunked|reference forces the training / prefill path and skips
    the net ("sm90" or "splash" on a machine without that chip runs the kernels in GPU / TPU
    interpret mode: slow, for tests and benchmark smoke runs; "cudnn" still takes the reference for
    calls with segment ids, which cuDNN's causal mask cannot express). It also forces the decode
    path unless DSV3_DECODE is set: sm90 -> sm90, splash -> tpu, chunked -> chunked,
    reference -> reference (cudnn leaves decode on auto).
  DSV3_DECODE=sm90|tpu|chunked|reference forces the decode path.
  DSV3_KERNEL_CHECK=off keeps "auto" but turns the net off.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp

from dsv3_jax.ops import chunked_attention, platform, safety_net
from dsv3_jax.ops.platform import forced_impl, gpu_interpret, tpu_interpret

_IMPLS = ("auto", "sm90", "cudnn", "splash", "chunked", "reference")
_DECODE_IMPLS = ("auto", "sm90", "tpu", "chunked", "reference")
# What DSV3_ATTENTION forces on decode when DSV3_DECODE is unset (module docstring).
_DECODE_FOLLOWS = {"sm90": "sm90", "splash": "tpu", "chunked": "chunked", "reference": "reference"}
# From these lengths on, "auto" takes the chunked jnp path where no kernel took the call.
CHUNKED_MIN_T = 1024
CHUNKED_MIN_SLOTS = 8192
_PALLAS = pathlib.Path(__file__).resolve().parent / "pallas"
_FLASH_SOURCES = (str(_PALLAS / "mla_attention_sm90.py"), str(_PALLAS / "hopper.py"))
_DECODE_SOURCES = (str(_PALLAS / "mla_decode_sm90.py"), str(_PALLAS / "hopper.py"))
# Kernels vs reference: within 2^-6 of the largest reference value (tests/test_mla_kernels.py).
KERNEL_RTOL = 2.0 ** -6


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
    """What "auto" tries first here for training / prefill, or what DSV3_ATTENTION forces: "sm90"
    (the Pallas Mosaic GPU kernels), "cudnn", "splash", or "chunked" / "reference" (the jnp paths;
    "chunked" forced takes every length, unforced it names the jnp pair, split at CHUNKED_MIN_T)."""
    return forced_impl("DSV3_ATTENTION", _IMPLS) or (
        "sm90" if platform.on_hopper() else "cudnn" if platform.on_gpu()
        else "splash" if platform.on_tpu() else "chunked")


def decode_impl() -> str:
    """What "auto" tries first here for latent-cache decoding, or what DSV3_DECODE (else
    DSV3_ATTENTION, module docstring) forces: "sm90", "tpu", "chunked" or "reference"."""
    return _forced_decode() or ("sm90" if platform.on_hopper() else "tpu" if platform.on_tpu()
                                else "chunked")


def _forced_decode() -> str | None:
    """The decode path DSV3_DECODE forces, else the one DSV3_ATTENTION implies, else None."""
    forced = forced_impl("DSV3_DECODE", _DECODE_IMPLS)
    return forced if forced is not None else _DECODE_FOLLOWS.get(
        forced_impl("DSV3_ATTENTION", _IMPLS))


# ------------------------------------------------------------------------------------------------
# The safety net's checks: one class of calls each, probed at a small shape (module docstring)
# ------------------------------------------------------------------------------------------------
def _normal(key, shape, dtype):
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def _probe_attention(core, dtype, a, o, segments: bool, t: int) -> None:
    """`core(q, k, v, scale, seg)` vs the reference at B 1, T t, H 2: output, dq, dk, dv."""
    keys = jax.random.split(safety_net.fresh_key(), 4)
    q, k = _normal(keys[0], (1, t, 2, a), dtype), _normal(keys[1], (1, t, 2, a), dtype)
    v, do = _normal(keys[2], (1, t, 2, o), dtype), _normal(keys[3], (1, t, 2, o), dtype)
    seg = jnp.where(jnp.arange(t) < t // 2 + 3, 1, 2)[None].astype(jnp.int32) if segments else None
    scale = a ** -0.5

    def out_and_grads(fn):
        out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, scale, seg), q, k, v)
        return out, *vjp(do)

    got = jax.jit(lambda: out_and_grads(core))()
    reference = lambda q, k, v, scale, seg: mla_attention_reference(q, k, v, scale=scale,
                                                                    segment_ids=seg)
    want = jax.jit(lambda: out_and_grads(reference))()
    for name, g, w in zip(("output", "dq", "dk", "dv"), got, want):
        safety_net.compare(name, g, w, KERNEL_RTOL)


def _flash_check(dtype, a: int, o: int, segments: bool) -> safety_net.Check:
    def probe():
        from dsv3_jax.ops.pallas import mla_attention_sm90

        _probe_attention(lambda q, k, v, scale, seg: mla_attention_sm90.mla_attention(
            q, k, v, scale=scale, segment_ids=seg, interpret=gpu_interpret()),
            dtype, a, o, segments, mla_attention_sm90.DEFAULT_CONFIG.t_multiple)

    return safety_net.Check(
        "mla_attention_sm90", f"{jnp.dtype(dtype).name} A={a} O={o}"
        + (" segments" if segments else ""), probe, _FLASH_SOURCES, "DSV3_ATTENTION", "sm90",
        "cudnn" if platform.on_gpu() and not segments else "reference")


def _cudnn_check(dtype, a: int, o: int) -> safety_net.Check:
    return safety_net.Check(
        "cudnn_attention", f"{jnp.dtype(dtype).name} A={a} O={o}",
        lambda: _probe_attention(_cudnn_attention, dtype, a, o, False, 128), (),
        "DSV3_ATTENTION", "cudnn", "reference")


def _decode_check(dtype, c: int, r: int) -> safety_net.Check:
    def probe():
        from dsv3_jax.ops.pallas import mla_decode_sm90

        keys = jax.random.split(safety_net.fresh_key(), 3)
        b, t, h, s = 1, 2, 2, 128  # two cache blocks of 64
        q_lat, q_pe = _normal(keys[0], (b, t, h, c), dtype), _normal(keys[1], (b, t, h, r), dtype)
        cache = _normal(keys[2], (b, s, c + r), dtype)
        pos = jnp.asarray([[90, 91]], jnp.int32)
        scale = (c + r) ** -0.5
        got = jax.jit(lambda: mla_decode_sm90.mla_decode(q_lat, q_pe, cache, pos, scale=scale,
                                                         interpret=gpu_interpret()))()
        want = jax.jit(lambda: mla_decode_reference(q_lat, q_pe, cache, pos, scale=scale))()
        safety_net.compare("decode output", got, want, KERNEL_RTOL)

    return safety_net.Check("mla_decode_sm90", f"{jnp.dtype(dtype).name} C={c} R={r}", probe,
                            _DECODE_SOURCES, "DSV3_ATTENTION", "sm90", "reference")


def _kernel_allowed(check: safety_net.Check, forced: str | None) -> bool:
    """Whether dispatch may use the causal kernel of `check`: always when forced; under "auto"
    unless the toolchain is known bad, then when the net passes it."""
    if forced is not None:
        return True
    if (why := platform.causal_ptxas_bug()) is not None:
        return safety_net.refuse(check, why)
    return safety_net.passes(check)


# ------------------------------------------------------------------------------------------------
# The cores
# ------------------------------------------------------------------------------------------------
def _cudnn_attention(q, k, v, scale, segment_ids=None):
    """cuDNN causal flash attention for O <= A: V padded with zeros to A, the output sliced back."""
    assert segment_ids is None, "cuDNN's path takes no segment ids"
    a, o = q.shape[-1], v.shape[-1]
    v_pad = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, a - o))) if o < a else v
    out = jax.nn.dot_product_attention(q, k, v_pad, scale=scale, is_causal=True,
                                       implementation="cudnn")
    return out[..., :o].astype(q.dtype)


def _cudnn_covers(q, v, segment_ids) -> bool:
    return (segment_ids is None and q.dtype == v.dtype
            and jnp.dtype(q.dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
            and v.shape[-1] <= q.shape[-1])


def _jnp_attention(q, k, v, scale, segment_ids, forced):
    """The chunked path (forced, or T >= CHUNKED_MIN_T) or the reference."""
    if forced == "chunked" or (forced is None and q.shape[1] >= CHUNKED_MIN_T):
        return chunked_attention.mla_attention_chunked(q, k, v, scale=scale,
                                                       segment_ids=segment_ids)
    return mla_attention_reference(q, k, v, scale=scale, segment_ids=segment_ids)


def mla_attention(q, k, v, *, scale, segment_ids=None):
    """Training / prefill attention core; see `mla_attention_reference` for the contract."""
    impl, forced = attention_impl(), forced_impl("DSV3_ATTENTION", _IMPLS)
    if impl == "sm90":
        from dsv3_jax.ops.pallas import mla_attention_sm90  # Mosaic GPU only when used

        if mla_attention_sm90.supports(q.shape, k.shape, v.shape, (q.dtype, k.dtype, v.dtype)):
            check = _flash_check(q.dtype, q.shape[-1], v.shape[-1], segment_ids is not None)
            if _kernel_allowed(check, forced):
                return mla_attention_sm90.mla_attention(q, k, v, scale=scale,
                                                        segment_ids=segment_ids,
                                                        interpret=gpu_interpret())
    if impl == "splash":
        from dsv3_jax.ops.pallas import splash_attention_tpu  # Mosaic TPU only when used

        if splash_attention_tpu.supports(q.shape, k.shape, v.shape, (q.dtype, k.dtype, v.dtype)):
            return splash_attention_tpu.mla_attention(q, k, v, scale=scale,
                                                      segment_ids=segment_ids,
                                                      interpret=tpu_interpret())
    if ((forced == "cudnn" or (forced is None and platform.on_gpu()))
            and _cudnn_covers(q, v, segment_ids)
            and (forced == "cudnn" or safety_net.passes(_cudnn_check(q.dtype, q.shape[-1],
                                                                     v.shape[-1])))):
        return _cudnn_attention(q, k, v, scale)
    return _jnp_attention(q, k, v, scale, segment_ids,
                          forced if forced in ("chunked", "reference") else None)


def mla_decode(q_latent, q_pe, cache, q_positions, *, scale):
    """Latent-cache attention core; see `mla_decode_reference` for the contract."""
    impl, forced = decode_impl(), _forced_decode()
    dtypes = (q_latent.dtype, q_pe.dtype, cache.dtype)
    if impl == "sm90":
        from dsv3_jax.ops.pallas import mla_decode_sm90  # Mosaic GPU only when used

        if mla_decode_sm90.supports(q_latent.shape, q_pe.shape, cache.shape, q_positions.shape,
                                    dtypes):
            check = _decode_check(q_latent.dtype, q_latent.shape[-1], q_pe.shape[-1])
            if _kernel_allowed(check, forced):
                return mla_decode_sm90.mla_decode(q_latent, q_pe, cache, q_positions, scale=scale,
                                                  interpret=gpu_interpret())
    if impl == "tpu":
        from dsv3_jax.ops.pallas import mla_decode_tpu  # Mosaic TPU only when used

        if mla_decode_tpu.supports(q_latent.shape, q_pe.shape, cache.shape, q_positions.shape,
                                   dtypes):
            return mla_decode_tpu.mla_decode(q_latent, q_pe, cache, q_positions, scale=scale,
                                             interpret=tpu_interpret())
    if forced == "chunked" or (forced != "reference" and cache.shape[1] >= CHUNKED_MIN_SLOTS):
        return chunked_attention.mla_decode_chunked(q_latent, q_pe, cache, q_positions,
                                                    scale=scale)
    return mla_decode_reference(q_latent, q_pe, cache, q_positions, scale=scale)


def model_checks(cfg) -> list[safety_net.Check]:
    """The attention classes a ModelConfig uses that a GPU path takes
    (safety_net.check_model_kernels): the flash kernels at (dtype, A, O) with and without
    segments, cuDNN's on a GPU, decode at (dtype, C, R)."""
    from dsv3_jax.ops.pallas import mla_attention_sm90, mla_decode_sm90

    dtype, a, o = jnp.dtype(cfg.dtype), cfg.qk_head_dim, cfg.v_head_dim
    c, r = cfg.kv_lora_rank, cfg.qk_rope_head_dim
    t = mla_attention_sm90.DEFAULT_CONFIG.t_multiple
    checks = []
    if mla_attention_sm90.supports((1, t, 1, a), (1, t, 1, a), (1, t, 1, o), (dtype,) * 3):
        checks += [_flash_check(dtype, a, o, False), _flash_check(dtype, a, o, True)]
    if platform.on_gpu() and o <= a and dtype in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        checks.append(_cudnn_check(dtype, a, o))
    if mla_decode_sm90.supports((1, 1, 1, c), (1, 1, 1, r), (1, 64, c + r), (1, 1), (dtype,) * 3):
        checks.append(_decode_check(dtype, c, r))
    return checks


safety_net.register_model_checks("attention", model_checks)


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
