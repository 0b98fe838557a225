"""FP8 block scaling (SPEC.md section 3): quantizers, the reference GEMM, the Hopper kernel in GPU
interpret mode and lowered for an H100, the FP8 linear layer and its gradients, Linear with
cfg.fp8, and a tiny FP8 training step.

Where the tolerances come from: e4m3 keeps 3 mantissa bits, so round-to-nearest leaves a relative
error uniform within +-2^-4 of the binade, RMS about 2.6% over a tile's values. A product of two
quantized operands then carries about sqrt(2) x 2.6% = 3.7% relative RMS error, and DeepGEMM's
calc_diff, which is about mean(err^2) / (2 mean(x^2)), comes out near 7e-4 on Gaussian data
whatever K is (measured: 6.6e-4 to 6.9e-4 here). SPEC's pass mark 1e-3 is therefore the bound for
one FP8 GEMM against the bf16 product of the unquantized inputs; a wrong scale, block index or
transpose gives calc_diff of order 0.1 to 1.
"""

from __future__ import annotations

import functools
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsv3_jax as ds
from dsv3_jax.config import ConfigError
from dsv3_jax.model.layers import Linear
from dsv3_jax.ops import fp8

from conftest import TINY32, init_params, jitted_loss_grad, random_tokens

ROOT = pathlib.Path(__file__).resolve().parent.parent
E4M3_REL = 2.0 ** -4  # largest relative rounding error of a normal e4m3 number
E4M3_SUB = 2.0 ** -10  # half the subnormal spacing (2^-9), in units of the scale s


def _f64(x):
    return np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)


def _rng(seed):
    return np.random.default_rng(seed)


def _assert_dequant_close(x, q, s_full, what):
    """|x - q s| <= 2^-4 |x| (normal range) or 2^-10 s (subnormal range), elementwise."""
    x, deq, s_full = _f64(x), _f64(q) * s_full, np.asarray(s_full, np.float64)
    bound = np.maximum(E4M3_REL * np.abs(x), E4M3_SUB * s_full) * (1 + 1e-6)
    assert np.all(np.abs(x - deq) <= bound), f"{what}: dequantized values out of e4m3 bounds"


# ------------------------------------------------------------------------------------------------
# Quantizers on hand-made tensors
# ------------------------------------------------------------------------------------------------
def test_act_quant_tiles_clamp_and_partial_tile():
    k = 300  # two full tiles and a partial one of 44
    x = np.zeros((2, k), np.float32)
    # row 0: tile 0 all zero, tile 1 amax 3.5 (at a known place), tile 2 (partial) amax 0.25
    x[0, 128:256] = np.linspace(-1.0, 1.0, 128)
    x[0, 200] = -3.5
    x[0, 256:] = np.linspace(-0.25, 0.1, 44)
    # row 1: Gaussian with an outlier in the partial tile
    x[1] = _rng(0).standard_normal(k)
    x[1, 299] = 40.0
    q, s = fp8.act_quant(jnp.asarray(x))
    assert q.shape == (2, k) and q.dtype == jnp.float8_e4m3fn
    assert s.shape == (2, 3) and s.dtype == jnp.float32
    s = np.asarray(s, np.float64)
    np.testing.assert_allclose(s[0], [1e-4 / 448, 3.5 / 448, 0.25 / 448], rtol=1e-6)
    np.testing.assert_allclose(s[1, 2], 40.0 / 448, rtol=1e-6)
    np.testing.assert_allclose(s[1, :2], np.abs(x[1].reshape(-1)[:256]).reshape(2, 128).max(1) / 448,
                               rtol=1e-6)
    qf = _f64(q)
    assert np.all(qf[0, :128] == 0)  # the all-zero tile stays zero under the 1e-4 floor
    assert qf[0, 200] == -448 and qf[1, 299] == 448  # each tile's amax lands on +-448
    _assert_dequant_close(x, q, np.repeat(s, 128, axis=1)[:, :k], "act_quant")


def test_act_quant_leading_dims_and_bf16_input():
    x = jnp.asarray(_rng(1).standard_normal((2, 3, 130)) * 5, jnp.bfloat16)
    q, s = fp8.act_quant(x)
    assert q.shape == (2, 3, 130) and s.shape == (2, 3, 2)
    q2, s2 = fp8.act_quant(x.reshape(6, 130))
    np.testing.assert_array_equal(_f64(q).reshape(6, 130), _f64(q2))
    np.testing.assert_array_equal(np.asarray(s).reshape(6, 2), np.asarray(s2))


def test_pow2_scales_are_powers_of_two_and_cover_amax():
    rng = _rng(2)
    x = rng.standard_normal((4, 512)) * np.exp(rng.uniform(-8, 8, (4, 1)))
    x[0, :128] = 0.0  # the floor, rounded up as well
    x[1, 128:256] = 448.0 * 2.0 ** -3  # an amax whose raw scale is a power of two already
    q, s = fp8.act_quant(jnp.asarray(x, jnp.float32), pow2_scale=True)
    _, s_raw = fp8.act_quant(jnp.asarray(x, jnp.float32))
    s, s_raw = np.asarray(s, np.float64), np.asarray(s_raw, np.float64)
    mant, _ = np.frexp(s)
    assert np.all(mant == 0.5), "pow2 scales must be exact powers of two"
    assert np.all(s >= s_raw) and np.all(s < 2 * s_raw)  # the next power of two up, not further
    assert s[1, 1] == s_raw[1, 1] == 2.0 ** -3
    amax = np.abs(x).reshape(4, 4, 128).max(-1)
    assert np.all(amax / s <= 448.0)  # still inside e4m3's range: nothing saturates
    assert np.all(np.isfinite(_f64(q)))
    qw, sw = fp8.weight_quant(jnp.asarray(x[:, :300], jnp.float32), pow2_scale=True)
    assert np.all(np.frexp(np.asarray(sw, np.float64))[0] == 0.5)


def test_col_quant_is_128x1_tiles_along_tokens():
    x = jnp.asarray(_rng(3).standard_normal((300, 70)) * 3, jnp.float32)
    q, s = fp8.col_quant(x)
    assert q.shape == (300, 70) and s.shape == (3, 70)
    amax = np.abs(np.pad(np.asarray(x), ((0, 84), (0, 0)))).reshape(3, 128, 70).max(1)
    np.testing.assert_allclose(np.asarray(s), np.maximum(amax, 1e-4) / 448, rtol=1e-6)
    q_t, s_t = fp8.act_quant(x.T)
    np.testing.assert_array_equal(_f64(q), _f64(q_t).T)
    _assert_dequant_close(x, q, np.repeat(np.asarray(s), 128, axis=0)[:300], "col_quant")


def test_weight_quant_blocks_partial_edges_and_dequant():
    n, k = 300, 200  # blocks 3 x 2, the last row and column of blocks partial
    w = _rng(4).standard_normal((n, k)).astype(np.float32) * 0.02
    w[:128, 128:] = 0.0  # one all-zero block
    w[299, 199] = 0.5  # the amax of the corner (partial x partial) block
    q, s = fp8.weight_quant(jnp.asarray(w))
    assert q.shape == (n, k) and s.shape == (3, 2)
    s = np.asarray(s, np.float64)
    np.testing.assert_allclose(s[0, 1], 1e-4 / 448, rtol=1e-6)
    np.testing.assert_allclose(s[2, 1], 0.5 / 448, rtol=1e-6)
    np.testing.assert_allclose(s[1, 0], np.abs(w[128:256, :128]).max() / 448, rtol=1e-6)
    assert np.all(_f64(q)[:128, 128:] == 0) and _f64(q)[299, 199] == 448
    deq = fp8.weight_dequant(q, jnp.asarray(s, jnp.float32))
    assert deq.dtype == jnp.float32 and deq.shape == (n, k)
    np.testing.assert_allclose(_f64(deq), _f64(q) * np.repeat(np.repeat(s, 128, 0), 128, 1)[:n, :k],
                               rtol=1e-7)
    _assert_dequant_close(w, q, np.repeat(np.repeat(s, 128, 0), 128, 1)[:n, :k], "weight_quant")
    # 128x128 blocks map to blocks under a transpose: q(w^T) = q(w)^T, s(w^T) = s(w)^T (Fprop
    # quantizes our [in, out] kernel once and transposes the fp8 copy).
    q_t, s_t = fp8.weight_quant(jnp.asarray(w.T))
    np.testing.assert_array_equal(_f64(q_t), _f64(q).T)
    np.testing.assert_array_equal(np.asarray(s_t), s.T.astype(np.float32))
    with pytest.raises(ValueError, match="weight_dequant"):
        fp8.weight_dequant(q, jnp.ones((2, 2), jnp.float32))


def test_calc_diff():
    x = _rng(5).standard_normal(1000)
    assert fp8.calc_diff(x, x) == pytest.approx(0.0, abs=1e-15)
    assert fp8.calc_diff(np.zeros(3), np.zeros(3)) == 0.0
    assert fp8.calc_diff(x, -x) == pytest.approx(2.0)
    y = x + 0.01 * _rng(6).standard_normal(1000)  # calc_diff ~ mean(err^2) / (2 mean(x^2))
    assert fp8.calc_diff(x, y) == pytest.approx(0.5 * 1e-4, rel=0.2)


# ------------------------------------------------------------------------------------------------
# The reference GEMM
# ------------------------------------------------------------------------------------------------
def _operands(m, n, k, seed, per_row_b=False):
    """Activations ~ N(0, 1) with a few outlier channels (x20, as LLM activations have) and
    weights ~ N(0, 0.02): the scales a real layer sees. Returns bf16 a [M, K], b [N, K] and their
    quantizations."""
    rng = _rng(seed)
    a = rng.standard_normal((m, k))
    a[:, rng.choice(k, size=max(1, k // 64), replace=False)] *= 20.0
    b = 0.02 * rng.standard_normal((n, k))
    a, b = jnp.asarray(a, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16)
    a_q, a_s = fp8.act_quant(a)
    b_q, b_s = fp8.act_quant(b) if per_row_b else fp8.weight_quant(b)
    return a, b, (a_q, a_s, b_q, b_s)


def _dequant_product(a_q, a_s, b_q, b_s):
    """float64 product of the dequantized operands: what the GEMM computes, up to fp32 sums."""
    m, k = a_q.shape
    n = b_q.shape[0]
    sa = np.repeat(np.asarray(a_s, np.float64), 128, axis=1)[:, :k]
    sb = np.repeat(np.asarray(fp8.b_scales_per_row(b_s, n), np.float64), 128, axis=1)[:, :k]
    return (_f64(a_q) * sa) @ (_f64(b_q) * sb).T


@pytest.mark.parametrize("m,n,k,per_row_b", [(100, 200, 300, False), (64, 96, 130, True)])
def test_reference_gemm_vs_bf16_product(m, n, k, per_row_b):
    a, b, ops = _operands(m, n, k, seed=m + n + k, per_row_b=per_row_b)
    out = fp8.fp8_gemm_reference(*ops)
    assert out.shape == (m, n) and out.dtype == jnp.bfloat16
    exact = jnp.dot(a, b.T, preferred_element_type=jnp.float32).astype(jnp.bfloat16)
    assert fp8.calc_diff(out, exact) < 1e-3  # SPEC's bar; see the module docstring
    # Against the exact product of the dequantized operands only the bf16 output rounding
    # (relative 2^-9, calc_diff ~ 1e-6) and fp32 summation remain.
    assert fp8.calc_diff(out, _dequant_product(*ops)) < 1e-5
    out32 = fp8.fp8_gemm(*ops, out_dtype=jnp.float32, impl="reference")
    assert out32.dtype == jnp.float32
    assert fp8.calc_diff(out32, _dequant_product(*ops)) < 1e-10


def test_gemm_refuses_bad_operands():
    _, _, (a_q, a_s, b_q, b_s) = _operands(64, 64, 256, seed=7)
    with pytest.raises(ValueError, match="contraction"):
        fp8.fp8_gemm(a_q, a_s, b_q[:, :128], b_s)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fp8.fp8_gemm(a_q.astype(jnp.bfloat16), a_s, b_q, b_s)
    with pytest.raises(ValueError, match="b_s"):
        fp8.fp8_gemm(a_q, a_s, b_q, jnp.ones((3, 2), jnp.float32))
    with pytest.raises(ValueError, match="impl"):
        fp8.fp8_gemm(a_q, a_s, b_q, b_s, impl="cuda")
    assert fp8.gemm_impl() == "reference"  # CPU: the jnp reference


# ------------------------------------------------------------------------------------------------
# The Hopper kernel: GPU interpret mode on the CPU, and the Mosaic GPU lowering for an H100
# ------------------------------------------------------------------------------------------------
# Kernel vs reference: both sum each 128-wide block in fp32 and promote it with the same scales, so
# they differ at most by fp32 summation order, which can flip the final bf16 rounding (one ulp, up
# to 2^-7 relative; the safety net's probe allows that, ops/fp8.py). At these seeds in interpret
# mode they agree bit for bit today, so this holds them to half of it.
KERNEL_ULP = 2.0 ** -8


def _check_kernel(out, ref):
    out, ref = _f64(out), _f64(ref)
    assert out.shape == ref.shape
    assert np.all(np.abs(out - ref) <= KERNEL_ULP * np.abs(ref) + 1e-30)
    assert fp8.calc_diff(out, ref) < 1e-6


@pytest.mark.parametrize("m,n,k,per_row_b,out_dtype", [
    (128, 128, 256, False, jnp.bfloat16),  # exactly one CTA tile, two K blocks
    (100, 72, 300, True, jnp.float32),  # nothing a multiple of a tile, a partial K block; Wgrad's
                                        # form: per-row b scales, fp32 out
])
def test_kernel_interpret_vs_reference(m, n, k, per_row_b, out_dtype):
    from dsv3_jax.ops.pallas import fp8_gemm_sm90

    a, b, ops = _operands(m, n, k, seed=3 * m + n + k, per_row_b=per_row_b)
    out = fp8_gemm_sm90.fp8_gemm(*ops, out_dtype=out_dtype, interpret=True)
    assert out.dtype == out_dtype
    _check_kernel(out, fp8.fp8_gemm_reference(*ops, out_dtype=out_dtype))
    exact = jnp.dot(a, b.T, preferred_element_type=jnp.float32)
    assert fp8.calc_diff(out, exact) < 1e-3


def test_kernel_interpret_pipeline_has_no_races():
    """One CTA walks 2 output tiles (M not a multiple of the tile) of 4 K blocks through 3 stages,
    both compute warpgroups splitting N: every shared buffer is refilled, within a tile and across
    tiles, while the race detector watches TMA writes, scale loads, wgmma reads and the epilogue."""
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as gpu_interpret
    import jax.experimental.pallas.mosaic_gpu as plgpu
    from dsv3_jax.ops.pallas import fp8_gemm_sm90

    cfg = fp8_gemm_sm90.TileConfig(wg_dimension="n", max_concurrent_steps=3, grid_tile_width=1)
    _, _, ops = _operands(100, 256, 512, seed=11)
    out = fp8_gemm_sm90.fp8_gemm(*ops, config=cfg, num_sms=1,
                                 interpret=plgpu.InterpretGPUParams(detect_races=True))
    out = jax.block_until_ready(out)
    assert not gpu_interpret.get_races().races_found
    _check_kernel(out, fp8.fp8_gemm_reference(*ops))


@pytest.mark.parametrize("out_dtype,per_row_b", [(jnp.bfloat16, False), (jnp.float32, True)])
def test_kernel_lowers_for_h100(out_dtype, per_row_b):
    """The full Mosaic GPU lowering for sm_90a at a DeepSeek-V3 shape: wgmma operand layouts (an
    FP8 wgmma refuses a transposed operand here, as on the GPU), TMA, register layouts, shared
    memory <= 227 KiB. What it cannot check: ptxas, register spills, the run itself."""
    from dsv3_jax.ops.pallas import fp8_gemm_sm90

    m, n, k = 4096, 7168, 2048
    args = (jax.ShapeDtypeStruct((m, k), jnp.float8_e4m3fn),
            jax.ShapeDtypeStruct((m, k // 128), jnp.float32),
            jax.ShapeDtypeStruct((n, k), jnp.float8_e4m3fn),
            jax.ShapeDtypeStruct((n if per_row_b else n // 128, k // 128), jnp.float32))
    gemm = functools.partial(fp8_gemm_sm90.fp8_gemm, out_dtype=out_dtype, num_sms=132)
    text = jax.jit(gemm).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


def test_kernel_tile_config_checks(monkeypatch):
    from dsv3_jax.ops.pallas import fp8_gemm_sm90

    with pytest.raises(ValueError, match="tile_m"):
        fp8_gemm_sm90.TileConfig(tile_m=96)
    with pytest.raises(ValueError, match="tile_n"):
        fp8_gemm_sm90.TileConfig(tile_n=320)
    big = fp8_gemm_sm90.TileConfig(tile_n=192, max_concurrent_steps=6)
    fitted = fp8_gemm_sm90.fit_to_smem(big, jnp.float32)  # fp32 epilogue: fewer stages
    assert 2 <= fitted.max_concurrent_steps < 6
    assert fp8_gemm_sm90.smem_bytes(fitted, jnp.float32) <= fp8_gemm_sm90.SMEM_BYTES
    with pytest.raises(ValueError, match="shared memory"):  # no stage count fits 16 KiB
        monkeypatch.setattr(fp8_gemm_sm90, "SMEM_BYTES", 16 * 1024)
        fp8_gemm_sm90.fit_to_smem(fp8_gemm_sm90.TileConfig(), jnp.float32)


@pytest.mark.parametrize("tiles", [dict(tile_n=256), dict(tile_m=128),
                                   dict(tile_n=256, num_compute_wgs=1)])
def test_kernel_refuses_a_spilling_tile_config(tiles):
    """Tiles whose two fp32 accumulators need more registers than a compute warpgroup holds are
    refused at construction, before any lowering: ptxas spills 356 B at 64x256 and 436 B at
    128x128 (the budget's measurements, `fp8_gemm_sm90.registers_needed`); 64x192 fits."""
    from dsv3_jax.ops.pallas import fp8_gemm_sm90

    with pytest.raises(ValueError, match="registers per thread"):
        fp8_gemm_sm90.TileConfig(**tiles)
    assert fp8_gemm_sm90.registers_needed(fp8_gemm_sm90.TileConfig(tile_n=192)) <= 232


# ------------------------------------------------------------------------------------------------
# fp8_linear: forward and both gradients
# ------------------------------------------------------------------------------------------------
def _bf16_linear(x, w):
    return jnp.dot(x, w.astype(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)


def _linear_case(seed, t_shape=(4, 64), k=192, n=320):
    rng = _rng(seed)
    x = jnp.asarray(rng.standard_normal((*t_shape, k)), jnp.bfloat16)  # T = 256, K not 128k
    w = jnp.asarray(0.05 * rng.standard_normal((k, n)), jnp.float32)  # master kernel [in, out]
    dy = jnp.asarray(rng.standard_normal((*t_shape, n)), jnp.bfloat16)
    return x, w, dy


@jax.jit
def _fp8_and_bf16_linear(x, w, dy):
    y8, vjp8 = jax.vjp(fp8.fp8_linear, x, w)
    yb, vjpb = jax.vjp(_bf16_linear, x, w)
    return (y8, *vjp8(dy)), (yb, *vjpb(dy)), fp8.fp8_linear(x, w, pow2_scale=True)


def test_fp8_linear_forward_and_gradients_vs_bf16():
    """Each of Fprop (x 1x128, w 128x128), Dgrad (dy 1x128, w 128x128) and Wgrad (x, dy 128x1) is
    one FP8 GEMM of two quantized operands: calc_diff ~7e-4 each (module docstring), so < 1e-3
    against the bf16 linear; dx keeps x's dtype and dw is fp32 for the fp32 master weight."""
    x, w, dy = _linear_case(20)
    (y8, dx8, dw8), (yb, dxb, dwb), y2 = _fp8_and_bf16_linear(x, w, dy)
    assert y8.shape == yb.shape and y8.dtype == jnp.bfloat16
    assert dx8.dtype == jnp.bfloat16 and dw8.dtype == jnp.float32 and dw8.shape == w.shape
    assert fp8.calc_diff(y8, yb) < 1e-3
    assert fp8.calc_diff(dx8, dxb) < 1e-3
    assert fp8.calc_diff(dw8, dwb) < 1e-3
    # pow2 scales lose nothing measurable (same mantissa use, amax in [224, 448]).
    assert fp8.calc_diff(y2, yb) < 1e-3


def test_fp8_linear_through_the_kernel_matches_the_reference(monkeypatch):
    """All three GEMMs of fp8_linear on the Hopper kernel (interpret mode): Fprop [128 x 192] x
    [192 x 72], Dgrad [128 x 72] x [72 x 192], Wgrad [192 x 128] x [128 x 72] with per-row scales
    and fp32 out. The transposes, scale layouts and dtypes agree with the reference path (one bf16
    ulp; fp32 out: the same bound)."""
    x, w, dy = _linear_case(21, t_shape=(2, 64), k=192, n=72)
    run = lambda: (lambda y, vjp: (y, *vjp(dy)))(*jax.vjp(fp8.fp8_linear, x, w))
    ref = run()
    monkeypatch.setattr(fp8, "gemm_impl", lambda: "sm90")
    got = run()
    for g, r in zip(got, ref):
        assert g.dtype == r.dtype
        _check_kernel(g, r)


def test_linear_module_fp8_vs_bf16():
    cfg = ds.get_model_config("tiny")
    x = jnp.asarray(_rng(22).standard_normal((2, 64, 128)), jnp.bfloat16)
    kernel = jnp.asarray(0.05 * _rng(23).standard_normal((128, 384)), jnp.float32)
    params = {"params": {"kernel": kernel}}
    layer = lambda c, axes=("embed", "mlp"), out=None: Linear(128, 384, axes, c, out_dtype=out)
    y = layer(cfg).apply(params, x)
    y8 = layer(cfg.replace(fp8=True)).apply(params, x)
    assert y8.dtype == y.dtype == jnp.bfloat16
    assert 0 < fp8.calc_diff(y8, y) < 1e-3  # FP8 really ran, with one GEMM's error
    # The output head (the projection onto "vocab") stays in the compute dtype.
    head = lambda c: Linear(128, 384, ("embed", "vocab"), c, out_dtype="float32", fp8=False)
    np.testing.assert_array_equal(head(cfg.replace(fp8=True)).apply(params, x),
                                  head(cfg).apply(params, x))


def test_config_fp8_field():
    assert ds.ModelConfig().fp8 is False
    assert ds.get_model_config("tiny", fp8=True).fp8 is True
    with pytest.raises(ConfigError, match="fp8"):
        ds.ModelConfig(fp8="yes")


def test_tiny_fp8_training_step_gradients():
    """jax.grad of the training loss of a one-layer tiny model (MLA + dense MLP): with fp8 the
    gradients are finite and close to the unquantized ones. About four FP8 GEMMs chain in each
    direction (~7e-4 each), so calc_diff ~5e-3 over all gradients (measured 4.7e-3); 2e-2 leaves
    room for other seeds and still fails on any wrong layout (calc_diff ~ 0.1 to 1). MoE layers
    are left out: a router that flips a token's experts under FP8 noise moves its gradient by O(1),
    which says nothing about the FP8 GEMMs."""
    cfg = TINY32.replace(n_layers=1, n_dense_layers=1, mtp_depth=0)
    params = init_params(cfg)
    tokens = random_tokens(cfg, (2, 64), seed=3)
    grads = jitted_loss_grad(cfg)(params, tokens)
    grads8 = jitted_loss_grad(cfg.replace(fp8=True))(params, tokens)
    flat = lambda t: np.concatenate([np.asarray(v, np.float64).ravel() for v in jax.tree.leaves(t)])
    g, g8 = flat(grads), flat(grads8)
    assert np.all(np.isfinite(g8))
    assert fp8.calc_diff(g8, g) < 2e-2
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(grads8))  # fp32 master gradients


# ------------------------------------------------------------------------------------------------
# The routed experts: grouped FP8 GEMMs
# ------------------------------------------------------------------------------------------------
def test_grouped_col_quant_tiles_restart_at_each_group():
    """Group sizes [3, 0, 130] over 140 rows: tiles are rows 0-2 (group 0), rows 3-130 and 131-132
    (group 2: 128 + 2), and the 7 padding rows quantize to 0. Row r of column c is in a tile whose
    scale is that tile's amax / 448 in that column."""
    rng = _rng(30)
    x = rng.standard_normal((140, 5)).astype(np.float32)
    x[1, 0] = 300.0  # an outlier in group 0 must not leak into group 2's tiles
    q, s, tile = fp8.grouped_col_quant(jnp.asarray(x), jnp.asarray([3, 0, 130]))
    tile = np.asarray(tile)
    groups = [range(0, 3), range(3, 131), range(131, 133)]
    assert len({tile[r] for r in range(140)}) == 4
    for rows in groups:
        assert len({tile[r] for r in rows}) == 1
        expect = np.maximum(np.abs(x[list(rows)]).max(axis=0), fp8.AMAX_FLOOR) / fp8.E4M3_MAX
        np.testing.assert_allclose(np.asarray(s)[tile[rows[0]]], expect, rtol=1e-6)
    assert np.all(np.asarray(q[133:], np.float32) == 0)
    full = np.asarray(s)[tile]
    _assert_dequant_close(x[:133], q[:133], full[:133], "grouped_col_quant")


def _grouped_case(seed, sizes=(130, 0, 5, 200, 1), pad=9, k=192, n=136):
    rng = _rng(seed)
    m = sum(sizes) + pad
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    w = jnp.asarray(0.05 * rng.standard_normal((len(sizes), k, n)), jnp.float32)
    dy = jnp.asarray(rng.standard_normal((m, n)), jnp.bfloat16)
    return x, w, dy, jnp.asarray(sizes, jnp.int32)


def test_fp8_grouped_matmul_equals_fp8_linear_per_group():
    """Every group's rows through fp8_grouped_matmul = fp8_linear on those rows alone: the same
    tiles (Wgrad's 128x1 tiles restart at the group's first row), so only fp32 summation order
    differs: one bf16 ulp (2^-8, bounded by 2^-7 |b|) for y and dx, and 1e-5 of the largest entry
    for the fp32 dw. Empty groups get dw = 0; padding rows give y = 0 and dx = 0. Sizes: a group
    of 130 rows (a partial second tile), an empty one, 5, 200 and 1 row, then 9 padding rows; K
    and N are not multiples of 128."""
    x, w, dy, sizes = _grouped_case(31)
    y, vjp = jax.vjp(lambda a, b: fp8.fp8_grouped_matmul(a, b, sizes), x, w)
    dx, dw = vjp(dy)
    assert y.dtype == dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32 and dw.shape == w.shape
    used = int(sizes.sum())
    assert not np.any(_f64(y[used:])) and not np.any(_f64(dx[used:]))
    start = 0
    for g, n in enumerate(np.asarray(sizes)):
        if n == 0:
            assert not np.any(_f64(dw[g]))
            continue
        rows = slice(start, start + n)
        yg, vjp_g = jax.vjp(fp8.fp8_linear, x[rows], w[g])
        dxg, dwg = vjp_g(dy[rows])
        for got, ref in ((y[rows], yg), (dx[rows], dxg)):
            got, ref = _f64(got), _f64(ref)
            assert np.all(np.abs(got - ref) <= 2.0 ** -7 * np.abs(ref) + 1e-5 * np.abs(ref).max())
        got, ref = _f64(dw[g]), _f64(dwg)
        assert np.all(np.abs(got - ref) <= 1e-5 * np.abs(ref).max())
        start += n


def test_fp8_grouped_matmul_vs_bf16_ragged_dot():
    """One FP8 GEMM each for y, dx and dw: calc_diff < 1e-3 against the bf16 grouped product
    (module docstring), over the rows that belong to a group."""
    x, w, dy, sizes = _grouped_case(32)
    bf16 = lambda a, b: jax.lax.ragged_dot(a, b.astype(a.dtype), sizes,
                                           preferred_element_type=jnp.float32).astype(a.dtype)
    y8, vjp8 = jax.vjp(lambda a, b: fp8.fp8_grouped_matmul(a, b, sizes), x, w)
    yb, vjpb = jax.vjp(bf16, x, w)
    used = int(sizes.sum())
    for got, ref in zip((y8, *vjp8(dy)), (yb, *vjpb(dy))):
        assert 0 < fp8.calc_diff(got[:used] if got.ndim == 2 else got,
                                 ref[:used] if ref.ndim == 2 else ref) < 1e-3


def test_routed_experts_run_fp8_with_the_config():
    """The MoE experts' SwiGLU (w1, w3, then w2 on silu(w1 x) * w3 x) with fp8: three chained FP8
    GEMMs, so calc_diff against the bf16 experts ~3 x 7e-4 (bound 5e-3, measured below 3e-3); 0
    would mean FP8 never ran. Gradients reach the fp32 master weights in fp32."""
    from dsv3_jax.parallel.expert_parallel import grouped_matmul_for, local_routed_experts

    rng = _rng(34)
    n, d, f, e, k = 96, 128, 192, 4, 2
    x = jnp.asarray(rng.standard_normal((n, d)), jnp.bfloat16)
    idx = jnp.asarray(np.stack([rng.choice(e, k, replace=False) for _ in range(n)]), jnp.int32)
    gate = jnp.asarray(rng.random((n, k)), jnp.float32)
    ws = [jnp.asarray(0.05 * rng.standard_normal(shape), jnp.float32)
          for shape in ((e, d, f), (e, f, d), (e, d, f))]

    def run(use_fp8):
        def loss(ws):
            w = ws if use_fp8 else [v.astype(jnp.bfloat16) for v in ws]
            y = local_routed_experts(x, idx, gate, *w, matmul=grouped_matmul_for(use_fp8))
            return jnp.sum(y.astype(jnp.float32) * x.astype(jnp.float32)), y
        return jax.value_and_grad(loss, has_aux=True)(ws)

    (_, y8), g8 = run(True)
    (_, yb), gb = run(False)
    assert 0 < fp8.calc_diff(y8, yb) < 5e-3
    assert all(g.dtype == jnp.float32 for g in g8)
    assert all(fp8.calc_diff(a, b) < 5e-3 for a, b in zip(g8, gb))


def test_fp8_grouped_refuses_bad_operands():
    x, w, _, sizes = _grouped_case(33, sizes=(4, 4), pad=0, k=64, n=32)
    with pytest.raises(ValueError, match=r"\[G, K, N\]"):
        fp8.fp8_grouped_matmul(x, w[0], sizes)
    xq, xs = fp8.act_quant(x)
    wq, ws = jax.vmap(fp8.weight_quant)(w)
    with pytest.raises(ValueError, match="b_s"):
        fp8.fp8_grouped_gemm_reference(xq, xs, wq, ws[:, :, :0], sizes)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fp8.fp8_grouped_gemm_reference(x, xs, wq, ws, sizes)


# ------------------------------------------------------------------------------------------------
# The benchmark's smoke mode (a few seconds: tiny shapes, interpret mode)
# ------------------------------------------------------------------------------------------------
def test_bench_fp8_gemm_smoke(capsys):
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        import bench_fp8_gemm
    finally:
        sys.path.pop(0)
    assert bench_fp8_gemm.main(["--smoke", "--shapes=ragged"]) == 0  # the other shape: same path
    table = capsys.readouterr().out
    assert "| pallas fp8 (ours) |" in table and "MISMATCH" not in table
