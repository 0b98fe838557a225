"""MLA decoding over the latent cache: GB/s of cache read, every decode path against XLA and a copy.

  python experiments/bench_mla_decode.py             # H100 / TPU: batch 1..128, context 1K..128K
  python experiments/bench_mla_decode.py --grid=64x4096,8x32768   # only these B x S
  python experiments/bench_mla_decode.py             # CPU: the memory and threshold tables
  python experiments/bench_mla_decode.py --smoke     # CPU, tiny shapes, kernels in interpret mode

Per (batch B, context S), H = 128 heads, one new token per sequence at position S - 1, latent 512 +
rope 64 per cached token (bf16, 1152 bytes), the DeepSeek-V3 shapes; the rows of the platform:
  pallas decode (ours)   GPU: dsv3_jax/ops/pallas/mla_decode_sm90.py (flash-decoding, jnp combine)
  tpu decode (ours)      TPU: dsv3_jax/ops/pallas/mla_decode_tpu.py (split-KV, jnp combine)
  chunked jnp            every platform: dsv3_jax/ops/chunked_attention.py (cache blocks, online
                         softmax), what "auto" takes from S = CHUNKED_MIN_SLOTS without a kernel
  xla reference          dsv3_jax.ops.attention.mla_decode_reference (einsums + softmax)
  device copy            jnp.copy of the same cache bytes (reads and writes them: the column shows
                         bytes read / time, so HBM bandwidth shows as about half its total)
On a CPU (no --smoke) it prints instead the compiled temporaries of the reference and the chunked
decode at V3 dims up to S = 128K (nothing run), and their times at B 1, H 16, the evidence for
CHUNKED_MIN_SLOTS.
GB/s = cache bytes read (B x S x 1152) / median time. Accuracy: max |diff| / max |ref| against the
reference, under 2^-6 (tests/test_mla_kernels.py says why); failures are marked MISMATCH and exit 1.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp

from dsv3_jax.ops import attention, chunked_attention
from dsv3_jax.ops.pallas import mla_decode_sm90, mla_decode_tpu

from benchutil import (add_timing_flags, fill_timing, fmt as _fmt, int_pairs, pick_rows,
                       provenance, time_median as _time)

H, C, R = 128, 512, 64
FULL_GRID = ((1, 1024), (1, 32768), (1, 131072), (8, 4096), (8, 32768), (64, 4096),
             (64, 16384), (128, 1024), (128, 4096))
SMOKE_GRID = ((2, 128),)
CPU_MEMORY_GRID = ((1, 32768), (1, 131072), (8, 32768))  # (B, S), T 1, V3 dims
# --impls keys -> row names (rows of other platforms are never there).
IMPL_KEYS = {"ours": "pallas decode (ours)", "tpu": "tpu decode (ours)", "chunked": "chunked jnp",
             "reference": "xla reference", "copy": "device copy"}
CPU_TIME_GRID = ((1, 1024), (1, 4096), (1, 8192), (1, 16384))  # H 16


def _inputs(b, s, heads, c, r):
    kq, kp, kc = jax.random.split(jax.random.key(b * 7 + s), 3)
    return (jax.random.normal(kq, (b, 1, heads, c), jnp.float32).astype(jnp.bfloat16),
            jax.random.normal(kp, (b, 1, heads, r), jnp.float32).astype(jnp.bfloat16),
            jax.random.normal(kc, (b, s, c + r), jnp.float32).astype(jnp.bfloat16),
            jnp.full((b, 1), s - 1, jnp.int32))


def _cpu_tables(args, timing) -> int:
    scale = 192 ** -0.5
    cores = (lambda *a: attention.mla_decode_reference(*a, scale=scale),
             lambda *a: chunked_attention.mla_decode_chunked(*a, scale=scale))
    print(f"\nMLA decode on the CPU, bf16, one token per sequence. {provenance(args)}\n")
    print(f"Temporaries at H={H}, C={C}, R={R} (compiled, not run):\n")
    print("| shape | reference MiB | chunked MiB | reference / chunked |")
    print("|---|---|---|---|")
    for b, s in CPU_MEMORY_GRID:
        sd = jax.ShapeDtypeStruct
        shapes = (sd((b, 1, H, C), jnp.bfloat16), sd((b, 1, H, R), jnp.bfloat16),
                  sd((b, s, C + R), jnp.bfloat16), sd((b, 1), jnp.int32))
        temp = [jax.jit(core).lower(*shapes).compile().memory_analysis().temp_size_in_bytes
                / 2 ** 20 for core in cores]
        print(f"| B={b} S={s} | {temp[0]:,.0f} | {temp[1]:,.1f} | {temp[0] / temp[1]:,.0f}x |")
    print(f"\nms per call at H=16 (\"auto\" takes the chunked decode from S = "
          f"{attention.CHUNKED_MIN_SLOTS}):\n")
    print("| shape | reference ms | chunked ms |")
    print("|---|---|---|")
    for b, s in CPU_TIME_GRID:
        inputs = _inputs(b, s, 16, C, R)
        ms = [_time(jax.jit(core), inputs, **timing) * 1e3 for core in cores]
        print(f"| B={b} S={s} | {ms[0]:,.2f} | {ms[1]:,.2f} |")
    return 0
TOLERANCE = 2.0 ** -6


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU: tiny shapes, kernel interpreted")
    ap.add_argument("--grid", default="", help="comma-separated BxS (e.g. 64x4096,8x32768); "
                    "default: all of FULL_GRID")
    ap.add_argument("--impls", default="", help="comma-separated rows to time, of "
                    f"{','.join(IMPL_KEYS)} (default: every row of the platform)")
    add_timing_flags(ap)
    args = ap.parse_args(argv)
    grid = SMOKE_GRID if args.smoke else (
        int_pairs(args.grid, "bench_mla_decode", "--grid", "BxS", "64x4096,8x32768") or FULL_GRID)
    device = jax.devices()[0]
    pick_rows([], args.impls, IMPL_KEYS, "bench_mla_decode")  # a bad value: one line, first
    if not args.smoke and device.platform not in ("gpu", "tpu"):
        return _cpu_tables(args, fill_timing(args, full=(1, 5, 2)))
    timing = fill_timing(args, full=(3, 10, 10))
    heads, c, r = (2, 128, 64) if args.smoke else (H, C, R)
    rows, ok = [], True
    for b, s in grid:
        q_lat, q_pe, cache, pos = _inputs(b, s, heads, c, r)
        scale = 192 ** -0.5
        nbytes = cache.size * cache.dtype.itemsize
        ref_fn = jax.jit(lambda a, p, cc, ps: attention.mla_decode_reference(a, p, cc, ps,
                                                                             scale=scale))
        ref = ref_fn(q_lat, q_pe, cache, pos).astype(jnp.float32)
        ref_scale = float(jnp.max(jnp.abs(ref)))
        label = f"B={b} S={s}"
        impls = []
        if args.smoke or device.platform == "gpu":
            impls.append(("pallas decode (ours)", jax.jit(
                lambda a, p, cc, ps: mla_decode_sm90.mla_decode(a, p, cc, ps, scale=scale,
                                                                interpret=args.smoke))))
        if args.smoke or device.platform == "tpu":
            impls.append(("tpu decode (ours)", jax.jit(
                lambda a, p, cc, ps: mla_decode_tpu.mla_decode(a, p, cc, ps, scale=scale,
                                                               interpret=args.smoke))))
        impls += [("chunked jnp", jax.jit(lambda a, p, cc, ps: chunked_attention.mla_decode_chunked(
                      a, p, cc, ps, scale=scale))),
                  ("xla reference", ref_fn),
                  ("device copy", jax.jit(lambda a, p, cc, ps: jnp.copy(cc)))]
        for name, fn in pick_rows(impls, args.impls, IMPL_KEYS, "bench_mla_decode"):
            try:
                out = jax.block_until_ready(fn(q_lat, q_pe, cache, pos))
                sec = _time(fn, (q_lat, q_pe, cache, pos), **timing)
            except Exception as e:  # noqa: BLE001 - reported, not fatal for baselines
                rows.append((label, name, float("nan"), float("nan"), float("nan"),
                             f"error: {type(e).__name__}: {str(e)[:90]}"))
                ok &= name not in ("pallas decode (ours)", "tpu decode (ours)")
                continue
            err, note = float("nan"), ""
            if name != "device copy":
                err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref))) / ref_scale
                if not err < TOLERANCE:
                    note, ok = f"MISMATCH: error {err:.2e} >= {TOLERANCE:.2e}", False
            rows.append((label, name, sec * 1e6, nbytes / sec / 1e9, err, note))
    print(f"\nMLA decode over the latent cache, H={heads}, C={c}, R={r}, bf16, one token per "
          f"sequence. {provenance(args)}\n")
    print("| shape | implementation | us | GB/s of cache read | error vs reference | note |")
    print("|---|---|---|---|---|---|")
    for label, name, us, gbs, err, note in rows:
        print(f"| {label} | {name} | {_fmt(us, '.1f')} | {_fmt(gbs, '.0f')} | {_fmt(err, '.1e')} "
              f"| {note} |")
    if not ok:
        print("\nMISMATCH: see the notes above.", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
