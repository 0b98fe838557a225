"""MLA decoding over the latent cache: GB/s of cache read, our kernel against XLA and a copy.

  python experiments/bench_mla_decode.py             # H100: batch 1..128, context 1K..128K
  python experiments/bench_mla_decode.py --grid=64x4096,8x32768   # only these B x S
  python experiments/bench_mla_decode.py --smoke     # CPU, tiny shapes, kernel in interpret mode

Per (batch B, context S), H = 128 heads, one new token per sequence at position S - 1, latent 512 +
rope 64 per cached token (bf16, 1152 bytes), the DeepSeek-V3 shapes:
  pallas decode (ours)   dsv3_jax/ops/pallas/mla_decode_sm90.py (flash-decoding, jnp combine)
  xla reference          dsv3_jax.ops.attention.mla_decode_reference (einsums + softmax)
  device copy            jnp.copy of the same cache bytes (reads and writes them: the column shows
                         bytes read / time, so HBM bandwidth shows as about half its total)
GB/s = cache bytes read (B x S x 1152) / median time. Accuracy: max |diff| / max |ref| against the
reference, under 2^-6 (tests/test_mla_kernels.py says why); failures are marked MISMATCH and exit 1.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp

from dsv3_jax.ops import attention
from dsv3_jax.ops.pallas import mla_decode_sm90

from benchutil import (add_timing_flags, fill_timing, fmt as _fmt, int_pairs, provenance,
                       time_median as _time)

H, C, R = 128, 512, 64
FULL_GRID = ((1, 1024), (1, 32768), (1, 131072), (8, 4096), (8, 32768), (64, 4096),
             (64, 16384), (128, 1024), (128, 4096))
SMOKE_GRID = ((2, 128),)
TOLERANCE = 2.0 ** -6


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU: tiny shapes, kernel interpreted")
    ap.add_argument("--grid", default="", help="comma-separated BxS (e.g. 64x4096,8x32768); "
                    "default: all of FULL_GRID")
    add_timing_flags(ap)
    args = ap.parse_args(argv)
    timing = fill_timing(args, full=(3, 10, 10))
    grid = SMOKE_GRID if args.smoke else (
        int_pairs(args.grid, "bench_mla_decode", "--grid", "BxS", "64x4096,8x32768") or FULL_GRID)
    device = jax.devices()[0]
    if not args.smoke and device.platform != "gpu":
        print(f"bench_mla_decode: needs a Hopper GPU, found {device.device_kind!r}; use --smoke "
              "for the CPU check.", file=sys.stderr)
        return 2
    heads, c, r = (2, 128, 64) if args.smoke else (H, C, R)
    rows, ok = [], True
    for b, s in grid:
        kq, kp, kc = jax.random.split(jax.random.key(b * 7 + s), 3)
        q_lat = jax.random.normal(kq, (b, 1, heads, c), jnp.float32).astype(jnp.bfloat16)
        q_pe = jax.random.normal(kp, (b, 1, heads, r), jnp.float32).astype(jnp.bfloat16)
        cache = jax.random.normal(kc, (b, s, c + r), jnp.float32).astype(jnp.bfloat16)
        pos = jnp.full((b, 1), s - 1, jnp.int32)
        scale = 192 ** -0.5
        nbytes = cache.size * cache.dtype.itemsize
        ref_fn = jax.jit(lambda a, p, cc, ps: attention.mla_decode_reference(a, p, cc, ps,
                                                                             scale=scale))
        ref = ref_fn(q_lat, q_pe, cache, pos).astype(jnp.float32)
        ref_scale = float(jnp.max(jnp.abs(ref)))
        label = f"B={b} S={s}"
        impls = (("pallas decode (ours)", jax.jit(lambda a, p, cc, ps: mla_decode_sm90.mla_decode(
                     a, p, cc, ps, scale=scale, interpret=args.smoke))),
                 ("xla reference", ref_fn),
                 ("device copy", jax.jit(lambda a, p, cc, ps: jnp.copy(cc))))
        for name, fn in impls:
            try:
                out = jax.block_until_ready(fn(q_lat, q_pe, cache, pos))
                sec = _time(fn, (q_lat, q_pe, cache, pos), **timing)
            except Exception as e:  # noqa: BLE001 - reported, not fatal for baselines
                rows.append((label, name, float("nan"), float("nan"), float("nan"),
                             f"error: {type(e).__name__}: {str(e)[:90]}"))
                ok &= name != "pallas decode (ours)"
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
