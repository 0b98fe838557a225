"""FP8 (E4M3) block-scaled quantization, the block-scaled GEMM, and the FP8 linear layer.

SPEC.md section 3, DeepSeek-V3 report section 3.3. Every number is float8_e4m3fn (max 448).
Letters (dsv3_jax/NOTATION.md): M rows, I contracted, J output dim; Ib, Jb their 128-blocks.

  act_quant(x)      1x128 tiles along the last (contraction) dim:  x [..., I] -> q [..., I],
                    s [..., Ib], s = max(amax, 1e-4) / 448, q = e4m3(x / s).
  col_quant(x)      128x1 tiles along the first dim (the token dim of Wgrad): x [T, I] -> q [T, I],
                    s [ceil(T/128), I]. Equal to act_quant(x.T) transposed.
  weight_quant(w)   128x128 blocks: w [J, I] -> q [J, I], s [Jb, Ib] (edge blocks partial);
                    weight_dequant(q, s) = q[j, i] * s[j // 128, i // 128].
  fp8_gemm          C[m, j] = sum_ib (A_q[m, ib] . B_q[j, ib]) * a_s[m, ib] * b_s[j // 128, ib], each
                    128-wide I block summed, scaled and added in fp32, output bf16. B is [J, I]
                    (I-major, DeepSeek's [out, in] layout); b_s is per 128x128 block [Jb, Ib] or per
                    row [J, Ib] (1x128 tiles, as Wgrad's second operand has).
  calc_diff(x, y)   1 - 2 sum(x y) / sum(x^2 + y^2) in float64 (DeepGEMM's metric; < 1e-3 passes).
  fp8_linear(x, w)  y = x @ w with FP8 Fprop, Dgrad and Wgrad GEMMs (custom_vjp), w [I, J] (our
                    [in, out] layout) the fp32 master kernel; gradients fp32 for w.
  fp8_grouped_matmul(x, w, group_sizes)
                    the routed experts' grouped product x [M, I] @ w[e] [E, I, J] (rows sorted by
                    expert, as ops.grouped_matmul) through the same three FP8 GEMMs: 1x128 tiles of
                    x and dy, 128x128 blocks of each expert's weight, and 128x1 Wgrad tiles along the
                    tokens that restart at every expert's first row (a tile never mixes experts).

Scales may be rounded up to powers of two (`pow2_scale=True`): then q * s is exact in any float
format and the tile's amax still maps inside [-448, 448].

Which GEMM runs (decided here, once, in `gemm_impl`; model code never asks): on a Hopper GPU
(compute capability 9.x) the Pallas Mosaic GPU kernel `ops/pallas/fp8_gemm_sm90.py`; everywhere else
(CPU, TPU, other GPUs) `fp8_gemm_reference`, plain jnp whose per-block dots XLA runs in bf16 with
fp32 results (e4m3 values and their products are exact there). No other platform has a kernel yet.
DSV3_FP8_GEMM=reference|sm90 in the environment overrides the choice (read at trace time), and a
forced choice runs as it is. Where "auto" chose the kernel, the safety net (ops/safety_net.py)
stands behind it: the first time a class of GEMMs comes (I, J, out dtype, b's scale layout), the
kernel runs once at 128 rows on fresh random operands against `fp8_gemm_reference`, within one
ulp of the output (|kernel - reference| <= 2^-8 |reference|, tests/test_fp8.py); a kernel that
raises, hangs or disagrees is skipped with one warning and the reference runs.
The grouped product has only a plain-jnp path for now (`fp8_grouped_gemm_reference`: the tiles
dequantized to fp32 and one fp32 grouped product, `ops.grouped_matmul.grouped_dot`, the same sums
up to fp32 rounding); a grouped FP8
kernel for Hopper is still to be written, so on a GPU FP8 routed experts cost more than bf16 ones
today.

Layouts of the three training GEMMs (w is our [I, J] master kernel, x [T, I], dy [T, J]; the GEMM
takes A [rows, contracted] and B [columns, contracted], both contiguous along the contracted dim):
  Fprop  y  = x w        A = q(x) 1x128 [T, I];   B = q(w)^T [J, I]: one transpose of the
                         fp8 weight (128x128 blocks transpose exactly: q(w^T) = q(w)^T).
  Dgrad  dx = dy w^T     A = q(dy) 1x128 [T, J];  B = q(w) [I, J] as stored: no transpose.
  Wgrad  dw = x^T dy     A = q(x)^T [I, T], B = q(dy)^T [J, T], both 128x1 along T (the
                         contraction dim), so both get transposed (fp8 copies) and B has per-row
                         scales; output fp32, already in the [in, out] layout of w.
The forward keeps x (compute dtype) and the fp8 weight with its scales for the backward pass.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import pathlib

from dsv3_jax.ops import platform, safety_net
from dsv3_jax.ops.grouped_matmul import grouped_dot, transposed_grouped_dot
from dsv3_jax.ops.varying import same_varying_axes
from dsv3_jax.ops.platform import forced_impl, gpu_interpret, num_sms

E4M3 = jnp.float8_e4m3fn
E4M3_MAX = 448.0  # largest finite float8_e4m3fn
BLOCK = 128  # tile / block edge of every quantizer here
AMAX_FLOOR = 1e-4  # an all-zero tile gets s = 1e-4 / 448, not a division by zero

_GEMM_IMPLS = ("auto", "sm90", "reference")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pad_to(x: jax.Array, axis: int, multiple: int) -> jax.Array:
    extra = _cdiv(x.shape[axis], multiple) * multiple - x.shape[axis]
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def _scale_from_amax(amax: jax.Array, pow2_scale: bool) -> jax.Array:
    """s = max(amax, 1e-4) / 448, optionally rounded up to a power of two (float32)."""
    s = jnp.maximum(amax.astype(jnp.float32), AMAX_FLOOR) / E4M3_MAX
    if pow2_scale:
        # s = mant * 2^e with mant in [0.5, 1): the next power of two up is 2^e (2^(e-1) when s is
        # one already). Exact, unlike exp2(ceil(log2(s))).
        mant, expo = jnp.frexp(s)
        s = jnp.ldexp(jnp.ones_like(s), jnp.where(mant == 0.5, expo - 1, expo))
    return s


def _to_e4m3(scaled: jax.Array) -> jax.Array:
    # |x / s| <= 448 up to the division's rounding; the clip keeps a 448.00003 from becoming NaN.
    return jnp.clip(scaled, -E4M3_MAX, E4M3_MAX).astype(E4M3)


# ------------------------------------------------------------------------------------------------
# Quantizers
# ------------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("block", "pow2_scale"))
def act_quant(x: jax.Array, block: int = BLOCK, pow2_scale: bool = False
              ) -> tuple[jax.Array, jax.Array]:
    """1 x `block` tiles along the last dim: x [..., I] -> (q e4m3 [..., I], s f32 [..., Ib]),
    Ib = ceil(I/block).

    x ~= q * s[..., i // block]. A partial last tile takes its amax over the elements it has.
    """
    k = x.shape[-1]
    nb = _cdiv(k, block)
    xp = _pad_to(x.astype(jnp.float32), -1, block).reshape(*x.shape[:-1], nb, block)
    s = _scale_from_amax(jnp.max(jnp.abs(xp), axis=-1), pow2_scale)  # [..., nb]
    q = _to_e4m3(xp / s[..., None]).reshape(*x.shape[:-1], nb * block)[..., :k]
    return q, s


@functools.partial(jax.jit, static_argnames=("block", "pow2_scale"))
def col_quant(x: jax.Array, block: int = BLOCK, pow2_scale: bool = False
              ) -> tuple[jax.Array, jax.Array]:
    """`block` x 1 tiles along the first dim: x [T, I] -> (q e4m3 [T, I], s f32 [ceil(T/block), I]).

    The weight gradient's quantizer: x^T dy contracts over T, so x and dy are tiled along T.
    x ~= q * s[t // block, i].
    """
    if x.ndim != 2:
        raise ValueError(f"col_quant takes a matrix [T, K], got shape {x.shape}.")
    q_t, s_t = act_quant(x.T, block, pow2_scale)
    return q_t.T, s_t.T


@functools.partial(jax.jit, static_argnames=("block", "pow2_scale"))
def weight_quant(w: jax.Array, block: int = BLOCK, pow2_scale: bool = False
                 ) -> tuple[jax.Array, jax.Array]:
    """`block` x `block` blocks: w [J, I] -> (q e4m3 [J, I], s f32 [ceil(J/block), ceil(I/block)]).

    w ~= q * s[j // block, i // block]; s is the Hugging Face checkpoints' `weight_scale_inv`.
    Edge blocks are partial. (The 1e-4 amax floor of act_quant applies too: a zero block stays 0.)
    """
    if w.ndim != 2:
        raise ValueError(f"weight_quant takes a matrix [N, K], got shape {w.shape}.")
    n, k = w.shape
    nb, kb = _cdiv(n, block), _cdiv(k, block)
    wp = _pad_to(_pad_to(w.astype(jnp.float32), 0, block), 1, block).reshape(nb, block, kb, block)
    s = _scale_from_amax(jnp.max(jnp.abs(wp), axis=(1, 3)), pow2_scale)  # [nb, kb]
    q = _to_e4m3(wp / s[:, None, :, None]).reshape(nb * block, kb * block)[:n, :k]
    return q, s


@functools.partial(jax.jit, static_argnames=("block", "dtype"))
def weight_dequant(q: jax.Array, s: jax.Array, block: int = BLOCK, dtype=jnp.float32) -> jax.Array:
    """q [J, I] e4m3, s [ceil(J/block), ceil(I/block)] -> q * s[j // block, i // block] in `dtype`."""
    n, k = q.shape
    if s.shape != (_cdiv(n, block), _cdiv(k, block)):
        raise ValueError(f"weight_dequant: scales {s.shape} do not match q {q.shape} in "
                         f"{block}x{block} blocks; expected {(_cdiv(n, block), _cdiv(k, block))}.")
    full = jnp.repeat(jnp.repeat(s.astype(jnp.float32), block, axis=0), block, axis=1)[:n, :k]
    return (q.astype(jnp.float32) * full).astype(dtype)


# ------------------------------------------------------------------------------------------------
# The GEMM
# ------------------------------------------------------------------------------------------------
def check_gemm_args(a_q, a_s, b_q, b_s) -> None:
    """Refuses operands that do not form C = A B^T with 128-wide I blocks (shapes, dtypes)."""
    if a_q.ndim != 2 or b_q.ndim != 2:
        raise ValueError(f"fp8_gemm: a_q and b_q must be matrices, got {a_q.shape} and {b_q.shape}.")
    m, k = a_q.shape
    n, k2 = b_q.shape
    if k != k2:
        raise ValueError(f"fp8_gemm: contraction dims differ: a_q {a_q.shape} [M, K], b_q "
                         f"{b_q.shape} [N, K] (b is K-major, DeepSeek's [out, in] layout).")
    for name, arr in (("a_q", a_q), ("b_q", b_q)):
        if arr.dtype != jnp.dtype(E4M3):
            raise ValueError(f"fp8_gemm: {name} must be float8_e4m3fn, got {arr.dtype}; quantize it "
                             "with act_quant / weight_quant.")
    kb = _cdiv(k, BLOCK)
    if a_s.shape != (m, kb):
        raise ValueError(f"fp8_gemm: a_s has shape {a_s.shape}; expected {(m, kb)} (1x128 tiles).")
    if b_s.shape not in ((_cdiv(n, BLOCK), kb), (n, kb)):
        raise ValueError(f"fp8_gemm: b_s has shape {b_s.shape}; expected {(_cdiv(n, BLOCK), kb)} "
                         f"(128x128 blocks) or {(n, kb)} (1x128 tiles).")


def b_scales_per_row(b_s: jax.Array, n: int) -> jax.Array:
    """b's scales as one float32 row per output column: [Jb, Ib] blocks or [J, Ib] rows -> [J, Ib].
    (The two layouts coincide only when J = 1, where they mean the same thing.)"""
    rows = b_s if b_s.shape[0] == n else jnp.repeat(b_s, BLOCK, axis=0)[:n]
    return rows.astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("out_dtype",))
def fp8_gemm_reference(a_q: jax.Array, a_s: jax.Array, b_q: jax.Array, b_s: jax.Array,
                       out_dtype=jnp.bfloat16) -> jax.Array:
    """Plain-jnp C = sum_ib (A_q[:, ib] B_q[:, ib]^T) * a_s[:, ib] b_s[:, ib]^T, fp32, -> out_dtype.

    a_q [M, I] e4m3, a_s [M, Ib]; b_q [J, I] e4m3, b_s [Jb, Ib] or [J, Ib]. I blocks are visited
    in order by a loop that keeps one [M, J] fp32 accumulator (no [Ib, M, J] intermediate). e4m3
    values are exact in bf16 and their products exact in fp32, so each block's
    dot is exact up to fp32 summation of 128 terms.
    """
    check_gemm_args(a_q, a_s, b_q, b_s)
    m, k = a_q.shape
    n = b_q.shape[0]
    kb = _cdiv(k, BLOCK)
    a = _pad_to(a_q.astype(jnp.bfloat16), 1, BLOCK).reshape(m, kb, BLOCK)
    b = _pad_to(b_q.astype(jnp.bfloat16), 1, BLOCK).reshape(n, kb, BLOCK)
    sa = a_s.astype(jnp.float32)  # [M, Ib]
    sb = b_scales_per_row(b_s, n)  # [J, Ib]

    def add_block(i, acc):
        a_blk = jax.lax.dynamic_index_in_dim(a, i, axis=1, keepdims=False)  # [M, 128]
        b_blk = jax.lax.dynamic_index_in_dim(b, i, axis=1, keepdims=False)  # [J, 128]
        partial = jax.lax.dot_general(a_blk, b_blk, (((1,), (1,)), ((), ())),
                                      preferred_element_type=jnp.float32)  # [M, J]
        sa_i = jax.lax.dynamic_index_in_dim(sa, i, axis=1)  # [M, 1]
        sb_i = jax.lax.dynamic_index_in_dim(sb, i, axis=1)  # [J, 1]
        return acc + partial * (sa_i * sb_i.T)

    acc = jax.lax.fori_loop(0, kb, add_block, jnp.zeros((m, n), jnp.float32))
    return acc.astype(out_dtype)


def gemm_impl() -> str:
    """The implementation `fp8_gemm(impl="auto")` uses here: "sm90" or "reference" (module
    docstring), e.g. DSV3_FP8_GEMM=reference to compare a training run with one on the kernel."""
    return forced_impl("DSV3_FP8_GEMM", _GEMM_IMPLS) or (
        "sm90" if platform.on_hopper() else "reference")


def fp8_gemm(a_q: jax.Array, a_s: jax.Array, b_q: jax.Array, b_s: jax.Array, *,
             out_dtype=jnp.bfloat16, impl: str = "auto") -> jax.Array:
    """C [M, J] = dequant(a) dequant(b)^T with per-128-I-block fp32 promotion (module docstring).

    Args:
      a_q: [M, I] float8_e4m3fn, a_s: [M, Ib] float32 (from act_quant).
      b_q: [J, I] float8_e4m3fn (I-major: DeepSeek's [out, in] weight layout); b_s [Jb, Ib]
        (weight_quant) or [J, Ib] (act_quant of b).
      out_dtype: bfloat16 (the recipe's output), float16 or float32.
      impl: "auto" (Hopper GPU -> the Pallas kernel, else the reference), "sm90" (the kernel; on a
        machine without a GPU it runs in GPU interpret mode, slowly) or "reference".
    Any M, J and I >= 1 work (the kernel pads to its tiles).
    """
    if impl not in _GEMM_IMPLS:
        raise ValueError(f"fp8_gemm: impl={impl!r}; use one of {_GEMM_IMPLS}.")
    # The net stands behind the kernel where "auto" chose it for the machine (not when forced).
    checked = (impl == "auto" and forced_impl("DSV3_FP8_GEMM", _GEMM_IMPLS) is None
               and platform.on_hopper())
    impl = gemm_impl() if impl == "auto" else impl
    if impl == "sm90":
        check_gemm_args(a_q, a_s, b_q, b_s)
        n, k = b_q.shape
        per_row = b_s.shape[0] == n and n > 1
        if not checked or safety_net.passes(_gemm_check(k, n, out_dtype, per_row)):
            return _sm90_gemm(a_q, a_s, b_q, b_s, out_dtype)
    return fp8_gemm_reference(a_q, a_s, b_q, b_s, out_dtype=out_dtype)


def _sm90_gemm(a_q, a_s, b_q, b_s, out_dtype):
    from dsv3_jax.ops.pallas import fp8_gemm_sm90  # Mosaic GPU is imported only when used

    return fp8_gemm_sm90.fp8_gemm(a_q, a_s, b_q, b_s, out_dtype=out_dtype,
                                  interpret=gpu_interpret(), num_sms=num_sms())


# The safety net's check (ops/safety_net.py) of one class (I, J, out dtype, b-scale layout): one
# GEMM of PROBE_ROWS rows against the reference, on fresh random inputs. Kernel and reference sum
# each 128-wide block in fp32 with the same scales, so they differ only by the fp32 summation
# order: where it flips the final rounding, one ulp of out_dtype (up to 2^-7 of |reference| in
# bf16, at the bottom of a binade), and near zero (cancellation) an absolute fp32 error of about
# sqrt(K) 2^-24 times the terms, far below 2^-12 max|reference| (a wrong scale or block is off
# by order one). So |kernel - reference| <= 2^-7 |reference| + 2^-12 max|reference|.
_SOURCES = tuple(str(pathlib.Path(__file__).resolve().parent / "pallas" / name)
                 for name in ("fp8_gemm_sm90.py", "hopper.py"))
PROBE_ROWS = 128
KERNEL_ULP = 2.0 ** -7
KERNEL_FLOOR = 2.0 ** -12


def _gemm_check(k: int, n: int, out_dtype, per_row: bool) -> safety_net.Check:
    def probe():
        keys = jax.random.split(safety_net.fresh_key(), 2)
        a = jax.random.normal(keys[0], (PROBE_ROWS, k), jnp.float32)
        b = jax.random.normal(keys[1], (n, k), jnp.float32)
        a_q, a_s = act_quant(a)
        b_q, b_s = act_quant(b) if per_row else weight_quant(b)
        got = jax.jit(lambda: _sm90_gemm(a_q, a_s, b_q, b_s, out_dtype))()
        want = fp8_gemm_reference(a_q, a_s, b_q, b_s, out_dtype=out_dtype)
        safety_net.compare("fp8_gemm", got, want, KERNEL_ULP, elementwise=True,
                           floor=KERNEL_FLOOR)

    dims = f"K={k} N={n} out={jnp.dtype(out_dtype).name} b_s={'rows' if per_row else 'blocks'}"
    return safety_net.Check("fp8_gemm_sm90", dims, probe, _SOURCES, "DSV3_FP8_GEMM", "sm90",
                            "reference")


def _projections(cfg) -> list[tuple[int, int]]:
    """(I, J) of every Linear layer that runs in FP8 with cfg.fp8 (model/: the attention
    projections, the dense and shared-expert MLPs, the MTP projection; not the output head)."""
    heads = cfg.n_heads
    qk_out = heads * cfg.qk_head_dim
    dims = ([(cfg.dim, cfg.q_lora_rank), (cfg.q_lora_rank, qk_out)] if cfg.q_lora_rank
            else [(cfg.dim, qk_out)])
    dims += [(cfg.dim, cfg.kv_lora_rank + cfg.qk_rope_head_dim),
             (cfg.kv_lora_rank, heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)),
             (heads * cfg.v_head_dim, cfg.dim)]
    for hidden in ((cfg.inter_dim,) if cfg.n_dense_layers else ()) + (
            (cfg.n_shared_experts * cfg.moe_inter_dim,) if cfg.n_shared_experts
            and cfg.n_layers > cfg.n_dense_layers else ()):
        dims += [(cfg.dim, hidden), (hidden, cfg.dim)]
    if cfg.mtp_depth:
        dims.append((2 * cfg.dim, cfg.dim))
    return list(dict.fromkeys(dims))


def model_checks(cfg) -> list[safety_net.Check]:
    """With cfg.fp8, the FP8 GEMM classes of the projections (safety_net.check_model_kernels):
    Fprop (K = I, N = J) and Dgrad (K = J, N = I), 128x128 weight blocks, out cfg.dtype. Wgrad's
    K is the number of tokens of a step, not a model dim: its classes are checked on first use."""
    if not cfg.fp8:
        return []
    pairs = dict.fromkeys(p for i, j in _projections(cfg) for p in ((i, j), (j, i)))
    return [_gemm_check(k, n, jnp.dtype(cfg.dtype), False) for k, n in pairs]


safety_net.register_model_checks("fp8", model_checks)


def calc_diff(x, y) -> float:
    """DeepGEMM's accuracy metric 1 - 2 sum(x y) / sum(x^2 + y^2), in float64 on the host.

    Computed as sum((x - y)^2) / sum(x^2 + y^2), the same quantity without the cancellation of
    1 - (a number near 1). 0 for identical inputs (also both zero), 2 for y = -x, about
    mean((x-y)^2) / (2 mean(x^2)) for close ones; an FP8 GEMM passes at < 1e-3 against the bf16
    product of the unquantized inputs.
    """
    x = np.asarray(jax.device_get(x), np.float64)
    y = np.asarray(jax.device_get(y), np.float64)
    if x.shape != y.shape:
        raise ValueError(f"calc_diff: shapes differ: {x.shape} vs {y.shape}.")
    denom = float(np.sum(x * x + y * y))
    return float(np.sum((x - y) ** 2)) / denom if denom else 0.0


# ------------------------------------------------------------------------------------------------
# FP8 linear layer for training
# ------------------------------------------------------------------------------------------------
def fp8_linear(x: jax.Array, w: jax.Array, *, pow2_scale: bool = False,
               out_dtype=None) -> jax.Array:
    """y = x @ w through FP8 GEMMs in the forward and both backward products (SPEC.md section 3).

    Args:
      x: [..., I] activations in the compute dtype (bf16 in training).
      w: [I, J] the master kernel in our [in, out] layout (fp32).
      out_dtype: y's dtype (x's when None); float32 keeps the GEMM's fp32 sums, e.g. for partial
        products summed across tensor-parallel shards before one rounding.
    Returns:
      [..., J] in out_dtype. Gradients: dx in x's dtype; dw in w's dtype (fp32 for the fp32 master
      weight), accumulated in fp32. Layouts and transposes: module docstring.
    """
    if w.ndim != 2 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"fp8_linear: x {x.shape} [..., K] does not match w {w.shape} [K, N].")
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    return _fp8_linear(x, w, (bool(pow2_scale), jnp.dtype(w.dtype).name, out_dtype.name))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _fp8_linear(x, w, static):
    return _fp8_linear_fwd(x, w, static)[0]


def _fp8_linear_fwd(x, w, static):
    pow2, _, out_dtype = static
    k, n = w.shape
    with jax.named_scope("fp8_fprop"):
        x2 = x.reshape(-1, k)  # [T, I]
        wq, ws = weight_quant(w, pow2_scale=pow2)  # [I, J] e4m3, [Ib, Jb]
        xq, xs = act_quant(x2, pow2_scale=pow2)  # [T, I], [T, Ib]
        y = fp8_gemm(xq, xs, wq.T, ws.T, out_dtype=jnp.dtype(out_dtype))  # B = w^T [J, I]
    return y.reshape(*x.shape[:-1], n), (x2, wq, ws)


def _fp8_linear_bwd(static, residuals, dy):
    pow2, w_dtype, _ = static
    x2, wq, ws = residuals  # [T, I] compute dtype; [I, J] e4m3; [Ib, Jb] f32
    k, n = wq.shape
    dy2 = dy.reshape(-1, n)  # [T, J]
    with jax.named_scope("fp8_dgrad"):
        dyq, dys = act_quant(dy2, pow2_scale=pow2)  # 1x128 along J, the contraction dim
        dx = fp8_gemm(dyq, dys, wq, ws, out_dtype=x2.dtype)  # B = w [I, J] as stored
    with jax.named_scope("fp8_wgrad"):
        xq, xs = col_quant(x2, pow2_scale=pow2)  # 128x1 along T: [T, I], [T/128, I]
        gq, gs = col_quant(dy2, pow2_scale=pow2)  # [T, J], [T/128, J]
        dw = fp8_gemm(xq.T, xs.T, gq.T, gs.T, out_dtype=jnp.float32)  # [I, J]; b_s per row
    return dx.reshape(*dy.shape[:-1], k), dw.astype(w_dtype)


_fp8_linear.defvjp(_fp8_linear_fwd, _fp8_linear_bwd)


# ------------------------------------------------------------------------------------------------
# The routed experts: grouped FP8 GEMMs
# ------------------------------------------------------------------------------------------------
def _check_grouped_args(a_q, a_s, b_q, b_s, group_sizes) -> None:
    if a_q.ndim != 2 or b_q.ndim != 3 or a_q.shape[1] != b_q.shape[1]:
        raise ValueError(f"fp8_grouped_gemm: a_q {a_q.shape} must be [M, K] and b_q {b_q.shape} "
                         "[G, K, N] with the same K.")
    for name, arr in (("a_q", a_q), ("b_q", b_q)):
        if arr.dtype != jnp.dtype(E4M3):
            raise ValueError(f"fp8_grouped_gemm: {name} must be float8_e4m3fn, got {arr.dtype}.")
    (m, k), (g, _, n) = a_q.shape, b_q.shape
    if a_s.shape != (m, _cdiv(k, BLOCK)):
        raise ValueError(f"fp8_grouped_gemm: a_s {a_s.shape}; expected {(m, _cdiv(k, BLOCK))}.")
    if b_s.shape != (g, _cdiv(k, BLOCK), _cdiv(n, BLOCK)):
        raise ValueError(f"fp8_grouped_gemm: b_s {b_s.shape}; expected "
                         f"{(g, _cdiv(k, BLOCK), _cdiv(n, BLOCK))} (128x128 blocks of each group).")
    if group_sizes.shape != (g,):
        raise ValueError(f"fp8_grouped_gemm: group_sizes {group_sizes.shape}; expected ({g},).")


@functools.partial(jax.jit, static_argnames=("out_dtype",))
def fp8_grouped_gemm_reference(a_q: jax.Array, a_s: jax.Array, b_q: jax.Array, b_s: jax.Array,
                               group_sizes: jax.Array, out_dtype=jnp.bfloat16) -> jax.Array:
    """C[m] = sum_ib (A_q[m, ib] . B_q[e(m), ib, :]) * a_s[m, ib] * b_s[e(m), ib, j // 128], fp32.

    a_q [M, I] e4m3 rows sorted by group, a_s [M, Ib] (1x128 tiles); b_q [E, I, J] e4m3 in our
    [expert, in, out] layout, b_s [E, Ib, Jb] (128x128 blocks of each group); group_sizes int [E].
    Rows past sum(group_sizes) come back as zeros.

    Both operands are dequantized to fp32 (q * s: exact up to one fp32 rounding) and multiplied by
    one fp32 grouped product (`grouped_dot`: the tiled backend, XLA's ragged_dot on a TPU). The
    scales are constant within each 128-wide I block, so this is the same sum as promoting each
    block's e4m3 partial product with a_s * b_s, up to fp32 rounding. (A loop over I blocks, as
    `fp8_gemm_reference` has, crashed XLA:CPU's compiler once inside a scanned layer under
    shard_map.)
    """
    _check_grouped_args(a_q, a_s, b_q, b_s, group_sizes)
    k = a_q.shape[1]
    a = a_q.astype(jnp.float32) * jnp.repeat(a_s.astype(jnp.float32), BLOCK, axis=1)[:, :k]
    b = jax.vmap(weight_dequant)(b_q, b_s)  # each group's [I, J] in its 128x128 blocks
    return grouped_dot(a, b, group_sizes).astype(out_dtype)


@functools.partial(jax.jit, static_argnames=("block", "pow2_scale"))
def grouped_col_quant(x: jax.Array, group_sizes: jax.Array, block: int = BLOCK,
                      pow2_scale: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`block` x 1 tiles along the rows that restart at each group's first row (Wgrad's quantizer
    for the routed experts: dw[e] = x_e^T dy_e contracts over group e's rows only).

    x [M, I] rows sorted by group -> (q e4m3 [M, I], s f32 [ceil(M/block) + E + 1, I], tile int32 [M]):
    row m belongs to tile `tile[m]` and x[m] ~= q[m] * s[tile[m]]. Group e's rows fill its tiles
    in order, `block` rows a tile; rows past sum(group_sizes) get the last, all-zero tile (q = 0).
    """
    if x.ndim != 2:
        raise ValueError(f"grouped_col_quant takes a matrix [M, K], got shape {x.shape}.")
    m = x.shape[0]
    g = group_sizes.shape[0]
    gs = group_sizes.astype(jnp.int32)
    ends, rows = jnp.cumsum(gs), jnp.arange(m, dtype=jnp.int32)
    group = jnp.searchsorted(ends, rows, side="right").astype(jnp.int32)  # [M], E for padding
    starts = ends - gs
    tiles_per_group = (gs + block - 1) // block
    first_tile = jnp.cumsum(tiles_per_group) - tiles_per_group
    n_tiles = _cdiv(m, block) + g  # >= sum_g ceil(gs_g / block) whatever the sizes
    safe = jnp.minimum(group, g - 1)
    local = rows - starts[safe]
    tile = jnp.where(group < g, first_tile[safe] + local // block, n_tiles)
    xf = jnp.where((group < g)[:, None], x.astype(jnp.float32), 0.0)
    amax = jax.ops.segment_max(jnp.abs(xf), tile, num_segments=n_tiles + 1)  # [tiles + 1, I]
    s = _scale_from_amax(jnp.maximum(amax, 0.0), pow2_scale)  # empty tiles: segment_max gives -inf
    q = _to_e4m3(xf / s[tile])
    return q, s, tile


def fp8_grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *,
                       pow2_scale: bool = False) -> jax.Array:
    """x [M, I] (rows sorted by group) @ w[e] [E, I, J] through FP8 GEMMs, like `fp8_linear` per group.

    The contract of `ops.grouped_matmul.grouped_matmul` (rows past sum(group_sizes) -> zeros),
    with the recipe's three GEMMs: Fprop q(x) 1x128 x q(w[e]) 128x128; Dgrad q(dy) 1x128 x q(w[e])
    (the same blocks, transposed); Wgrad q(x)^T q(dy) with 128x1 tiles that restart at each
    group's first row. Returns x's dtype; dx in x's dtype, dw in w's dtype (fp32 master), no
    gradient for group_sizes. Equal, group by group, to `fp8_linear` on that group's rows.
    """
    if w.ndim != 3 or x.ndim != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"fp8_grouped_matmul: x {x.shape} [M, K] does not match w {w.shape} "
                         "[G, K, N].")
    x, w = same_varying_axes(x, w)  # inside shard_map: see ops/varying
    return _fp8_grouped(x, w, group_sizes.astype(jnp.int32), (bool(pow2_scale), jnp.dtype(w.dtype).name))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fp8_grouped(x, w, group_sizes, static):
    return _fp8_grouped_fwd(x, w, group_sizes, static)[0]


def _fp8_grouped_fwd(x, w, group_sizes, static):
    pow2, _ = static
    with jax.named_scope("fp8_grouped_fprop"):
        wq, ws = jax.vmap(lambda wg: weight_quant(wg, pow2_scale=pow2))(w)  # [E, I, J], [E, Ib, Jb]
        xq, xs = act_quant(x, pow2_scale=pow2)  # [M, I], [M, Ib]
        y = fp8_grouped_gemm_reference(xq, xs, wq, ws, group_sizes, out_dtype=x.dtype)
    return y, (x, wq, ws, group_sizes)


def _fp8_grouped_bwd(static, residuals, dy):
    pow2, w_dtype = static
    x, wq, ws, group_sizes = residuals
    with jax.named_scope("fp8_grouped_dgrad"):
        dyq, dys = act_quant(dy, pow2_scale=pow2)  # 1x128 along J, the contraction dim
        dx = fp8_grouped_gemm_reference(dyq, dys, jnp.swapaxes(wq, 1, 2), jnp.swapaxes(ws, 1, 2),
                                        group_sizes, out_dtype=x.dtype)
    with jax.named_scope("fp8_grouped_wgrad"):
        xq, xs, tile = grouped_col_quant(x, group_sizes, pow2_scale=pow2)
        gq, gs, _ = grouped_col_quant(dy, group_sizes, pow2_scale=pow2)
        # Scaling the tiles before the product is the same sum as promoting each tile's partial
        # product (the scales are constant within a tile), exact up to fp32 rounding.
        x_hat = xq.astype(jnp.float32) * xs[tile]
        dy_hat = gq.astype(jnp.float32) * gs[tile]
        dw = transposed_grouped_dot(x_hat, dy_hat, group_sizes)  # [E, I, J] fp32
    return dx, dw.astype(w_dtype), None


_fp8_grouped.defvjp(_fp8_grouped_fwd, _fp8_grouped_bwd)


__all__ = ["AMAX_FLOOR", "BLOCK", "E4M3", "E4M3_MAX", "act_quant", "b_scales_per_row", "calc_diff",
           "check_gemm_args", "col_quant", "fp8_gemm", "fp8_gemm_reference", "fp8_grouped_gemm_reference",
           "fp8_grouped_matmul", "fp8_linear", "gemm_impl", "grouped_col_quant", "weight_dequant",
           "weight_quant"]
