"""FP8 block-scaled GEMM for Hopper (sm_90a), Pallas Mosaic GPU.

The math (SPEC.md section 3, DeepSeek's DeepGEMM):

    C[m, j] = sum_ib (A_q[m, ib] . B_q[j, ib]) * a_s[m, ib] * b_s[j, ib]     (fp32), then -> bf16

Letters (dsv3_jax/NOTATION.md): M rows, I the contracted dim, J the output dim; Ib = I / 128.
A_q [M, I] and B_q [J, I] are float8_e4m3fn, both I-major (I is the contiguous dimension); ib runs
over 128-wide I blocks. a_s [M, Ib] holds one scale per row and I block (1x128 activation tiles);
b_s is given per row, [J, Ib]: the wrapper expands 128x128 weight-block scales [ceil(J/128), Ib] to
rows, and Wgrad's 1x128 gradient tiles are per-row already.

Why the promotion: Hopper's FP8 tensor-core accumulator keeps only about 14 bits, so a long sum over
I loses precision. DeepGEMM's fix, done here: every 128-wide I block gets a *fresh* WGMMA
accumulator; once that block's product is done it is scaled and added into fp32 registers
(acc += partial * a_s[m] * b_s[j]), so the tensor core never sums more than 128 products.

The tiling:
  * One CTA computes a `cta_m x cta_n` output tile; its `num_compute_wgs` (2) compute warpgroups
    each own a `tile_m x tile_n` slice of it (split along M by default), and a third warpgroup only
    issues TMA copies (`plgpu.emit_pipeline_warp_specialized`): A [cta_m, 128], B [cta_n, 128] and the
    two scale rows of each I block, `max_concurrent_steps` blocks in flight.
  * Per I block a compute warpgroup runs `wgmma(acc_i, A[rows, 128], B[cols, 128]^T)`. The transpose
    is only a view: B's shared-memory tile stays I-major, which is what an FP8 wgmma requires (the
    real lowering rejects transposed 8-bit operands: "Only f16 WGMMA supports transposes").
  * The kernel is persistent: one CTA per SM walks the output tiles in a snake order (`planar_snake`)
    so that neighbouring CTAs share A rows / B columns in L2.
  * Epilogue: the fp32 registers are cast to bf16 (or the requested dtype), stored to swizzled
    shared memory and written out by TMA.

Layouts the wrapper prepares (all copies, done by XLA around the call): M, J padded to the CTA tile
and I to 128 with zeros (exact: zero products), a_s transposed to [Ib, Mp] and b_s to [Ib, Jp], so
that each I block's scales are one contiguous row for TMA. Real DeepSeek-V3 shapes (multiples of
128 or of the tile) pay only the small scale transposes.

The plain-jnp reference it is tested against is `dsv3_jax.ops.fp8.fp8_gemm_reference`; tests run
this kernel on CPU in GPU interpret mode (`interpret=True`), with the race detector, and lower it
for an H100 (`lowering_platforms=("cuda",)`) to check the Mosaic GPU lowering. Timing and the final
check on a real H100 are done by `experiments/bench_fp8_gemm.py`.

Status: NOT YET RUN ON A GPU. It matches the reference in interpret mode (bit for bit) with no race
reported, passes the sm_90a Mosaic GPU lowering (wgmma operand layouts, TMA, shared memory), and
compiles through ptxas for sm_90a without spills at DeepSeek-V3 and small-config shapes (168
registers at launch, 232 per compute thread after setmaxnreg; numbers in experiments/RESULTS.md):
    python mosaic_ptxas_check.py --fail-on-spill --fn experiments.kernel_targets:make
(the tool that takes Mosaic GPU kernels through ptxas on a machine without a GPU; its built-in
`fp8_gemm` and `fp8_gemm_f32` targets are the same kernel at one V3 shape). A tile config that
would spill is refused before lowering (`registers_needed`). The run on an H100 and its speed remain
to be measured by `python experiments/bench_fp8_gemm.py --sweep` there.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp

from dsv3_jax.ops.pallas.hopper import (OUT_DTYPES, SMEM_BYTES, check_registers,
                                        persistent_kernel, refuse, round_up, transforms,
                                        warp_specialized_registers, wgmma_new)

BLOCK_K = 128  # the quantization block along I (the contracted dim): one wgmma accumulator each
# Registers per thread of the warpgroup that only issues TMA copies. 40 spilled one 64-bit value in
# its loop at I = 1024 (the small config's dense fprop: 8 B, ptxas 13.0, sm_90a); 48 does not, and
# leaves the 2 compute warpgroups their 232 (the register file's 512 per lane less 48, halved, in
# steps of 8).
MEMORY_REGISTERS = 48


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """How the output is tiled. The defaults suit DeepSeek-V3 shapes on an H100 (to be tuned there).

    Register budget of a compute warpgroup (`registers_needed`, checked here before any lowering):
    the fresh wgmma accumulator and the promoted fp32 accumulator each take tile_m * tile_n / 128
    registers per thread, so tile_m * tile_n <= 64 * 192.
    """

    tile_m: int = 64  # rows per compute warpgroup (a multiple of 64: wgmma's M)
    tile_n: int = 128  # columns per compute warpgroup (a multiple of 64, at most 256)
    num_compute_wgs: int = 2  # compute warpgroups per CTA (one more issues the TMA copies)
    wg_dimension: str = "m"  # how the compute warpgroups split the CTA tile: "m" or "n"
    max_concurrent_steps: int = 4  # I blocks in flight (shared-memory stages)
    grid_minor_dim: str = "n"  # the snake order walks this dimension fastest ...
    grid_tile_width: int = 4  # ... in bands this many tiles wide

    def __post_init__(self):
        if self.tile_m < 64 or self.tile_m % 64:
            refuse(self, "tile_m", "must be a positive multiple of 64 (the wgmma M)")
        if self.tile_n < 64 or self.tile_n % 64 or self.tile_n > 256:
            refuse(self, "tile_n",
                   "must be 64, 128, 192 or 256 (wgmma N <= 256, 128-byte epilogue rows)")
        if self.num_compute_wgs not in (1, 2):
            refuse(self, "num_compute_wgs", "must be 1 or 2")
        if self.wg_dimension not in ("m", "n"):
            refuse(self, "wg_dimension", 'must be "m" or "n"')
        if self.max_concurrent_steps < 2:
            refuse(self, "max_concurrent_steps", "must be >= 2 (double buffering at least)")
        if self.grid_minor_dim not in ("m", "n"):
            refuse(self, "grid_minor_dim", 'must be "m" or "n"')
        if self.grid_tile_width < 1:
            refuse(self, "grid_tile_width", "must be >= 1")
        check_registers(self, "fp8_gemm_sm90", registers_needed(self),
                        warp_specialized_registers(self.num_compute_wgs, MEMORY_REGISTERS),
                        "compute warpgroups")

    @property
    def cta_m(self) -> int:
        return self.tile_m * (self.num_compute_wgs if self.wg_dimension == "m" else 1)

    @property
    def cta_n(self) -> int:
        return self.tile_n * (self.num_compute_wgs if self.wg_dimension == "n" else 1)


def registers_needed(cfg: TileConfig) -> int:
    """Live 32-bit registers per compute-warpgroup thread: two fp32 accumulators of
    tile_m x tile_n (the fresh wgmma one and the promoted one, tile_m * tile_n / 128 each) and 32 for
    addresses, scales and loop state. Measured with `python mosaic_ptxas_check.py --fn
    experiments.kernel_targets:make` (ptxas 13.2, sm_90a, 2026-12-01) at I 2048, J 7168 and 2
    compute warpgroups (232 registers each after setmaxnreg): tiles 64x128 (needs 160) and 64x192
    (224) compile without spills; 64x256 (288) spills 356 B and 128x128 (288) spills 436 B."""
    return 2 * cfg.tile_m * cfg.tile_n // 128 + 32


DEFAULT_CONFIG = TileConfig()
_SMEM_SLACK = 4 * 1024  # barriers and alignment


def smem_bytes(cfg: TileConfig, out_dtype) -> int:
    """Shared memory the kernel allocates: the pipeline stages plus the epilogue tiles."""
    stage = (cfg.cta_m + cfg.cta_n) * BLOCK_K + 4 * (cfg.cta_m + cfg.cta_n)  # fp8 tiles, f32 scales
    epilogue = cfg.num_compute_wgs * cfg.tile_m * cfg.tile_n * jnp.dtype(out_dtype).itemsize
    return cfg.max_concurrent_steps * stage + epilogue + _SMEM_SLACK


def fit_to_smem(cfg: TileConfig, out_dtype) -> TileConfig:
    """`cfg` with fewer pipeline stages if its shared memory would not fit (an fp32 epilogue is
    twice a bf16 one); refuses a tiling that does not fit even double-buffered."""
    while smem_bytes(cfg, out_dtype) > SMEM_BYTES and cfg.max_concurrent_steps > 2:
        cfg = dataclasses.replace(cfg, max_concurrent_steps=cfg.max_concurrent_steps - 1)
    if smem_bytes(cfg, out_dtype) > SMEM_BYTES:
        raise ValueError(f"{cfg} needs {smem_bytes(cfg, out_dtype)} bytes of shared memory with a "
                         f"{jnp.dtype(out_dtype)} output, more than {SMEM_BYTES}; use smaller tiles.")
    return cfg


def _kernel(a_gmem, b_gmem, as_gmem, bs_gmem, out_gmem, *, cfg: TileConfig):
    """One persistent CTA: loops over output tiles; see the module docstring."""
    # a_gmem:  [Mp, Ip]  float8_e4m3fn, I-major
    # b_gmem:  [Jp, Ip]  float8_e4m3fn, I-major
    # as_gmem: [Ib, Mp]  float32, a_s transposed: row ib holds the scales of I block ib
    # bs_gmem: [Ib, Jp]  float32, per-row b scales, transposed likewise
    # out_gmem: [Mp, Jp] out dtype
    mp, kp = a_gmem.shape
    np_ = b_gmem.shape[0]
    out_dtype = out_gmem.dtype
    tm, tn, wgs = cfg.tile_m, cfg.tile_n, cfg.num_compute_wgs
    cta_m, cta_n = cfg.cta_m, cfg.cta_n
    m_iters, n_iters, k_iters = mp // cta_m, np_ // cta_n, kp // BLOCK_K

    # 128 fp8 = 128 bytes per I row: 128-byte swizzle, (8, 128) tiles, as wgmma expects.
    in_transforms = transforms(BLOCK_K, a_gmem.dtype)
    out_transforms = transforms(tn, out_dtype)

    def make_pipeline(body, compute_context):
        return plgpu.emit_pipeline_warp_specialized(
            body,
            grid=(k_iters,),
            memory_registers=MEMORY_REGISTERS,
            in_specs=[
                plgpu.BlockSpec((cta_m, BLOCK_K), lambda k: (0, k), transforms=in_transforms),
                plgpu.BlockSpec((cta_n, BLOCK_K), lambda k: (0, k), transforms=in_transforms),
                plgpu.BlockSpec((1, cta_m), lambda k: (k, 0)),
                plgpu.BlockSpec((1, cta_n), lambda k: (k, 0)),
            ],
            wg_axis="wg",
            num_compute_wgs=wgs,
            max_concurrent_steps=cfg.max_concurrent_steps,
            compute_context=compute_context,
        )

    ignore = lambda *_, **__: None  # the allocations do not depend on the body

    @functools.partial(
        pl.run_scoped,
        pipeline_allocs=make_pipeline(ignore, ignore).get_allocations(a_gmem, b_gmem, as_gmem,
                                                                      bs_gmem),
        out_smem=plgpu.SMEM((wgs, tm, tn), out_dtype, transforms=out_transforms),  # [W, tm, tn]
        collective_axes="wg",
    )
    def _scoped(pipeline_allocs, out_smem):
        wg = lax.axis_index("wg")
        if cfg.wg_dimension == "m":
            wg_rows, wg_cols = pl.ds(wg * tm, tm), pl.ds(0, tn)
        else:
            wg_rows, wg_cols = pl.ds(0, tm), pl.ds(wg * tn, tn)

        @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
        def _tile(loop_info):
            (lin,) = loop_info.index
            mi, ni = plgpu.planar_snake(lin, (m_iters, n_iters),
                                        0 if cfg.grid_minor_dim == "m" else 1,
                                        cfg.grid_tile_width)
            cta_rows, cta_cols = pl.ds(mi * cta_m, cta_m), pl.ds(ni * cta_n, cta_n)

            def k_block(_, a_smem, b_smem, as_smem, bs_smem, acc):
                # a_smem:  [cta_m, 128] fp8 (swizzled)   b_smem: [cta_n, 128] fp8 (swizzled)
                # as_smem: [1, cta_m] f32                bs_smem: [1, cta_n] f32
                # acc:     [tm, tn] f32 registers (WGMMA layout), the promoted accumulator
                # partial: [tm, tn] f32, this block's product in a fresh wgmma accumulator
                partial = wgmma_new((tm, tn), a_smem.at[wg_rows],
                                    b_smem.at[wg_cols].transpose((1, 0)))  # B viewed [128, tn]
                sa = plgpu.load(as_smem.at[0, wg_rows], layout=plgpu.Layout.WGMMA.reduce(1))  # [tm]
                sb = plgpu.load(bs_smem.at[0, wg_cols], layout=plgpu.Layout.WGMMA.reduce(0))  # [tn]
                # The scale rows were read by ordinary loads and the TMA engine (async proxy) will
                # overwrite this stage once the pipeline releases it: fence the two proxies.
                plgpu.commit_smem()
                scale = (lax.broadcast_in_dim(sa, (tm, tn), [0])
                         * lax.broadcast_in_dim(sb, (tm, tn), [1]))
                return acc + partial * scale

            def compute_context(run_pipeline):
                acc = run_pipeline(plgpu.layout_cast(jnp.zeros((tm, tn), jnp.float32),
                                                     plgpu.Layout.WGMMA))
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous tile's store
                out_smem[wg] = acc.astype(out_dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(out_smem.at[wg],
                                        out_gmem.at[cta_rows, cta_cols].at[wg_rows, wg_cols])

            make_pipeline(k_block, compute_context)(
                a_gmem.at[cta_rows, :], b_gmem.at[cta_cols, :],
                as_gmem.at[:, cta_rows], bs_gmem.at[:, cta_cols],
                allocations=pipeline_allocs)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def fp8_gemm(a_q: jax.Array, a_s: jax.Array, b_q: jax.Array, b_s: jax.Array, *,
             out_dtype=jnp.bfloat16, config: TileConfig | None = None,
             interpret: bool | plgpu.InterpretGPUParams = False,
             num_sms: int | None = None) -> jax.Array:
    """C = dequant(A) dequant(B)^T with per-128-I-block fp32 promotion, on Hopper.

    Args (checked by the dispatcher, `ops.fp8.check_gemm_args`, not here):
      a_q: [M, I] float8_e4m3fn; a_s: [M, ceil(I/128)] float32 (1x128 tiles).
      b_q: [J, I] float8_e4m3fn; b_s: [ceil(J/128), ceil(I/128)] (128x128 blocks) or
        [J, ceil(I/128)] (1x128 tiles) float32.
      out_dtype: bfloat16 (default), float16 or float32.
      config: tiling (DEFAULT_CONFIG when None).
      interpret: True (or an `InterpretGPUParams`, e.g. with the race detector on) runs the
        kernel in Pallas GPU interpret mode on the CPU (tests).
      num_sms: persistent CTAs: the dispatcher's SM count (None: hopper.persistent_kernel's).
    Returns:
      [M, J] in out_dtype.
    """
    out_dtype = jnp.dtype(out_dtype)
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"fp8_gemm_sm90: out_dtype={out_dtype} is not supported; use one of "
                         f"{[str(d) for d in OUT_DTYPES]}.")
    cfg = fit_to_smem(config or DEFAULT_CONFIG, out_dtype)
    m, k = a_q.shape
    n = b_q.shape[0]
    mp, np_, kp = round_up(m, cfg.cta_m), round_up(n, cfg.cta_n), round_up(k, BLOCK_K)

    # [J, Ib]: 128x128 block scales repeated over their rows (the two layouts coincide when J = 1).
    b_rows = b_s if b_s.shape[0] == n else jnp.repeat(b_s, BLOCK_K, axis=0)[:n]
    a_p = jnp.pad(a_q, ((0, mp - m), (0, kp - k)))  # [Mp, Ip]
    b_p = jnp.pad(b_q, ((0, np_ - n), (0, kp - k)))  # [Jp, Ip]
    as_t = jnp.pad(a_s.astype(jnp.float32), ((0, mp - m), (0, 0))).T  # [Ib, Mp]
    bs_t = jnp.pad(b_rows.astype(jnp.float32), ((0, np_ - n), (0, 0))).T  # [Ib, Jp]

    n_tiles = (mp // cfg.cta_m) * (np_ // cfg.cta_n)
    call = persistent_kernel(functools.partial(_kernel, cfg=cfg),
                             jax.ShapeDtypeStruct((mp, np_), out_dtype), n_tiles, num_sms,
                             interpret, num_threads=cfg.num_compute_wgs + 1, thread_name="wg")
    out = call(a_p, b_p, as_t, bs_t)
    return out[:m, :n] if (mp, np_) != (m, n) else out


__all__ = ["BLOCK_K", "DEFAULT_CONFIG", "SMEM_BYTES", "TileConfig", "fit_to_smem", "fp8_gemm",
           "registers_needed", "smem_bytes"]
