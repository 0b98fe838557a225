"""Grouped (ragged) matmul for the routed experts: the one place that picks its implementation.

Letters (dsv3_jax/NOTATION.md): M rows (token-expert pairs, sorted by expert), I input dim,
J output dim, E experts (the groups) in group_sizes, E_loc of them held in w; e indexes them.

`grouped_matmul(x, w, group_sizes)[m] = x[m] @ w[e(m)]`, where rows are laid out group after group:
the first group_sizes[0] rows belong to group 0, the next group_sizes[1] to group 1, and so on.
Rows past sum(group_sizes) (padding) come back as zeros and get zero gradients. Products
accumulate in float32 and are returned in x's dtype (w is cast to x's dtype first).

Expert-parallel shards (`group_offset`): group_sizes [E] still describes every row of x, but w
[E_loc, I, J] holds only the experts group_offset .. group_offset + E_loc - 1 (a contiguous slice;
group_offset may be traced, e.g. axis_index * E_loc). Rows of those groups get their products;
rows of all other groups, and padding rows, come back as zeros with zero dx, and dw covers the
E_loc held experts only. Without group_offset, E_loc must equal E. (megablox's contract.)
parallel/expert_parallel.py does not need it: after its all_to_all a device holds only rows of
its own experts (sorted, then padding), so it passes their local sizes and no offset.

Gradients (a custom_vjp, the same structure on every backend):
  dx = grouped_matmul(dy, w^T)          dy [M, J], w[e]^T [J, I]: a grouped matmul (no copy of w
                                        on the kernels: they read w[e] transposed)
  dw[e] = x[rows of e]^T dy[rows of e]  the transposed grouped matmul ("tgmm"), fp32 sums,
                                        returned in w's dtype; zeros for an empty group.

Backends (chosen once here, at trace time; model code never asks):
  sm90        a Hopper GPU (compute capability 9.x): our Pallas Mosaic GPU kernels
              `ops/pallas/grouped_matmul_sm90.py` (gmm and tgmm) for bf16/fp16 operands; other
              dtypes (fp32) go to tiled. Off a GPU it runs in GPU interpret mode (tests).
  megablox    a TPU: `jax.experimental.pallas.ops.tpu.megablox` gmm / tgmm; elsewhere in
              interpret mode (tests).
  tiled       the CPU and any other GPU (Colab's T4 / L4 / A100): `ops/tiled_grouped_matmul.py`,
              plain jnp, a loop over row tiles of each held group (`TILED_ROWS`), FLOPs for the
              routed rows plus under one tile per group.
  ragged_dot  XLA's `jax.lax.ragged_dot` / `ragged_dot_general`: the reference
              (`grouped_matmul_reference` / `transposed_grouped_matmul_reference`). XLA:CPU
              expands it into a dense masked product over every group (cost E_loc x M) and other
              GPUs reach a few percent of a dense matmul, so it is never chosen by "auto".
DSV3_GROUPED_MATMUL=tiled|ragged_dot|sm90|megablox in the environment forces a backend (read at
trace time), e.g. for benchmarks and for tests of every backend on the CPU; a forced backend runs
as it is, with nothing in between.

The safety net (ops/safety_net.py) stands behind sm90 where "auto" chose it. The first time a
class of calls comes (gmm: dtype, K, N, transpose_rhs, out dtype; tgmm: dtype, K, N, out dtype),
the kernel runs once at 128 rows in three groups (one empty, 38 padding rows) on fresh random
inputs against ragged_dot in fp32, within 2^-7 of the largest value (tests/test_grouped_matmul.py)
and with exact zeros where the contract says so. A kernel that raises, hangs or disagrees is
skipped with one warning; then, fastest proven first:
  gmm   1. our gmm kernel; 2. on a Hopper GPU, jax's own Mosaic GPU kernel
        `jax.experimental.pallas.ops.gpu.ragged_dot_mgpu` (K and N multiples of 64, no group
        offset; rows past the groups, which it leaves unwritten, masked to zero), itself checked
        by the net; 3. tiled.
  tgmm  1. our tgmm kernel; 2. on a Hopper GPU, `transposed_ragged_dot_mgpu` (I and J multiples
        of 64, output in the operands' dtype, so only where w's dtype is x's; no group offset),
        checked by the net; 3. tiled.
(jax's kernels have no interpret mode: off a GPU the chain is our kernel, then tiled.)

Not done: SwiGLU's w1 and w3 are two calls (a fused call would read x once and write one [M, 2F]
result; a later step).
"""

from __future__ import annotations

import functools
import importlib
import pathlib

import jax
import jax.numpy as jnp

from dsv3_jax.ops import platform, safety_net, tiled_grouped_matmul
from dsv3_jax.ops.varying import same_varying_axes
from dsv3_jax.ops.platform import forced_impl, gpu_interpret, num_sms, on_tpu

IMPLS = ("auto", "tiled", "ragged_dot", "sm90", "megablox")
_TRANSPOSED_DIMS = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(((0,), (0,)), ((), ())),  # contract over the (ragged) rows
    lhs_ragged_dimensions=[0],
    rhs_group_dimensions=[],
)


# ------------------------------------------------------------------------------------------------
# Group bookkeeping
# ------------------------------------------------------------------------------------------------
def _all_starts(group_sizes: jax.Array) -> jax.Array:
    """int32 [E+1]: group e owns rows [starts[e], starts[e+1])."""
    gs = group_sizes.astype(jnp.int32)
    return jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(gs, dtype=jnp.int32)])


def local_starts(group_sizes: jax.Array, group_offset, num_local: int) -> jax.Array:
    """int32 [E_loc+1]: row starts of the held groups offset .. offset + E_loc - 1 (and the end of
    the last one), in rows of x."""
    starts = _all_starts(group_sizes)
    if group_offset is None:
        return starts
    return jax.lax.dynamic_slice(starts, (jnp.asarray(group_offset, jnp.int32),), (num_local + 1,))


def _local_frame(group_sizes, group_offset, num_local):
    """(sizes of the held groups [E_loc], first row of the held groups) for the ragged_dot path."""
    if group_offset is None:
        return group_sizes.astype(jnp.int32), None
    offset = jnp.asarray(group_offset, jnp.int32)
    sizes = jax.lax.dynamic_slice(group_sizes.astype(jnp.int32), (offset,), (num_local,))
    return sizes, _all_starts(group_sizes)[offset]


# ------------------------------------------------------------------------------------------------
# ragged_dot backend (the reference)
# ------------------------------------------------------------------------------------------------
def _ragged_forward(x, w, group_sizes, group_offset=None, transpose_rhs=False):
    """x [M, I] @ w[e] ([E_loc, I, J], or w[e]^T for w [E_loc, J, I]) -> [M, J] f32."""
    w = w.astype(x.dtype)
    if transpose_rhs:
        w = jnp.swapaxes(w, 1, 2)
    sizes, row_lo = _local_frame(group_sizes, group_offset, w.shape[0])
    if row_lo is not None:
        # Rotate the held groups' rows to the top: ragged_dot assigns rows from row 0 and leaves
        # rows past sum(sizes) zero, which after rotating back are exactly the other groups' rows.
        x = jnp.roll(x, -row_lo, axis=0)
    out = jax.lax.ragged_dot(x, w, sizes, preferred_element_type=jnp.float32)
    return out if row_lo is None else jnp.roll(out, row_lo, axis=0)


def _ragged_wgrad(x, dy, group_sizes, group_offset, num_local, out_dtype=jnp.float32):
    """x [M, I], dy [M, J] -> [E_loc, I, J] f32, per held group x_e^T dy_e."""
    sizes, row_lo = _local_frame(group_sizes, group_offset, num_local)
    dy = dy.astype(x.dtype)
    if row_lo is not None:
        x, dy = jnp.roll(x, -row_lo, axis=0), jnp.roll(dy, -row_lo, axis=0)
    return jax.lax.ragged_dot_general(x, dy, sizes, _TRANSPOSED_DIMS,
                                      preferred_element_type=jnp.float32).astype(out_dtype)


def grouped_matmul_reference(x: jax.Array, w: jax.Array, group_sizes: jax.Array,
                             group_offset=None) -> jax.Array:
    """x [M, I], w [E_loc, I, J], group_sizes int32 [E] -> [M, J] in x's dtype (lax.ragged_dot);
    the module docstring's contract, group_offset included."""
    return _ragged_forward(x, w, group_sizes, group_offset).astype(x.dtype)


def transposed_grouped_matmul_reference(x: jax.Array, dy: jax.Array, group_sizes: jax.Array,
                                        group_offset=None, num_groups: int | None = None
                                        ) -> jax.Array:
    """x [M, I], dy [M, J] -> [E_loc, I, J] float32: x[rows of e]^T dy[rows of e] for the held
    groups (E_loc = num_groups, default len(group_sizes))."""
    num_local = group_sizes.shape[0] if num_groups is None else num_groups
    return _ragged_wgrad(x, dy, group_sizes, group_offset, num_local)


# ------------------------------------------------------------------------------------------------
# tiled backend (the portable default)
# ------------------------------------------------------------------------------------------------
# Rows per tile of the tiled backend, per platform: the most a tile takes. A call with fewer rows
# per held group on average (M / E_loc) takes the power of two at or below that (at least 8), so
# the padding, under one tile per group, stays below the routed rows. CPU: 128 measured fastest
# of 32..256 at the "mid" config's shapes (experiments/RESULTS.md); GPU: 512 keeps the loop's
# per-tile launches small against a tile's FLOPs (not yet timed on a GPU).
TILED_ROWS = {"cpu": 128, "gpu": 512}
TILED_MIN_ROWS = 8


def tiled_rows(rows: int, num_local: int) -> int:
    """The tile height m for a call on `rows` rows over `num_local` held groups (TILED_ROWS)."""
    cap = TILED_ROWS.get(jax.devices()[0].platform, TILED_ROWS["cpu"])
    per_group = max(rows // max(num_local, 1), 1)
    return max(TILED_MIN_ROWS, min(cap, 1 << (per_group.bit_length() - 1)))


def _tiled_forward(x, w, group_sizes, group_offset=None, transpose_rhs=False, out_dtype=None):
    starts = local_starts(group_sizes, group_offset, w.shape[0])
    return tiled_grouped_matmul.gmm(x, w, starts, m=tiled_rows(x.shape[0], w.shape[0]),
                                    transpose_rhs=transpose_rhs, out_dtype=out_dtype)


def _tiled_wgrad(x, dy, group_sizes, group_offset, num_local, out_dtype=jnp.float32):
    starts = local_starts(group_sizes, group_offset, num_local)
    return tiled_grouped_matmul.tgmm(x, dy, starts, m=tiled_rows(x.shape[0], num_local),
                                     out_dtype=out_dtype)


def _plain_impl() -> str:
    """The jnp backend for grouped products outside the custom_vjp: ragged_dot on a TPU (XLA
    lowers it to a grouped kernel there), tiled elsewhere; DSV3_GROUPED_MATMUL=ragged_dot|tiled
    forces one (the kernel backends name none of these products)."""
    forced = forced_impl("DSV3_GROUPED_MATMUL", IMPLS)
    if forced in ("tiled", "ragged_dot"):
        return forced
    return "ragged_dot" if on_tpu() else "tiled"


def grouped_dot(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """x [M, I], w [E, I, J], group_sizes int [E] -> [M, J] float32, no custom gradient: the
    product of `grouped_matmul` on x's dtype (ops/fp8.py's grouped FP8 path, on fp32 operands)."""
    gs = group_sizes.astype(jnp.int32)
    if _plain_impl() == "ragged_dot":
        return _ragged_forward(x, w, gs)
    return _tiled_forward(x, w, gs, out_dtype=jnp.float32)


def transposed_grouped_dot(x: jax.Array, dy: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """x [M, I], dy [M, J], group_sizes int [E] -> [E, I, J] float32: x_e^T dy_e per group (zeros
    for an empty group), through the same backend as `grouped_dot`."""
    gs = group_sizes.astype(jnp.int32)
    return _WGRAD[_plain_impl()](x, dy, gs, None, gs.shape[0], jnp.float32)


# ------------------------------------------------------------------------------------------------
# Pallas backends
# ------------------------------------------------------------------------------------------------
def _sm90_gmm(x, w, group_sizes, group_offset, transpose_rhs):
    from dsv3_jax.ops.pallas import grouped_matmul_sm90  # Mosaic GPU is imported only when used

    starts = local_starts(group_sizes, group_offset, w.shape[0])
    return grouped_matmul_sm90.gmm(x, w.astype(x.dtype), starts, transpose_rhs=transpose_rhs,
                                   out_dtype=x.dtype, interpret=gpu_interpret(), num_sms=num_sms())


def _tgmm_kernel_out(out_dtype):
    from dsv3_jax.ops.pallas import grouped_matmul_sm90

    # The kernel writes w's dtype straight from its fp32 sums (no [E, I, J] fp32 round trip).
    return out_dtype if jnp.dtype(out_dtype) in grouped_matmul_sm90.OUT_DTYPES else jnp.float32


def _sm90_tgmm(x, dy, group_sizes, group_offset, num_local, out_dtype):
    from dsv3_jax.ops.pallas import grouped_matmul_sm90

    starts = local_starts(group_sizes, group_offset, num_local)
    return grouped_matmul_sm90.tgmm(x, dy.astype(x.dtype), starts,
                                    out_dtype=_tgmm_kernel_out(out_dtype),
                                    interpret=gpu_interpret(), num_sms=num_sms())


def _sm90_forward(x, w, group_sizes, group_offset, transpose_rhs, checked=False):
    """Our gmm kernel; with `checked` ("auto" on a Hopper GPU) through the safety net, then jax's
    Mosaic GPU ragged_dot where it takes the call, then tiled (module docstring)."""
    from dsv3_jax.ops.pallas import grouped_matmul_sm90

    if jnp.dtype(x.dtype) not in grouped_matmul_sm90.IN_DTYPES:
        return _tiled_forward(x, w, group_sizes, group_offset, transpose_rhs)
    k, n = x.shape[1], (w.shape[1] if transpose_rhs else w.shape[2])
    if not checked or safety_net.passes(_gmm_check(x.dtype, k, n, transpose_rhs)):
        return _sm90_gmm(x, w, group_sizes, group_offset, transpose_rhs)
    if (group_offset is None and _mgpu_gmm_covers(x.dtype, k, n)
            and safety_net.passes(_mgpu_gmm_check(x.dtype, k, n, transpose_rhs))):
        return _mgpu_gmm(x, w, group_sizes, transpose_rhs)
    return _tiled_forward(x, w, group_sizes, group_offset, transpose_rhs)


def _sm90_wgrad(x, dy, group_sizes, group_offset, num_local, out_dtype, checked=False):
    """Our tgmm kernel; with `checked` through the safety net, then jax's Mosaic GPU transposed
    ragged_dot where it takes the call, then tiled."""
    from dsv3_jax.ops.pallas import grouped_matmul_sm90

    if jnp.dtype(x.dtype) not in grouped_matmul_sm90.IN_DTYPES:
        return _tiled_wgrad(x, dy, group_sizes, group_offset, num_local, out_dtype)
    k, n = x.shape[1], dy.shape[1]
    if not checked or safety_net.passes(_tgmm_check(x.dtype, k, n, out_dtype)):
        return _sm90_tgmm(x, dy, group_sizes, group_offset, num_local, out_dtype)
    if (group_offset is None and _mgpu_tgmm_covers(x.dtype, k, n, out_dtype)
            and safety_net.passes(_mgpu_tgmm_check(x.dtype, k, n))):
        return _mgpu_tgmm(x, dy, group_sizes)
    return _tiled_wgrad(x, dy, group_sizes, group_offset, num_local, out_dtype)


# ------------------------------------------------------------------------------------------------
# jax's own Mosaic GPU ragged dots (the first fallback on a Hopper GPU; no interpret mode)
# ------------------------------------------------------------------------------------------------
_MGPU = "jax.experimental.pallas.ops.gpu"


def _on_real_hopper() -> bool:
    """A Hopper GPU itself: jax's kernels have no interpret mode."""
    return platform.on_hopper() and not gpu_interpret()


def _mgpu_block_n(n: int) -> int:
    return 128 if n % 128 == 0 else 64


def _mgpu_gmm_covers(dtype, k: int, n: int) -> bool:
    """jax's ragged_dot_mgpu: Hopper only, 16-bit operands, K a multiple of its block_k (64), N of
    64 (its output tiles); no group offset."""
    return _on_real_hopper() and k % 64 == 0 and n % 64 == 0


def _mask_rows(out, group_sizes):
    """Rows past sum(group_sizes), which the jax kernels leave unwritten, set to zero."""
    rows = jnp.arange(out.shape[0], dtype=jnp.int32)[:, None]
    return jnp.where(rows < jnp.sum(group_sizes.astype(jnp.int32)), out, jnp.zeros((), out.dtype))


def _mgpu_gmm(x, w, group_sizes, transpose_rhs):
    mod = importlib.import_module(f"{_MGPU}.ragged_dot_mgpu")
    n = w.shape[1] if transpose_rhs else w.shape[2]
    out = mod.ragged_dot(x, w.astype(x.dtype), group_sizes=group_sizes.astype(jnp.int32),
                         block_m=128, block_n=_mgpu_block_n(n), block_k=64, max_concurrent_steps=4,
                         grid_block_n=1, transpose_rhs=transpose_rhs)
    return _mask_rows(out, group_sizes)


def _mgpu_tgmm_covers(dtype, k: int, n: int, out_dtype) -> bool:
    """jax's transposed_ragged_dot_mgpu: Hopper only, output in the operands' dtype (so only when
    w's dtype is x's), I and J multiples of its blocks (64); no group offset."""
    return (_on_real_hopper() and jnp.dtype(out_dtype) == jnp.dtype(dtype)
            and k % 64 == 0 and n % 64 == 0)


def _mgpu_tgmm(x, dy, group_sizes):
    mod = importlib.import_module(f"{_MGPU}.transposed_ragged_dot_mgpu")
    return mod.transposed_ragged_dot(x, dy.astype(x.dtype),
                                     group_sizes=group_sizes.astype(jnp.int32), block_m=64,
                                     block_n=_mgpu_block_n(dy.shape[1]), block_k=64,
                                     max_concurrent_steps=2, grid_block_n=1)


# ------------------------------------------------------------------------------------------------
# The safety net's checks (ops/safety_net.py): one class of calls each, probed at a small shape
# ------------------------------------------------------------------------------------------------
_PALLAS = pathlib.Path(__file__).resolve().parent / "pallas"
_SOURCES = (str(_PALLAS / "grouped_matmul_sm90.py"), str(_PALLAS / "hopper.py"))
PROBE_SIZES = (40, 0, 50)  # three groups, one empty, 128 rows: 38 padding rows
PROBE_ROWS = 128
# Kernel vs ragged_dot in fp32: within 2^-7 of the largest value (tests/test_grouped_matmul.py).
KERNEL_RTOL = 2.0 ** -7


def _probe_operands(dtype, k, n, w_shape):
    keys = jax.random.split(safety_net.fresh_key(), 2)
    x = jax.random.normal(keys[0], (PROBE_ROWS, k), jnp.float32).astype(dtype)
    other = jax.random.normal(keys[1], w_shape, jnp.float32) / jnp.sqrt(k)
    return x, other.astype(dtype), jnp.asarray(PROBE_SIZES, jnp.int32)


def _probe_gmm(kernel, dtype, k, n, transpose_rhs):
    """kernel(x, w, sizes) -> [M, N] vs lax.ragged_dot (fp32): KERNEL_RTOL, padding rows zero."""
    g = len(PROBE_SIZES)
    x, w, sizes = _probe_operands(dtype, k, n, (g, n, k) if transpose_rhs else (g, k, n))
    got = jax.jit(kernel)(x, w, sizes)
    want = jax.jit(lambda: _ragged_forward(x, w, sizes, None, transpose_rhs))()
    safety_net.compare("gmm", got, want, KERNEL_RTOL)
    if jnp.any(got[sum(PROBE_SIZES):] != 0):
        raise safety_net.Mismatch("gmm: rows past the last group are not zero")


def _probe_tgmm(kernel, dtype, k, n):
    """kernel(x, dy, sizes) -> [E, K, N] vs ragged_dot_general (fp32): KERNEL_RTOL; the empty
    group's product exactly zero."""
    x, dy, sizes = _probe_operands(dtype, k, n, (PROBE_ROWS, n))
    got = jax.jit(kernel)(x, dy, sizes)
    want = jax.jit(lambda: _ragged_wgrad(x, dy, sizes, None, len(PROBE_SIZES)))()
    safety_net.compare("tgmm", got, want, KERNEL_RTOL)
    if jnp.any(got[PROBE_SIZES.index(0)] != 0):
        raise safety_net.Mismatch("tgmm: the empty group's product is not zero")


def _gmm_dims(dtype, k, n, transpose_rhs):
    name = jnp.dtype(dtype).name
    return f"{name} K={k} N={n}{' transpose_rhs' if transpose_rhs else ''} out={name}"


def _gmm_check(dtype, k: int, n: int, transpose_rhs: bool) -> safety_net.Check:
    probe = lambda: _probe_gmm(lambda x, w, s: _sm90_gmm(x, w, s, None, transpose_rhs),
                               dtype, k, n, transpose_rhs)
    fallback = "ragged_dot_mgpu" if _mgpu_gmm_covers(dtype, k, n) else "tiled"
    return safety_net.Check("gmm_sm90", _gmm_dims(dtype, k, n, transpose_rhs), probe, _SOURCES,
                            "DSV3_GROUPED_MATMUL", "sm90", fallback)


def _tgmm_check(dtype, k: int, n: int, out_dtype) -> safety_net.Check:
    out = jnp.dtype(_tgmm_kernel_out(out_dtype))
    probe = lambda: _probe_tgmm(
        lambda x, dy, s: _sm90_tgmm(x, dy, s, None, len(PROBE_SIZES), out), dtype, k, n)
    fallback = ("transposed_ragged_dot_mgpu" if _mgpu_tgmm_covers(dtype, k, n, out_dtype)
                else "tiled")
    return safety_net.Check("tgmm_sm90", f"{jnp.dtype(dtype).name} K={k} N={n} out={out.name}",
                            probe, _SOURCES, "DSV3_GROUPED_MATMUL", "sm90", fallback)


def _mgpu_gmm_check(dtype, k: int, n: int, transpose_rhs: bool) -> safety_net.Check:
    probe = lambda: _probe_gmm(lambda x, w, s: _mgpu_gmm(x, w, s, transpose_rhs), dtype, k, n,
                               transpose_rhs)
    return safety_net.Check("ragged_dot_mgpu", _gmm_dims(dtype, k, n, transpose_rhs), probe, (),
                            "DSV3_GROUPED_MATMUL", "sm90", "tiled")


def _mgpu_tgmm_check(dtype, k: int, n: int) -> safety_net.Check:
    name = jnp.dtype(dtype).name
    return safety_net.Check("transposed_ragged_dot_mgpu", f"{name} K={k} N={n} out={name}",
                            lambda: _probe_tgmm(_mgpu_tgmm, dtype, k, n), (),
                            "DSV3_GROUPED_MATMUL", "sm90", "tiled")


def model_checks(cfg) -> list[safety_net.Check]:
    """The routed experts' classes (safety_net.check_model_kernels), when they run in cfg.dtype
    (with cfg.fp8 they take ops.fp8's grouped path instead): gmm at K, N = (D, F) and (F, D), plain
    (Fprop of w1 / w3, w2) and transposed (their Dgrad), tgmm at both (Wgrad, in cfg.dtype: the
    layer casts its weights), and on a Hopper GPU the jax fallbacks for the same classes."""
    from dsv3_jax.ops.pallas import grouped_matmul_sm90

    dtype, d, f = jnp.dtype(cfg.dtype), cfg.dim, cfg.moe_inter_dim
    if cfg.fp8 or cfg.n_routed_experts == 0 or dtype not in grouped_matmul_sm90.IN_DTYPES:
        return []
    checks = [_gmm_check(dtype, k, n, t) for k, n in ((d, f), (f, d)) for t in (False, True)]
    checks += [_tgmm_check(dtype, k, n, dtype) for k, n in ((d, f), (f, d))]
    checks += [_mgpu_gmm_check(dtype, k, n, t) for k, n in ((d, f), (f, d)) for t in (False, True)
               if _mgpu_gmm_covers(dtype, k, n)]
    checks += [_mgpu_tgmm_check(dtype, k, n) for k, n in ((d, f), (f, d))
               if _mgpu_tgmm_covers(dtype, k, n, dtype)]
    return checks


safety_net.register_model_checks("grouped_matmul", model_checks)


def _megablox():
    # The package's __init__ re-exports the differentiable `gmm` under the module's name.
    return importlib.import_module("jax.experimental.pallas.ops.tpu.megablox.gmm")


# megablox tile sizes (tm, tk, tn), one entry per shape class of a call's (I, J): I the dim that
# `megablox_tiling` gets as k, J the one it gets as n (gmm: contracted and output dims, so the dx
# call of w [E, I, J] comes as (J, I); tgmm: the [I, J] of dw, contracting over M). The first
# class whose tk divides I and whose tn divides J wins; "small" takes everything else.
#   "v3_experts"  I, J multiples of 512 / 1024: DeepSeek-V3's routed experts (D 7168, F 2048):
#                 w1 / w3 (I 7168, J 2048), w2 (I 2048, J 7168), their dx calls (2048, 7168) and
#                 (7168, 2048) and the tgmm of each. VMEM, bf16 operands, double-buffered: gmm
#                 lhs 512x512 + rhs 512x1024 + out 512x1024, plus the fp32 512x1024 accumulator,
#                 ~7 MiB; tgmm with an fp32 dw tile ~9 MiB: inside the 16 MiB default scoped VMEM
#                 of every TPU generation (megablox sets no vmem limit).
#   "small"       small or odd dims (tests, tiny presets): 128 capped at the dim, the edge tile
#                 partial (megablox masks it).
# tm is capped at M rounded up to 16 (bf16's sublane tile); the caller pads M to tm. All entries
# are multiples of 128 lanes (tk, tn) and of 16 sublanes (tm). UNTUNED: chosen from the VMEM budget
# and MaxText's megablox defaults, not timed on a real TPU (none was lent).
MEGABLOX_TILING_TABLE: dict[str, tuple[int, int, int]] = {
    "v3_experts": (512, 512, 1024),
    "small": (128, 128, 128),
}


def megablox_tiling(m: int, k: int, n: int) -> tuple[int, int, int]:
    """(tm, tk, tn) for a megablox call on M rows and dims (I, J) = (k, n), from the first class of
    `MEGABLOX_TILING_TABLE` that takes them (its table comment); M is padded to tm (a multiple of
    16) by the caller; in the "small" class I and J may end in a partial tile."""
    tm_cap = -(-m // 16) * 16
    for name, (tm, tk, tn) in MEGABLOX_TILING_TABLE.items():
        if name == "small" or (k % tk == 0 and n % tn == 0):
            return min(tm, tm_cap), min(tk, k), min(tn, n)
    raise AssertionError("MEGABLOX_TILING_TABLE has no 'small' class")


def _pad_rows(a, multiple):
    extra = -a.shape[0] % multiple
    return jnp.pad(a, ((0, extra), (0, 0))) if extra else a


def _megablox_forward(x, w, group_sizes, group_offset, transpose_rhs):
    m = x.shape[0]
    n = w.shape[1] if transpose_rhs else w.shape[2]
    tiling = megablox_tiling(m, x.shape[1], n)
    out = _megablox().gmm(_pad_rows(x, tiling[0]), w.astype(x.dtype),
                          group_sizes.astype(jnp.int32), preferred_element_type=x.dtype,
                          tiling=tiling, group_offset=group_offset, transpose_rhs=transpose_rhs,
                          interpret=not on_tpu())[:m]
    # megablox leaves rows past the last held group unwritten (garbage) when it holds every group.
    starts = local_starts(group_sizes, group_offset, w.shape[0])
    rows = jnp.arange(m, dtype=jnp.int32)[:, None]
    return jnp.where((rows >= starts[0]) & (rows < starts[-1]), out, jnp.zeros((), out.dtype))


def _megablox_wgrad(x, dy, group_sizes, group_offset, num_local, out_dtype):
    tiling = megablox_tiling(x.shape[0], x.shape[1], dy.shape[1])
    return _megablox().tgmm(_pad_rows(x, tiling[0]).T, _pad_rows(dy.astype(x.dtype), tiling[0]),
                            group_sizes.astype(jnp.int32), preferred_element_type=out_dtype,
                            tiling=tiling, group_offset=group_offset, num_actual_groups=num_local,
                            interpret=not on_tpu())


# "sm90_checked": what "auto" picks on a Hopper GPU, the kernels behind the safety net.
_FORWARD = {"tiled": _tiled_forward, "ragged_dot": _ragged_forward, "sm90": _sm90_forward,
            "megablox": _megablox_forward,
            "sm90_checked": functools.partial(_sm90_forward, checked=True)}
_WGRAD = {"tiled": _tiled_wgrad, "ragged_dot": _ragged_wgrad, "sm90": _sm90_wgrad,
          "megablox": _megablox_wgrad,
          "sm90_checked": functools.partial(_sm90_wgrad, checked=True)}


# ------------------------------------------------------------------------------------------------
# Dispatch and the custom_vjp
# ------------------------------------------------------------------------------------------------
def grouped_matmul_impl() -> str:
    """The backend `grouped_matmul(impl="auto")` uses here: "sm90" on a Hopper GPU, "megablox" on
    a TPU, "tiled" elsewhere; DSV3_GROUPED_MATMUL=tiled|ragged_dot|sm90|megablox overrides it."""
    return forced_impl("DSV3_GROUPED_MATMUL", IMPLS) or (
        "sm90" if platform.on_hopper() else "megablox" if on_tpu() else "tiled")


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, group_offset=None, *,
                   impl: str = "auto") -> jax.Array:
    """x [M, I], w [E_loc, I, J], group_sizes int [E] -> [M, J] in x's dtype.

    group_offset: None (w holds every group, E_loc = E) or an int32 scalar, the index in
    group_sizes of w[0] (module docstring). impl: "auto" or one of tiled, ragged_dot, sm90,
    megablox.
    """
    if impl not in IMPLS:
        raise ValueError(f"grouped_matmul: impl={impl!r}; use one of {IMPLS}.")
    if x.ndim != 2 or w.ndim != 3 or x.shape[1] != w.shape[1]:
        raise ValueError(f"grouped_matmul: x {x.shape} must be [M, K] and w {w.shape} [G, K, N] "
                         "with the same K.")
    if group_sizes.ndim != 1 or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"grouped_matmul: group_sizes must be a 1-D integer array, got "
                         f"{group_sizes.shape} {group_sizes.dtype}.")
    if group_offset is None and group_sizes.shape[0] != w.shape[0]:
        raise ValueError(f"grouped_matmul: group_sizes has {group_sizes.shape[0]} groups but w "
                         f"{w.shape} holds {w.shape[0]}; pass group_offset when w is a shard.")
    if group_sizes.shape[0] < w.shape[0]:
        raise ValueError(f"grouped_matmul: w holds {w.shape[0]} groups, more than group_sizes "
                         f"describes ({group_sizes.shape[0]}).")
    if impl == "auto":
        impl = grouped_matmul_impl()
        if impl == "sm90" and forced_impl("DSV3_GROUPED_MATMUL", IMPLS) is None:
            impl = "sm90_checked"  # chosen, not forced: the safety net stands behind it
    x, w = same_varying_axes(x, w)
    has_offset = group_offset is not None
    offset = jnp.asarray(group_offset if has_offset else 0, jnp.int32)
    return _grouped_matmul(x, w, group_sizes.astype(jnp.int32), offset, (impl, has_offset))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _grouped_matmul(x, w, group_sizes, offset, static):
    return _grouped_matmul_fwd(x, w, group_sizes, offset, static)[0]


def _grouped_matmul_fwd(x, w, group_sizes, offset, static):
    impl, has_offset = static
    with jax.named_scope(f"grouped_matmul_{impl}"):
        out = _FORWARD[impl](x, w, group_sizes, offset if has_offset else None, False)
    return out.astype(x.dtype), (x, w, group_sizes, offset)


def _grouped_matmul_bwd(static, residuals, dy):
    impl, has_offset = static
    x, w, group_sizes, offset = residuals
    offset = offset if has_offset else None
    with jax.named_scope(f"grouped_matmul_dgrad_{impl}"):
        dx = _FORWARD[impl](dy.astype(x.dtype), w, group_sizes, offset, True)  # dy @ w[e]^T
    with jax.named_scope(f"grouped_matmul_wgrad_{impl}"):
        dw = _WGRAD[impl](x, dy, group_sizes, offset, w.shape[0], w.dtype)
    return dx.astype(x.dtype), dw.astype(w.dtype), None, None


_grouped_matmul.defvjp(_grouped_matmul_fwd, _grouped_matmul_bwd)


__all__ = ["IMPLS", "grouped_dot", "grouped_matmul", "grouped_matmul_impl",
           "grouped_matmul_reference", "local_starts", "megablox_tiling", "tiled_rows",
           "transposed_grouped_dot", "transposed_grouped_matmul_reference"]
