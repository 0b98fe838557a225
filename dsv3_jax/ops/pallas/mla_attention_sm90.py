"""Causal flash attention for MLA training and prefill on Hopper (sm_90a), Pallas Mosaic GPU.

The math (SPEC.md section 2, MLA), per batch row b and head h, queries i and keys j:

    s_ij = scale * q_i . k_j                 (qk head dim K = 192: nope 128 + rope 64)
    visible(i, j) = j <= i  and  seg_i == seg_j      (segment ids: packed documents)
    P = softmax_j(s_ij over visible j)       (float32)
    o_i = sum_j P_ij v_j                     (v head dim V = 128)
    lse_i = log2 sum_{visible j} 2^(s_ij log2 e)    (saved for the backward, base 2)

Forward (flash attention 2/3 style, online softmax). One CTA owns `2 * block_q` query rows of one
(batch, head); its two compute warpgroups take `block_q` rows each and a third warpgroup only issues
TMA copies of the key/value blocks (`plgpu.emit_pipeline_warp_specialized`, `stages` blocks in
flight). Per key block a compute warpgroup runs

    S  = wgmma(Q [block_q, K], K_blk [block_kv, K]^T)          fp32 registers
    masks (causal, segment) -> -inf; running max m, running sum l (base 2: exp2 with log2(e) folded
    into the scale, so each exponent is one FMA)
    O  = O * 2^(m_old - m_new) + wgmma(P.astype(bf16) [block_q, block_kv], V_blk [block_kv, V])

and at the end writes O / l (bf16) and lse = m + log2(l) (fp32) through shared memory and TMA. The
causal structure is used twice: a CTA only walks key blocks up to its last row (a dynamic pipeline
length), and the CTAs with the most work (the last query rows) are launched first. Key blocks are
not skipped by segment (a packed document still reads the earlier documents' keys and masks them).
The running max starts at -1e30, not -inf, so a row whose first key blocks are all masked (a later
document) never computes exp2(-inf - -inf).

Backward: NOT A KERNEL YET. `mla_attention` is a `custom_vjp` whose forward is the kernel above
(saving o and the lse) and whose backward today recomputes the gradients through the jnp reference
(`jax.vjp` of `mla_attention_reference`: correct, but it materialises the [T, T] scores). The
planned kernels (same file), for which the saved lse is already there:

    P  = 2^(S log2 e - lse);  delta_i = o_i . do_i (XLA)
    dV = P^T dO;   dP = dO V^T;   dS = P * (dP - delta);   dQ = scale * dS K;   dK = scale * dS^T Q

  * dq kernel: a CTA owns `block_q` query rows, the key/value blocks stream in (TMA pipeline, causal
    dynamic length), dQ accumulates in fp32 registers [block_q, K].
  * dkv kernel: a CTA owns `block_kv` key rows, the query-side blocks (Q, dO, lse, delta) stream in
    from the first query block that can see them (a dynamic start); dK [block_kv, K] and
    dV [block_kv, V] accumulate in fp32 registers (96 + 64 per thread: one compute warpgroup).

Layouts: q, k [B, T, H, K] and v [B, T, H, V] are read in place; each TMA box is one head's
[rows, dim] slice (strided in global memory by H * dim). Shared-memory tiles are 128-byte swizzled
(8 x 64 bf16 tiles), so head dims must be multiples of 64; wgmma's N and the fp32 register
accumulators limit them to 256. The wrapper pads T up to a multiple of the CTA tiles (zeros; padded
keys sit after every real query, so causality hides them; padded segment ids are -1) and slices the
outputs back. Requirements, checked with clear errors: bf16 (or f16) q, k, v of one dtype; K, V
multiples of 64, at most 256; segment_ids int [B, T].

The plain-jnp reference it is tested against is `dsv3_jax.ops.attention.mla_attention_reference`
(tests/test_mla_kernels.py: interpret mode on CPU against it, outputs and the custom_vjp's
dq, dk, dv, segments, ragged T; and the sm_90a lowering at DeepSeek-V3 shapes).
`experiments/bench_mla_attention.py` times it on an H100 against cuDNN, tokamax and XLA.

Status: NOT YET RUN ON A GPU. The forward matches the reference in interpret mode and its Mosaic
GPU lowering for sm_90a passes; the backward kernels are not written (above). ptxas, register
pressure (spills), the run on an H100 and its speed remain to be confirmed there. Tuning ideas,
not done: the causal mask only on diagonal blocks, overlap of softmax and wgmma across the two
warpgroups (FA3's ping-pong schedule barrier), skipping key blocks of other documents.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp

LOG2E = math.log2(math.e)
_M_INIT = -1e30  # running-max start: finite, so fully masked blocks give exp2(-inf) = 0, not NaN
_DIM_MULTIPLE = 64  # 128-byte swizzle of bf16 rows: head dims in whole 64-element tiles
_MAX_DIM = 256  # wgmma N and the fp32 register accumulators
_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
SMEM_BYTES = 227 * 1024
_SMEM_SLACK = 2 * 1024


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """Block sizes (to be tuned on an H100). block_q and block_kv are multiples of 64 (wgmma M)."""

    block_q: int = 64  # query rows per compute warpgroup (forward: 2 warpgroups per CTA)
    block_kv: int = 64  # key rows per pipeline step
    stages: int = 3  # key/value blocks in flight (forward)
    block_q_bwd: int = 64  # planned backward kernels (module docstring): reserved, T is padded
    block_kv_bwd: int = 64  # to their multiples already
    stages_bwd: int = 2

    def __post_init__(self):
        for name in ("block_q", "block_kv", "block_q_bwd", "block_kv_bwd"):
            value = getattr(self, name)
            if value < 64 or value % 64:
                raise ValueError(f"TileConfig.{name}={value}: must be a positive multiple of 64 "
                                 "(the wgmma M).")
        for name in ("stages", "stages_bwd"):
            if getattr(self, name) < 2:
                raise ValueError(f"TileConfig.{name}={getattr(self, name)}: must be >= 2.")

    @property
    def q_tile(self) -> int:
        return 2 * self.block_q  # two compute warpgroups per forward CTA

    @property
    def t_multiple(self) -> int:
        return math.lcm(self.q_tile, self.block_kv, self.block_q_bwd, self.block_kv_bwd)


DEFAULT_CONFIG = TileConfig()


def smem_bytes_fwd(cfg: TileConfig, dk: int, dv: int, itemsize: int = 2) -> int:
    """Shared memory of the forward kernel: the K/V stages, Q and O tiles, lse and segment rows."""
    stage = cfg.block_kv * (dk + dv) * itemsize + 4 * cfg.block_kv
    fixed = 2 * cfg.block_q * (dk + dv) * itemsize + 2 * cfg.block_q * 8
    return cfg.stages * stage + fixed + _SMEM_SLACK


def check_dims(q_shape, k_shape, v_shape, dtypes, config: TileConfig | None = None) -> None:
    """Refuses inputs the kernels cannot take (ValueError naming the field and the fix)."""
    cfg = config or DEFAULT_CONFIG
    if len(q_shape) != 4 or len(k_shape) != 4 or len(v_shape) != 4:
        raise ValueError(f"mla_attention_sm90: q, k, v must be [B, T, H, dim], got {q_shape}, "
                         f"{k_shape}, {v_shape}.")
    if tuple(q_shape) != tuple(k_shape) or tuple(v_shape[:3]) != tuple(q_shape[:3]):
        raise ValueError(f"mla_attention_sm90: q {q_shape} and k {k_shape} must match, and v "
                         f"{v_shape} must share their [B, T, H].")
    dk, dv = q_shape[-1], v_shape[-1]
    for name, d in (("qk head dim", dk), ("v head dim", dv)):
        if d % _DIM_MULTIPLE or d > _MAX_DIM:
            raise ValueError(f"mla_attention_sm90: {name} {d} must be a multiple of {_DIM_MULTIPLE} "
                             f"and at most {_MAX_DIM}; use the reference for other dims.")
    dts = {jnp.dtype(d) for d in dtypes}
    if len(dts) != 1 or next(iter(dts)) not in _DTYPES:
        raise ValueError(f"mla_attention_sm90: q, k, v must all be bfloat16 (or float16), got "
                         f"{[str(jnp.dtype(d)) for d in dtypes]}.")
    need = smem_bytes_fwd(cfg, dk, dv)
    if need > SMEM_BYTES:
        raise ValueError(f"mla_attention_sm90: {cfg} needs {need} bytes of shared memory at dims "
                         f"{dk}/{dv}, more than {SMEM_BYTES}; use smaller blocks or fewer stages.")


def supports(q_shape, k_shape, v_shape, dtypes) -> bool:
    """Whether the kernels take these inputs (the dispatcher's test)."""
    try:
        check_dims(q_shape, k_shape, v_shape, dtypes)
    except ValueError:
        return False
    return True


_SWIZZLE = 128
_TRANSFORMS = (plgpu.TilingTransform((8, _SWIZZLE // 2)), plgpu.SwizzleTransform(_SWIZZLE))


def _interpret_params(interpret):
    if isinstance(interpret, plgpu.InterpretGPUParams):
        return interpret
    return plgpu.InterpretGPUParams() if interpret else None


def _mask(s, row0, col0, shape, qseg=None, kseg=None):
    """s with invisible entries at -inf. row0/col0: global index of the tile's first row/column;
    qseg [rows] (WGMMA.reduce(1)) and kseg [cols] (WGMMA.reduce(0)) segment ids, or None."""
    rows = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA) + row0
    cols = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA) + col0
    visible = cols <= rows
    if qseg is not None:
        visible = visible & (lax.broadcast_in_dim(qseg, shape, [0])
                             == lax.broadcast_in_dim(kseg, shape, [1]))
    return jnp.where(visible, s, -jnp.inf)


def _wgmma_into(acc, a, b, interpret: bool, a_scratch=None):
    """acc + a @ b on the tensor cores (acc fp32 registers, WGMMA layout; a registers or shared
    memory, b shared memory). On the GPU the product accumulates into `acc` itself (`pl.run_state`
    over a preinitialised accumulator) and a register operand `a` feeds the wgmma directly.
    GPU interpret mode in jax 0.11.2 can do neither (no `run_state` over an accumulator, shared-
    memory operands only), so there a register `a` is staged through `a_scratch` (shared memory of
    a's shape) and the product goes into a fresh accumulator that is then added: the same sum, one
    more fp32 rounding."""
    if interpret:
        if a_scratch is not None:  # a is in registers
            a_scratch[...] = a
            plgpu.commit_smem()
            a = a_scratch

        def product(acc_ref):
            plgpu.wgmma(acc_ref, a, b)
            return acc_ref[...]

        return acc + pl.run_scoped(product, plgpu.ACC(acc.shape, jnp.float32))

    def accumulate(acc_ref):
        plgpu.wgmma(acc_ref, a, b)

    return pl.run_state(accumulate)(plgpu.ACC.init(acc))


# ------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------
def _fwd_kernel(q_gmem, k_gmem, v_gmem, *rest, cfg: TileConfig, scale: float, has_segments: bool,
                interpret: bool):
    # q_gmem, k_gmem: [B, Tp, H, K] bf16     v_gmem: [B, Tp, H, V] bf16
    # qseg_gmem, kseg_gmem (with segments): [B, Tp] int32 (the same array twice)
    # o_gmem: [B, Tp, H, V] bf16             lse_gmem: [B, H, Tp] f32 (base 2)
    if has_segments:
        qseg_gmem, kseg_gmem, o_gmem, lse_gmem = rest
    else:
        (o_gmem, lse_gmem), qseg_gmem, kseg_gmem = rest, None, None
    dk, dv = q_gmem.shape[-1], v_gmem.shape[-1]
    dtype = q_gmem.dtype
    bq, bkv, wgs = cfg.block_q, cfg.block_kv, 2
    n_q_tiles = q_gmem.shape[1] // (wgs * bq)
    qi = n_q_tiles - 1 - lax.axis_index("q_seq")  # the longest rows first
    h, b = lax.axis_index("heads"), lax.axis_index("batch")
    tile_end = (qi + 1) * (wgs * bq)
    kv_steps = lax.div(tile_end + (bkv - 1), jnp.int32(bkv))  # causal: blocks up to the last row
    s_scale = scale * LOG2E

    def scoped(q_smem, o_smem, lse_smem, qseg_smem, q_bar, seg_bar, p_smem=None):
        # q_smem: [2, bq, K]  o_smem: [2, bq, V]  lse_smem: [2, bq] f32  qseg_smem: [2, bq] i32
        # p_smem: [2, bq, bkv] (interpret mode only: P staged for the wgmma; see _wgmma_into)
        wg = lax.axis_index("wg")
        q_base = qi * (wgs * bq) + wg * bq

        def body(idx, k_smem, v_smem, *seg_and_carry):
            # k_smem: [bkv, K]  v_smem: [bkv, V]  kseg_smem: [bkv] i32 (with segments)
            (step,) = idx
            carry = seg_and_carry[-1]
            acc, m_i, l_i = carry

            def qk(acc_ref):  # acc_ref: [bq, bkv] f32
                plgpu.wgmma(acc_ref, q_smem.at[wg], k_smem.transpose((1, 0)))
                return acc_ref[...]

            s = pl.run_scoped(qk, plgpu.ACC((bq, bkv), jnp.float32)) * s_scale
            qseg = kseg = None
            if has_segments:
                qseg = plgpu.load(qseg_smem.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))
                kseg = plgpu.load(seg_and_carry[0], layout=plgpu.Layout.WGMMA.reduce(0))
            s = _mask(s, q_base, step * bkv, (bq, bkv), qseg, kseg)
            m_new = jnp.maximum(m_i, s.max(axis=1))
            alpha = jnp.exp2(m_i - m_new)
            p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
            l_i = l_i * alpha + p.sum(axis=1)
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])

            acc = _wgmma_into(acc, p.astype(dtype), v_smem, interpret,  # [bq, V] += P V
                              None if p_smem is None else p_smem.at[wg])
            return acc, m_new, l_i

        def compute_context(run_pipeline):
            plgpu.copy_gmem_to_smem(q_gmem.at[b, pl.ds(q_base, bq), h], q_smem.at[wg],
                                    q_bar.at[wg])
            if has_segments:
                plgpu.copy_gmem_to_smem(qseg_gmem.at[b, pl.ds(q_base, bq)], qseg_smem.at[wg],
                                        seg_bar.at[wg])
                plgpu.barrier_wait(seg_bar.at[wg])
            plgpu.barrier_wait(q_bar.at[wg])
            acc = plgpu.layout_cast(jnp.zeros((bq, dv), jnp.float32), plgpu.Layout.WGMMA)
            m_i = plgpu.layout_cast(jnp.full((bq,), _M_INIT, jnp.float32),
                                    plgpu.Layout.WGMMA.reduce(1))
            l_i = plgpu.layout_cast(jnp.zeros((bq,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            acc, m_i, l_i = run_pipeline((acc, m_i, l_i))
            # Every row sees its own key, so l >= 1 here.
            o_smem[wg] = (acc / lax.broadcast_in_dim(l_i, acc.shape, [0])).astype(dtype)
            lse_smem[wg] = m_i + jnp.log2(l_i)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem.at[wg], o_gmem.at[b, pl.ds(q_base, bq), h])
            plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_gmem.at[b, h, pl.ds(q_base, bq)])
            plgpu.wait_smem_to_gmem(0)

        specs = [plgpu.BlockSpec((bkv, dk), lambda i: (i, 0), transforms=_TRANSFORMS),
                 plgpu.BlockSpec((bkv, dv), lambda i: (i, 0), transforms=_TRANSFORMS)]
        refs = [k_gmem.at[b, :, h, :], v_gmem.at[b, :, h, :]]
        if has_segments:
            specs.append(plgpu.BlockSpec((bkv,), lambda i: (i,)))
            refs.append(kseg_gmem.at[b])
        pipeline = plgpu.emit_pipeline_warp_specialized(
            body, grid=(kv_steps,), memory_registers=40, in_specs=specs, wg_axis="wg",
            num_compute_wgs=wgs, max_concurrent_steps=cfg.stages,
            compute_context=compute_context)
        pipeline(*refs)

    pl.run_scoped(
        scoped,
        plgpu.SMEM((wgs, bq, dk), dtype, transforms=_TRANSFORMS),
        plgpu.SMEM((wgs, bq, dv), dtype, transforms=_TRANSFORMS),
        plgpu.SMEM((wgs, bq), jnp.float32),
        plgpu.SMEM((wgs, bq), jnp.int32),
        plgpu.Barrier(num_barriers=wgs),
        plgpu.Barrier(num_barriers=wgs),
        *([plgpu.SMEM((wgs, bq, bkv), dtype, transforms=_TRANSFORMS)] if interpret else []),
        collective_axes="wg",
    )


def _forward(q, k, v, seg, cfg: TileConfig, scale: float, interpret):
    """Padded inputs ([B, Tp, H, *], seg [B, Tp] or None) -> (o [B, Tp, H, V], lse [B, H, Tp])."""
    b, tp, h, _ = q.shape
    dv = v.shape[-1]
    has_segments = seg is not None
    call = plgpu.kernel(
        functools.partial(_fwd_kernel, cfg=cfg, scale=scale, has_segments=has_segments,
                          interpret=bool(interpret)),
        out_type=(jax.ShapeDtypeStruct((b, tp, h, dv), q.dtype),
                  jax.ShapeDtypeStruct((b, h, tp), jnp.float32)),
        grid=(tp // cfg.q_tile, h, b),
        grid_names=("q_seq", "heads", "batch"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=_interpret_params(interpret),
    )
    args = (q, k, v) + ((seg, seg) if has_segments else ())
    return call(*args)


# ------------------------------------------------------------------------------------------------
# The differentiable wrapper
# ------------------------------------------------------------------------------------------------
def _pad_t(x: jax.Array, tp: int, value=0) -> jax.Array:
    if x.shape[1] == tp:
        return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, tp - x.shape[1])
    return jnp.pad(x, widths, constant_values=value)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, seg, static):
    return _flash_fwd(q, k, v, seg, static)[0]


def _flash_fwd(q, k, v, seg, static):
    cfg, scale, interpret = static
    o, lse = _forward(q, k, v, seg, cfg, scale, interpret)
    return o, (q, k, v, seg, o, lse)


def _flash_bwd(static, res, do):
    cfg, scale, interpret = static
    q, k, v, seg, o, lse = res
    dq, dk, dv = _backward(q, k, v, seg, o, lse, do, cfg, scale, interpret)
    dseg = None if seg is None else jnp.zeros(seg.shape, jax.dtypes.float0)
    return dq, dk, dv, dseg


_flash.defvjp(_flash_fwd, _flash_bwd)


def mla_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float,
                  segment_ids: jax.Array | None = None, config: TileConfig | None = None,
                  interpret: bool | plgpu.InterpretGPUParams = False) -> jax.Array:
    """Causal flash attention with qk head dim K and v head dim V (differentiable: custom_vjp).

    Args:
      q, k: [B, T, H, K]; v: [B, T, H, V]; one dtype, bfloat16 (or float16); K, V multiples of 64,
        at most 256 (module docstring).
      scale: softmax scale.
      segment_ids: optional int [B, T]; a query sees only keys of its own segment.
      config: block sizes (DEFAULT_CONFIG when None).
      interpret: True (or `InterpretGPUParams`) runs the kernels in GPU interpret mode on the CPU.
    Returns:
      [B, T, H, V] in q's dtype; the same contract as `ops.attention.mla_attention_reference`.
    """
    cfg = config or DEFAULT_CONFIG
    check_dims(q.shape, k.shape, v.shape, (q.dtype, k.dtype, v.dtype), cfg)
    b, t = q.shape[:2]
    if segment_ids is not None and segment_ids.shape != (b, t):
        raise ValueError(f"mla_attention_sm90: segment_ids has shape {segment_ids.shape}; expected "
                         f"{(b, t)} (one id per token).")
    tp = -(-t // cfg.t_multiple) * cfg.t_multiple
    seg = None if segment_ids is None else _pad_t(segment_ids.astype(jnp.int32), tp, -1)
    o = _flash(_pad_t(q, tp), _pad_t(k, tp), _pad_t(v, tp), seg, (cfg, float(scale), interpret))
    return o[:, :t] if tp != t else o


def _backward(q, k, v, seg, o, lse, do, cfg, scale, interpret):
    """dq, dk, dv through the jnp reference (recomputed; the backward kernels are not written yet,
    module docstring). o and lse are unused until they are."""
    del o, lse, cfg, interpret
    from dsv3_jax.ops.attention import mla_attention_reference

    _, vjp = jax.vjp(lambda q, k, v: mla_attention_reference(q, k, v, scale=scale,
                                                             segment_ids=seg), q, k, v)
    return vjp(do)


def flops(b: int, t: int, h: int, dk: int, dv: int, backward: bool = False) -> float:
    """Useful FLOPs of causal attention (half the score matrix): 2 T^2/2 (K + V) per head forward;
    the backward does 2.5x that (dQ, dK, dV, dP and the recomputed S)."""
    fwd = 2.0 * b * h * (t * t / 2) * (dk + dv)
    return fwd * 3.5 if backward else fwd


__all__ = ["DEFAULT_CONFIG", "TileConfig", "check_dims", "flops", "mla_attention", "smem_bytes_fwd",
           "supports"]
