"""Splash attention (ops/pallas/splash_attention_tpu.py) in TPU interpret mode on the CPU against
`dsv3_jax.ops.attention.mla_attention_reference`, its input checks and block table, and its
lowering to Mosaic TPU at V3 dims (jax.export for platform "tpu": no TPU needed).

Tolerances. Inputs ~ N(0, 1), fresh random (never zeros). bf16: kernel and reference compute scores
and softmax in fp32 from the same bf16 inputs; the kernel folds the scale into q (one extra bf16
rounding of q, relative 2^-9), runs an online softmax over 128-key blocks and feeds P to the P V
product in bf16 before normalising, where the reference rounds the normalised P; both round the
output to bf16. Each output element is a convex combination of values of size <= ~4: a few bf16
ulps of the output scale, so 2^-6 of max|reference| (KERNEL_RTOL, the kernels' bound in
ops/attention.py and tests/test_mla_kernels.py; observed 2^-7.8). The gradients (splash's dq and
dkv kernels against `jax.vjp` of the reference) round P and dS = P (dP - delta) to bf16 for the
matmuls: relative 2^-9 per term, random sign, summed over <= T terms: the same 2^-6 of
max|reference gradient| (observed 2^-7.5 for dq and dk, 2^-8.5 for dv). A wrong mask or a
segment leak gives errors of order 1. f32: every product is exact fp32 under interpret mode on a
CPU and the only differences are summation order and the online softmax's rescaling: relative
~1e-6 (observed 2^-20.5), so 2^-16 (~1.5e-5).

Interpret mode is slow on 2 CPU cores (each numeric case ~10-30 s: forward, dq and dkv kernels over
a 2 x 2 block grid, 2 heads, 2 sequences); the whole file takes well under 90 s.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash

from dsv3_jax.ops.attention import KERNEL_RTOL, mla_attention_reference
from dsv3_jax.ops.pallas import splash_attention_tpu as sp

from conftest import assert_close

F32_RTOL = 2.0 ** -16  # see the module docstring
A, O = 192, 128  # V3's qk and v head dims


def _normal(rng, shape, dtype):
    return jnp.asarray(rng.standard_normal(shape), dtype)


def _out_and_grads(fn, q, k, v, do, seg, scale):
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, scale=scale, segment_ids=seg), q, k, v)
    return out, *vjp(do)


_splash = jax.jit(lambda q, k, v, do, seg, scale: _out_and_grads(
    lambda *a, **kw: sp.mla_attention(*a, **kw, interpret=True), q, k, v, do, seg, scale),
    static_argnames="scale")
_reference = jax.jit(lambda q, k, v, do, seg, scale: _out_and_grads(
    mla_attention_reference, q, k, v, do, seg, scale), static_argnames="scale")


def _compare(dtype, rtol, seg, seed):
    """B 2, T 256 (2 x 2 blocks of 128: the table's class at this T), H 2, A 192, O 128: output,
    dq, dk, dv of splash (interpret mode, batch mapped) against the reference's."""
    rng = np.random.default_rng(seed)
    b, t, h = 2, 256, 2
    q, k = _normal(rng, (b, t, h, A), dtype), _normal(rng, (b, t, h, A), dtype)
    v, do = _normal(rng, (b, t, h, O), dtype), _normal(rng, (b, t, h, O), dtype)
    scale = A ** -0.5
    got = _splash(q, k, v, do, seg, scale)
    want = _reference(q, k, v, do, seg, scale)
    for name, g, w in zip(("output", "dq", "dk", "dv"), got, want):
        assert g.shape == w.shape and g.dtype == w.dtype == dtype, (name, g.shape, g.dtype)
        assert_close(g, w, rtol, f"{jnp.dtype(dtype).name} {name}")
    return q, k, v, do, got


def test_bf16_packed_documents_forward_and_gradients():
    """Two sequences with different packings, every boundary inside a 128-block (row 0: documents
    of 70, 100, 86 tokens; row 1: 200, 56), so the mask's partial blocks carry both the causal and
    the segment mask; then one document alone equals attention over that document by itself."""
    seg = jnp.asarray(np.stack([np.repeat([3, 5, 6], [70, 100, 86]),
                                np.repeat([1, 2], [200, 56])]), jnp.int32)
    q, k, v, do, (out, dq, dk, dv) = _compare(jnp.bfloat16, KERNEL_RTOL, seg, seed=0)
    doc = slice(70, 170)  # row 0's second document: starts and ends inside blocks
    alone = _reference(q[:1, doc], k[:1, doc], v[:1, doc], do[:1, doc], None, A ** -0.5)
    for name, g, w in zip(("output", "dq", "dk", "dv"), (out, dq, dk, dv), alone):
        assert_close(g[:1, doc], w, KERNEL_RTOL, f"second document alone: {name}")


def test_f32_causal_forward_and_gradients():
    _compare(jnp.float32, F32_RTOL, None, seed=1)


# ------------------------------------------------------------------------------------------------
# Block table and input checks
# ------------------------------------------------------------------------------------------------
def test_block_table_entries_are_valid_and_chosen_by_shape_class():
    for (t_min, max_dim), fields in sp.BLOCK_TABLE.items():
        bs = splash.BlockSizes(**fields)
        assert all(blk % 128 == 0 for blk in fields.values()), fields  # 128 lanes
        assert bs.block_kv % bs.block_kv_compute == 0
        assert bs.block_kv_dkv % bs.block_kv_dkv_compute == 0
        assert bs.has_backward_blocks and not bs.use_fused_bwd_kernel
        biggest = max(fields.values())
        t = biggest * -(-t_min // biggest)  # the class's smallest T that all its blocks divide
        assert sp.block_sizes(t, max_dim, max_dim) == bs
        sp.check_dims((1, t, 1, A), (1, t, 1, A), (1, t, 1, O), (jnp.bfloat16,) * 3,
                      block_sizes=bs)
    assert sp.block_sizes(4096, A, O).block_kv == 1024  # V3 pretraining
    assert sp.block_sizes(4096, A, O).block_q == 512
    assert sp.block_sizes(1536, A, O).block_kv == 512  # 1536 is no multiple of 1024
    assert sp.block_sizes(256, A, O).block_q == 128
    assert sp.block_sizes(384, A, O).block_q == 128  # no multiple of 512
    with pytest.raises(ValueError, match="multiple of 128"):
        sp.block_sizes(200, A, O)
    with pytest.raises(ValueError, match="head dims at most 256"):
        sp.block_sizes(256, 512, O)


def test_check_dims_refuses_bad_inputs():
    bf16 = (jnp.bfloat16,) * 3
    ok = ((2, 256, 2, A), (2, 256, 2, A), (2, 256, 2, O))
    sp.check_dims(*ok, bf16, segment_ids_shape=(2, 256))
    assert sp.supports(*ok, bf16) and sp.supports(*ok, (jnp.float32,) * 3)
    cases = [
        (((2, 200, 2, A), (2, 200, 2, A), (2, 200, 2, O)), bf16, {},
         "T = 200 must be a multiple of 128"),
        (((2, 256, 2, 96), (2, 256, 2, 96), (2, 256, 2, O)), bf16, {},
         "A = 96 must be a multiple of 64"),
        (((2, 256, 2, A), (2, 256, 2, A), (2, 256, 2, 320)), bf16, {}, "O = 320 .* at most 256"),
        (((2, 256, 2, A), (2, 256, 2, 128), (2, 256, 2, O)), bf16, {}, "must match"),
        (((2, 256, 2, A), (2, 256, 2, A), (2, 128, 2, O)), bf16, {}, "share their"),
        (((256, 2, A), (256, 2, A), (256, 2, O)), bf16, {}, r"\[B, T, H, dim\]"),
        (ok, (jnp.bfloat16, jnp.bfloat16, jnp.float32), {}, "all be bfloat16 or all float32"),
        (ok, (jnp.float16,) * 3, {}, "all be bfloat16 or all float32"),
        (ok, bf16, dict(segment_ids_shape=(2, 128)), r"segment_ids \(2, 128\) must be \[B, T\]"),
        (ok, bf16, dict(block_sizes=splash.BlockSizes(**sp.BLOCK_TABLE[(512, 256)])),
         "block_q = 512 must be a multiple of 128 dividing T = 256"),
        (ok, bf16, dict(block_sizes=splash.BlockSizes(block_q=128, block_kv=128)),
         "block_q_dkv = None"),
        (ok, bf16, dict(block_sizes=splash.BlockSizes(
            block_q=128, block_kv=128, block_q_dkv=128, block_kv_dkv=128,
            block_kv_dkv_compute=128, use_fused_bwd_kernel=True)), "use_fused_bwd_kernel"),
    ]
    for shapes, dtypes, kw, match in cases:
        with pytest.raises(ValueError, match=match):
            sp.check_dims(*shapes, dtypes, **kw)
        if not kw:
            assert not sp.supports(*shapes, dtypes)
    with pytest.raises(ValueError, match="T = 200"):  # the entry point checks too
        x = jnp.ones((1, 200, 1, 128), jnp.bfloat16)
        sp.mla_attention(x, x, x, scale=0.1, interpret=True)


# ------------------------------------------------------------------------------------------------
# Lowering to Mosaic TPU at V3 dims
# ------------------------------------------------------------------------------------------------
def _v3_args(with_cotangent: bool):
    b, t, h = 1, 4096, 128
    args = [jax.ShapeDtypeStruct((b, t, h, A), jnp.bfloat16),
            jax.ShapeDtypeStruct((b, t, h, A), jnp.bfloat16),
            jax.ShapeDtypeStruct((b, t, h, O), jnp.bfloat16),
            jax.ShapeDtypeStruct((b, t), jnp.int32)]
    return args + [jax.ShapeDtypeStruct((b, t, h, O), jnp.bfloat16)] * with_cotangent


def _kernel_names(text: str) -> set[str]:
    assert "tpu_custom_call" in text
    return set(re.findall(r"splash_mha_(fwd|dq|dkv)", text))


@pytest.mark.parametrize("segments", [False, True])
def test_exports_for_tpu_forward(segments):
    attend = lambda q, k, v, seg: sp.mla_attention(q, k, v, scale=A ** -0.5,
                                                   segment_ids=seg if segments else None)
    exported = jax.export.export(jax.jit(attend), platforms=["tpu"])(*_v3_args(False))
    assert _kernel_names(exported.mlir_module()) == {"fwd"}
    assert exported.out_avals[0].shape == (1, 4096, 128, O)


def test_exports_for_tpu_forward_and_backward():
    def out_and_grads(q, k, v, seg, do):
        return _out_and_grads(sp.mla_attention, q, k, v, do, seg, A ** -0.5)

    exported = jax.export.export(jax.jit(out_and_grads), platforms=["tpu"])(*_v3_args(True))
    assert _kernel_names(exported.mlir_module()) == {"fwd", "dq", "dkv"}
    assert [a.shape[-1] for a in exported.out_avals] == [O, A, A, O]
