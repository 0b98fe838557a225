"""Causal flash attention for MLA training and prefill on Hopper (sm_90a), Pallas Mosaic GPU.

Letters (dsv3_jax/NOTATION.md): B batch, T query positions, S key positions (the same T
tokens: causal self-attention), H heads, A qk head dim (N + R = 192: nope 128 + rope 64), O v head
dim (128). The math (SPEC.md section 2, MLA), per batch row b and head h, query t and key s:

    score_ts = scale * q_t . k_s             (over the A dims of one head)
    visible(t, s) = s <= t  and  seg_t == seg_s      (segment ids: packed documents)
    P = softmax_s(score_ts over visible s)   (float32)
    o_t = sum_s P_ts v_s                     (over O dims)
    lse_t = log2 sum_{visible s} 2^(score_ts log2 e)    (saved for the backward, base 2)

Forward (flash attention 2/3 style, online softmax). One CTA owns `2 * block_q` query rows of one
(batch, head); its two compute warpgroups take `block_q` rows each and a third warpgroup only issues
TMA copies of the key/value blocks (`plgpu.emit_pipeline_warp_specialized`, `stages` blocks in
flight). Per key block a compute warpgroup runs

    S  = wgmma(Q [block_q, A], K_blk [block_kv, A]^T)          fp32 registers
    masks (causal, segment) -> -inf; running max m, running sum l (base 2: exp2 with log2(e) folded
    into the scale, so each exponent is one FMA)
    O  = O * 2^(m_old - m_new) + wgmma(P.astype(bf16) [block_q, block_kv], V_blk [block_kv, O])

and at the end writes O / l (bf16) and lse = m + log2(l) (fp32) through shared memory and TMA. The
causal structure is used twice: a CTA only walks key blocks up to its last row (a dynamic pipeline
length), and the CTAs with the most work (the last query rows) are launched first. Key blocks are
not skipped by segment (a packed document still reads the earlier documents' keys and masks them).
The running max starts at -1e30, not -inf, so a row whose first key blocks are all masked (a later
document) never computes exp2(-inf - -inf).

Backward (FlashAttention-2 style, two kernels and an XLA preprocess; `_backward_kernels`). With
the saved base-2 lse, P is recomputed block by block instead of stored:

    delta_t = o_t . do_t                                   (XLA, fp32 [B, H, T])
    P  = 2^(S log2 e - lse)   (masked entries: 2^-inf = 0);   dP = dO V^T;   dS = P * (dP - delta)
    dV = P^T dO;   dK = scale * dS^T Q;   dQ = scale * dS K

  * dq kernel: a CTA owns `2 * block_q_bwd` query rows of one (batch, head), one compute warpgroup
    per `block_q_bwd` rows and a TMA warpgroup streaming the key/value (and key segment) blocks,
    `stages_bwd` in flight, up to the tile's last row (causal dynamic length, longest tiles first).
    Per key block: S = wgmma(Q, K_blk^T), mask, P, dP = wgmma(dO, V_blk^T), dS, and
    dQ += wgmma(dS.astype(bf16) [registers], K_blk) into fp32 registers [block_q_bwd, A].
  * dkv kernel: a CTA owns `block_kv_bwd` key rows (one compute warpgroup: dK [block_kv_bwd, A] and
    dV [block_kv_bwd, O] take 96 + 64 fp32 registers per thread at V3 dims); the query-side blocks
    (Q, dO, lse, delta, query segments) of `block_q_dkv` rows stream in from the first query block
    that can see its keys (a dynamic start, `q_first`) to the end. The tiles are transposed, keys
    on rows: S^T = wgmma(K, Q_blk^T), P^T, dV += wgmma(P^T.astype(bf16), dO_blk), dP^T =
    wgmma(V, dO_blk^T), dS^T, dK += wgmma(dS^T.astype(bf16), Q_blk), so that the register operand
    is always the A operand. The query step is narrow (block_q_dkv = 32: S^T and dP^T [64, 32],
    16 fp32 registers each) so that they fit beside dK and dV: at 64 query rows the kernel spilled
    (ptxas, below). The step is the contraction K of the dV and dK wgmmas, and a wgmma's operands
    share one swizzle whose width K must fill, so this kernel's K, V, Q and dO tiles take the
    widest swizzle block_q_dkv bf16 elements fill (`hopper.transforms`: 64 bytes at 32 rows, not
    the 128 of the other kernels). Key tiles with the
    most work (the first keys) are launched first.

  Both write their bf16 results through the shared-memory tile of the input they no longer need
  (Q's, K's and V's) and TMA. Segments are masked, never skipped (as in the forward). Padded rows
  have dO = 0 (the cotangent of the slice), so they add nothing; padded keys are seen only by them.
  The previous backward (dq, dk, dv recomputed through `jax.vjp` of the jnp reference) is the
  dispatcher's: `ops.attention.mla_attention_kernel(..., backward="reference")`.

Layouts: q, k [B, T, H, A] and v [B, T, H, O] are read in place; each TMA box is one head's
[rows, dim] slice (strided in global memory by H * dim). Shared-memory tiles are 128-byte swizzled
(8 x 64 bf16 tiles), so head dims must be multiples of 64; a wgmma's width and the fp32 register
accumulators limit them to 256. The wrapper pads T up to a multiple of the CTA tiles (zeros; padded
keys sit after every real query, so causality hides them; padded segment ids are -1) and slices the
outputs back. Requirements, checked with clear errors: bf16 (or f16) q, k, v of one dtype; A, O
multiples of 64, at most 256; segment_ids int [B, T].

The plain-jnp reference it is tested against is `dsv3_jax.ops.attention.mla_attention_reference`
(tests/test_mla_kernels.py: interpret mode on CPU against it, outputs and the backward kernels'
dq, dk, dv, segments, ragged T, dkv query steps of 16, 32 and 64 rows; the refusal of tile
configs that spill; and the sm_90a lowering of the forward and both backward kernels
at DeepSeek-V3 shapes).
`experiments/bench_mla_attention.py` times it on an H100 against cuDNN, tokamax and XLA.

Status: NOT YET RUN ON A GPU (forward and backward). In interpret mode the forward and the backward
kernels match the reference (outputs; dq, dk, dv within the same 2^-6 bound, observed ~2^-8), and
the Mosaic GPU lowering for sm_90a of all three kernels passes. The interpret-mode differences are
those of `hopper.wgmma_into` (register operands P, P^T, dS, dS^T staged through shared memory there;
on the GPU they feed the wgmma from registers).

Registers (ptxas 13.0.88 for sm_90a through mosaic_ptxas_check.py, shipped outside the repository,
2026-12-01): at V3 dims (A 192, O 128, T 4096, H 128; the "small" preset's H = 16 gives the same)
none of the three kernels spills, with or without segment ids: forward and dq 168 registers per
thread at launch (setmaxnreg 232 for their two compute warpgroups, 40 for the TMA one), dkv 255
(setmaxnreg 256 for its one compute warpgroup), 0 B spill stores and loads, no STL/LDL in the
SASS; dynamic shared memory 210000 / 208976 B (forward, with / without segments), 168048 / 167024
(dq), 86072 / 85048 (dkv). The dkv kernel's former 64-row query step spilled there (80 B of spill
stores, 14 spill reloads in the key loop). `check_dims` holds each kernel's register estimate
(`registers_per_thread`, fitted to ptxas: the table above `_SCORE_TILES`) against its budget and
refuses the tile configs it estimates to spill, before any lowering. To measure again:
    KERNEL_TARGETS='mla_fwd*,mla_bwd*' python mosaic_ptxas_check.py --fail-on-spill \
        --fn experiments.kernel_targets:make    # mla_fwd_v3, mla_bwd_v3, ..., mla_bwd_noseg_small
    python mosaic_ptxas_check.py --fail-on-spill mla_fwd mla_fwd_noseg mla_bwd mla_bwd_noseg
(the tool's built-in targets; mla_bwd's kernel #0 is the forward, #1 dq, #2 dkv). The run on an
H100 and its speed remain to be confirmed there, the narrower dkv step (twice the pipeline steps
of the 64-row one) and 64-byte swizzle included. Tuning ideas, not done: the causal mask only
on diagonal blocks, overlap of softmax and wgmma across the two warpgroups (FA3's ping-pong schedule
barrier), skipping key blocks of other documents, issuing dV and dP^T as one wgmma group (one wait
instead of two), manual consumed barriers so the next blocks load earlier, a dkv CTA of two compute
warpgroups (dK's columns split between them) for 64-row query steps.
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

from dsv3_jax.ops.pallas.hopper import (DTYPES_16BIT, LOG2E, M_INIT, SMEM_BYTES, TRANSFORMS_16BIT,
                                        check_registers, interpret_params, pad_axis, refuse,
                                        round_up, transforms, warp_specialized_registers,
                                        wgmma_into, wgmma_new)

_DIM_MULTIPLE = 64  # 128-byte swizzle of bf16 rows: head dims in whole 64-element tiles
_MAX_DIM = 256  # a wgmma's width and the fp32 register accumulators
_SMEM_SLACK = 2 * 1024
_FWD_WGS = 2  # compute warpgroups of the forward kernel (block_q rows each)
_DQ_WGS = 2  # compute warpgroups of the dq kernel (block_q_bwd rows each)
_DKV_WGS = 1  # compute warpgroups of the dkv kernel: dK + dV take 160 fp32 registers per thread
_MEMORY_REGISTERS = 40  # setmaxnreg of each kernel's TMA warpgroup; the compute ones share the rest


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """Block sizes (to be tuned on an H100). The block sizes are multiples of 64 (a wgmma's M),
    block_q_dkv of 16 (a 16-bit wgmma's K). `check_dims` refuses those whose kernels would spill
    registers (`registers_per_thread`) or overflow shared memory."""

    block_q: int = 64  # query rows per compute warpgroup (forward: 2 warpgroups per CTA)
    block_kv: int = 64  # key rows per pipeline step
    stages: int = 3  # key/value blocks in flight (forward)
    block_q_bwd: int = 64  # backward: query rows per dq warpgroup (2 per CTA) and per dkv step
    block_kv_bwd: int = 64  # backward: key rows per dkv CTA (1 compute warpgroup) and per dq step
    stages_bwd: int = 2  # blocks in flight (both backward kernels)
    block_q_dkv: int = 32  # backward: query rows per dkv step (the N of its S^T, dP^T tiles)

    def __post_init__(self):
        for name in ("block_q", "block_kv", "block_q_bwd", "block_kv_bwd"):
            if getattr(self, name) < 64 or getattr(self, name) % 64:
                refuse(self, name, "must be a positive multiple of 64 (the wgmma M)")
        if self.block_q_dkv < 16 or self.block_q_dkv % 16:
            refuse(self, "block_q_dkv", "must be a positive multiple of 16 (the K of a 16-bit "
                   "wgmma, whose A operand P^T / dS^T it is)")
        for name in ("stages", "stages_bwd"):
            if getattr(self, name) < 2:
                refuse(self, name, "must be >= 2")

    @property
    def q_tile(self) -> int:
        return 2 * self.block_q  # two compute warpgroups per forward CTA

    @property
    def dq_tile(self) -> int:
        return _DQ_WGS * self.block_q_bwd  # two compute warpgroups per dq CTA

    @property
    def t_multiple(self) -> int:
        return math.lcm(self.q_tile, self.block_kv, self.dq_tile, self.block_kv_bwd,
                        self.block_q_dkv)


DEFAULT_CONFIG = TileConfig()


def smem_bytes_fwd(cfg: TileConfig, dk: int, dv: int, itemsize: int = 2) -> int:
    """Shared memory of the forward kernel: the K/V stages, Q and O tiles, lse and segment rows."""
    stage = cfg.block_kv * (dk + dv) * itemsize + 4 * cfg.block_kv
    fixed = 2 * cfg.block_q * (dk + dv) * itemsize + 2 * cfg.block_q * 8
    return cfg.stages * stage + fixed + _SMEM_SLACK


def smem_bytes_bwd(cfg: TileConfig, dk: int, dv: int, itemsize: int = 2) -> int:
    """Shared memory of the larger backward kernel. dq: Q and dO tiles, lse / delta / segment rows,
    the K/V stages. dkv: K and V tiles, segment rows, the Q/dO/lse/delta/segment stages."""
    bq, bkv, bq_dkv = cfg.block_q_bwd, cfg.block_kv_bwd, cfg.block_q_dkv
    dq = (_DQ_WGS * bq * ((dk + dv) * itemsize + 12)
          + cfg.stages_bwd * (bkv * (dk + dv) * itemsize + 4 * bkv))
    dkv = (_DKV_WGS * bkv * ((dk + dv) * itemsize + 4)
           + cfg.stages_bwd * (bq_dkv * (dk + dv) * itemsize + 12 * bq_dkv))
    return max(dq, dkv) + _SMEM_SLACK


# The register estimate (`registers_per_thread`), fitted to ptxas through mosaic_ptxas_check.py
# (`python mosaic_ptxas_check.py --fail-on-spill --fn <module>:make` on the kernels under custom
# configs; ptxas 13.0.88, sm_90a, jax 0.11.2, 2026-12-01): the three kernels at T = 4096, H = 16,
# 22 tile configs over head dims A / O of 192/128, 256/128, 192/192, 256/64, 128/128, 128/64,
# 64/128 and 64/64 (those that fit in shared memory), each classified as ptxas does but the two
# noted below. Per thread of a compute warpgroup it counts the fp32 accumulators, `_SCORE_TILES`
# score-block-sized fp32 tiles (the fitted number of S, P, dP, their transposes and the bf16
# operands made of them live at once), the softmax vectors and a fixed overhead (`_OVERHEAD`),
# held against the warpgroup's setmaxnreg (`register_budget`). Estimate / budget -> ptxas:
#   forward  192/128 default                        150 / 232 -> no spill
#            64/64 block_q=128 (two m-groups)       220 / 232 -> no spill
#            64/64 block_kv=192                     246 / 232 -> 72 B spilled
#            128/128 block_q=128                    284 / 232 -> 292 B spilled
#   dq       192/128 default                        192 / 232 -> no spill
#            256/128 default                        224 / 232 -> no spill
#            128/128 block_kv_bwd=128               240 / 232 -> 60 B spilled
#   dkv      192/128 default (block_q_dkv=32)       228 / 255 -> no spill
#            128/128 block_q_dkv=64                 252 / 255 -> no spill
#            192/128 block_q_dkv=48                 256 / 255 -> 40 B spilled
#            192/128 block_q_dkv=64 (the old step)  284 / 255 -> 80 B spilled (14 reloads in loop)
#            128/128 block_kv_bwd=128               356 / 255 -> 944 B spilled
# No linear count separates every dkv point: 256/128 and 192/192 at block_q_dkv=32 get through
# ptxas unspilled but are estimated at 260 and refused (block_q_dkv=16 takes them, 232).
_SCORE_TILES = {"forward": 2.0, "dq": 2.5, "dkv": 2.0}
_OVERHEAD = {"forward": 16, "dq": 10, "dkv": 12}


def _tile_registers(rows: int, cols: int) -> int:
    """32-bit registers per thread of an fp32 [rows, cols] tile held by one warpgroup (WGMMA
    layout: 128 threads)."""
    return rows * cols // 128


def register_budget(wgs: int) -> int:
    """Registers per thread of each of `wgs` compute warpgroups beside the TMA warpgroup
    (`hopper.warp_specialized_registers`): 232 for two compute warpgroups, 255 for one."""
    return warp_specialized_registers(wgs, _MEMORY_REGISTERS)


def registers_per_thread(cfg: TileConfig, dk: int, dv: int) -> dict[str, tuple[int, int]]:
    """{kernel: (estimated live 32-bit registers per thread, budget)} of the compute warpgroups of
    the forward, dq and dkv kernels at head dims A = dk, O = dv (the fit above). A [rows] softmax
    vector takes rows / 32 registers per thread (two rows per thread per 64), a [cols] column
    vector of the transposed dkv tile cols / 4 (two columns of every eight); three each (m, l or
    lse, delta; and the segment ids)."""
    bq, bkv = cfg.block_q, cfg.block_kv
    fwd = (_tile_registers(bq, dv) + _SCORE_TILES["forward"] * _tile_registers(bq, bkv)
           + 3 * bq // 32 + _OVERHEAD["forward"])
    bq, bkv = cfg.block_q_bwd, cfg.block_kv_bwd
    dq = (_tile_registers(bq, dk) + _SCORE_TILES["dq"] * _tile_registers(bq, bkv)
          + 3 * bq // 32 + _OVERHEAD["dq"])
    bq = cfg.block_q_dkv
    dkv = (_tile_registers(bkv, dk + dv) + _SCORE_TILES["dkv"] * _tile_registers(bkv, bq)
           + 3 * bq // 4 + _OVERHEAD["dkv"])
    return {"forward": (math.ceil(fwd), register_budget(_FWD_WGS)),
            "dq": (math.ceil(dq), register_budget(_DQ_WGS)),
            "dkv": (math.ceil(dkv), register_budget(_DKV_WGS))}


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
    if len(dts) != 1 or next(iter(dts)) not in DTYPES_16BIT:
        raise ValueError(f"mla_attention_sm90: q, k, v must all be bfloat16 (or float16), got "
                         f"{[str(jnp.dtype(d)) for d in dtypes]}.")
    need = max(smem_bytes_fwd(cfg, dk, dv), smem_bytes_bwd(cfg, dk, dv))
    if need > SMEM_BYTES:
        raise ValueError(f"mla_attention_sm90: {cfg} needs {need} bytes of shared memory at dims "
                         f"{dk}/{dv}, more than {SMEM_BYTES}; use smaller blocks or fewer stages.")
    for kernel, (need, budget) in registers_per_thread(cfg, dk, dv).items():
        check_registers(cfg, f"mla_attention_sm90 {kernel} kernel", need, budget,
                        f"compute warpgroup at head dims {dk}/{dv}")


def supports(q_shape, k_shape, v_shape, dtypes) -> bool:
    """Whether the kernels take these inputs (the dispatcher's test)."""
    try:
        check_dims(q_shape, k_shape, v_shape, dtypes)
    except ValueError:
        return False
    return True


def _masked_scores(a, b, shape, s_scale, row0, col0, segs=None, keys_on_rows: bool = False):
    """wgmma(a, b^T) * s_scale, [rows, cols] fp32 (a [rows, dim], b [cols, dim] in shared memory),
    with invisible entries at -inf. row0/col0: global index of the tile's first row/column; segs:
    None or the shared-memory segment ids (rows' [rows], columns' [cols]). Queries on rows and keys
    on columns (visible: col <= row), or the transposed tile of the dkv kernel with `keys_on_rows`
    (visible: row <= col)."""
    s = wgmma_new(shape, a, b.transpose((1, 0))) * s_scale
    if segs is not None:
        rowseg = plgpu.load(segs[0], layout=plgpu.Layout.WGMMA.reduce(1))
        colseg = plgpu.load(segs[1], layout=plgpu.Layout.WGMMA.reduce(0))
    rows = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA) + row0
    cols = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA) + col0
    visible = rows <= cols if keys_on_rows else cols <= rows
    if segs is not None:
        visible = visible & (lax.broadcast_in_dim(rowseg, shape, [0])
                             == lax.broadcast_in_dim(colseg, shape, [1]))
    return jnp.where(visible, s, -jnp.inf)


# ------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------
def _stream_kv_blocks(body, compute_context, k_rows, v_rows, kseg_row, bkv: int, steps: int,
                      wgs: int, stages: int) -> None:
    """Runs `body` over the first `steps` key blocks of one (batch, head): a TMA warpgroup streams
    K [bkv, dk] and V [bkv, dv] tiles (and the keys' segment ids when kseg_row is given) through
    `stages` buffers to the `wgs` compute warpgroups (the forward and the dq kernel share this)."""
    dk, dv = k_rows.shape[-1], v_rows.shape[-1]
    specs = [plgpu.BlockSpec((bkv, dk), lambda i: (i, 0), transforms=TRANSFORMS_16BIT),
             plgpu.BlockSpec((bkv, dv), lambda i: (i, 0), transforms=TRANSFORMS_16BIT)]
    refs = [k_rows, v_rows]
    if kseg_row is not None:
        specs.append(plgpu.BlockSpec((bkv,), lambda i: (i,)))
        refs.append(kseg_row)
    pipeline = plgpu.emit_pipeline_warp_specialized(
        body, grid=(steps,), memory_registers=_MEMORY_REGISTERS, in_specs=specs, wg_axis="wg",
        num_compute_wgs=wgs, max_concurrent_steps=stages, compute_context=compute_context)
    pipeline(*refs)


def _fwd_kernel(q_gmem, k_gmem, v_gmem, *rest, cfg: TileConfig, scale: float, has_segments: bool,
                interpret: bool):
    # q_gmem, k_gmem: [B, Tp, H, A] bf16     v_gmem: [B, Tp, H, O] bf16
    # qseg_gmem, kseg_gmem (with segments): [B, Tp] int32 (the same array twice)
    # o_gmem: [B, Tp, H, O] bf16             lse_gmem: [B, H, Tp] f32 (base 2)
    qseg_gmem, kseg_gmem = rest[:2] if has_segments else (None, None)
    o_gmem, lse_gmem = rest[2:] if has_segments else rest
    dk, dv = q_gmem.shape[-1], v_gmem.shape[-1]
    dtype = q_gmem.dtype
    bq, bkv, wgs = cfg.block_q, cfg.block_kv, _FWD_WGS
    n_q_tiles = q_gmem.shape[1] // (wgs * bq)
    qi = n_q_tiles - 1 - lax.axis_index("q_seq")  # the longest rows first
    h, b = lax.axis_index("heads"), lax.axis_index("batch")
    tile_end = (qi + 1) * (wgs * bq)
    kv_steps = lax.div(tile_end + (bkv - 1), jnp.int32(bkv))  # causal: blocks up to the last row
    s_scale = scale * LOG2E

    def scoped(q_smem, o_smem, lse_smem, qseg_smem, q_bar, seg_bar, p_smem=None):
        # q_smem: [2, bq, A]  o_smem: [2, bq, O]  lse_smem: [2, bq] f32  qseg_smem: [2, bq] i32
        # p_smem: [2, bq, bkv] (interpret mode only: P staged for the wgmma; see hopper.wgmma_into)
        wg = lax.axis_index("wg")
        q_base = qi * (wgs * bq) + wg * bq

        def body(idx, k_smem, v_smem, *seg_and_carry):
            # k_smem: [bkv, A]  v_smem: [bkv, O]  kseg_smem: [bkv] i32 (with segments)
            (step,) = idx
            carry = seg_and_carry[-1]
            acc, m_i, l_i = carry
            s = _masked_scores(q_smem.at[wg], k_smem, (bq, bkv), s_scale, q_base, step * bkv,
                               (qseg_smem.at[wg], seg_and_carry[0]) if has_segments else None)
            m_new = jnp.maximum(m_i, s.max(axis=1))
            alpha = jnp.exp2(m_i - m_new)
            p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
            l_i = l_i * alpha + p.sum(axis=1)
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])

            acc = wgmma_into(acc, p.astype(dtype), v_smem, interpret,  # [bq, O] += P V
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
            m_i = plgpu.layout_cast(jnp.full((bq,), M_INIT, jnp.float32),
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

        _stream_kv_blocks(body, compute_context, k_gmem.at[b, :, h, :], v_gmem.at[b, :, h, :],
                          kseg_gmem.at[b] if has_segments else None, bkv, kv_steps, wgs,
                          cfg.stages)

    pl.run_scoped(
        scoped,
        plgpu.SMEM((wgs, bq, dk), dtype, transforms=TRANSFORMS_16BIT),
        plgpu.SMEM((wgs, bq, dv), dtype, transforms=TRANSFORMS_16BIT),
        plgpu.SMEM((wgs, bq), jnp.float32),
        plgpu.SMEM((wgs, bq), jnp.int32),
        plgpu.Barrier(num_barriers=wgs),
        plgpu.Barrier(num_barriers=wgs),
        *([plgpu.SMEM((wgs, bq, bkv), dtype, transforms=TRANSFORMS_16BIT)] if interpret else []),
        collective_axes="wg",
    )


def _forward(q, k, v, seg, cfg: TileConfig, scale: float, interpret):
    """Padded inputs ([B, Tp, H, *], seg [B, Tp] or None) -> (o [B, Tp, H, O], lse [B, H, Tp])."""
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
        interpret=interpret_params(interpret),
    )
    args = (q, k, v) + ((seg, seg) if has_segments else ())
    return call(*args)


# ------------------------------------------------------------------------------------------------
# Backward
# ------------------------------------------------------------------------------------------------
def _dq_kernel(q_gmem, k_gmem, v_gmem, do_gmem, lse_gmem, delta_gmem, *rest, cfg: TileConfig,
               scale: float, has_segments: bool, interpret: bool):
    # q_gmem, k_gmem: [B, Tp, H, A]    v_gmem, do_gmem: [B, Tp, H, O]    (bf16)
    # lse_gmem (base 2), delta_gmem: [B, H, Tp] f32    qseg_gmem, kseg_gmem: [B, Tp] i32
    # dq_gmem: [B, Tp, H, A] bf16
    qseg_gmem, kseg_gmem = rest[:2] if has_segments else (None, None)
    (dq_gmem,) = rest[2:] if has_segments else rest
    dk, dv = q_gmem.shape[-1], v_gmem.shape[-1]
    dtype = q_gmem.dtype
    bq, bkv, wgs = cfg.block_q_bwd, cfg.block_kv_bwd, _DQ_WGS
    n_q_tiles = q_gmem.shape[1] // (wgs * bq)
    qi = n_q_tiles - 1 - lax.axis_index("q_seq")  # the longest rows first
    h, b = lax.axis_index("heads"), lax.axis_index("batch")
    kv_steps = lax.div((qi + 1) * (wgs * bq) + (bkv - 1), jnp.int32(bkv))  # causal
    s_scale = scale * LOG2E

    def scoped(q_smem, do_smem, lse_smem, delta_smem, qseg_smem, bars, ds_smem=None):
        # q_smem: [2, bq, A]  do_smem: [2, bq, O]  lse/delta_smem: [2, bq] f32  qseg: [2, bq] i32
        # bars: q, dO, lse, delta, segments (one barrier per warpgroup each)
        # ds_smem: [2, bq, bkv] (interpret only: dS staged for the wgmma; see hopper.wgmma_into)
        wg = lax.axis_index("wg")
        q_base = qi * (wgs * bq) + wg * bq

        def body(idx, k_smem, v_smem, *seg_and_carry):
            # k_smem: [bkv, A]  v_smem: [bkv, O]  kseg_smem: [bkv] i32 (with segments)
            (step,) = idx
            dq_acc, lse, delta = seg_and_carry[-1]
            s = _masked_scores(q_smem.at[wg], k_smem, (bq, bkv), s_scale, q_base, step * bkv,
                               (qseg_smem.at[wg], seg_and_carry[0]) if has_segments else None)
            p = jnp.exp2(s - lax.broadcast_in_dim(lse, s.shape, [0]))  # masked: exp2(-inf) = 0
            dp = wgmma_new((bq, bkv), do_smem.at[wg], v_smem.transpose((1, 0)))  # dO V^T
            ds = p * (dp - lax.broadcast_in_dim(delta, s.shape, [0]))
            dq_acc = wgmma_into(dq_acc, ds.astype(dtype), k_smem, interpret,  # [bq, A] += dS K
                                 None if ds_smem is None else ds_smem.at[wg])
            return dq_acc, lse, delta

        def compute_context(run_pipeline):
            rows = pl.ds(q_base, bq)
            plgpu.copy_gmem_to_smem(q_gmem.at[b, rows, h], q_smem.at[wg], bars[0].at[wg])
            plgpu.copy_gmem_to_smem(do_gmem.at[b, rows, h], do_smem.at[wg], bars[1].at[wg])
            plgpu.copy_gmem_to_smem(lse_gmem.at[b, h, rows], lse_smem.at[wg], bars[2].at[wg])
            plgpu.copy_gmem_to_smem(delta_gmem.at[b, h, rows], delta_smem.at[wg], bars[3].at[wg])
            if has_segments:
                plgpu.copy_gmem_to_smem(qseg_gmem.at[b, rows], qseg_smem.at[wg], bars[4].at[wg])
            for bar in bars[:5 if has_segments else 4]:
                plgpu.barrier_wait(bar.at[wg])
            lse = plgpu.load(lse_smem.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))
            delta = plgpu.load(delta_smem.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))
            dq_acc = plgpu.layout_cast(jnp.zeros((bq, dk), jnp.float32), plgpu.Layout.WGMMA)
            dq_acc, _, _ = run_pipeline((dq_acc, lse, delta))
            q_smem[wg] = (dq_acc * scale).astype(dtype)  # Q's tile is free once the loop is done
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_smem.at[wg], dq_gmem.at[b, rows, h])
            plgpu.wait_smem_to_gmem(0)

        _stream_kv_blocks(body, compute_context, k_gmem.at[b, :, h, :], v_gmem.at[b, :, h, :],
                          kseg_gmem.at[b] if has_segments else None, bkv, kv_steps, wgs,
                          cfg.stages_bwd)

    pl.run_scoped(
        scoped,
        plgpu.SMEM((wgs, bq, dk), dtype, transforms=TRANSFORMS_16BIT),
        plgpu.SMEM((wgs, bq, dv), dtype, transforms=TRANSFORMS_16BIT),
        plgpu.SMEM((wgs, bq), jnp.float32),
        plgpu.SMEM((wgs, bq), jnp.float32),
        plgpu.SMEM((wgs, bq), jnp.int32),
        tuple(plgpu.Barrier(num_barriers=wgs) for _ in range(5)),
        *([plgpu.SMEM((wgs, bq, bkv), dtype, transforms=TRANSFORMS_16BIT)] if interpret else []),
        collective_axes="wg",
    )


def _dkv_kernel(q_gmem, k_gmem, v_gmem, do_gmem, lse_gmem, delta_gmem, *rest, cfg: TileConfig,
                scale: float, has_segments: bool, interpret: bool):
    # Inputs as _dq_kernel's; dk_gmem: [B, Tp, H, A] bf16, dv_gmem: [B, Tp, H, O] bf16.
    # Tiles are transposed (keys on rows): S^T = K Q^T [bkv, bq], so that P^T and dS^T are the
    # register A operands of dV += P^T dO and dK += dS^T Q.
    qseg_gmem, kseg_gmem = rest[:2] if has_segments else (None, None)
    dk_gmem, dv_gmem = rest[2:] if has_segments else rest
    dk, dv = q_gmem.shape[-1], v_gmem.shape[-1]
    dtype = q_gmem.dtype
    bq, bkv, wgs = cfg.block_q_dkv, cfg.block_kv_bwd, _DKV_WGS
    kj = lax.axis_index("kv_seq")  # the first keys are seen by the most queries: launched first
    h, b = lax.axis_index("heads"), lax.axis_index("batch")
    q_first = lax.div(kj * (wgs * bkv), jnp.int32(bq))  # causal: the first block that sees a key
    q_steps = q_gmem.shape[1] // bq - q_first
    s_scale = scale * LOG2E
    # One swizzle for every wgmma operand (a wgmma's operands share it): the widest a K of bq
    # (the contraction of dV += P^T dO and dK += dS^T Q) allows, 64 bytes at bq = 32.
    tr = transforms(bq, dtype)

    def scoped(k_smem, v_smem, kseg_smem, bars, pt_smem=None, dst_smem=None):
        # k_smem: [1, bkv, A]  v_smem: [1, bkv, O]  kseg_smem: [1, bkv] i32; bars: k, v, segments
        # pt_smem, dst_smem: [1, bkv, bq] (interpret mode only: P^T, dS^T staged for the wgmma)
        wg = lax.axis_index("wg")
        k_base = kj * (wgs * bkv) + wg * bkv

        def body(idx, q_smem, do_smem, lse_smem, delta_smem, *seg_and_carry):
            # q_smem: [bq, A]  do_smem: [bq, O]  lse/delta_smem: [bq] f32  qseg_smem: [bq] i32
            (step,) = idx
            dk_acc, dv_acc = seg_and_carry[-1]
            st = _masked_scores(k_smem.at[wg], q_smem, (bkv, bq), s_scale, k_base,
                                (q_first + step) * bq,
                                (kseg_smem.at[wg], seg_and_carry[0]) if has_segments else None,
                                keys_on_rows=True)
            lse = plgpu.load(lse_smem, layout=plgpu.Layout.WGMMA.reduce(0))
            pt = jnp.exp2(st - lax.broadcast_in_dim(lse, st.shape, [1]))
            dv_acc = wgmma_into(dv_acc, pt.astype(dtype), do_smem, interpret,  # += P^T dO
                                 None if pt_smem is None else pt_smem.at[wg])
            dpt = wgmma_new((bkv, bq), v_smem.at[wg], do_smem.transpose((1, 0)))  # V dO^T
            delta = plgpu.load(delta_smem, layout=plgpu.Layout.WGMMA.reduce(0))
            dst = pt * (dpt - lax.broadcast_in_dim(delta, st.shape, [1]))
            dk_acc = wgmma_into(dk_acc, dst.astype(dtype), q_smem, interpret,  # += dS^T Q
                                 None if dst_smem is None else dst_smem.at[wg])
            return dk_acc, dv_acc

        def compute_context(run_pipeline):
            rows = pl.ds(k_base, bkv)
            plgpu.copy_gmem_to_smem(k_gmem.at[b, rows, h], k_smem.at[wg], bars[0].at[wg])
            plgpu.copy_gmem_to_smem(v_gmem.at[b, rows, h], v_smem.at[wg], bars[1].at[wg])
            if has_segments:
                plgpu.copy_gmem_to_smem(kseg_gmem.at[b, rows], kseg_smem.at[wg], bars[2].at[wg])
            for bar in bars[:3 if has_segments else 2]:
                plgpu.barrier_wait(bar.at[wg])
            dk_acc = plgpu.layout_cast(jnp.zeros((bkv, dk), jnp.float32), plgpu.Layout.WGMMA)
            dv_acc = plgpu.layout_cast(jnp.zeros((bkv, dv), jnp.float32), plgpu.Layout.WGMMA)
            dk_acc, dv_acc = run_pipeline((dk_acc, dv_acc))
            k_smem[wg] = (dk_acc * scale).astype(dtype)  # K's and V's tiles are free now
            v_smem[wg] = dv_acc.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(k_smem.at[wg], dk_gmem.at[b, rows, h])
            plgpu.copy_smem_to_gmem(v_smem.at[wg], dv_gmem.at[b, rows, h])
            plgpu.wait_smem_to_gmem(0)

        specs = [plgpu.BlockSpec((bq, dk), lambda i: (q_first + i, 0), transforms=tr),
                 plgpu.BlockSpec((bq, dv), lambda i: (q_first + i, 0), transforms=tr),
                 plgpu.BlockSpec((bq,), lambda i: (q_first + i,)),
                 plgpu.BlockSpec((bq,), lambda i: (q_first + i,))]
        refs = [q_gmem.at[b, :, h, :], do_gmem.at[b, :, h, :], lse_gmem.at[b, h],
                delta_gmem.at[b, h]]
        if has_segments:
            specs.append(plgpu.BlockSpec((bq,), lambda i: (q_first + i,)))
            refs.append(qseg_gmem.at[b])
        pipeline = plgpu.emit_pipeline_warp_specialized(
            body, grid=(q_steps,), memory_registers=_MEMORY_REGISTERS, in_specs=specs, wg_axis="wg",
            num_compute_wgs=wgs, max_concurrent_steps=cfg.stages_bwd,
            compute_context=compute_context)
        pipeline(*refs)

    pl.run_scoped(
        scoped,
        plgpu.SMEM((wgs, bkv, dk), dtype, transforms=tr),
        plgpu.SMEM((wgs, bkv, dv), dtype, transforms=tr),
        plgpu.SMEM((wgs, bkv), jnp.int32),
        tuple(plgpu.Barrier(num_barriers=wgs) for _ in range(3)),
        *([plgpu.SMEM((wgs, bkv, bq), dtype, transforms=tr)] * 2
          if interpret else []),
        collective_axes="wg",
    )


def _backward_kernels(q, k, v, seg, o, lse, do, cfg: TileConfig, scale: float, interpret):
    """Padded inputs and residuals -> (dq, dk, dv), through the dq and dkv kernels."""
    b, tp, h, dk = q.shape
    dv = v.shape[-1]
    has_segments = seg is not None
    do = do.astype(q.dtype)
    # delta_i = o_i . do_i, [B, H, Tp] f32 (XLA; the rows of dP - delta).
    delta = jnp.einsum("btho,btho->bht", o.astype(jnp.float32), do.astype(jnp.float32))
    args = (q, k, v, do, lse, delta) + ((seg, seg) if has_segments else ())
    static = dict(cfg=cfg, scale=scale, has_segments=has_segments, interpret=bool(interpret))
    common = dict(thread_name="wg", compiler_params=plgpu.CompilerParams(approx_math=True),
                  interpret=interpret_params(interpret))
    dq = plgpu.kernel(
        functools.partial(_dq_kernel, **static),
        out_type=jax.ShapeDtypeStruct((b, tp, h, dk), q.dtype),
        grid=(tp // cfg.dq_tile, h, b), grid_names=("q_seq", "heads", "batch"),
        num_threads=_DQ_WGS + 1, **common)(*args)
    dk_, dv_ = plgpu.kernel(
        functools.partial(_dkv_kernel, **static),
        out_type=(jax.ShapeDtypeStruct((b, tp, h, dk), k.dtype),
                  jax.ShapeDtypeStruct((b, tp, h, dv), v.dtype)),
        grid=(tp // (_DKV_WGS * cfg.block_kv_bwd), h, b), grid_names=("kv_seq", "heads", "batch"),
        num_threads=_DKV_WGS + 1, **common)(*args)
    return dq, dk_, dv_


# ------------------------------------------------------------------------------------------------
# The differentiable wrapper
# ------------------------------------------------------------------------------------------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, seg, static):
    return _flash_fwd(q, k, v, seg, static)[0]


def _flash_fwd(q, k, v, seg, static):  # static: (cfg, scale, interpret)
    o, lse = _forward(q, k, v, seg, *static)
    return o, (q, k, v, seg, o, lse)


def _flash_bwd(static, res, do):  # res: (q, k, v, seg, o, lse)
    dseg = None if res[3] is None else jnp.zeros(res[3].shape, jax.dtypes.float0)
    return (*_backward_kernels(*res, do, *static), dseg)


_flash.defvjp(_flash_fwd, _flash_bwd)


def mla_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float,
                  segment_ids: jax.Array | None = None, config: TileConfig | None = None,
                  interpret: bool | plgpu.InterpretGPUParams = False) -> jax.Array:
    """Causal flash attention with qk head dim A and v head dim O (differentiable: custom_vjp, the
    dq and dkv kernels).

    Args:
      q, k: [B, T, H, A]; v: [B, T, H, O]; one dtype, bfloat16 (or float16); A, O multiples of 64,
        at most 256 (module docstring).
      scale: softmax scale.
      segment_ids: optional int [B, T]; a query sees only keys of its own segment.
      config: block sizes (DEFAULT_CONFIG when None).
      interpret: True (or `InterpretGPUParams`) runs the kernels in GPU interpret mode on the CPU.
    Returns:
      [B, T, H, O] in q's dtype; the same contract as `ops.attention.mla_attention_reference`.
    """
    cfg = config or DEFAULT_CONFIG
    check_dims(q.shape, k.shape, v.shape, (q.dtype, k.dtype, v.dtype), cfg)
    b, t = q.shape[:2]
    if segment_ids is not None and segment_ids.shape != (b, t):
        raise ValueError(f"mla_attention_sm90: segment_ids has shape {segment_ids.shape}; expected "
                         f"{(b, t)} (one id per token).")
    tp = round_up(t, cfg.t_multiple)
    seg = None if segment_ids is None else pad_axis(segment_ids.astype(jnp.int32), 1, tp, -1)
    o = _flash(pad_axis(q, 1, tp), pad_axis(k, 1, tp), pad_axis(v, 1, tp), seg,
               (cfg, float(scale), interpret))
    return o[:, :t] if tp != t else o


def flops(b: int, t: int, h: int, dk: int, dv: int, backward: bool = False) -> float:
    """Useful FLOPs of causal attention (half the score matrix): 2 T^2/2 (A + O) per head forward;
    the backward does 2.5x that (dQ, dK, dV, dP and the recomputed S)."""
    fwd = 2.0 * b * h * (t * t / 2) * (dk + dv)
    return fwd * 3.5 if backward else fwd


__all__ = ["DEFAULT_CONFIG", "TileConfig", "check_dims", "flops", "mla_attention", "smem_bytes_bwd",
           "smem_bytes_fwd", "supports"]
