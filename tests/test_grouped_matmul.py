"""The grouped matmul of the routed experts (ops/grouped_matmul.py): forward and both gradients
against a float64 per-group loop, with empty groups, ragged sizes, padding rows and an expert-
parallel group offset, for the portable tiled backend (the CPU default) and ragged_dot; the tiled
backend's tile plan at every tile height; the Hopper kernels in GPU interpret mode and lowered
for an H100; megablox in interpret mode; the MoE layer through every backend; the benchmark's
smoke mode.

Tolerances (all scale-aware: max error <= rtol x max|expected|, `assert_close`):
  fp32 operands      1e-5: fp32 sums of at most a few hundred products (relative error ~1e-6).
  bf16 operands      2^-7 against float64 of the bf16-rounded inputs: the products are exact in
                     fp32, the sums fp32, then one rounding to bf16 (relative 2^-9 of the element,
                     below 2^-8 of the max); 2^-7 leaves room and still fails on any wrong row,
                     group or transpose (errors of order 1).
  backend vs backend the kernels and ragged_dot both sum in fp32 and round once to the same dtype,
                     so they differ by summation order only: at most one bf16 ulp per element
                     (2^-7 relative at most), and the MoE layer, which chains three of them with
                     SwiGLU in between, stays within 2^-6 of its max.
Padding rows, rows of groups a shard does not hold and the gradients of empty groups must be
exactly zero on every backend. Interpret mode is slow (seconds per call): the Pallas cases are few
and small; the whole file takes about 30 s on 2 CPU cores.
"""

from __future__ import annotations

import functools
import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsv3_jax as ds
from dsv3_jax.model.moe import MoE
from dsv3_jax.ops import grouped_matmul as gm

from conftest import assert_close

ROOT = pathlib.Path(__file__).resolve().parent.parent
BF16_RTOL = 2.0 ** -7
FP32_RTOL = 1e-5
ULP_BF16 = 2.0 ** -7  # one bf16 ulp relative to the element (8 significant bits: 2^-8..2^-7)

# Sizes with empty groups (first, middle and last), a group of one row, groups not a multiple of
# any tile, and padding rows after the last group (sum 151 of M = 176 rows).
SIZES = np.array([0, 37, 1, 0, 64, 49, 0], np.int32)
M_ROWS = 176


def _f64(a):
    return np.asarray(jnp.asarray(a).astype(jnp.float32), np.float64)


def _case(seed, k, n, dtype, m=M_ROWS, sizes=SIZES):
    """Fresh N(0, 1) x and dy, w ~ N(0, 1/K) (never zeros), rounded to dtype."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    w = jnp.asarray(rng.standard_normal((len(sizes), k, n)) / np.sqrt(k), dtype)
    dy = jnp.asarray(rng.standard_normal((m, n)), dtype)
    return x, w, dy, jnp.asarray(sizes)


def _np_reference(x, w, dy, sizes, offset=0, held=None):
    """float64 loop over groups: (y, dx, dw) for w holding groups offset .. offset + held - 1."""
    x, w, dy = _f64(x), _f64(w), _f64(dy)
    held = w.shape[0] if held is None else held
    starts = np.concatenate([[0], np.cumsum(sizes)])
    y, dx = np.zeros((x.shape[0], w.shape[2])), np.zeros_like(x)
    dw = np.zeros_like(w)
    for j in range(held):
        lo, hi = starts[offset + j], starts[offset + j + 1]
        y[lo:hi] = x[lo:hi] @ w[j]
        dx[lo:hi] = dy[lo:hi] @ w[j].T
        dw[j] = x[lo:hi].T @ dy[lo:hi]
    return y, dx, dw


def _vjp(impl, x, w, dy, sizes, offset=None):
    y, pullback = jax.vjp(lambda x, w: gm.grouped_matmul(x, w, sizes, offset, impl=impl), x, w)
    return (y, *pullback(dy))


def _check_zero_rows(arrays, sizes, offset, held):
    """Rows outside the held groups (other shards' groups and padding) are exactly zero."""
    starts = np.concatenate([[0], np.cumsum(sizes)])
    lo, hi = starts[offset], starts[offset + held]
    for a in arrays:
        a = _f64(a)
        assert np.all(a[:lo] == 0) and np.all(a[hi:] == 0)


# ------------------------------------------------------------------------------------------------
# The jnp backends (tiled: the CPU default; ragged_dot) and the reference functions vs float64
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["tiled", "ragged_dot"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("offset,held", [(None, None), (1, 4)], ids=["all-groups", "offset"])
def test_jnp_backend_forward_and_gradients(impl, dtype, offset, held):
    x, w, dy, sizes = _case(1, 48, 40, dtype)
    if offset is not None:
        w = w[offset:offset + held]  # this shard holds groups 1..4 (37 rows, 1, empty, 64)
    y, dx, dw = jax.jit(functools.partial(_vjp, impl))(
        x, w, dy, sizes, None if offset is None else jnp.int32(offset))
    assert y.dtype == dx.dtype == dw.dtype == dtype
    assert y.shape == (M_ROWS, 40) and dx.shape == x.shape and dw.shape == w.shape
    ey, edx, edw = _np_reference(x, w, dy, SIZES, offset or 0, held)
    rtol = FP32_RTOL if dtype == jnp.float32 else BF16_RTOL
    assert_close(y, ey, rtol, "y")
    assert_close(dx, edx, rtol, "dx")
    assert_close(dw, edw, rtol, "dw")
    _check_zero_rows([y, dx], SIZES, offset or 0, held or len(SIZES))
    for j in range(w.shape[0]):  # empty groups get exactly zero weight gradients
        if SIZES[(offset or 0) + j] == 0:
            assert np.all(_f64(dw[j]) == 0)
    # The reference functions the kernels name are the same math.
    assert_close(gm.grouped_matmul_reference(x, w, sizes, offset), ey, rtol, "reference")
    assert_close(gm.transposed_grouped_matmul_reference(x, dy, sizes, offset, w.shape[0]), edw,
                 rtol, "transposed reference")


@pytest.mark.parametrize("m", [8, 16, 32, 64, 256])
@pytest.mark.parametrize("offset,held", [(None, None), (2, 5)], ids=["all-groups", "offset"])
@pytest.mark.parametrize("rows", [M_ROWS, int(SIZES.sum())], ids=["padded", "no-padding"])
def test_tiled_every_tile_height_vs_float64(m, offset, held, rows):
    """The tiled kernels at tile heights below, across and above the group sizes (1..64 rows):
    tiles that end inside a group, a group of one row, fewer rows than one tile (m = 256), and,
    without padding rows, a last tile whose window would run past the rows (it reads the last m
    rows, and the earlier rows in it must keep the previous tile's products); fp32 operands (1e-5)
    against float64, zeros outside the held groups, zero dw for empty groups."""
    from dsv3_jax.ops import tiled_grouped_matmul as tiled

    x, w, dy, sizes = _case(7, 40, 24, jnp.float32, m=rows)
    w = w if offset is None else w[offset:offset + held]  # groups 2..6: 1, empty, 64, 49, empty
    starts = gm.local_starts(sizes, None if offset is None else jnp.int32(offset), w.shape[0])
    y = jax.jit(functools.partial(tiled.gmm, m=m))(x, w, starts)
    dx = jax.jit(functools.partial(tiled.gmm, m=m, transpose_rhs=True))(dy, w, starts)
    dw = jax.jit(functools.partial(tiled.tgmm, m=m))(x, dy, starts)
    ey, edx, edw = _np_reference(x, w, dy, SIZES, offset or 0, held)
    assert_close(y, ey, FP32_RTOL, "y")
    assert_close(dx, edx, FP32_RTOL, "dx")
    assert_close(dw, edw, FP32_RTOL, "dw")
    _check_zero_rows([y, dx], SIZES, offset or 0, held or len(SIZES))
    for j in range(w.shape[0]):
        if SIZES[(offset or 0) + j] == 0:
            assert np.all(_f64(dw[j]) == 0)


@pytest.mark.parametrize("impl", ["tiled", "ragged_dot"])
def test_grouped_dot_products_vs_float64(impl, monkeypatch):
    """grouped_dot / transposed_grouped_dot (the FP8 grouped path's fp32 products, no custom_vjp)
    through either jnp backend: fp32 results, zero padding rows, zero dw for empty groups."""
    monkeypatch.setenv("DSV3_GROUPED_MATMUL", impl)
    x, w, dy, sizes = _case(8, 32, 24, jnp.float32)
    y = jax.jit(gm.grouped_dot)(x, w, sizes)
    dw = jax.jit(gm.transposed_grouped_dot)(x, dy, sizes)
    ey, _, edw = _np_reference(x, w, dy, SIZES)
    assert y.dtype == dw.dtype == jnp.float32
    assert_close(y, ey, FP32_RTOL, "y")
    assert_close(dw, edw, FP32_RTOL, "dw")
    _check_zero_rows([y], SIZES, 0, len(SIZES))
    assert np.all(_f64(dw[SIZES == 0]) == 0)


def test_tiled_rows_follow_the_rows_per_group():
    """The tile height: TILED_ROWS caps it; fewer rows per group take the power of two at or below
    M / E_loc, never under TILED_MIN_ROWS (so the padding stays under the routed rows)."""
    cap = gm.TILED_ROWS["cpu"]
    assert gm.tiled_rows(4096, 16) == min(cap, 256)
    assert gm.tiled_rows(4096, 4) == cap
    assert gm.tiled_rows(300, 16) == 16  # 18.75 rows per group
    assert gm.tiled_rows(32, 16) == gm.TILED_MIN_ROWS  # decode: 2 rows per group
    assert gm.tiled_rows(1, 1) == gm.TILED_MIN_ROWS
    for rows, groups in ((4096, 16), (300, 16), (1000, 3), (64, 64)):
        m = gm.tiled_rows(rows, groups)
        assert m & (m - 1) == 0
        assert groups * (m - 1) < max(rows, groups * gm.TILED_MIN_ROWS)


def test_model_call_signature_and_auto_backend():
    """grouped_matmul(x, w, group_sizes) as the model calls it; auto = tiled on a CPU; under jit
    and grad together with other ops, against autodiff of lax.ragged_dot."""
    x, w, dy, sizes = _case(2, 16, 24, jnp.float32, m=60, sizes=np.array([20, 0, 30], np.int32))
    assert gm.grouped_matmul_impl() == "tiled"
    loss = lambda x, w: jnp.sum(jnp.sin(gm.grouped_matmul(x, w, sizes)) * dy)
    gx, gw = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)
    ref = lambda x, w: jnp.sum(jnp.sin(jax.lax.ragged_dot(x, w, sizes)) * dy)
    rx, rw = jax.grad(ref, argnums=(0, 1))(x, w)
    assert_close(gx, rx, FP32_RTOL, "dx")
    assert_close(gw, rw, FP32_RTOL, "dw")


def test_refuses_bad_arguments(monkeypatch):
    x, w, _, sizes = _case(3, 16, 8, jnp.float32, m=8, sizes=np.array([4, 4], np.int32))
    with pytest.raises(ValueError, match="same K"):
        gm.grouped_matmul(x[:, :8], w, sizes)
    with pytest.raises(ValueError, match="group_offset"):
        gm.grouped_matmul(x, w[:1], sizes)  # a shard of w without its offset
    with pytest.raises(ValueError, match="1-D integer"):
        gm.grouped_matmul(x, w, sizes.astype(jnp.float32))
    with pytest.raises(ValueError, match="impl"):
        gm.grouped_matmul(x, w, sizes, impl="triton")
    monkeypatch.setenv("DSV3_GROUPED_MATMUL", "cuda")
    with pytest.raises(ValueError, match="DSV3_GROUPED_MATMUL"):
        gm.grouped_matmul(x, w, sizes)
    monkeypatch.setenv("DSV3_GROUPED_MATMUL", "megablox")
    assert gm.grouped_matmul_impl() == "megablox"


# ------------------------------------------------------------------------------------------------
# The Pallas backends in interpret mode, through the custom_vjp (forward, dx, dw)
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def small_sm90_tiles(monkeypatch):
    """64-wide tiles (the smallest wgmma allows) so that the 176 rows make 3 row tiles: groups
    cross tile boundaries, a tile holds 3 groups, the tgmm masks first and last blocks, and K = 96
    runs 2 pipeline steps with the last partial (padded)."""
    from dsv3_jax.ops.pallas import grouped_matmul_sm90 as k

    small = k.TileConfig(block_m=64, block_n=64, block_k=64, max_concurrent_steps=2, grid_block_n=1)
    monkeypatch.setattr(k, "DEFAULT_GMM_CONFIG", small)
    monkeypatch.setattr(k, "DEFAULT_TGMM_CONFIG", small)


@pytest.mark.parametrize("impl", ["sm90", "megablox"])
def test_pallas_backend_vjp_with_offset_vs_float64(impl, small_sm90_tiles):
    """The shard holds groups 1..5 (37 rows, 1, empty, 64, 49), so the rows of groups 0 and 6
    (empty here) and the 25 padding rows must come back zero; its empty group gets dw = 0."""
    x, w, dy, sizes = _case(4, 96, 64, jnp.bfloat16)
    offset, held = 1, 5
    w = w[offset:offset + held]
    got = _vjp(impl, x, w, dy, sizes, jnp.int32(offset))
    ref = _vjp("ragged_dot", x, w, dy, sizes, jnp.int32(offset))
    for name, g, r, e in zip(("y", "dx", "dw"), got, ref,
                             _np_reference(x, w, dy, SIZES, offset, held)):
        assert g.dtype == r.dtype and g.shape == r.shape, name
        assert_close(g, e, BF16_RTOL, f"{impl} {name} vs float64")
        assert_close(g, r, ULP_BF16, f"{impl} {name} vs ragged_dot")
    _check_zero_rows(got[:2], SIZES, offset, held)
    for j in range(held):
        if SIZES[offset + j] == 0:
            assert np.all(_f64(got[2][j]) == 0), f"empty group {offset + j}"


@pytest.mark.parametrize("kernel, tiles", [("gmm", dict(block_m=128, block_n=192)),
                                           ("tgmm", dict(block_m=64, block_k=128, block_n=192)),
                                           ("tgmm", dict(block_m=64, block_k=192, block_n=128))])
def test_sm90_refuses_a_spilling_tile_config(kernel, tiles):
    """Tiles ptxas spills at (gmm 128x192: 512 B; tgmm 128x192 / 192x128: 188 / 184 B) are
    refused before lowering, naming the register count; the defaults and the widest tiles that
    compiled clean (gmm 192x128, tgmm 64x256) pass the same check."""
    from dsv3_jax.ops.pallas import grouped_matmul_sm90 as k

    x, w, dy, _ = _case(6, 64, 64, jnp.bfloat16, m=64, sizes=np.array([64], np.int32))
    starts = jnp.asarray([0, 64], jnp.int32)
    cfg = k.TileConfig(max_concurrent_steps=2, **tiles)
    call = (lambda: k.gmm(x, w[:1], starts, config=cfg, interpret=True)) if kernel == "gmm" else (
        lambda: k.tgmm(x, dy, starts, config=cfg, interpret=True))
    with pytest.raises(ValueError, match="registers per thread"):
        jax.eval_shape(call)
    assert k.registers_needed_gmm(k.DEFAULT_GMM_CONFIG) <= 255
    assert k.registers_needed_gmm(k.TileConfig(block_m=192, block_n=128)) <= 255
    assert k.registers_needed_tgmm(k.DEFAULT_TGMM_CONFIG) <= 255
    assert k.registers_needed_tgmm(k.TileConfig(block_k=64, block_n=256)) <= 255


def test_sm90_kernels_fp32_output_and_race_free():
    """gmm with an fp32 output and tgmm with a bf16 one, one CTA (every shared buffer reused
    across tiles and groups), under the interpreter's race detector."""
    import jax.experimental.pallas.mosaic_gpu as plgpu
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as gpu_interpret
    from dsv3_jax.ops.pallas import grouped_matmul_sm90 as k

    sizes = np.array([50, 0, 70], np.int32)  # group 0 ends inside row tile 0; padding after 120
    x, w, dy, _ = _case(5, 64, 64, jnp.bfloat16, m=128, sizes=sizes)
    starts = jnp.asarray(np.concatenate([[0], np.cumsum(sizes)]), jnp.int32)
    cfg = k.TileConfig(block_m=64, block_n=64, block_k=64, max_concurrent_steps=2)
    params = plgpu.InterpretGPUParams(detect_races=True)
    y = k.gmm(x, w, starts, out_dtype=jnp.float32, config=cfg, interpret=params, num_sms=1)
    assert not gpu_interpret.get_races().races_found
    dw = k.tgmm(x, dy, starts, out_dtype=jnp.bfloat16, config=cfg, interpret=params, num_sms=1)
    assert not gpu_interpret.get_races().races_found
    ey, _, edw = _np_reference(x, w, dy, sizes)
    assert y.dtype == jnp.float32 and dw.dtype == jnp.bfloat16
    assert_close(y, ey, 1e-5, "gmm fp32 out")  # products exact, fp32 sums: no bf16 rounding
    assert_close(dw, edw, BF16_RTOL, "tgmm bf16 out")
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        k.gmm(x.astype(jnp.float32), w.astype(jnp.float32), starts, interpret=True)


@pytest.mark.parametrize("k_dim,n_dim", [(7168, 2048), (2048, 7168)], ids=["w1", "w2"])
def test_sm90_kernels_lower_for_h100(k_dim, n_dim):
    """The full Mosaic GPU lowering for sm_90a at DeepSeek-V3 expert shapes (8 local experts, 4096
    rows): forward, its transposed-w form (dx) and tgmm (dw). Checks wgmma operand layouts (a
    transposed operand is refused unless 16-bit), TMA, register layouts, shared memory; not
    ptxas, register spills or the run."""
    from dsv3_jax.ops.pallas import grouped_matmul_sm90 as k

    m, g = 4096, 8
    bf16 = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)
    starts = jax.ShapeDtypeStruct((g + 1,), jnp.int32)
    lower = lambda f, *a: jax.jit(f).trace(*a).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in lower(functools.partial(k.gmm, num_sms=132),
                                 bf16(m, k_dim), bf16(g, k_dim, n_dim), starts)
    assert "mosaic_gpu" in lower(functools.partial(k.gmm, transpose_rhs=True, num_sms=132),
                                 bf16(m, n_dim), bf16(g, k_dim, n_dim), starts)
    assert "mosaic_gpu" in lower(functools.partial(k.tgmm, out_dtype=jnp.bfloat16, num_sms=132),
                                 bf16(m, k_dim), bf16(m, n_dim), starts)


# ------------------------------------------------------------------------------------------------
# megablox: the tile table and the Mosaic TPU lowering at DeepSeek-V3 expert shapes
# ------------------------------------------------------------------------------------------------
V3_EXPERT_DIMS = [(7168, 2048), (2048, 7168)]  # (I, J) of w1 / w3 and of w2
VMEM_SCOPED_DEFAULT = 16 * 2 ** 20  # the smallest default scoped VMEM of a TPU generation (v5e)


def _megablox_vmem_bytes(tm, tk, tn):
    """VMEM of one megablox call at these tiles, bf16 operands, inputs and outputs
    double-buffered, fp32 accumulator: (gmm with a bf16 output, tgmm with an fp32 dw tile)."""
    gmm = 2 * 2 * (tm * tk + tk * tn + tm * tn) + 4 * tm * tn
    tgmm = 2 * (2 * tk * tm + 2 * tm * tn + 4 * tk * tn) + 4 * tk * tn
    return gmm, tgmm


def test_megablox_tiling_table_entries_are_valid():
    """Every class's tiles are whole TPU tiles (tm of 16 sublanes, tk / tn of 128 lanes) and fit
    the default scoped VMEM; V3's expert calls (forward, dx with I and J swapped, tgmm) take the
    "v3_experts" class with tiles dividing every dim; small or odd dims keep the 128-capped rule
    (M rounded up to 16, I and J as they are below 128, a partial edge tile above)."""
    table = gm.MEGABLOX_TILING_TABLE
    assert list(table)[-1] == "small"  # the catch-all comes last
    for name, (tm, tk, tn) in table.items():
        assert tm % 16 == 0 and tk % 128 == 0 and tn % 128 == 0, name
        assert max(_megablox_vmem_bytes(tm, tk, tn)) <= VMEM_SCOPED_DEFAULT, name
    m = 8192
    for i, j in V3_EXPERT_DIMS:
        tiling = gm.megablox_tiling(m, i, j)
        assert tiling == table["v3_experts"]
        assert m % tiling[0] == 0 and i % tiling[1] == 0 and j % tiling[2] == 0
    old_rule = lambda m, k, n: (min(128, -(-m // 16) * 16), min(128, k), min(128, n))
    for m, k, n in [(176, 96, 64), (8, 16, 8), (32, 128, 64), (1000, 7168, 1408), (300, 1408, 2048),
                    (4096, 512, 640), (130, 200, 300)]:
        assert gm.megablox_tiling(m, k, n) == old_rule(m, k, n), (m, k, n)
    assert gm.megablox_tiling(100, 7168, 2048) == (112, 512, 1024)  # tm capped at M rounded to 16


def _megablox_kernels():
    import importlib

    return importlib.import_module("jax.experimental.pallas.ops.tpu.megablox.gmm")


def _tpu_text(fn, *args):
    return jax.export.export(jax.jit(fn), platforms=["tpu"])(*args).mlir_module()


@pytest.mark.parametrize("i_dim,j_dim", V3_EXPERT_DIMS, ids=["w1", "w2"])
def test_megablox_exports_for_tpu_at_v3_expert_shapes(i_dim, j_dim):
    """jax's megablox gmm (forward and the transposed-w dx form) and tgmm (dw) with our tiling,
    lowered to Mosaic TPU (interpret off) at V3 expert shapes: 8192 rows over 8 local experts."""
    mb = _megablox_kernels()
    m, e = 8192, 8
    bf16 = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)
    sizes = jax.ShapeDtypeStruct((e,), jnp.int32)
    fwd = functools.partial(mb.gmm, tiling=gm.megablox_tiling(m, i_dim, j_dim),
                            preferred_element_type=jnp.bfloat16)
    assert "tpu_custom_call" in _tpu_text(fwd, bf16(m, i_dim), bf16(e, i_dim, j_dim), sizes)
    dx = functools.partial(mb.gmm, tiling=gm.megablox_tiling(m, j_dim, i_dim), transpose_rhs=True,
                           preferred_element_type=jnp.bfloat16)
    assert "tpu_custom_call" in _tpu_text(dx, bf16(m, j_dim), bf16(e, i_dim, j_dim), sizes)
    dw = lambda x, dy, s: mb.tgmm(x.T, dy, s, tiling=gm.megablox_tiling(m, i_dim, j_dim),
                                  preferred_element_type=jnp.float32)
    assert "tpu_custom_call" in _tpu_text(dw, bf16(m, i_dim), bf16(m, j_dim), sizes)


@pytest.mark.parametrize("i_dim,j_dim", V3_EXPERT_DIMS, ids=["w1", "w2"])
def test_grouped_matmul_vjp_exports_for_tpu_through_megablox(i_dim, j_dim, monkeypatch):
    """The whole custom_vjp (forward, dx, dw) with DSV3_GROUPED_MATMUL=megablox, traced as on a
    TPU (ops/grouped_matmul.py runs megablox with interpret=not on_tpu(); patched to True here),
    an expert-parallel shard (8 of 256 experts, a traced group offset), lowered to Mosaic TPU:
    three kernels, at V3 expert shapes."""
    monkeypatch.setenv("DSV3_GROUPED_MATMUL", "megablox")
    monkeypatch.setattr(gm, "on_tpu", lambda: True)
    m, e_loc, e = 8192, 8, 256
    bf16 = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)

    def out_and_grads(x, w, sizes, offset, dy):
        y, pullback = jax.vjp(lambda x, w: gm.grouped_matmul(x, w, sizes, offset), x, w)
        return y, *pullback(dy)

    text = _tpu_text(out_and_grads, bf16(m, i_dim), bf16(e_loc, i_dim, j_dim),
                     jax.ShapeDtypeStruct((e,), jnp.int32), jax.ShapeDtypeStruct((), jnp.int32),
                     bf16(m, j_dim))
    assert text.count("tpu_custom_call") == 3  # gmm, gmm with w transposed, tgmm


# ------------------------------------------------------------------------------------------------
# The MoE layer through every backend
# ------------------------------------------------------------------------------------------------
def test_moe_layer_same_through_every_backend(monkeypatch):
    """Tiny MoE (4 experts, top-2, D 128, F 64; 32 token-expert rows), bf16 compute: output and
    gradients (x and the three expert weights) through tiled (the CPU default), sm90 (interpret)
    and megablox (interpret) equal those through ragged_dot up to summation order (2^-6 of the
    max: module docstring).
    Four experts rather than the tiny preset's eight: interpret mode runs one K loop per expert
    in a row tile, and this test is the file's slowest."""
    cfg = ds.get_model_config("tiny", dtype="bfloat16", init_std=0.05, n_shared_experts=0,
                              n_routed_experts=4, n_expert_groups=2, n_limited_groups=1)
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.standard_normal((2, 8, cfg.dim)), jnp.float32)
    valid = jnp.ones((2, 8), bool)
    moe = MoE(cfg)
    params = nn.unbox(jax.jit(moe.init)(jax.random.key(0), x, valid)["params"])

    def loss(params, x):
        y, _ = moe.apply({"params": params}, x, valid)
        return jnp.sum(y.astype(jnp.float32) * jnp.cos(jnp.arange(cfg.dim)))

    results = {}
    for impl in ("ragged_dot", "tiled", "sm90", "megablox"):
        monkeypatch.setenv("DSV3_GROUPED_MATMUL", impl)
        fn = lambda p, x: jax.value_and_grad(loss, argnums=(0, 1))(p, x)  # a new trace per impl
        results[impl] = jax.jit(fn)(params, x)
    (l_ref, (gp_ref, gx_ref)) = results["ragged_dot"]
    for impl in ("tiled", "sm90", "megablox"):
        l_got, (gp_got, gx_got) = results[impl]
        assert_close(l_got, l_ref, 2.0 ** -6, f"{impl} loss")
        assert_close(gx_got, gx_ref, 2.0 ** -6, f"{impl} dx")
        for name in ("w1", "w2", "w3"):
            assert np.any(_f64(gp_ref[name]) != 0)
            assert_close(gp_got[name], gp_ref[name], 2.0 ** -6, f"{impl} d{name}")


# ------------------------------------------------------------------------------------------------
# The benchmark's smoke mode
# ------------------------------------------------------------------------------------------------
def test_bench_grouped_matmul_smoke(capsys):
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        import bench_grouped_matmul
    finally:
        sys.path.pop(0)
    assert bench_grouped_matmul.main(["--smoke"]) == 0
    table = capsys.readouterr().out
    assert "| pallas sm90 (ours) |" in table and "MISMATCH" not in table
