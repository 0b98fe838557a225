"""Grouped (ragged) matmuls of the routed experts for Hopper (sm_90a), Pallas Mosaic GPU.

Letters (dsv3_jax/NOTATION.md): M rows, I input dim, J output dim, E experts (groups). The
math (rows of x sorted by expert; group e owns the rows [starts[e], starts[e+1])):

    gmm:   out[m, :] = x[m, :] @ w[e(m)]          x [M, I], w [E, I, J]  -> [M, J]
           (transpose_rhs: w[e(m)]^T, w [E, J, I]: the input gradient dx = dy w^T needs no copy)
           rows outside [starts[0], starts[E]) are zeros.
    tgmm:  out[e] = x[starts[e]:starts[e+1]]^T @ dy[starts[e]:starts[e+1]]
                                                  x [M, I], dy [M, J]   -> [E, I, J]
           (the weight gradient dw; an empty group gets zeros).

`starts` [E+1] is in absolute rows of x, so the kernels never see an expert-parallel group offset:
the caller (`dsv3_jax/ops/grouped_matmul.py`) slices the starts of the experts it holds. The
references the kernels are tested against are `grouped_matmul_reference` and
`transposed_grouped_matmul_reference` in that file (XLA's `lax.ragged_dot`).

gmm tiling. The output [M, J] is cut into `block_m x block_n` tiles; one CTA per SM (persistent)
walks the tiles in a snake order (`planar_snake`, bands `grid_block_n` tiles wide along J) so that
CTAs working at the same time share rows of x and columns of w in L2. For one output tile:
  * the wrapper precomputed, per row tile, the range [lo, hi) of groups whose rows meet it (most
    tiles: one group; a tile across a boundary: two or more; a tile of padding rows: none);
  * for each such group e with rows in the tile, one `emit_pipeline` over I (`block_k` = 64 bf16 =
    one 128-byte swizzled row) streams x[tile rows, i-block] and w[e][i-block, tile cols] by TMA,
    `max_concurrent_steps` stages deep, into `wgmma(acc, x_tile, w_tile)` (fp32 accumulator in
    registers; for transpose_rhs the w tile is [block_n, block_k] and wgmma reads it transposed,
    which 16-bit wgmma supports);
  * the rows of the tile that belong to e are selected into the shared-memory output tile
    (`where(row in e, acc, out_tile)`, starting from zeros), so rows of other groups, and padding
    rows, are never written with a wrong product; one TMA store writes the whole tile.
A tile across a boundary runs the I loop once per group (the extra cost is at most E + 1 tiles of
ceil(M / block_m)); a tile with no group is only stored as zeros (no I loop).

tgmm tiling. One work item is (group e, a `block_k x block_n` tile of the [I, J] output); CTAs walk
the items persistently. For an item, `emit_pipeline` runs over the `block_m`-row blocks that meet
the group's rows (a dynamic count, none for an empty group), streaming x[block, k cols] and
dy[block, j cols]; `wgmma(acc, x_blk^T, dy_blk)` contracts over the rows (x's tile is read
transposed, allowed for 16-bit operands). The first and last block of a group may hold rows of its
neighbours: there both tiles are masked in shared memory (rows outside the group set to 0, a
register round trip, then `commit_smem` before the wgmma reads them); interior blocks are used as
loaded. The accumulator goes through shared memory to gmem by TMA.

What the wrapper pads (zeros, exact; DeepSeek-V3's expert shapes need none): M to a multiple of
block_m, the contraction and output dims to their tiles. Operands are bf16 or fp16 (the compute
dtype); the caller routes fp32 elsewhere (16-bit wgmma is what a Hopper tensor core runs at speed,
and an fp32 = tf32 wgmma would not give fp32 results anyway). Accumulation is fp32.

Status: NOT YET RUN ON A GPU. Both kernels match the references in GPU interpret mode on the CPU,
pass the sm_90a Mosaic GPU lowering and compile through ptxas for sm_90a without spills at
DeepSeek-V3 and small-config expert shapes (gmm 168 registers, tgmm 209; experiments/RESULTS.md):
    python mosaic_ptxas_check.py --fail-on-spill --fn experiments.kernel_targets:make
(the tool that takes Mosaic GPU kernels through ptxas on a machine without a GPU; its built-in
`gmm_w1`, `gmm_w1_dx`, `tgmm_w1`, `gmm_w2`... targets are the same kernels at V3 shapes). A tile
config that would spill is refused before lowering (`registers_needed_gmm` / `_tgmm`). ptxas notes
"warpgroup.arrive is injected ... to allow use of registers in GMMA" for both: the accumulator is
carried through the pipeline loop in registers, so ptxas places a wgmma fence in each iteration,
which is what a hand-written Hopper GEMM (CUTLASS's warpgroup_arrive per k block) does anyway. The
run on an H100 and the speed are to be measured with `python experiments/bench_grouped_matmul.py`. Not tuned: one compute
warpgroup per CTA (no warp specialisation, no 2-CTA tiles); SwiGLU's w1 and w3 are two calls.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp

from dsv3_jax.ops.pallas.hopper import (DTYPES_16BIT, MAX_REGISTERS, OUT_DTYPES, SMEM_BYTES,
                                        check_registers, pad_axis, persistent_kernel, refuse,
                                        round_up, transforms)

IN_DTYPES = DTYPES_16BIT  # operands; the dispatcher routes others (fp32) to lax.ragged_dot
_SMEM_SLACK = 4 * 1024  # barriers and alignment


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """Tiling of both kernels (defaults to be tuned on an H100).

    gmm:  output tiles block_m x block_n, contraction steps of block_k.
    tgmm: output tiles block_k x block_n of each group's [I, J], contraction steps of block_m rows.
    """

    block_m: int = 128  # gmm: rows per tile (wgmma M, a multiple of 64); tgmm: rows per step
    block_n: int = 128  # columns per tile (a wgmma's width: a multiple of 64, at most 256)
    block_k: int = 64  # gmm: contraction step; tgmm: output rows (wgmma M) per tile
    max_concurrent_steps: int = 4  # pipeline stages in shared memory
    grid_block_n: int = 4  # the snake order's band width along J

    def __post_init__(self):
        for field in ("block_m", "block_k"):
            if getattr(self, field) < 64 or getattr(self, field) % 64:
                refuse(self, field, "must be a positive multiple of 64")
        if self.block_n < 64 or self.block_n % 64 or self.block_n > 256:
            refuse(self, "block_n", "must be 64, 128, 192 or 256 (wgmma N <= 256)")
        if self.max_concurrent_steps < 2:
            refuse(self, "max_concurrent_steps", "must be >= 2 (the wgmma of a step is still "
                   "reading its tiles while the next step's copies are issued)")
        if self.grid_block_n < 1:
            refuse(self, "grid_block_n", "must be >= 1")


DEFAULT_GMM_CONFIG = TileConfig()
DEFAULT_TGMM_CONFIG = TileConfig(block_m=64, block_k=128)


# Register budgets: one warpgroup per CTA and no setmaxnreg, so a thread may hold MAX_REGISTERS.
# The estimates are fitted to ptxas (13.2, sm_90a, 2026-12-01, `python mosaic_ptxas_check.py --fn
# experiments.kernel_targets:make` and tile sweeps at K 7168 N 2048, 8 groups, bf16):
#   gmm  block_m x block_n: 128x128 168 regs, 64x256 166, 192x128 235, 64x192 172, no spills;
#        128x192 spills 512 B (the row select of the epilogue holds a tile row per column too).
#   tgmm block_k x block_n: 128x128 209 regs, 64x256 243, 64x192 245, no spills; 128x192 and
#        192x128 spill 188 / 184 B (the boundary-block masking keeps tiles in registers).
def registers_needed_gmm(cfg: TileConfig) -> int:
    """Live registers per thread of gmm: the [block_m, block_n] fp32 accumulator (block_m *
    block_n / 128), the epilogue's row select (block_n / 4) and 24 for addresses and loop state."""
    return cfg.block_m * cfg.block_n // 128 + cfg.block_n // 4 + 24


def registers_needed_tgmm(cfg: TileConfig) -> int:
    """Live registers per thread of tgmm: the [block_k, block_n] fp32 accumulator (block_k *
    block_n / 128) and 96 for the masking of a group's first and last row block and the loop."""
    return cfg.block_k * cfg.block_n // 128 + 96


def _check_dtypes(name, *arrays):
    for a in arrays:
        if jnp.dtype(a.dtype) not in IN_DTYPES:
            raise ValueError(f"{name}: operands must be bfloat16 or float16, got {a.dtype}; "
                             "dsv3_jax.ops.grouped_matmul routes other dtypes to lax.ragged_dot.")


# ------------------------------------------------------------------------------------------------
# gmm: out = x @ w[e(row)]
# ------------------------------------------------------------------------------------------------
def smem_bytes_gmm(cfg: TileConfig, in_dtype, out_dtype) -> int:
    stage = (cfg.block_m + cfg.block_n) * cfg.block_k * jnp.dtype(in_dtype).itemsize
    out = cfg.block_m * cfg.block_n * jnp.dtype(out_dtype).itemsize
    return cfg.max_concurrent_steps * stage + out + _SMEM_SLACK


def _gmm_kernel(starts_gmem, tile_lo_gmem, tile_hi_gmem, x_gmem, w_gmem, out_gmem, *,
                cfg: TileConfig, transpose_rhs: bool):
    """One persistent CTA: walks output tiles (module docstring)."""
    # starts_gmem:  [E+1] int32, group e owns rows [starts[e], starts[e+1])
    # tile_lo_gmem: [Mt] int32, tile_hi_gmem: [Mt] int32: groups [lo, hi) meet each row tile
    # x_gmem:       [Mp, Ip] bf16/f16
    # w_gmem:       [E, Ip, Jp], or [E, Jp, Ip] when transpose_rhs
    # out_gmem:     [Mp, Jp]
    mp, kp = x_gmem.shape
    np_ = out_gmem.shape[1]
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    m_tiles, n_tiles, k_steps = mp // bm, np_ // bn, kp // bk
    dtype, out_dtype = x_gmem.dtype, out_gmem.dtype

    x_spec = plgpu.BlockSpec((bm, bk), lambda k: (0, k), transforms=transforms(bk, dtype),
                             delay_release=1)
    if transpose_rhs:
        w_spec = plgpu.BlockSpec((bn, bk), lambda k: (0, k), transforms=transforms(bk, dtype),
                                 delay_release=1)
    else:
        w_spec = plgpu.BlockSpec((bk, bn), lambda k: (k, 0), transforms=transforms(bn, dtype),
                                 delay_release=1)

    @functools.partial(pl.run_scoped,
                       o_smem=plgpu.SMEM((bm, bn), out_dtype,
                                         transforms=transforms(bn, out_dtype)))  # [bm, bn]
    def _scoped(o_smem):
        @plgpu.nd_loop((m_tiles * n_tiles,), collective_axes="sm")
        def _tile(loop_info):
            (lin,) = loop_info.index
            mi, ni = plgpu.planar_snake(lin, (m_tiles, n_tiles), 1, cfg.grid_block_n)
            row0 = mi * bm
            rows, cols = pl.ds(row0, bm), pl.ds(ni * bn, bn)
            x_tile_rows = x_gmem.at[rows, :]  # [bm, Ip]

            def product(g):
                w_g = w_gmem.at[g, cols, :] if transpose_rhs else w_gmem.at[g, :, cols]

                def scope(acc_ref):  # acc_ref: [bm, bn] f32, wgmma accumulator
                    def step(_, x_smem, w_smem):
                        # x_smem: [bm, bk]; w_smem: [bk, bn] or [bn, bk] (transpose_rhs)
                        rhs = w_smem.transpose((1, 0)) if transpose_rhs else w_smem
                        plgpu.wgmma(acc_ref, x_smem, rhs)

                    plgpu.emit_pipeline(step, grid=(k_steps,), in_specs=[x_spec, w_spec],
                                        max_concurrent_steps=cfg.max_concurrent_steps,
                                        )(x_tile_rows, w_g)
                    return acc_ref[...]  # waits for the last wgmma

                return pl.run_scoped(scope, plgpu.ACC((bm, bn), jnp.float32))

            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous tile's store read o_smem
            o_smem[...] = plgpu.layout_cast(jnp.zeros((bm, bn), out_dtype), plgpu.Layout.WGMMA)

            def one_group(g, carry):
                lo = jnp.maximum(starts_gmem[g], row0) - row0  # the group's rows in this tile
                hi = jnp.minimum(starts_gmem[g + 1], row0 + bm) - row0

                @pl.when(hi > lo)  # empty groups (and groups merely touching the tile) skip
                def _():
                    acc = product(g)
                    r = plgpu.broadcasted_iota(jnp.int32, (bm, bn), 0, layout=plgpu.Layout.WGMMA)
                    keep = (r >= lo) & (r < hi)
                    o_smem[...] = jnp.where(keep, acc.astype(out_dtype), o_smem[...])

                return carry

            lax.fori_loop(tile_lo_gmem[mi], tile_hi_gmem[mi], one_group, None)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem, out_gmem.at[rows, cols])

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def row_tile_group_ranges(starts: jax.Array, m_padded: int, block_m: int
                          ) -> tuple[jax.Array, jax.Array]:
    """For each block_m row tile: [lo, hi), the groups e whose rows [starts[e], starts[e+1]) meet
    the tile's rows [tile * block_m, (tile + 1) * block_m) (an empty group may be included; it is
    skipped in the kernel). starts int32 [E+1] non-decreasing -> (lo, hi) int32 [Mp / block_m]."""
    row0 = jnp.arange(0, m_padded, block_m, dtype=jnp.int32)
    lo = jnp.searchsorted(starts[1:], row0, side="right").astype(jnp.int32)  # ends <= row0: before
    hi = jnp.searchsorted(starts[:-1], row0 + block_m, side="left").astype(jnp.int32)
    return lo, jnp.maximum(hi, lo)


def gmm(x: jax.Array, w: jax.Array, starts: jax.Array, *, transpose_rhs: bool = False,
        out_dtype=None, config: TileConfig | None = None,
        interpret: bool | plgpu.InterpretGPUParams = False, num_sms: int | None = None
        ) -> jax.Array:
    """out[m] = x[m] @ w[e] for starts[e] <= m < starts[e+1]; zeros for other rows.

    Args:
      x: [M, I] bf16 or f16, rows sorted by group.
      w: [E, I, J] (or [E, J, I] with transpose_rhs=True, multiplying by w[e]^T), x's dtype.
      starts: int32 [E+1], non-decreasing, in rows of x (starts[E] <= M).
      out_dtype: x's dtype when None; bf16, f16 or f32.
      config: tiling (DEFAULT_GMM_CONFIG when None).
      interpret: True (or InterpretGPUParams) runs in Pallas GPU interpret mode on the CPU.
      num_sms: persistent CTAs: the dispatcher's SM count (None: hopper.persistent_kernel's).
    Returns:
      [M, J] in out_dtype.
    """
    _check_dtypes("grouped_matmul_sm90.gmm", x, w)
    if x.dtype != w.dtype:
        raise ValueError(f"grouped_matmul_sm90.gmm: x is {x.dtype} but w is {w.dtype}; cast w.")
    cfg = config or DEFAULT_GMM_CONFIG
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"grouped_matmul_sm90.gmm: out_dtype={out_dtype} is not supported.")
    m, k = x.shape
    g = w.shape[0]
    n = w.shape[1] if transpose_rhs else w.shape[2]
    if (w.shape[2] if transpose_rhs else w.shape[1]) != k or starts.shape != (g + 1,):
        raise ValueError(f"grouped_matmul_sm90.gmm: x {x.shape}, w {w.shape} (transpose_rhs="
                         f"{transpose_rhs}) and starts {starts.shape} do not match.")
    if smem_bytes_gmm(cfg, x.dtype, out_dtype) > SMEM_BYTES:
        raise ValueError(f"{cfg} needs more than {SMEM_BYTES} bytes of shared memory.")
    check_registers(cfg, "grouped_matmul_sm90.gmm", registers_needed_gmm(cfg), MAX_REGISTERS,
                    "warpgroup")
    mp, kp, np_ = round_up(m, cfg.block_m), round_up(k, cfg.block_k), round_up(n, cfg.block_n)
    x_p = pad_axis(pad_axis(x, 0, mp), 1, kp)
    w_p = pad_axis(pad_axis(w, 1, np_ if transpose_rhs else kp), 2, kp if transpose_rhs else np_)
    starts = starts.astype(jnp.int32)
    lo, hi = row_tile_group_ranges(starts, mp, cfg.block_m)
    n_tiles = (mp // cfg.block_m) * (np_ // cfg.block_n)
    out = persistent_kernel(functools.partial(_gmm_kernel, cfg=cfg, transpose_rhs=transpose_rhs),
                            jax.ShapeDtypeStruct((mp, np_), out_dtype), n_tiles, num_sms,
                            interpret)(starts, lo, hi, x_p, w_p)
    return out[:m, :n] if (mp, np_) != (m, n) else out


# ------------------------------------------------------------------------------------------------
# tgmm: out[e] = x[rows of e]^T @ dy[rows of e]
# ------------------------------------------------------------------------------------------------
def smem_bytes_tgmm(cfg: TileConfig, in_dtype, out_dtype) -> int:
    stage = cfg.block_m * (cfg.block_k + cfg.block_n) * jnp.dtype(in_dtype).itemsize
    out = cfg.block_k * cfg.block_n * jnp.dtype(out_dtype).itemsize
    return cfg.max_concurrent_steps * stage + out + _SMEM_SLACK


def _tgmm_kernel(starts_gmem, x_gmem, dy_gmem, out_gmem, *, cfg: TileConfig):
    """One persistent CTA: walks (group, output tile) items (module docstring)."""
    # starts_gmem: [E+1] int32, group e owns rows [starts[e], starts[e+1])
    # x_gmem:      [Mp, Ip] bf16/f16
    # dy_gmem:     [Mp, Jp] bf16/f16
    # out_gmem:    [E, Ip, Jp]
    kp = x_gmem.shape[1]
    np_ = dy_gmem.shape[1]
    groups = out_gmem.shape[0]
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    k_tiles, n_tiles = kp // bk, np_ // bn
    dtype, out_dtype = x_gmem.dtype, out_gmem.dtype

    @functools.partial(pl.run_scoped,
                       o_smem=plgpu.SMEM((bk, bn), out_dtype,
                                         transforms=transforms(bn, out_dtype)))  # [bk, bn]
    def _scoped(o_smem):
        @plgpu.nd_loop((groups, k_tiles * n_tiles), collective_axes="sm")
        def _item(loop_info):
            g, lin = loop_info.index
            ki, ni = plgpu.planar_snake(lin, (k_tiles, n_tiles), 1, cfg.grid_block_n)
            start, end = starts_gmem[g], starts_gmem[g + 1]
            first_block = lax.div(start, bm)
            n_blocks = jnp.where(end > start, lax.div(end + bm - 1, bm) - first_block, 0)

            def mask_rows(ref, block):
                """Zeros the rows of a [bm, cols] tile that lie outside [start, end)."""
                r = plgpu.broadcasted_iota(jnp.int32, ref.shape, 0, layout=plgpu.Layout.WGMMA)
                r = r + block * bm
                ref[...] = jnp.where((r >= start) & (r < end), ref[...], jnp.zeros_like(ref[...]))

            def scope(acc_ref):  # acc_ref: [bk, bn] f32
                def step(idx, x_smem, dy_smem):
                    # x_smem: [bm, bk] (rows, i cols); dy_smem: [bm, bn] (rows, j cols)
                    (i,) = idx

                    @pl.when((i == 0) | (i == n_blocks - 1))  # blocks shared with neighbours
                    def _():
                        mask_rows(x_smem, first_block + i)
                        mask_rows(dy_smem, first_block + i)
                        plgpu.commit_smem()  # make the stores visible to the wgmma (async proxy)

                    plgpu.wgmma(acc_ref, x_smem.transpose((1, 0)), dy_smem)

                @pl.when(n_blocks > 0)
                def _():
                    plgpu.emit_pipeline(
                        step, grid=(n_blocks,),
                        in_specs=[
                            plgpu.BlockSpec((bm, bk), lambda i: (first_block + i, 0),
                                            transforms=transforms(bk, dtype), delay_release=1),
                            plgpu.BlockSpec((bm, bn), lambda i: (first_block + i, 0),
                                            transforms=transforms(bn, dtype), delay_release=1),
                        ],
                        max_concurrent_steps=cfg.max_concurrent_steps,
                    )(x_gmem.at[:, pl.ds(ki * bk, bk)], dy_gmem.at[:, pl.ds(ni * bn, bn)])

                return acc_ref[...]

            acc = pl.run_scoped(scope, plgpu.ACC((bk, bn), jnp.float32))
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous item's store
            o_smem[...] = acc.astype(out_dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem, out_gmem.at[g, pl.ds(ki * bk, bk), pl.ds(ni * bn, bn)])

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def tgmm(x: jax.Array, dy: jax.Array, starts: jax.Array, *, out_dtype=jnp.float32,
         config: TileConfig | None = None, interpret: bool | plgpu.InterpretGPUParams = False,
         num_sms: int | None = None) -> jax.Array:
    """out[e] = x[starts[e]:starts[e+1]]^T @ dy[starts[e]:starts[e+1]]: the weight gradient.

    Args:
      x: [M, I] bf16/f16; dy: [M, J] of the same dtype; rows sorted by group.
      starts: int32 [E+1], non-decreasing (starts[E] <= M); rows outside [starts[0], starts[E])
        are ignored.
      out_dtype: float32 (default), bf16 or f16; the sum is fp32 in any case.
      config: tiling (DEFAULT_TGMM_CONFIG when None); interpret, num_sms: as for `gmm`.
    Returns:
      [E, I, J] in out_dtype; zeros for an empty group.
    """
    _check_dtypes("grouped_matmul_sm90.tgmm", x, dy)
    if x.dtype != dy.dtype or x.shape[0] != dy.shape[0] or starts.ndim != 1:
        raise ValueError(f"grouped_matmul_sm90.tgmm: x {x.shape} {x.dtype} and dy {dy.shape} "
                         f"{dy.dtype} must share rows and dtype; starts {starts.shape} is [E+1].")
    cfg = config or DEFAULT_TGMM_CONFIG
    out_dtype = jnp.dtype(out_dtype)
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"grouped_matmul_sm90.tgmm: out_dtype={out_dtype} is not supported.")
    if smem_bytes_tgmm(cfg, x.dtype, out_dtype) > SMEM_BYTES:
        raise ValueError(f"{cfg} needs more than {SMEM_BYTES} bytes of shared memory.")
    check_registers(cfg, "grouped_matmul_sm90.tgmm", registers_needed_tgmm(cfg), MAX_REGISTERS,
                    "warpgroup")
    m, k = x.shape
    n = dy.shape[1]
    g = starts.shape[0] - 1
    mp, kp, np_ = round_up(m, cfg.block_m), round_up(k, cfg.block_k), round_up(n, cfg.block_n)
    x_p, dy_p = pad_axis(pad_axis(x, 0, mp), 1, kp), pad_axis(pad_axis(dy, 0, mp), 1, np_)
    n_items = g * (kp // cfg.block_k) * (np_ // cfg.block_n)
    out = persistent_kernel(functools.partial(_tgmm_kernel, cfg=cfg),
                            jax.ShapeDtypeStruct((g, kp, np_), out_dtype), n_items, num_sms,
                            interpret)(starts.astype(jnp.int32), x_p, dy_p)
    return out[:, :k, :n] if (kp, np_) != (k, n) else out


__all__ = ["DEFAULT_GMM_CONFIG", "DEFAULT_TGMM_CONFIG", "IN_DTYPES", "SMEM_BYTES", "TileConfig",
           "gmm", "registers_needed_gmm", "registers_needed_tgmm", "row_tile_group_ranges",
           "smem_bytes_gmm", "smem_bytes_tgmm", "tgmm"]
