"""The shared parts of the Hopper (sm_90a) Mosaic GPU kernels: the one definition of each constant
and helper more than one kernel uses. Kernels import this module, jax and numpy, nothing else of
dsv3_jax (ops/pallas/__init__.py).
"""

from __future__ import annotations

import math

import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp

SMEM_BYTES = 227 * 1024  # shared memory a Hopper CTA may opt into
NUM_SMS = 132  # SMs of an H100 SXM / H200: a persistent grid's size when the caller gives none
INTERPRET_NUM_SMS = 2  # the same in GPU interpret mode: few CTAs, each walking several tiles
DTYPES_16BIT = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))  # operands of a 16-bit wgmma
OUT_DTYPES = (*DTYPES_16BIT, jnp.dtype(jnp.float32))  # what the matmul epilogues write
LOG2E = math.log2(math.e)  # softmax in base 2: exp(x) = exp2(x log2 e), log2 e folded into scale
M_INIT = -1e30  # running-max start: finite, so fully masked blocks give exp2(-inf) = 0, not NaN
MAX_REGISTERS = 255  # 32-bit registers a thread may address
REGISTER_FILE = 64 * 1024  # 32-bit registers per SM, shared by the CTA's threads


def warp_specialized_registers(num_compute_wgs: int, memory_registers: int) -> int:
    """Registers per thread a compute warpgroup may use under `emit_pipeline_warp_specialized`'s
    setmaxnreg: the register file less the memory warpgroup's share, split over the compute
    warpgroups, in steps of 8, at most 256 (jax's pipeline), of which a thread addresses
    MAX_REGISTERS (e.g. 232 for 2 compute warpgroups beside 40 or 48; 255 for one)."""
    per_wg = REGISTER_FILE // 128 - memory_registers
    return min(MAX_REGISTERS, min(256, per_wg // num_compute_wgs) // 8 * 8)


def check_registers(config, kernel: str, need: int, budget: int, where: str) -> None:
    """Refuses a tile config before lowering when its estimate of live 32-bit registers per thread
    (`need`, the kernel's own count: accumulators, register operands, fixed overhead) exceeds
    `budget`, the most that kernel's warpgroup `where` holds without ptxas spilling (each kernel
    states how its budget was measured)."""
    if need > budget:
        raise ValueError(f"{kernel}: {config} needs about {need} registers per thread in its "
                         f"{where}, over the {budget} it holds without spilling; use smaller "
                         "tiles (or fewer accumulators per warpgroup).")


def refuse(config, field: str, why: str):
    """Raises `Config.field=value: why.`, the ValueError of a config field a kernel cannot take."""
    raise ValueError(f"{type(config).__name__}.{field}={getattr(config, field)!r}: {why}.")


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def pad_axis(x, axis: int, size: int, value=0):
    """x padded with `value` at the end of `axis` to `size` (x itself when it is that long)."""
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


def interpret_params(interpret) -> plgpu.InterpretGPUParams | None:
    """A kernel's `interpret` (a bool or `InterpretGPUParams`) as `plgpu.kernel` takes it."""
    if isinstance(interpret, plgpu.InterpretGPUParams):
        return interpret
    return plgpu.InterpretGPUParams() if interpret else None


def persistent_kernel(body, out_type, work: int, num_sms: int | None, interpret, **kwargs):
    """`plgpu.kernel` of a persistent warpgroup-semantics kernel: a grid "sm" of one CTA per SM
    (num_sms, from the caller; NUM_SMS, or INTERPRET_NUM_SMS in interpret mode, when None), at most
    one per work item, at least one. kwargs (num_threads, thread_name) go to `plgpu.kernel`."""
    sms = num_sms or (INTERPRET_NUM_SMS if interpret else NUM_SMS)
    return plgpu.kernel(
        body, out_type=out_type, grid=(max(1, min(sms, work)),), grid_names=("sm",),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=interpret_params(interpret), **kwargs)


def transforms(minor: int, dtype) -> tuple:
    """Tiling + swizzle of a shared-memory tile whose minor (contiguous) dim holds `minor` elements
    of `dtype`: the widest swizzle its rows allow, in (8, swizzle / itemsize) tiles."""
    itemsize = jnp.dtype(dtype).itemsize
    swizzle = plgpu.find_swizzle(minor * itemsize * 8)
    return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


TRANSFORMS_16BIT = transforms(64, jnp.bfloat16)  # 16-bit tiles, minor dims multiples of 64


def wgmma_new(shape, a, b):
    """a @ b into a fresh fp32 accumulator of `shape` (both operands in shared memory)."""

    def product(acc_ref):
        plgpu.wgmma(acc_ref, a, b)
        return acc_ref[...]  # waits for the wgmma

    return pl.run_scoped(product, plgpu.ACC(shape, jnp.float32))


def wgmma_into(acc, a, b, interpret: bool, a_scratch=None):
    """acc + a @ b on the tensor cores (acc fp32 registers, WGMMA layout; a registers or shared
    memory, b shared memory). On the GPU it accumulates into `acc` itself (`pl.run_state`) and a
    register `a` feeds the wgmma directly. GPU interpret mode (jax 0.11.2) can do neither, so there
    a register `a` is staged through `a_scratch` (shared memory of its shape) and a fresh
    accumulator is added: the same sum, one more fp32 rounding."""
    if interpret:
        if a_scratch is not None:  # a is in registers
            a_scratch[...] = a
            plgpu.commit_smem()
            a = a_scratch
        return acc + wgmma_new(acc.shape, a, b)

    def accumulate(acc_ref):
        plgpu.wgmma(acc_ref, a, b)

    return pl.run_state(accumulate)(plgpu.ACC.init(acc))
