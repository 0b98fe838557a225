"""The MLA Pallas kernels (ops/pallas/mla_attention_sm90.py, mla_decode_sm90.py) in GPU interpret
mode on the CPU against the jnp references, through the model, lowered for an H100, and the
dispatch in ops/attention.py.

Tolerances. Inputs are bf16 ~ N(0, 1) (never zeros). Kernel and reference both compute scores and
softmax in fp32 from the same bf16 inputs, but the kernel feeds P to the value product in bf16
(the wgmma operand) after an online softmax, while the reference rounds the normalised P to bf16;
both round the output to bf16. Each output element is a convex combination of values of size
<= ~4, so the difference is a few bf16 ulps of the output scale: we allow 2^-6 (4 ulps at the top
binade) of max|reference|. A wrong mask, block index or scale gives errors of order 1 (tested:
masking is checked separately with poisoned inputs). Decode with several splits adds the bf16
rounding of each split's partial output before the combine: one more ulp, same bound.
Gradients (the flash backward kernels against `jax.vjp` of the reference): both recompute the fp32
scores and feed bf16 operands to fp32 products, rounding dq, dk, dv to bf16; the kernel rounds
P^T and dS = P (dP - delta) to bf16 (the wgmma A operands) where the reference rounds P and the
cotangent of P (its probs are bf16). Those roundings are relative 2^-9 per term, of random sign,
in sums over at most T keys or queries: a few bf16 ulps of the gradient's scale again, so the
same 2^-6 of max|reference gradient| (observed about 2^-8: one ulp at the top binade). A missing
segment mask in the dkv kernel gives errors of order 100x the bound (checked by mutation).
The model comparison (bf16 model, kernels vs the reference path) uses the bound of the existing
bf16 decode test, 3e-2 of the logit scale (bf16 activations through a whole block).

Interpret mode is slow (every kernel op is a host callback): shapes are the smallest that still
have several blocks, several CTAs and ragged edges. Interpret mode runs the three warpgroups of a
CTA as threads that block in barrier waits inside XLA host callbacks; with asynchronous CPU
dispatch they share the XLA client's small thread pool (2 threads on 2 cores), which can deadlock,
so this module runs with asynchronous dispatch off.
"""

from __future__ import annotations

import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsv3_jax as ds
from dsv3_jax.model.transformer import DeepSeekV3, init_latent_cache
from dsv3_jax.ops import attention
from dsv3_jax.ops.attention import mla_attention_reference, mla_decode_reference
from dsv3_jax.ops.pallas import mla_attention_sm90, mla_decode_sm90
from dsv3_jax.ops.pallas.hopper import SMEM_BYTES

from conftest import assert_close, init_params, random_tokens

ROOT = pathlib.Path(__file__).resolve().parent.parent
KERNEL_RTOL = 2.0 ** -6  # see the module docstring
MODEL_RTOL = 3e-2


@pytest.fixture(autouse=True, scope="module")
def _synchronous_cpu_dispatch():
    old = jax.config.values["jax_cpu_enable_async_dispatch"]
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    yield
    jax.config.update("jax_cpu_enable_async_dispatch", old)


def _bf16(rng, shape, scale=1.0):
    return jnp.asarray(scale * rng.standard_normal(shape), jnp.bfloat16)


# ------------------------------------------------------------------------------------------------
# Training / prefill flash attention
# ------------------------------------------------------------------------------------------------
def _flash_and_grads(fn, q, k, v, do, **kw):
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, **kw), q, k, v)
    return out, vjp(do)


def _kernel(backward="kernel"):
    return lambda *a, **kw: attention.mla_attention_kernel(*a, **kw, interpret=True,
                                                           backward=backward)


def _assert_grads_close(grads, ref_grads, what):
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert g.shape == r.shape and g.dtype == r.dtype
        assert_close(g, r, KERNEL_RTOL, f"{what}: {name}")


def test_flash_one_tile_several_heads_and_gradients():
    """T = 128 at the V3 head dims (qk 192, v 128): one forward CTA tile (2 warpgroups x 64 rows),
    one dq CTA, two dkv CTAs (the second starts at the second query block), two key blocks, two
    heads, two sequences; forward and the kernel backward's dq, dk, dv against the reference."""
    rng = np.random.default_rng(0)
    b, t, h = 2, 128, 2
    q, k = _bf16(rng, (b, t, h, 192)), _bf16(rng, (b, t, h, 192))
    v, do = _bf16(rng, (b, t, h, 128)), _bf16(rng, (b, t, h, 128))
    out, grads = _flash_and_grads(_kernel(), q, k, v, do, scale=192 ** -0.5)
    assert out.shape == (b, t, h, 128) and out.dtype == jnp.bfloat16
    ref, ref_grads = _flash_and_grads(mla_attention_reference, q, k, v, do, scale=192 ** -0.5)
    assert_close(out, ref, KERNEL_RTOL, "flash forward")
    _assert_grads_close(grads, ref_grads, "kernel backward")


def test_flash_segments_ragged_length_and_gradients():
    """T = 200 (padded to 256: two CTA tiles, four key blocks, a causal dynamic length), three
    packed documents whose boundaries fall inside blocks (rows whose first key blocks are all
    masked), two heads, and dq, dk, dv through the custom_vjp against the reference's: the kernel
    backward (two dq CTAs with 4 and 2 key steps, four dkv CTAs starting at query blocks 0..3, the
    padded rows and keys) and the `backward="reference"` path. Reduced head dims (128 / 64, the
    documented multiples of 64) keep interpret mode fast."""
    rng = np.random.default_rng(1)
    b, t, h = 1, 200, 2
    q, k = _bf16(rng, (b, t, h, 128)), _bf16(rng, (b, t, h, 128))
    v = _bf16(rng, (b, t, h, 64))
    seg = jnp.asarray(np.repeat([3, 5, 6], [70, 61, 69])[None], jnp.int32)
    do = _bf16(rng, (b, t, h, 64))
    kw = dict(scale=0.11, segment_ids=seg)

    out, grads = _flash_and_grads(_kernel(), q, k, v, do, **kw)
    ref, ref_grads = _flash_and_grads(mla_attention_reference, q, k, v, do, **kw)
    assert_close(out, ref, KERNEL_RTOL, "flash forward with segments")
    # The rows of a document equal attention over that document alone (no leak across segments).
    alone = mla_attention_reference(q[:, 70:131], k[:, 70:131], v[:, 70:131], scale=0.11)
    assert_close(out[:, 70:131], alone, KERNEL_RTOL, "second document alone")
    _assert_grads_close(grads, ref_grads, "kernel backward with segments")
    # The second document's keys get gradient only from its own queries.
    _, alone_grads = _flash_and_grads(mla_attention_reference, q[:, 70:131], k[:, 70:131],
                                      v[:, 70:131], do[:, 70:131], scale=0.11)
    _assert_grads_close([g[:, 70:131] for g in grads], alone_grads, "second document alone")
    _, ref_path_grads = _flash_and_grads(_kernel("reference"), q, k, v, do, **kw)
    _assert_grads_close(ref_path_grads, ref_grads, "reference backward")


def test_flash_refuses_unsupported_inputs():
    q = jnp.zeros((1, 64, 2, 96), jnp.bfloat16)
    v = jnp.zeros((1, 64, 2, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="multiple of 64"):
        mla_attention_sm90.mla_attention(q, q, v, scale=0.1)
    q = jnp.zeros((1, 64, 2, 128), jnp.float32)
    with pytest.raises(ValueError, match="bfloat16"):
        mla_attention_sm90.mla_attention(q, q, v.astype(jnp.float32), scale=0.1)
    with pytest.raises(ValueError, match="segment_ids"):
        mla_attention_sm90.mla_attention(q.astype(jnp.bfloat16), q.astype(jnp.bfloat16), v,
                                         scale=0.1, segment_ids=jnp.zeros((1, 63), jnp.int32))
    with pytest.raises(ValueError, match="block_q"):
        mla_attention_sm90.TileConfig(block_q=96)
    with pytest.raises(ValueError, match="block_q_dkv"):
        mla_attention_sm90.TileConfig(block_q_dkv=40)
    with pytest.raises(ValueError, match="backward"):
        attention.mla_attention_kernel(q.astype(jnp.bfloat16), q.astype(jnp.bfloat16), v,
                                       scale=0.1, backward="xla")
    assert not mla_attention_sm90.supports((1, 8, 4, 48), (1, 8, 4, 48), (1, 8, 4, 32),
                                           (jnp.bfloat16,) * 3)


@pytest.mark.parametrize("rows", [16, 64])
def test_flash_dkv_query_steps(rows):
    """The dkv kernel's other query-step widths (block_q_dkv 16: 32-byte swizzled tiles, K = 16
    wgmmas; 64: 128-byte swizzle, the widest) with segment boundaries inside steps and a ragged T
    (100, padded to 128): dq, dk, dv against the reference's vjp."""
    rng = np.random.default_rng(9 + rows)
    b, t, h = 1, 100, 1
    q, k = _bf16(rng, (b, t, h, 128)), _bf16(rng, (b, t, h, 128))
    v, do = _bf16(rng, (b, t, h, 64)), _bf16(rng, (b, t, h, 64))
    seg = jnp.asarray(np.repeat([1, 2, 4], [23, 40, 37])[None], jnp.int32)
    kw = dict(scale=0.09, segment_ids=seg)
    _, ref_grads = _flash_and_grads(mla_attention_reference, q, k, v, do, **kw)
    cfg = mla_attention_sm90.TileConfig(block_q_dkv=rows)
    _, grads = _flash_and_grads(mla_attention_sm90.mla_attention, q, k, v, do, config=cfg,
                                interpret=True, **kw)
    _assert_grads_close(grads, ref_grads, f"kernel backward, block_q_dkv={rows}")


# Tile configs that mosaic_ptxas_check.py found spilling (the fit in mla_attention_sm90), at head
# dims A / O: (kernel, dims, config fields).
SPILLING_CONFIGS = (
    ("forward", (128, 128), dict(block_q=128, stages=2)),  # 292 B spilled
    ("dq", (128, 128), dict(block_kv_bwd=128)),  # dq 60 B, dkv 944 B spilled
    ("dkv", (192, 128), dict(block_q_dkv=64)),  # the former dkv tile: 80 B spilled
    ("dkv", (192, 128), dict(block_q_dkv=48)),  # 40 B spilled
)


@pytest.mark.parametrize("kernel, dims, fields", SPILLING_CONFIGS)
def test_flash_refuses_tile_configs_that_spill(monkeypatch, kernel, dims, fields):
    """A config whose register estimate exceeds its compute warpgroup's setmaxnreg is refused by
    check_dims, naming the kernel, before anything is traced into a kernel (`_flash`, the
    custom_vjp the kernels lower through, must not be reached); the default config passes at V3
    dims."""
    cfg = mla_attention_sm90.TileConfig(**fields)
    a, o = dims
    shapes = ((1, 256, 2, a), (1, 256, 2, a), (1, 256, 2, o))
    # Within shared memory: the refusal is the register one.
    assert (max(mla_attention_sm90.smem_bytes_fwd(cfg, a, o),
                mla_attention_sm90.smem_bytes_bwd(cfg, a, o)) <= SMEM_BYTES)

    def lowered(*args):
        raise AssertionError("mla_attention reached the kernels")

    monkeypatch.setattr(mla_attention_sm90, "_flash", lowered)
    q, k, v = (jnp.zeros(s, jnp.bfloat16) for s in shapes)
    with pytest.raises(ValueError, match=rf"{kernel} kernel: TileConfig\(.*registers per thread"):
        mla_attention_sm90.mla_attention(q, k, v, scale=0.1, config=cfg)
    with pytest.raises(ValueError, match=f"{kernel} kernel"):
        mla_attention_sm90.check_dims(*shapes, (jnp.bfloat16,) * 3, cfg)
    v3 = ((1, 4096, 128, 192), (1, 4096, 128, 192), (1, 4096, 128, 128))
    mla_attention_sm90.check_dims(*v3, (jnp.bfloat16,) * 3)  # the default config: no error
    assert mla_attention_sm90.supports(*v3, (jnp.bfloat16,) * 3)
    need = mla_attention_sm90.registers_per_thread(mla_attention_sm90.DEFAULT_CONFIG, 192, 128)
    assert all(n <= budget for n, budget in need.values()), need


# ------------------------------------------------------------------------------------------------
# Decoding over the latent cache
# ------------------------------------------------------------------------------------------------
def _decode_case(seed, b, t, h, c, r, s):
    rng = np.random.default_rng(seed)
    return (_bf16(rng, (b, t, h, c)), _bf16(rng, (b, t, h, r)), _bf16(rng, (b, s, c + r)))


def test_decode_splits_positions_and_garbage_slots():
    """Two sequences at different positions, two queries each (a 2-token chunk), a cache of 256
    slots in four blocks over two splits (the jnp combine), one sequence seeing only part of its
    first split and none of its second (lse = -inf there). Slots past every position hold large
    values: they must not leak."""
    b, t, h, c, r, s = 2, 2, 2, 128, 64, 256
    q_lat, q_pe, cache = _decode_case(2, b, t, h, c, r, s)
    pos = jnp.asarray([[199, 200], [40, 41]], jnp.int32)
    cache = cache.at[0, 201:].set(30.0).at[1, 42:].set(30.0)
    cfg = mla_decode_sm90.DecodeConfig(splits=2)
    out = mla_decode_sm90.mla_decode(q_lat, q_pe, cache, pos, scale=0.07, config=cfg,
                                     interpret=True)
    assert out.shape == (b, t, h, c) and out.dtype == jnp.bfloat16
    ref = mla_decode_reference(q_lat, q_pe, cache, pos, scale=0.07)
    assert_close(out, ref, KERNEL_RTOL, "decode, two splits")


def test_decode_one_split_one_block():
    """The other extreme: one split (no combine), one block of 64 slots, T = 1, 3 heads."""
    q_lat, q_pe, cache = _decode_case(3, 1, 1, 3, 128, 64, 64)
    pos = jnp.asarray([[63]], jnp.int32)
    out = mla_decode_sm90.mla_decode(q_lat, q_pe, cache, pos, scale=0.1, interpret=True,
                                     config=mla_decode_sm90.DecodeConfig(splits=1))
    assert_close(out, mla_decode_reference(q_lat, q_pe, cache, pos, scale=0.1), KERNEL_RTOL,
                 "decode, one split")


def test_combine_of_splits_equals_whole_softmax():
    """The jnp combine on its own (float32): attention over a cache cut into three splits, one of
    them invisible (lse = -inf), recombined, equals attention over the whole cache."""
    rng = np.random.default_rng(4)
    scores = rng.standard_normal((5, 90))  # [rows, slots]
    values = rng.standard_normal((90, 7))
    visible = np.arange(90)[None] <= np.array([10, 40, 59, 20, 59])[:, None]
    parts, lses = [], []
    for lo, hi in ((0, 30), (30, 60), (60, 90)):
        sc = np.where(visible[:, lo:hi], scores[:, lo:hi], -np.inf) / np.log(2)  # base 2
        m = np.max(sc, axis=1, keepdims=True)
        m = np.where(np.isfinite(m), m, 0.0)
        w = np.exp2(sc - m)
        l = w.sum(1, keepdims=True)
        parts.append(np.where(l > 0, w @ values[lo:hi] / np.where(l > 0, l, 1), 0.0))
        lses.append(np.where(l[:, 0] > 0, m[:, 0] + np.log2(np.where(l[:, 0] > 0, l[:, 0], 1)),
                             -np.inf))
    got = mla_decode_sm90.combine(jnp.asarray(np.stack(parts), jnp.float32),
                                  jnp.asarray(np.stack(lses), jnp.float32))
    full = np.where(visible, scores, -np.inf)
    p = np.exp(full - full.max(1, keepdims=True))
    expected = (p / p.sum(1, keepdims=True)) @ values
    assert_close(got, expected, 1e-5, "combine")  # float32 sums of 90 terms


def test_decode_refuses_unsupported_inputs():
    q_lat = jnp.zeros((1, 1, 2, 96), jnp.bfloat16)
    q_pe = jnp.zeros((1, 1, 2, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="multiple of 128"):
        mla_decode_sm90.mla_decode(q_lat, q_pe, jnp.zeros((1, 64, 160), jnp.bfloat16),
                                   jnp.zeros((1, 1), jnp.int32), scale=0.1)
    with pytest.raises(ValueError, match="q_positions"):
        mla_decode_sm90.mla_decode(jnp.zeros((1, 1, 2, 128), jnp.bfloat16), q_pe,
                                   jnp.zeros((1, 64, 192), jnp.bfloat16),
                                   jnp.zeros((1, 2), jnp.int32), scale=0.1)
    with pytest.raises(ValueError, match="block_s"):
        mla_decode_sm90.DecodeConfig(block_s=32)
    cfg = mla_decode_sm90.DEFAULT_CONFIG
    assert mla_decode_sm90.choose_splits(1, 2, 131072, cfg) == 132  # small batch, long context
    assert mla_decode_sm90.choose_splits(128, 2, 4096, cfg) == 2
    assert mla_decode_sm90.choose_splits(64, 2, 100, cfg) == 1  # never a split under two blocks


# ------------------------------------------------------------------------------------------------
# Through the model and the dispatcher
# ------------------------------------------------------------------------------------------------
# A bf16 model whose MLA dims meet both kernels' multiples: qk 64 + 64 = 128, v 64, latent 128.
# Layers unscanned: flax's nn.scan traces its body to find broadcast variables and refuses the
# host callbacks GPU interpret mode puts there ("broadcasted variable has a data dependency on the
# scan body"); a compiled kernel on a GPU has no callbacks.
KERNEL_CFG = ds.get_model_config("tiny", n_layers=1, n_dense_layers=1, mtp_depth=0,
                                 scan_layers=False, qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=64,
                                 kv_lora_rank=128, init_std=0.05)


def test_model_prefill_and_decode_on_the_kernels_equal_the_forward(monkeypatch):
    """The model's naive path (training forward, flash kernel) against its absorbed path (prefill +
    one decode step, decode kernel), both with DSV3_ATTENTION=sm90, and against the forward on the
    reference: the same logits to bf16 accuracy."""
    cfg = KERNEL_CFG
    params = init_params(cfg)
    model = DeepSeekV3(cfg)
    tokens = random_tokens(cfg, (2, 6), seed=5)
    fwd = lambda: model.apply({"params": params}, tokens, method=DeepSeekV3.forward).logits
    monkeypatch.setenv("DSV3_ATTENTION", "reference")
    full_ref = fwd()
    monkeypatch.setenv("DSV3_ATTENTION", "sm90")
    assert attention.attention_impl() == "sm90"
    full = fwd()
    assert_close(full, full_ref, MODEL_RTOL, "forward, flash kernel vs reference")
    decode = lambda t, pos, cache: model.apply({"params": params}, t, pos, cache,
                                               method=DeepSeekV3.decode)
    prompt = 5
    cache = init_latent_cache(cfg, 2, 64)
    logits, _, cache = decode(tokens[:, :prompt], jnp.broadcast_to(jnp.arange(prompt), (2, prompt)),
                              cache)
    assert_close(logits, full_ref[:, :prompt], MODEL_RTOL, "prefill on the decode kernel")
    logits, _, _ = decode(tokens[:, prompt:], jnp.full((2, 1), prompt), cache)
    assert_close(logits[:, 0], full_ref[:, prompt], MODEL_RTOL, "decode step on the decode kernel")


def test_dispatch(monkeypatch):
    monkeypatch.delenv("DSV3_ATTENTION", raising=False)
    assert attention.attention_impl() == "chunked"  # CPU: the jnp pair (chunked / reference)
    monkeypatch.setenv("DSV3_ATTENTION", "cuda")
    with pytest.raises(ValueError, match="DSV3_ATTENTION"):
        attention.attention_impl()
    # Forced onto the kernels, dims they do not take still run (on the reference).
    monkeypatch.setenv("DSV3_ATTENTION", "sm90")
    rng = np.random.default_rng(6)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 5, 2, d)), jnp.float32) for d in (12, 12, 8))
    np.testing.assert_array_equal(attention.mla_attention(q, k, v, scale=0.3),
                                  mla_attention_reference(q, k, v, scale=0.3))


# ------------------------------------------------------------------------------------------------
# The Mosaic GPU lowering for an H100 at DeepSeek-V3 shapes (no execution)
# ------------------------------------------------------------------------------------------------
def _mosaic_kernels(text):
    return len(re.findall(r"custom_call @mosaic_gpu", text))


@pytest.mark.parametrize("segments", [True, False])
def test_flash_attention_lowers_for_h100(segments):
    """sm_90a lowering at V3 training shapes (T = 4096, H = 128, qk 192 / v 128, with and without
    segments) of the forward alone and of forward + backward (the dq and dkv kernels): wgmma
    operand layouts, TMA boxes on the [B, T, H, dim] layout, shared memory. Not checked here: ptxas
    and its register spills (mosaic_ptxas_check.py; check_dims holds the register estimate fitted
    to it), the run."""
    s = jax.ShapeDtypeStruct
    args = (s((1, 4096, 128, 192), jnp.bfloat16), s((1, 4096, 128, 192), jnp.bfloat16),
            s((1, 4096, 128, 128), jnp.bfloat16), s((1, 4096), jnp.int32))

    def f(q, k, v, seg):
        return mla_attention_sm90.mla_attention(q, k, v, scale=0.135,
                                                segment_ids=seg if segments else None)

    def f_grad(q, k, v, seg):
        out, vjp = jax.vjp(lambda q, k, v: f(q, k, v, seg), q, k, v)
        return vjp(out)

    lower = lambda fn: jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert _mosaic_kernels(lower(f)) == 1
    assert _mosaic_kernels(lower(f_grad)) == 3  # forward, dq, dkv


@pytest.mark.parametrize("b, h, slots", [(64, 128, 4096), (8, 16, 32768)], ids=["v3", "small"])
def test_decode_lowers_for_h100(b, h, slots):
    """sm_90a lowering at the decode shapes of V3 (B = 64, H = 128, a 4096-slot cache) and of the
    small config (B = 8, H = 16, 32K slots): one token, latent 512 + rope 64, several splits."""
    s = jax.ShapeDtypeStruct
    args = (s((b, 1, h, 512), jnp.bfloat16), s((b, 1, h, 64), jnp.bfloat16),
            s((b, slots, 576), jnp.bfloat16), s((b, 1), jnp.int32))
    f = lambda a, b, c, p: mla_decode_sm90.mla_decode(a, b, c, p, scale=0.135)
    text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


@pytest.mark.gpu
@pytest.mark.skipif(jax.devices()[0].platform != "gpu", reason="needs a GPU")
def test_kernels_on_the_gpu():
    """On an H100: the kernels compiled for real, at V3-like shapes, against the references (the
    flash forward and its backward kernels' dq, dk, dv, with segments)."""
    rng = np.random.default_rng(7)
    q, k = _bf16(rng, (1, 1024, 4, 192)), _bf16(rng, (1, 1024, 4, 192))
    v, do = _bf16(rng, (1, 1024, 4, 128)), _bf16(rng, (1, 1024, 4, 128))
    seg = jnp.asarray(np.repeat([0, 1, 2], [300, 500, 224])[None], jnp.int32)
    kw = dict(scale=0.135, segment_ids=seg)
    out, grads = _flash_and_grads(mla_attention_sm90.mla_attention, q, k, v, do, **kw)
    ref, ref_grads = _flash_and_grads(mla_attention_reference, q, k, v, do, **kw)
    assert_close(out, ref, KERNEL_RTOL, "flash on GPU")
    _assert_grads_close(grads, ref_grads, "flash backward on GPU")
    q_lat, q_pe, cache = _decode_case(8, 4, 1, 128, 512, 64, 4096)
    pos = jnp.asarray([[4095], [1000], [1], [2048]], jnp.int32)
    assert_close(mla_decode_sm90.mla_decode(q_lat, q_pe, cache, pos, scale=0.135),
                 mla_decode_reference(q_lat, q_pe, cache, pos, scale=0.135), KERNEL_RTOL,
                 "decode on GPU")


# ------------------------------------------------------------------------------------------------
# The benchmarks' smoke modes
# ------------------------------------------------------------------------------------------------
def _bench(name):
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)


def test_bench_mla_attention_smoke(capsys):
    assert _bench("bench_mla_attention").main(["--smoke"]) == 0
    table = capsys.readouterr().out
    for row in ("pallas flash (ours)", "splash", "chunked jnp", "xla reference"):
        assert f"| {row} |" in table, row
    assert "MISMATCH" not in table


def test_bench_mla_decode_smoke(capsys):
    assert _bench("bench_mla_decode").main(["--smoke"]) == 0
    table = capsys.readouterr().out
    assert "| pallas decode (ours) |" in table and "| tpu decode (ours) |" in table
    assert "| chunked jnp |" in table and "MISMATCH" not in table


@pytest.mark.parametrize("name", ["bench_mla_attention", "bench_mla_decode"])
def test_bench_impls_refuses_an_unknown_row(name):
    with pytest.raises(SystemExit, match=rf"{name}: --impls='ours,foo': unknown \['foo'\]"):
        _bench(name).main(["--impls=ours,foo"])
