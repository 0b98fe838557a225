"""The chunked jnp attention (ops/chunked_attention.py) against the references, its memory, and the
dispatch that picks it.

Tolerances. float32: the chunked path sums the same float32 products as the reference in another
order (block by block, rescaled by the online softmax), so outputs and gradients agree to a few
float32 ulps of the largest value; 1e-5 relative to the largest reference value leaves ~10x margin
over the measured ~1e-6. bfloat16 inputs: the reference rounds its normalised probabilities to
bf16 before P V and the chunked path does not, so they differ by about that rounding; the bound
is the kernels' KERNEL_RTOL (2^-6 of the largest reference value, ops/attention.py). Against a
float64 numpy version of SPEC's equations (softmax of masked q k^T / sqrt, times v), the float32
path is within 1e-5 too.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.model.transformer import DeepSeekV3
from dsv3_jax.ops import attention, chunked_attention
from dsv3_jax.ops.attention import KERNEL_RTOL, mla_attention_reference, mla_decode_reference
from dsv3_jax.ops.chunked_attention import mla_attention_chunked, mla_decode_chunked

from conftest import TINY32, assert_close, init_params, random_tokens

F32_RTOL = 1e-5


def _qkv(key, b, t, h, a, o, dtype=jnp.float32):
    ks = jax.random.split(key, 4)
    q, k = (jax.random.normal(ks[i], (b, t, h, a), jnp.float32).astype(dtype) for i in (0, 1))
    v = jax.random.normal(ks[2], (b, t, h, o), jnp.float32).astype(dtype)
    do = jax.random.normal(ks[3], (b, t, h, o), jnp.float32).astype(dtype)
    return q, k, v, do


def _segments(b, t, seed):
    """int [B, T]: 1-4 packed documents per row, boundaries anywhere (inside blocks)."""
    rng = np.random.default_rng(seed)
    rows = [np.searchsorted(np.sort(rng.choice(np.arange(1, t), rng.integers(0, 4),
                                               replace=False)), np.arange(t), side="right")
            for _ in range(b)]
    return jnp.asarray(np.stack(rows), jnp.int32)


def _out_and_grads(fn, q, k, v, do):
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(do))


def _numpy_attention(q, k, v, scale, seg):
    """SPEC's causal attention in float64: softmax(mask(q k^T * scale)) v, per (b, h)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    t = q.shape[1]
    s = np.einsum("btha,bsha->bhts", q, k) * scale
    mask = np.tril(np.ones((t, t), bool))[None, None]
    if seg is not None:
        seg = np.asarray(seg)
        mask = mask & (seg[:, None, :, None] == seg[:, None, None, :])
    s = np.where(mask, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhts,bsho->btho", p, v)


# (T, block_q, block_k): one block, T a multiple of both, T ending inside a block, unequal blocks.
SHAPES = [(40, 64, 64), (96, 32, 32), (100, 16, 32), (77, 32, 16)]


@pytest.mark.parametrize("t,bq,bk", SHAPES, ids=[f"T{s[0]}-q{s[1]}-k{s[2]}" for s in SHAPES])
@pytest.mark.parametrize("segments", [False, True], ids=["causal", "packed"])
def test_float32_output_and_gradients_equal_the_reference(t, bq, bk, segments):
    b, h, a, o, scale = 2, 3, 24, 16, 0.3
    q, k, v, do = _qkv(jax.random.key(t + bq + 7 * bk + segments), b, t, h, a, o)
    seg = _segments(b, t, seed=t) if segments else None
    got = jax.jit(lambda *x: _out_and_grads(
        lambda q, k, v: mla_attention_chunked(q, k, v, scale=scale, segment_ids=seg,
                                              block_q=bq, block_k=bk), *x))(q, k, v, do)
    want = jax.jit(lambda *x: _out_and_grads(
        lambda q, k, v: mla_attention_reference(q, k, v, scale=scale, segment_ids=seg), *x))(
        q, k, v, do)
    for name, g, w in zip(("output", "dq", "dk", "dv"), got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        assert_close(g, w, F32_RTOL, name)
    assert_close(got[0], _numpy_attention(q, k, v, scale, seg), F32_RTOL, "output vs float64")


def test_bfloat16_within_the_kernel_bound():
    b, t, h, a, o, scale = 2, 160, 2, 192, 128, 192 ** -0.5
    q, k, v, do = _qkv(jax.random.key(3), b, t, h, a, o, jnp.bfloat16)
    seg = _segments(b, t, seed=3)
    got = jax.jit(lambda *x: _out_and_grads(
        lambda q, k, v: mla_attention_chunked(q, k, v, scale=scale, segment_ids=seg,
                                              block_q=64, block_k=64), *x))(q, k, v, do)
    want = jax.jit(lambda *x: _out_and_grads(
        lambda q, k, v: mla_attention_reference(q, k, v, scale=scale, segment_ids=seg), *x))(
        q, k, v, do)
    for name, g, w in zip(("output", "dq", "dk", "dv"), got, want):
        assert g.dtype == jnp.bfloat16, name
        assert_close(g, w, KERNEL_RTOL, name)


def test_bad_blocks_and_shapes_are_refused():
    q, k, v, _ = _qkv(jax.random.key(0), 1, 8, 1, 4, 4)
    with pytest.raises(ValueError, match=r"block_q=0; a block size is a positive int"):
        mla_attention_chunked(q, k, v, scale=1.0, block_q=0)
    with pytest.raises(ValueError, match=r"expected q and k \[B, T, H, A\]"):
        mla_attention_chunked(q, k[:, :4], v, scale=1.0)


def _temp_bytes(fn, *shapes) -> int:
    return jax.jit(fn).lower(*shapes).compile().memory_analysis().temp_size_in_bytes


def test_training_memory_at_8192_is_far_below_the_reference():
    """Forward + backward temporaries at T = 8192 (compiled, not run): the reference holds
    [B, H, T, T] fp32 scores and probabilities (1.5 GiB here); the chunked path O(T x block)
    (9 MiB measured). The issue asks for at least 8x."""
    b, t, h, a, o = 1, 8192, 2, 32, 16
    sd = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
    shapes = (sd(b, t, h, a), sd(b, t, h, a), sd(b, t, h, o))

    def grads(core):
        return jax.grad(lambda q, k, v: core(q, k, v, scale=0.2).sum(), argnums=(0, 1, 2))

    ref = _temp_bytes(grads(mla_attention_reference), *shapes)
    chunked = _temp_bytes(grads(mla_attention_chunked), *shapes)
    print(f"T=8192 fwd+bwd temporaries: reference {ref / 2**20:.1f} MiB, "
          f"chunked {chunked / 2**20:.1f} MiB")
    assert ref >= b * h * t * t * 4  # at least one fp32 score matrix
    assert chunked * 8 <= ref


# ------------------------------------------------------------------------------------------------
# Decode over the latent cache
# ------------------------------------------------------------------------------------------------
def _decode_inputs(key, b, t, h, c, r, s, dtype=jnp.float32):
    ks = jax.random.split(key, 3)
    return (jax.random.normal(ks[0], (b, t, h, c), jnp.float32).astype(dtype),
            jax.random.normal(ks[1], (b, t, h, r), jnp.float32).astype(dtype),
            jax.random.normal(ks[2], (b, s, c + r), jnp.float32).astype(dtype))


@pytest.mark.parametrize("s,bs", [(300, 64), (256, 64), (100, 128)],
                         ids=["partial-last-block", "whole-blocks", "one-block"])
def test_decode_equals_the_reference_and_ignores_unseen_slots(s, bs):
    """Positions at a block's first slot, in its middle, at its end and at the last slot; slots
    past every position hold huge junk, which must change nothing."""
    b, t, h, c, r, scale = 3, 2, 2, 32, 8, 0.2
    q_lat, q_pe, cache = _decode_inputs(jax.random.key(s + bs), b, t, h, c, r, s)
    pos = jnp.asarray([[0, 1], [bs - 1, bs + bs // 2], [s - 2, s - 1]], jnp.int32)
    pos = jnp.minimum(pos, s - 1)
    slots = jnp.arange(s)[None, :, None]
    visible = slots <= pos.max(axis=1)[:, None, None]
    junk = jnp.where(visible, cache, 3e4)
    want = mla_decode_reference(q_lat, q_pe, cache, pos, scale=scale)
    got = jax.jit(functools.partial(mla_decode_chunked, scale=scale, block_s=bs))(
        q_lat, q_pe, junk, pos)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert bool(jnp.all(jnp.isfinite(got)))
    assert_close(got, want, F32_RTOL, "decode")


def test_decode_bfloat16_within_the_kernel_bound():
    q_lat, q_pe, cache = _decode_inputs(jax.random.key(5), 2, 1, 4, 64, 16, 200, jnp.bfloat16)
    pos = jnp.asarray([[150], [199]], jnp.int32)
    got = mla_decode_chunked(q_lat, q_pe, cache, pos, scale=0.1, block_s=64)
    assert got.dtype == jnp.bfloat16
    assert_close(got, mla_decode_reference(q_lat, q_pe, cache, pos, scale=0.1), KERNEL_RTOL,
                 "decode bf16")


def test_decode_over_a_128k_cache_never_builds_the_scores():
    """At S = 131072 the reference's [B, H, T, S] fp32 scores are 16 MiB here; the chunked decode's
    temporaries stay at a few blocks (compiled, not run)."""
    b, t, h, c, r, s = 1, 2, 16, 64, 16, 131072
    sd = jax.ShapeDtypeStruct
    shapes = (sd((b, t, h, c), jnp.bfloat16), sd((b, t, h, r), jnp.bfloat16),
              sd((b, s, c + r), jnp.bfloat16), sd((b, t), jnp.int32))
    scores = b * h * t * s * 4
    chunked = _temp_bytes(functools.partial(mla_decode_chunked, scale=0.1), *shapes)
    ref = _temp_bytes(functools.partial(mla_decode_reference, scale=0.1), *shapes)
    print(f"S=128K decode temporaries: reference {ref / 2**20:.1f} MiB, "
          f"chunked {chunked / 2**20:.2f} MiB")
    assert ref >= scores and chunked * 8 <= scores


# ------------------------------------------------------------------------------------------------
# Dispatch
# ------------------------------------------------------------------------------------------------
def _calls(monkeypatch):
    """Counts the chunked cores' traces."""
    seen = []
    for name in ("mla_attention_chunked", "mla_decode_chunked"):
        real = getattr(chunked_attention, name)
        monkeypatch.setattr(chunked_attention, name,
                            functools.partial(lambda real, name, *a, **kw: (seen.append(name),
                                                                            real(*a, **kw))[1],
                                              real, name))
    return seen


def test_dispatch_takes_the_chunked_path_above_the_thresholds(monkeypatch):
    for var in ("DSV3_ATTENTION", "DSV3_DECODE"):
        monkeypatch.delenv(var, raising=False)
    seen = _calls(monkeypatch)
    sd = jax.ShapeDtypeStruct
    for t in (64, attention.CHUNKED_MIN_T):
        x = sd((1, t, 1, 8), jnp.float32)
        jax.eval_shape(functools.partial(attention.mla_attention, scale=1.0), x, x, x)
    assert seen == ["mla_attention_chunked"]  # only the long one
    for s in (64, attention.CHUNKED_MIN_SLOTS):
        jax.eval_shape(functools.partial(attention.mla_decode, scale=1.0),
                       sd((1, 1, 1, 8), jnp.float32), sd((1, 1, 1, 4), jnp.float32),
                       sd((1, s, 12), jnp.float32), sd((1, 1), jnp.int32))
    assert seen == ["mla_attention_chunked", "mla_decode_chunked"]
    assert attention.decode_impl() == "chunked"

    # Forced: every length takes the forced jnp path.
    seen.clear()
    x = sd((1, 16, 1, 8), jnp.float32)
    monkeypatch.setenv("DSV3_ATTENTION", "chunked")
    jax.eval_shape(functools.partial(attention.mla_attention, scale=1.0), x, x, x)
    assert seen == ["mla_attention_chunked"]
    monkeypatch.setenv("DSV3_ATTENTION", "reference")
    long = sd((1, attention.CHUNKED_MIN_T, 1, 8), jnp.float32)
    jax.eval_shape(functools.partial(attention.mla_attention, scale=1.0), long, long, long)
    assert attention.decode_impl() == "reference"  # DSV3_ATTENTION implies the decode path
    monkeypatch.setenv("DSV3_DECODE", "chunked")
    assert attention.decode_impl() == "chunked"  # unless DSV3_DECODE says otherwise
    assert seen == ["mla_attention_chunked"]
    monkeypatch.setenv("DSV3_DECODE", "flash")
    with pytest.raises(ValueError, match=r"DSV3_DECODE='flash'; use one of"):
        attention.decode_impl()


# ------------------------------------------------------------------------------------------------
# The whole model through the chunked path
# ------------------------------------------------------------------------------------------------
def _model_loss(cfg):
    """value_and_grad of the main head's cross-entropy plus 0.3 x the MTP head's (the token after
    next)."""
    model = DeepSeekV3(cfg)

    def ce(logits, targets):
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))
        return -jnp.take_along_axis(logp, targets[..., None], -1).mean()

    def loss(params, tokens, positions, segments):
        logits, mtp_logits = model.apply({"params": params}, tokens, positions, segments,
                                         return_mtp=True)
        return ce(logits[:, :-1], tokens[:, 1:]) + 0.3 * ce(mtp_logits[0][:, :-2], tokens[:, 2:])

    return jax.value_and_grad(loss)


def test_tiny_model_forward_and_gradients_equal_the_reference_path(monkeypatch):
    """float32 tiny model, packed documents: the loss and every parameter's gradient through
    DSV3_ATTENTION=chunked equal those through the reference, within 1e-5 of the gradients' size
    (the attention differences, ~1e-6, pass through the rest of the float32 model)."""
    b, t = 2, 96
    params = init_params(TINY32)
    tokens = random_tokens(TINY32, (b, t), seed=4)
    seg = _segments(b, t, seed=4)
    starts = jnp.concatenate([jnp.ones((b, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    idx = jnp.arange(t)[None]
    positions = idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    results = {}
    for impl in ("reference", "chunked"):
        monkeypatch.setenv("DSV3_ATTENTION", impl)
        results[impl] = jax.jit(_model_loss(TINY32))(params, tokens, positions, seg)
    (loss_c, grads_c), (loss_r, grads_r) = results["chunked"], results["reference"]
    assert abs(float(loss_c) - float(loss_r)) <= 1e-5 * abs(float(loss_r))
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(grads_c),
                            jax.tree.leaves(grads_r)):
        assert_close(g, w, F32_RTOL, jax.tree_util.keystr(path))


def test_forced_tpu_paths_run_in_interpret_mode_through_the_dispatcher(monkeypatch):
    """DSV3_ATTENTION=splash and DSV3_DECODE=tpu on this CPU: the dispatcher hands the calls to the
    Mosaic TPU kernels in TPU interpret mode, within the kernels' bound of the references (their
    own tests cover them in depth: test_splash_attention.py, test_mla_decode_tpu.py)."""
    monkeypatch.setenv("DSV3_ATTENTION", "splash")
    monkeypatch.setenv("DSV3_DECODE", "tpu")
    seen = []
    from dsv3_jax.ops.pallas import mla_decode_tpu, splash_attention_tpu

    for module in (splash_attention_tpu, mla_decode_tpu):
        name = "mla_attention" if module is splash_attention_tpu else "mla_decode"
        real = getattr(module, name)
        monkeypatch.setattr(module, name, functools.partial(
            lambda real, name, *a, **kw: (seen.append((name, kw["interpret"])), real(*a, **kw))[1],
            real, name))
    q, k, v, _ = _qkv(jax.random.key(11), 1, 128, 1, 64, 64, jnp.bfloat16)
    got = attention.mla_attention(q, k, v, scale=0.125)
    assert_close(got, mla_attention_reference(q, k, v, scale=0.125), KERNEL_RTOL, "splash")
    q_lat, q_pe, cache = _decode_inputs(jax.random.key(12), 1, 1, 2, 128, 64, 256, jnp.bfloat16)
    pos = jnp.asarray([[200]], jnp.int32)
    got = attention.mla_decode(q_lat, q_pe, cache, pos, scale=0.05)
    assert_close(got, mla_decode_reference(q_lat, q_pe, cache, pos, scale=0.05), KERNEL_RTOL,
                 "tpu decode")
    assert seen == [("mla_attention", True), ("mla_decode", True)]


def test_a_2048_token_training_step_of_the_tiny_model_takes_the_chunked_path(monkeypatch):
    """The run's own train step (loop.TrainSteps: loss, gradients, AdamW, the bias rule) on one
    2,048-token sequence of two documents, with "auto" dispatch: every attention call is the
    chunked one, and the step's loss and gradient norm are finite and positive."""
    from dsv3_jax.parallel import mesh as mesh_lib
    from dsv3_jax.train import loop
    from dsv3_jax.train.run_config import base_config

    for var in ("DSV3_ATTENTION", "DSV3_DECODE"):
        monkeypatch.delenv(var, raising=False)
    seen = _calls(monkeypatch)
    t = 2048
    config = base_config("tiny")
    config.data.seq_len, config.data.batch_size, config.model.max_seq_len = t, 1, t
    steps = loop.TrainSteps(config, mesh_lib.make_mesh(config.mesh, jax.devices()[:1]))
    state = steps.lower_init().compile()()
    tokens = random_tokens(TINY32, (1, t), seed=8)
    segments = jnp.where(jnp.arange(t) < 1500, 1, 2)[None].astype(jnp.int32)
    positions = jnp.where(segments == 1, jnp.arange(t), jnp.arange(t) - 1500).astype(jnp.int32)
    state, metrics = steps.lower_train_step().compile()(
        state, {"tokens": tokens, "segment_ids": segments, "positions": positions})
    assert set(seen) == {"mla_attention_chunked"} and len(seen) >= 3  # 2 layers + MTP, traced
    for key in ("loss", "grad_norm"):
        assert np.isfinite(float(metrics[key])) and float(metrics[key]) > 0, (key, metrics[key])


def test_generation_over_an_8192_slot_cache(monkeypatch):
    """A 4,097-token prompt and 3 new tokens: the cache holds 8,192 slots (prefill and decode take
    the chunked decode), and each greedy token is the argmax of the full forward pass over the
    prompt and the tokens before it (within 1e-4 of its max logit: float32 near-ties may differ in
    the last bits between the latent-cache and the training paths)."""
    import dsv3_jax as ds

    for var in ("DSV3_ATTENTION", "DSV3_DECODE"):
        monkeypatch.delenv(var, raising=False)
    seen = []
    real = chunked_attention.mla_decode_chunked
    monkeypatch.setattr(chunked_attention, "mla_decode_chunked",
                        lambda *a, **kw: (seen.append(a[2].shape[1]), real(*a, **kw))[1])
    cfg = TINY32.replace(max_seq_len=8192)
    params = init_params(TINY32)
    prompt = np.asarray(random_tokens(cfg, (1, 4097), seed=9))[0].tolist()
    out = ds.generate(cfg, params, [prompt], max_new_tokens=3)[0]
    assert out[:len(prompt)] == prompt and len(out) == len(prompt) + 3
    assert seen and set(seen) == {8192}
    logits = jax.jit(lambda p, x: DeepSeekV3(cfg).apply({"params": p}, x))(
        params, jnp.asarray([out[:-1]], jnp.int32))[0]
    for i, token in enumerate(out[len(prompt):]):
        row = np.asarray(logits[len(prompt) - 1 + i], np.float64)
        assert row[token] >= row.max() - 1e-4, (i, token, int(row.argmax()))
