"""MLA decoding over the latent cache on Hopper (sm_90a), Pallas Mosaic GPU, split along the cache.

Letters (dsv3_jax/NOTATION.md): B batch, T new tokens, H heads, S cache slots, C kv latent
rank (512), R qk rope head dim (64); THp: the T*H query rows of a sequence, padded to a multiple
of 64. The math (SPEC.md section 2, absorbed MLA), per sequence b, for every query row (t, h) of
that sequence at absolute position pos[t] = q_positions[b, t], over the cache slots s:

    score_ths = scale * (q_latent_th . c_s + q_pe_th . k_pe_s)    cache row s = [c_s | k_pe_s]
    visible(t, s) = s <= pos[t]
    o_th = sum_{visible s} softmax_s(score_ths) c_s            [C], fp32 softmax and accumulation

The cache rows are shared by all heads, so a sequence's T*H query rows form one matrix and each
cached row is read once per row tile (MQA-like, head dim 576 for scores, 512 for values).

Tiling (flash-decoding). The grid is (row tiles of 64 query rows, splits of the cache, batch). A CTA
loads its 64 query rows ([64, 512] latent in two 256-column halves, [64, 64] rope part) into shared
memory and walks its split of the cache in blocks of `block_s` rows, streamed by a TMA warpgroup
(`plgpu.emit_pipeline_warp_specialized`); a block is three boxes of the same rows: c[:, :256],
c[:, 256:] and k_pe. Two compute warpgroups each own one 256-column half of the output (a
[64, 512] fp32 accumulator would need 256 registers per thread; a half needs 128). Warpgroup 0
computes the scores, once per block, and the online softmax (base 2, as in mla_attention_sm90):

    S   = wgmma(Qlat_lo, C_lo^T) + wgmma(Qlat_hi, C_hi^T) + wgmma(Qpe, Kpe^T)   [64, block_s] fp32
    masked to slot <= pos[t];  m_new = max(m_old, rowmax S);  alpha = 2^(m_old - m_new)
    P = 2^(S - m_new) -> shared memory (bf16 [64, block_s]), alpha -> shared memory ([64] fp32)
    O_w = O_w * alpha + wgmma(P, C_w)      (both warpgroups, P from shared memory) [64, 256] fp32

and hands P over (FlashMLA's scheme): it writes P and alpha, arrives on "P ready", and runs its
value wgmma; warpgroup 1 waits on "P ready", rescales its half and runs its value wgmma, then
arrives on "P free", which warpgroup 0 waits on before writing the next block's P. So warpgroup 1's
value wgmma of block k overlaps warpgroup 0's scores of block k + 1, and the tensor cores do
576 + 2 x 256 deep products per block row instead of 2 x (576 + 256) with both warpgroups scoring
(at H = 128 decoding is close to compute-bound, see BASELINES.md). Warpgroup 0 keeps the row
statistics m and l and gives l to warpgroup 1 after the walk. P's 8 KB (block_s 64) fit because the
kernel asks for no cross-warp reduction scratch (its row reductions stay within a warp; Mosaic's
default reserves 2 KB): 231520 of the 232448 bytes at V3 dims (`smem_bytes`). A CTA stops at the
last block any of its rows can see (a dynamic pipeline length read from a per-tile scalar), so
short sequences in a long cache cost only what they read. Each split writes its normalised partial
output (bf16, staged through the query's shared memory once both warpgroups are done with it) and
its log-sum-exp (fp32, -inf when the split holds no visible slot); the combine step is jnp:

    o_th = sum_splits 2^(lse_split - lse) o_split,   lse = log2 sum_splits 2^lse_split

Why Mosaic GPU and not the Triton backend: the Triton backend is deprecated (DESIGN.md) and cannot
use wgmma with shared-memory operands and TMA warp specialisation, which the head-shared latent rows
are made for: one TMA load of a cache block feeds 64 query rows' wgmmas.

What the wrapper does (XLA, around the call): flattens q to rows [B, T*H, 576] (latent | rope), pads
the rows to a multiple of 64 (padded rows see slot 0 only, and are sliced away), builds the per-row
positions [B, THp] and per-tile visible limits [B, THp/64], pads the cache slots to a multiple of
`block_s * splits` when needed (a copy: allocate caches in multiples of 64 slots to avoid it), and
combines the splits. The number of splits is chosen so that batch x row tiles x splits fills the GPU
(about two CTAs per SM) without splits shorter than two blocks. Requirements (checked): C a multiple
of 128 and at most 512 (two 64-multiple halves), R a multiple of 64 dividing C (k_pe is the cache
row's block C / R of width R), bf16/f16 inputs of one dtype; the config within shared memory and
the register budget.

The plain-jnp reference it is tested against is `dsv3_jax.ops.attention.mla_decode_reference`
(tests/test_mla_kernels.py: interpret mode against it with per-sequence positions, several splits
and blocks, and the model's prefill + decode against its forward; the sm_90a lowering at V3 and
small-config shapes; tests/test_mla_decode_sm90.py: the dims and register refusals, interpret
mode on fresh inputs with positions in the first block, several splits of several blocks, two row
tiles, R 128).
`experiments/bench_mla_decode.py` measures GB/s of cache read on an H100.

Registers and spills (measured 2026-12-01: jax 0.11.2, ptxas 13.0, through Mosaic GPU's own
pipeline): `KERNEL_TARGETS='mla_decode*' python mosaic_ptxas_check.py --fail-on-spill --fn
experiments.kernel_targets:make` (the built-in target: `python mosaic_ptxas_check.py mla_decode
--fail-on-spill`)
gives, at V3 dims (B 64, H 128, C 512 + R 64, 4096 slots) and at the small config's (B 8, H 16,
32K slots), 168 registers per thread at launch, setmaxnreg 40 (TMA) / 232 (compute warpgroups),
0 bytes spilled, 231520 B of dynamic shared memory. Before (both warpgroups scoring), it spilled
88/92 B in the compute warpgroups, 12 reloads in the loop: LLVM hoists the 36 loop-invariant 64-bit
wgmma descriptors of q's 16-deep slices out of the cache loop (72 registers), which the hand-over
of P alone does not cure (172/176 B spilled). q's views are now indexed by a zero LLVM cannot see
through (`_kernel`). The register budget of the config (`registers_needed`, checked in
`check_dims`) is calibrated with the same tool.

Status: NOT YET RUN ON A GPU. Interpret mode matches the reference, the sm_90a lowering passes and
ptxas compiles it without spilling; the H100 run and its speed remain to be confirmed. Paged
caches: not done.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp

from dsv3_jax.ops.pallas.hopper import (DTYPES_16BIT, LOG2E, M_INIT, NUM_SMS, SMEM_BYTES,
                                        TRANSFORMS_16BIT, check_registers, interpret_params,
                                        pad_axis, refuse, round_up, warp_specialized_registers,
                                        wgmma_into)

ROWS = 64  # query rows per CTA (wgmma M)
MEMORY_REGISTERS = 40  # setmaxnreg of the TMA warpgroup
# Registers per thread of each of the two compute warpgroups (232: the tool's "setmaxnreg
# -40,+232").
COMPUTE_REGISTERS = warp_specialized_registers(2, MEMORY_REGISTERS)


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """block_s: cache rows per pipeline step (a multiple of 64, at most 256); stages: blocks in
    flight; splits: cache splits per sequence (None: chosen from the shape, see `choose_splits`)."""

    block_s: int = 64
    stages: int = 2
    splits: int | None = None
    target_ctas: int = 2 * NUM_SMS  # about two per SM of an H100

    def __post_init__(self):
        if self.block_s < 64 or self.block_s % 64 or self.block_s > 256:
            refuse(self, "block_s", "must be a multiple of 64 and at most 256 (the score wgmma's "
                   "N)")
        if self.stages < 2:
            refuse(self, "stages", "must be >= 2")
        if self.splits is not None and self.splits < 1:
            refuse(self, "splits", "must be >= 1 (or None)")


DEFAULT_CONFIG = DecodeConfig()


def smem_bytes(cfg: DecodeConfig, c: int, r: int, itemsize: int = 2) -> int:
    """Dynamic shared memory of a CTA as Mosaic GPU lays it out (each buffer rounded up to 1 KiB,
    8 B per barrier): q [64, C + R], positions, row statistics [2, 64], P [64, block_s], `stages`
    cache blocks [block_s, C + R]; 12 barriers at 2 stages. Equals the tool's dynamic shared
    memory (231520 at V3 dims; 198752 at C 128, block_s 192; 239744 at C 128, block_s 128, 4
    stages)."""
    kib = lambda n: round_up(n, 1024)
    bs, st = cfg.block_s, cfg.stages
    buffers = (kib(ROWS * c * itemsize) + kib(ROWS * r * itemsize) + kib(ROWS * 4)
               + kib(2 * ROWS * 4) + kib(ROWS * bs * itemsize)
               + 2 * kib(st * bs * (c // 2) * itemsize) + kib(st * bs * r * itemsize))
    barriers = 4 + 2 + 2 + 2 * st  # q loads, warpgroup syncs, P ready / free, the pipeline's
    return buffers + 8 * barriers


def registers_needed(cfg: DecodeConfig, c: int, r: int) -> int:
    """Estimated live 32-bit registers per thread of the busiest warpgroup, warpgroup 0 (scores,
    softmax and half the values): its half of the output accumulator [64, C/2] fp32 (C/4), the
    scores [64, block_s] fp32 (block_s/2), their bf16 P (block_s/4), the column index of each
    score element for the mask (block_s/4: LLVM hoists them out of the loop), and 16 for the rest
    (row max, sum and position of the thread's two rows, the rescale factor, loop indices,
    addresses). R and the stages add nothing: q's descriptors are recomputed in the loop.
    Warpgroup 1 holds its accumulator and little else.

    Budget: COMPUTE_REGISTERS (232). Calibrated with `python mosaic_ptxas_check.py` on this kernel
    (2026-12-01, jax 0.11.2, ptxas 13.0; its shared-memory bound lifted to compile the blocks
    that do not fit), B 8, H 128: spill bytes stored (0: none) [estimate] for C x block_s, R 64,
    2 stages:
      C 512:  64: 0 [208]   128: 48 [264]   192: 980 [336]   256: 5124 [400]
      C 384:  64: 0 [176]   128: 0 [240]    192: 548 [304]   256: 2004 [368]
      C 256:  64: 0 [144]   128: 0 [208]    192: 136 [272]   256: 332 [336]
      C 128:  64: 0 [112]   128: 0 [176]    192: 8 [240]     256: 60 [304]
    R 128 the same (C 512: 64: 0, 128: 48; C 128, 192: 8); 4 stages the same (C 128, block_s
    128: 0; C 256, 64: 0). Every config is classified right but C 384, block_s 128 (refused
    though it compiles clean; it needs 305 KB of shared memory anyway). Only block_s 64 fits in
    shared memory at C 512.
    """
    del r  # q's rope descriptors are not held across the loop either
    return c // 4 + cfg.block_s // 2 + cfg.block_s // 4 + cfg.block_s // 4 + 16


def check_dims(q_latent_shape, q_pe_shape, cache_shape, positions_shape, dtypes,
               config: DecodeConfig | None = None) -> None:
    """Refuses inputs the kernel cannot take (ValueError naming the field and the fix)."""
    cfg = config or DEFAULT_CONFIG
    if len(q_latent_shape) != 4 or len(q_pe_shape) != 4 or len(cache_shape) != 3:
        raise ValueError(f"mla_decode_sm90: q_latent {q_latent_shape} and q_pe {q_pe_shape} must "
                         f"be [B, T, H, *], cache {cache_shape} [B, S, C + R].")
    b, t, h, c = q_latent_shape
    r = q_pe_shape[-1]
    if tuple(q_pe_shape[:3]) != (b, t, h) or cache_shape[0] != b or cache_shape[2] != c + r:
        raise ValueError(f"mla_decode_sm90: shapes do not agree: q_latent {q_latent_shape}, q_pe "
                         f"{q_pe_shape}, cache {cache_shape} (expected [B, S, {c} + {r}]).")
    if tuple(positions_shape) != (b, t):
        raise ValueError(f"mla_decode_sm90: q_positions has shape {positions_shape}; expected "
                         f"{(b, t)}.")
    if c % 128 or c > 512 or r % 64 or r > 256:
        raise ValueError(f"mla_decode_sm90: latent rank {c} must be a multiple of 128 and at most "
                         f"512, rope dim {r} a multiple of 64; use the reference for other dims.")
    if c % r:
        raise ValueError(f"mla_decode_sm90: rope dim {r} must divide latent rank {c} (the k_pe box "
                         f"of a cache row is block {c} // {r} of width {r}, columns from "
                         f"{c // r * r}, not {c}); use a rope dim dividing {c}, or the reference.")
    dts = {jnp.dtype(d) for d in dtypes}
    if len(dts) != 1 or next(iter(dts)) not in DTYPES_16BIT:
        raise ValueError(f"mla_decode_sm90: q_latent, q_pe and cache must all be bfloat16 (or "
                         f"float16), got {[str(jnp.dtype(d)) for d in dtypes]}.")
    if smem_bytes(cfg, c, r) > SMEM_BYTES:
        raise ValueError(f"mla_decode_sm90: {cfg} needs {smem_bytes(cfg, c, r)} bytes of shared "
                         f"memory, more than {SMEM_BYTES}; use a smaller block_s or fewer stages.")
    check_registers(cfg, "mla_decode_sm90", registers_needed(cfg, c, r), COMPUTE_REGISTERS,
                    "compute warpgroups")


def supports(q_latent_shape, q_pe_shape, cache_shape, positions_shape, dtypes) -> bool:
    try:
        check_dims(q_latent_shape, q_pe_shape, cache_shape, positions_shape, dtypes)
    except ValueError:
        return False
    return True


def choose_splits(batch: int, row_tiles: int, slots: int, cfg: DecodeConfig) -> int:
    """Cache splits per sequence: enough CTAs to fill the GPU, each split at least two blocks."""
    if cfg.splits is not None:
        return cfg.splits
    blocks = -(-slots // cfg.block_s)
    want = -(-cfg.target_ctas // (batch * row_tiles))
    return max(1, min(want, blocks // 2))


def _kernel(q_gmem, cache_gmem, pos_gmem, limit_gmem, o_gmem, lse_gmem, *, c: int, r: int,
            blocks_per_split: int, cfg: DecodeConfig, scale: float, interpret: bool):
    # q_gmem:     [B, THp, C + R] bf16   rows (t, h) flattened, [q_latent | q_pe]
    # cache_gmem: [B, Sp, C + R] bf16   [c | k_pe] per slot
    # pos_gmem:   [B, THp] int32         absolute position of each row (slots <= it are visible)
    # limit_gmem: [B, THp / 64] int32    max position over each row tile
    # o_gmem:     [splits, B, THp, C] bf16  normalised partial outputs
    # lse_gmem:   [splits, B, THp] f32   base-2 log-sum-exp of each split (-inf: nothing visible)
    bs, half = cfg.block_s, c // 2
    dtype = q_gmem.dtype
    tile, split, b = lax.axis_index("rows"), lax.axis_index("split"), lax.axis_index("batch")
    rows = pl.ds(tile * ROWS, ROWS)
    first_block = split * blocks_per_split
    visible_blocks = lax.div(limit_gmem[b, tile] + bs, jnp.int32(bs)) - first_block
    steps = jnp.clip(visible_blocks, 0, blocks_per_split)
    s_scale = scale * LOG2E

    def scoped(qlat_smem, qpe_smem, pos_smem, stat_smem, p_smem, q_bar, done_bar, p_bar):
        # qlat_smem: [2, 64, C/2] the halves of q_latent; after the walk, the output halves
        # qpe_smem: [1, 64, R]   pos_smem: [64] int32
        # stat_smem: [2, 64] f32: row 0 the block's rescale factor 2^(m_old - m_new) in the walk,
        #            then the lse; row 1 the final row sums l (warpgroup 0 to warpgroup 1)
        # p_smem: [64, bs] the block's P (bf16), written by warpgroup 0, read by both
        # p_bar: one arrival each: [0] P and its factor are in p_smem / stat_smem (warpgroup 0
        #        arrives), [1] warpgroup 1 is done reading them
        wg = lax.axis_index("wg")
        row_layout = plgpu.Layout.WGMMA.reduce(1)

        def scores_softmax(step, clo_smem, chi_smem, kpe_smem, carry):  # warpgroup 0
            acc, m_i, l_i = carry
            # q's shared-memory views indexed by `zero`, 0 but not known to LLVM: otherwise it
            # hoists the 36 loop-invariant 64-bit wgmma descriptors of q's 16-deep slices out of
            # the loop and ptxas spills them (172 B at V3 dims; module docstring).
            zero = lax.shift_right_logical(step, 31)  # step >= 0
            qlat, qpe = (qlat_smem.at[zero], qlat_smem.at[zero + 1]), qpe_smem.at[zero]

            def scores(acc_ref):  # acc_ref: [64, bs] f32
                plgpu.wgmma(acc_ref, qlat[0], clo_smem.transpose((1, 0)))
                plgpu.wgmma(acc_ref, qlat[1], chi_smem.transpose((1, 0)))
                plgpu.wgmma(acc_ref, qpe, kpe_smem.transpose((1, 0)))
                return acc_ref[...]

            s = pl.run_scoped(scores, plgpu.ACC((ROWS, bs), jnp.float32)) * s_scale
            pos = plgpu.load(pos_smem, layout=row_layout)
            slots = plgpu.broadcasted_iota(jnp.int32, (ROWS, bs), 1, layout=plgpu.Layout.WGMMA)
            slots = slots + (first_block + step) * bs
            s = jnp.where(slots <= lax.broadcast_in_dim(pos, s.shape, [0]), s, -jnp.inf)
            m_new = jnp.maximum(m_i, s.max(axis=1))
            alpha = jnp.exp2(m_i - m_new)
            p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
            l_i = l_i * alpha + p.sum(axis=1)

            @pl.when(step > 0)
            def _():  # warpgroup 1 is done with the previous block's P and factor
                plgpu.barrier_wait(p_bar.at[1])

            p_smem[...] = p.astype(dtype)
            stat_smem[0] = alpha
            plgpu.commit_smem()  # visible to the wgmmas (async proxy) of both warpgroups
            plgpu.barrier_arrive(p_bar.at[0])
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            return wgmma_into(acc, p_smem, clo_smem, interpret), m_new, l_i

        def values(clo_smem, chi_smem, kpe_smem, carry):  # warpgroup 1
            del clo_smem, kpe_smem
            acc, m_i, l_i = carry  # m_i, l_i: unused here (warpgroup 0 keeps the statistics)
            plgpu.barrier_wait(p_bar.at[0])
            alpha = plgpu.load(stat_smem.at[0], layout=row_layout)
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            acc = wgmma_into(acc, p_smem, chi_smem, interpret)  # returns once the wgmma is done
            plgpu.barrier_arrive(p_bar.at[1])
            return acc, m_i, l_i

        def body(idx, clo_smem, chi_smem, kpe_smem, carry):
            # clo_smem, chi_smem: [bs, C/2] (c's two column halves)   kpe_smem: [bs, R]
            (step,) = idx
            return lax.cond(wg == 0,
                            lambda: scores_softmax(step, clo_smem, chi_smem, kpe_smem, carry),
                            lambda: values(clo_smem, chi_smem, kpe_smem, carry))

        def compute_context(run_pipeline):
            plgpu.copy_gmem_to_smem(q_gmem.at[b, rows, pl.ds(wg * half, half)], qlat_smem.at[wg],
                                    q_bar.at[wg])
            plgpu.barrier_wait(q_bar.at[wg])

            @pl.when(wg == 0)
            def _():
                plgpu.copy_gmem_to_smem(q_gmem.at[b, rows, pl.ds(c, r)], qpe_smem.at[0],
                                        q_bar.at[2])
                plgpu.copy_gmem_to_smem(pos_gmem.at[b, rows], pos_smem, q_bar.at[3])
                plgpu.barrier_wait(q_bar.at[2])
                plgpu.barrier_wait(q_bar.at[3])

            # Both halves of q, its rope part and the positions are in place before either
            # warpgroup starts.
            plgpu.barrier_arrive(done_bar.at[0])
            plgpu.barrier_wait(done_bar.at[0])
            acc = plgpu.layout_cast(jnp.zeros((ROWS, half), jnp.float32), plgpu.Layout.WGMMA)
            m_i = plgpu.layout_cast(jnp.full((ROWS,), M_INIT, jnp.float32), row_layout)
            l_i = plgpu.layout_cast(jnp.zeros((ROWS,), jnp.float32), row_layout)
            acc, m_i, l_i = run_pipeline((acc, m_i, l_i))

            @pl.when(jnp.logical_and(wg == 0, steps > 0))
            def _():  # the last block's "P free": warpgroup 0 observes every phase it completes
                plgpu.barrier_wait(p_bar.at[1])

            seen = l_i > 0
            l_safe = jnp.where(seen, l_i, 1.0)

            @pl.when(wg == 0)
            def _():
                stat_smem[1] = l_safe

            # Both warpgroups are done reading q (and warpgroup 1 the factors) before q's shared
            # memory takes the output and stat_smem[0] the lse; warpgroup 0's sums are in place.
            plgpu.barrier_arrive(done_bar.at[1])
            plgpu.barrier_wait(done_bar.at[1])
            l_safe = plgpu.load(stat_smem.at[1], layout=row_layout)
            qlat_smem[wg] = (acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])).astype(dtype)

            @pl.when(wg == 0)
            def _():
                stat_smem[0] = jnp.where(seen, m_i + jnp.log2(l_safe), -jnp.inf)

            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(qlat_smem.at[wg],
                                    o_gmem.at[split, b, rows, pl.ds(wg * half, half)])

            @pl.when(wg == 0)
            def _():
                plgpu.copy_smem_to_gmem(stat_smem.at[0], lse_gmem.at[split, b, rows])

            plgpu.wait_smem_to_gmem(0)

        block = lambda col: (lambda i: (first_block + i, col))
        pipeline = plgpu.emit_pipeline_warp_specialized(
            body, grid=(steps,), memory_registers=MEMORY_REGISTERS, wg_axis="wg",
            num_compute_wgs=2, max_concurrent_steps=cfg.stages, compute_context=compute_context,
            in_specs=[plgpu.BlockSpec((bs, half), block(0), transforms=TRANSFORMS_16BIT),
                      plgpu.BlockSpec((bs, half), block(1), transforms=TRANSFORMS_16BIT),
                      plgpu.BlockSpec((bs, r), block(c // r), transforms=TRANSFORMS_16BIT)])
        cache_b = cache_gmem.at[b]
        pipeline(cache_b, cache_b, cache_b)

    pl.run_scoped(
        scoped,
        plgpu.SMEM((2, ROWS, half), dtype, transforms=TRANSFORMS_16BIT),
        plgpu.SMEM((1, ROWS, r), dtype, transforms=TRANSFORMS_16BIT),
        plgpu.SMEM((ROWS,), jnp.int32),
        plgpu.SMEM((2, ROWS), jnp.float32),
        plgpu.SMEM((ROWS, bs), dtype, transforms=TRANSFORMS_16BIT),
        plgpu.Barrier(num_barriers=4),
        plgpu.Barrier(num_arrivals=2, num_barriers=2),
        plgpu.Barrier(num_barriers=2),
        collective_axes="wg",
    )


def combine(o_parts: jax.Array, lse_parts: jax.Array) -> jax.Array:
    """Flash-decoding combine: o_parts [splits, ...rows, C], lse_parts [splits, ...rows] (base 2,
    -inf for a split that saw nothing) -> [...rows, C] float32."""
    lse_max = jnp.max(lse_parts, axis=0)  # finite: the split holding slot 0 sees every row
    w = jnp.exp2(lse_parts - lse_max[None])  # [splits, ...rows]
    # The sum over the splits (axis 0, a dim the package's letter legend has no letter for).
    num = jnp.einsum(w, [0, ...], o_parts.astype(jnp.float32), [0, ..., 1], [..., 1])
    return num / jnp.sum(w, axis=0)[..., None]


def mla_decode(q_latent: jax.Array, q_pe: jax.Array, cache: jax.Array, q_positions: jax.Array, *,
               scale: float, config: DecodeConfig | None = None,
               interpret: bool | plgpu.InterpretGPUParams = False) -> jax.Array:
    """Absorbed MLA attention over the latent cache, split along the cache (flash-decoding).

    Args:
      q_latent: [B, T, H, C]; q_pe: [B, T, H, R]; cache: [B, S, C + R]; one dtype, bf16 (or f16).
      q_positions: int [B, T]; a query at position p sees slots 0..p (p < S).
      scale: softmax scale.
      config: block size, stages, splits (DEFAULT_CONFIG when None).
      interpret: True (or `InterpretGPUParams`) runs the kernel in GPU interpret mode on the CPU.
    Returns:
      [B, T, H, C] in q_latent's dtype; the contract of `ops.attention.mla_decode_reference`.
    """
    cfg = config or DEFAULT_CONFIG
    check_dims(q_latent.shape, q_pe.shape, cache.shape, q_positions.shape,
               (q_latent.dtype, q_pe.dtype, cache.dtype), cfg)
    b, t, h, c = q_latent.shape
    r = q_pe.shape[-1]
    rows = t * h
    rp = round_up(rows, ROWS)
    row_tiles = rp // ROWS
    splits = choose_splits(b, row_tiles, cache.shape[1], cfg)
    blocks = -(-cache.shape[1] // cfg.block_s)
    blocks_per_split = -(-blocks // splits)
    splits = -(-blocks // blocks_per_split)  # no empty split at the end
    sp = splits * blocks_per_split * cfg.block_s

    q = jnp.concatenate([q_latent, q_pe], axis=-1).reshape(b, rows, c + r)
    q = pad_axis(q, 1, rp)  # [B, THp, C + R]
    pos = jnp.repeat(q_positions.astype(jnp.int32), h, axis=1)  # [B, T*H], row (t, h) -> t
    pos = pad_axis(pos, 1, rp)  # padded rows: position 0
    limit = jnp.max(pos.reshape(b, row_tiles, ROWS), axis=-1)  # [B, THp/64]
    cache_p = pad_axis(cache, 1, sp)  # a copy only when S is not a multiple of the split
    interp = interpret_params(interpret)
    call = plgpu.kernel(
        functools.partial(_kernel, c=c, r=r, blocks_per_split=blocks_per_split, cfg=cfg,
                          scale=float(scale), interpret=interp is not None),
        out_type=(jax.ShapeDtypeStruct((splits, b, rp, c), q_latent.dtype),
                  jax.ShapeDtypeStruct((splits, b, rp), jnp.float32)),
        grid=(row_tiles, splits, b),
        grid_names=("rows", "split", "batch"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True, reduction_scratch_bytes=0),
        interpret=interp,
    )
    o_parts, lse_parts = call(q, cache_p, pos, limit)
    out = o_parts[0] if splits == 1 else combine(o_parts, lse_parts).astype(q_latent.dtype)
    return out[:, :rows].reshape(b, t, h, c)


__all__ = ["COMPUTE_REGISTERS", "DEFAULT_CONFIG", "DecodeConfig", "ROWS", "check_dims",
           "choose_splits", "combine", "mla_decode", "registers_needed", "smem_bytes", "supports"]
