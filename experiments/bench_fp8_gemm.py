"""FP8 block-scaled GEMM: our Hopper kernel against XLA, in one run.

  python experiments/bench_fp8_gemm.py                 # H100: 8192^3 and the DeepSeek-V3 shapes
  python experiments/bench_fp8_gemm.py --sweep         # also try several kernel tilings per shape
  python experiments/bench_fp8_gemm.py --smoke         # CPU, tiny shapes, kernel in interpret mode

Rows per shape (C [M, N] = A [M, K] B [N, K]^T, bf16 out):
  xla bf16            jnp.dot of the unquantized bf16 inputs (cuBLAS); also the accuracy reference
  xla fp8 per-tensor  one scale per tensor: dot_general of the e4m3 inputs (fp32 out, scaled, cast)
  xla fp8 dequant     one scale per tensor, written as dot(dequant(a), dequant(b)): the pattern XLA's
                      GEMM rewriter turns into a cuBLASLt FP8 GEMM with scales
  pallas fp8 (ours)   dsv3_jax/ops/pallas/fp8_gemm_sm90.py: 1x128 / 128x128 block scales, promotion
                      into fp32 every 128-wide K block (SPEC.md section 3)
  jnp reference       dsv3_jax.ops.fp8.fp8_gemm_reference (what CPU/TPU run), same math as ours
  quantize a, b       act_quant(a) + weight_quant(b) (XLA), the cost in front of every block GEMM

Timing: each implementation is jitted on inputs already on the device (quantized beforehand for the
FP8 rows), run `--warmup` times, then `--runs` timed runs of `--inner` back-to-back calls each ended
by block_until_ready; the table shows the median per call. TFLOP/s = 2 M N K / time.
Accuracy: calc_diff (DeepGEMM's, SPEC.md section 3) against the bf16 product of the unquantized
inputs (fp32 out); inputs ~ N(0, 1). A block-FP8 row passes at calc_diff < 1e-3, and ours must
match the jnp reference elementwise within 2^-8 |ref| + 2^-10 max|ref| (tests/test_gpu_kernels.py's
FP8 tolerance): one bf16 ulp, plus room for the tensor core's FP8 accumulator, which keeps about
14 bits within each 128-wide block (the reference sums in fp32), so an element whose blocks cancel
may differ by more than an ulp of its own small value. Any failure is marked MISMATCH and exits 1.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time

import jax
import jax.numpy as jnp

from dsv3_jax.ops import fp8, platform

from benchutil import add_timing_flags, fill_timing, provenance, fmt as _fmt, time_median as _time

# (label, M, K, N): 8192^3, then the DeepSeek-V3 671B projections at 4096 tokens.
FULL_SHAPES = (
    ("square 8192^3", 8192, 8192, 8192),
    ("wq_a 7168->1536", 4096, 7168, 1536),
    ("wq_b 1536->24576", 4096, 1536, 24576),
    ("expert w1/w3 7168->2048", 4096, 7168, 2048),
    ("expert w2 2048->7168", 4096, 2048, 7168),
    ("dense w1/w3 7168->18432", 4096, 7168, 18432),
    ("dense w2 18432->7168", 4096, 18432, 7168),
)
SMOKE_SHAPES = (("aligned", 128, 256, 128), ("ragged", 100, 300, 72))
KERNEL_ULP = 2.0 ** -8
KERNEL_ABS = 2.0 ** -10  # of max|ref|: the FP8 accumulator (module docstring)


def _sweep_configs():
    from dsv3_jax.ops.pallas.fp8_gemm_sm90 import TileConfig

    return {
        "64x128 m-split, 4 stages, snake n/4 (default)": TileConfig(),
        "64x128 m-split, 5 stages": TileConfig(max_concurrent_steps=5),
        "64x128 n-split (CTA 64x256)": TileConfig(wg_dimension="n"),
        "64x192 m-split (CTA 128x192)": TileConfig(tile_n=192),
        "64x128 m-split, snake m/8": TileConfig(grid_minor_dim="m", grid_tile_width=8),
    }


@jax.jit
def _calc_diff_device(x, y):
    """calc_diff on the device in fp32, as sum((x-y)^2) / sum(x^2+y^2) (no cancellation)."""
    x, y = x.astype(jnp.float32), y.astype(jnp.float32)
    return jnp.sum(jnp.square(x - y)) / jnp.sum(x * x + y * y)


def _max_ulp_excess(out, ref):
    """max(|out - ref| - (2^-8 |ref| + 2^-10 max|ref|)), > 0 when some element is off by more than
    the tolerance (module docstring)."""
    out, ref = out.astype(jnp.float32), ref.astype(jnp.float32)
    bound = KERNEL_ULP * jnp.abs(ref) + KERNEL_ABS * jnp.max(jnp.abs(ref))
    return float(jnp.max(jnp.abs(out - ref) - bound))


def _per_tensor_quant(x):
    s = jnp.maximum(jnp.max(jnp.abs(x.astype(jnp.float32))), 1e-4) / fp8.E4M3_MAX
    return jnp.clip(x.astype(jnp.float32) / s, -fp8.E4M3_MAX, fp8.E4M3_MAX).astype(fp8.E4M3), s


def _xla_fp8_direct(a_q, sa, b_q, sb):
    out = jax.lax.dot_general(a_q, b_q, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return (out * (sa * sb)).astype(jnp.bfloat16)


def _xla_fp8_dequant(a_q, sa, b_q, sb):
    a = a_q.astype(jnp.bfloat16) * sa.astype(jnp.bfloat16)
    b = b_q.astype(jnp.bfloat16) * sb.astype(jnp.bfloat16)
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.bfloat16)


def _bench_shape(label, m, k, n, args, configs, rows, detail_rows) -> bool:
    """Times every implementation at one shape; appends table rows; returns False on a mismatch."""
    flops = 2.0 * m * n * k
    ka, kb = jax.random.split(jax.random.key(m * 7 + k * 3 + n))
    a = jax.random.normal(ka, (m, k), jnp.float32).astype(jnp.bfloat16)
    b = jax.random.normal(kb, (n, k), jnp.float32).astype(jnp.bfloat16)
    timing = dict(warmup=args.warmup, runs=args.runs, inner=args.inner)
    ok = True

    bf16_dot = jax.jit(lambda a, b: jax.lax.dot_general(
        a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32).astype(jnp.bfloat16))
    exact = jax.jit(lambda a, b: jax.lax.dot_general(
        a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32))(a, b)
    t_bf16 = _time(bf16_dot, (a, b), **timing)

    def row(impl, seconds, out, note=""):
        diff = float(_calc_diff_device(out, exact)) if out is not None else float("nan")
        rows.append((label, f"{m}x{k}x{n}", impl, seconds * 1e3, flops / seconds / 1e12,
                     t_bf16 / seconds, diff, note))
        return diff

    row("xla bf16", t_bf16, bf16_dot(a, b))

    quantize = jax.jit(lambda a, b: (*fp8.act_quant(a), *fp8.weight_quant(b)))
    t_quant = _time(quantize, (a, b), **timing)
    ops = quantize(a, b)

    pt = (*_per_tensor_quant(a), *_per_tensor_quant(b))  # (a_q, sa, b_q, sb)
    for impl, fn in (("xla fp8 per-tensor", _xla_fp8_direct), ("xla fp8 dequant", _xla_fp8_dequant)):
        jf = jax.jit(fn)
        try:
            row(impl, _time(jf, pt, **timing), jf(*pt))
        except Exception as e:  # noqa: BLE001 - a baseline XLA cannot compile is reported, not fatal
            rows.append((label, f"{m}x{k}x{n}", impl, float("nan"), float("nan"), float("nan"),
                         float("nan"), f"error: {type(e).__name__}: {str(e)[:80]}"))

    reference = jax.jit(fp8.fp8_gemm_reference)
    ref_out = reference(*ops)
    ref_diff = row("jnp reference", _time(reference, ops, **timing), ref_out)
    if not ref_diff < 1e-3:
        ok = False
        rows[-1] = rows[-1][:-1] + ("MISMATCH: calc_diff >= 1e-3",)

    from dsv3_jax.ops.pallas import fp8_gemm_sm90

    best = None  # (name, seconds, out) of the fastest tiling that compiled and matched
    for name, cfg in configs.items():
        gemm = jax.jit(functools.partial(fp8_gemm_sm90.fp8_gemm, config=cfg,
                                         interpret=args.smoke, num_sms=platform.num_sms()))
        try:
            out = jax.block_until_ready(gemm(*ops))
        except Exception as e:  # noqa: BLE001 - a tiling that does not compile is reported
            detail_rows.append((label, name, float("nan"), float("nan"),
                                f"error: {type(e).__name__}: {str(e)[:100]}"))
            continue
        seconds = _time(gemm, ops, **timing)
        diff = float(_calc_diff_device(out, exact))
        excess = _max_ulp_excess(out, ref_out)
        note = ""
        if not (diff < 1e-3 and excess <= 0):
            note = f"MISMATCH: calc_diff {diff:.2e}, {excess:.3g} beyond the reference's tolerance"
            ok = False
            row("pallas fp8 (ours)", seconds, out, f"{name}: {note}")
        elif best is None or seconds < best[1]:
            best = (name, seconds, out)
        detail_rows.append((label, name, seconds * 1e3, flops / seconds / 1e12, note))
    if best is not None:
        row("pallas fp8 (ours)", best[1], best[2], best[0])
    elif not any(r[2] == "pallas fp8 (ours)" and r[0] == label for r in rows):
        rows.append((label, f"{m}x{k}x{n}", "pallas fp8 (ours)", float("nan"), float("nan"),
                     float("nan"), float("nan"), "error: no tiling compiled (see the tilings table)"))
        ok = False
    rows.append((label, f"{m}x{k}x{n}", "quantize a, b", t_quant * 1e3, float("nan"),
                 float("nan"), float("nan"), "act_quant 1x128 + weight_quant 128x128"))
    return ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU: tiny shapes, kernel interpreted")
    ap.add_argument("--sweep", action="store_true", help="try several kernel tilings per shape")
    ap.add_argument("--shapes", default="", help="only shapes whose label contains this text")
    add_timing_flags(ap)
    args = ap.parse_args(argv)
    fill_timing(args, full=(3, 15, 10))

    device = jax.devices()[0]
    if not args.smoke and not fp8.gemm_impl() == "sm90":
        print(f"bench_fp8_gemm: the kernel needs a Hopper GPU, found {device.device_kind!r}; "
              "use --smoke for the CPU check.", file=sys.stderr)
        return 2
    from dsv3_jax.ops.pallas.fp8_gemm_sm90 import DEFAULT_CONFIG

    configs = _sweep_configs() if args.sweep else {"default": DEFAULT_CONFIG}
    shapes = [s for s in (SMOKE_SHAPES if args.smoke else FULL_SHAPES) if args.shapes in s[0]]
    rows, detail_rows, ok = [], [], True
    for label, m, k, n in shapes:
        ok &= _bench_shape(label, m, k, n, args, configs, rows, detail_rows)

    print(f"\nFP8 GEMM, C = A B^T, bf16 out. {provenance(args)}\n")
    print("| shape | M x K x N | implementation | ms | TFLOP/s | vs xla bf16 | calc_diff vs bf16 "
          "| note |")
    print("|---|---|---|---|---|---|---|---|")
    for label, dims, impl, ms, tflops, speedup, diff, note in rows:
        print(f"| {label} | {dims} | {impl} | {_fmt(ms, '.3f')} | {_fmt(tflops, '.0f')} | "
              f"{_fmt(speedup, '.2f')}x | {_fmt(diff, '.2e')} | {note} |".replace("| -x |", "| - |"))
    if args.sweep or any(r[-1] for r in detail_rows):
        print("\nKernel tilings (TileConfig):\n")
        print("| shape | tiling | ms | TFLOP/s | note |")
        print("|---|---|---|---|---|")
        for label, name, ms, tflops, note in detail_rows:
            print(f"| {label} | {name} | {_fmt(ms, '.3f')} | {_fmt(tflops, '.0f')} | {note} |")
    if not ok:
        print("\nMISMATCH: see the notes above.", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
