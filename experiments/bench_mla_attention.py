"""MLA training attention (causal, qk 192 / v 128): every path ops/attention.py can take, timed.

  python experiments/bench_mla_attention.py            # H100 / TPU: T = 4096, 16384; H = 16, 128
  python experiments/bench_mla_attention.py --shapes=4096x16,4096x128   # only these T x H
  python experiments/bench_mla_attention.py            # CPU: the memory and threshold tables
  python experiments/bench_mla_attention.py --smoke    # CPU, tiny shapes, kernels in interpret mode

Rows per shape (bf16 inputs, B chosen so that B x T = 16384 tokens, at least 1), those of the
platform it runs on:
  pallas flash (ours)   GPU: dsv3_jax/ops/pallas/mla_attention_sm90.py (forward kernel; fwd+bwd
                        adds its dq and dkv backward kernels)
  cudnn, v padded       GPU: jax.nn.dot_product_attention(implementation="cudnn"), V zero-padded
                        to 192 and the output sliced back (cuDNN needs equal qk and v dims)
  tokamax               GPU: tokamax.dot_product_attention if importable (a note otherwise)
  splash                TPU: dsv3_jax/ops/pallas/splash_attention_tpu.py (jax's splash kernel)
  chunked jnp           every platform: dsv3_jax/ops/chunked_attention.py (online softmax over
                        key blocks, custom_vjp), what "auto" takes from T = CHUNKED_MIN_T where no
                        kernel applies
  xla reference         dsv3_jax.ops.attention.mla_attention_reference ([B, H, T, T] scores)

On a CPU (no --smoke) it prints instead (1) the compiled forward + backward temporaries
(`compile().memory_analysis()`, nothing run) of the reference and the chunked path at V3 head dims,
and (2) their fwd+bwd times at short T, the evidence for CHUNKED_MIN_T.

Useful FLOPs (causal: half the score matrix): forward 2 B H (T^2 / 2) (192 + 128); forward +
backward 3.5x that. TFLOP/s = useful FLOPs / median time. Timing: jitted, `--warmup` calls, then
`--runs` timed runs of `--inner` calls each ended by block_until_ready.
Accuracy: each row's output against the XLA reference (fp32 scores), max |diff| / max |ref|; ours
must stay under 2^-6 (a few bf16 ulps; tests/test_mla_kernels.py says why). Failures are marked
MISMATCH and exit 1.
"""

from __future__ import annotations

import argparse
import functools
import sys

import jax
import jax.numpy as jnp

from dsv3_jax.ops import attention, chunked_attention
from dsv3_jax.ops.pallas import mla_attention_sm90, splash_attention_tpu

from benchutil import (add_timing_flags, fill_timing, fmt as _fmt, int_pairs, pick_rows,
                       provenance, time_median as _time)

DK, DV = 192, 128
FULL_SHAPES = ((4096, 16), (4096, 128), (16384, 16), (16384, 128))  # (T, H)
SMOKE_SHAPES = ((128, 2),)
CPU_MEMORY_SHAPES = ((1024, 16), (4096, 16), (8192, 16), (16384, 16))  # (T, H), B 1
CPU_TIME_SHAPES = ((256, 2), (1024, 2), (2048, 2))
# --impls keys -> row names (rows of other platforms are never there).
IMPL_KEYS = {"ours": "pallas flash (ours)", "cudnn": "cudnn, v padded", "tokamax": "tokamax",
             "splash": "splash", "chunked": "chunked jnp", "reference": "xla reference"}
TOLERANCE = 2.0 ** -6


def _cudnn(q, k, v, scale):
    vp = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, DK - DV)))
    out = jax.nn.dot_product_attention(q, k, vp, scale=scale, is_causal=True,
                                       implementation="cudnn")
    return out[..., :DV]


def _tokamax():
    try:
        import tokamax  # noqa: F401
    except Exception as e:  # noqa: BLE001 - optional baseline
        return None, f"tokamax not importable ({type(e).__name__})"
    return (lambda q, k, v, scale: tokamax.dot_product_attention(q, k, v, scale=scale,
                                                                  is_causal=True)), ""


def _impls(args, platform: str):
    """(name, fn(q, k, v, scale) or None, note) for the paths of `platform` ("gpu", "tpu"; with
    --smoke every kernel in interpret mode)."""
    impls = []
    if args.smoke or platform == "gpu":
        ours = functools.partial(mla_attention_sm90.mla_attention, interpret=args.smoke)
        impls.append(("pallas flash (ours)", lambda q, k, v, s: ours(q, k, v, scale=s), ""))
    if platform == "gpu" and not args.smoke:
        impls.append(("cudnn, v padded", _cudnn, ""))
        tk, note = _tokamax()
        impls.append(("tokamax", tk, note))
    if args.smoke or platform == "tpu":
        splash = functools.partial(splash_attention_tpu.mla_attention, interpret=args.smoke)
        impls.append(("splash", lambda q, k, v, s: splash(q, k, v, scale=s), ""))
    impls.append(("chunked jnp",
                  lambda q, k, v, s: chunked_attention.mla_attention_chunked(q, k, v, scale=s), ""))
    impls.append(("xla reference",
                  lambda q, k, v, s: attention.mla_attention_reference(q, k, v, scale=s), ""))
    return impls


def _fwd_bwd(core, scale):
    return lambda q, k, v, do: jax.vjp(lambda q, k, v: core(q, k, v, scale=scale), q, k, v)[1](do)


def _cpu_tables(args, timing) -> int:
    """The CPU report: compiled temporaries at long T, fwd+bwd times at short T."""
    cores = (("xla reference", attention.mla_attention_reference),
             ("chunked jnp", chunked_attention.mla_attention_chunked))
    print(f"\nMLA causal attention on the CPU, qk {DK} / v {DV}, bf16, B=1. {provenance(args)}\n")
    print("Forward + backward temporaries (compiled, not run):\n")
    print("| T | H | reference MiB | chunked MiB | reference / chunked |")
    print("|---|---|---|---|---|")
    for t, h in CPU_MEMORY_SHAPES:
        sd = lambda d: jax.ShapeDtypeStruct((1, t, h, d), jnp.bfloat16)
        temp = [jax.jit(_fwd_bwd(core, DK ** -0.5)).lower(sd(DK), sd(DK), sd(DV), sd(DV))
                .compile().memory_analysis().temp_size_in_bytes / 2 ** 20 for _, core in cores]
        print(f"| {t} | {h} | {temp[0]:,.0f} | {temp[1]:,.1f} | {temp[0] / temp[1]:,.0f}x |")
    print(f"\nForward + backward ms (\"auto\" takes the chunked path from T = "
          f"{attention.CHUNKED_MIN_T}):\n")
    print("| T | H | reference ms | chunked ms |")
    print("|---|---|---|---|")
    for t, h in CPU_TIME_SHAPES:
        keys = jax.random.split(jax.random.key(t), 4)
        args_ = [jax.random.normal(kk, (1, t, h, d), jnp.float32).astype(jnp.bfloat16)
                 for kk, d in zip(keys, (DK, DK, DV, DV))]
        ms = [_time(jax.jit(_fwd_bwd(core, DK ** -0.5)), args_, **timing) * 1e3
              for _, core in cores]
        print(f"| {t} | {h} | {ms[0]:,.1f} | {ms[1]:,.1f} |")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU: tiny shapes, kernel interpreted")
    ap.add_argument("--tokens", type=int, default=16384, help="B x T per shape")
    ap.add_argument("--shapes", default="", help="comma-separated TxH (e.g. 4096x16,4096x128); "
                    "default: all of FULL_SHAPES")
    ap.add_argument("--impls", default="", help="comma-separated rows to time, of "
                    f"{','.join(IMPL_KEYS)} (default: every row of the platform)")
    add_timing_flags(ap)
    args = ap.parse_args(argv)
    shapes = SMOKE_SHAPES if args.smoke else (
        int_pairs(args.shapes, "bench_mla_attention", "--shapes", "TxH", "4096x16,4096x128")
        or FULL_SHAPES)
    device = jax.devices()[0]
    impls = pick_rows(_impls(args, device.platform), args.impls, IMPL_KEYS, "bench_mla_attention")
    if not args.smoke and device.platform not in ("gpu", "tpu"):
        return _cpu_tables(args, fill_timing(args, full=(1, 3, 1)))
    timing = fill_timing(args, full=(3, 10, 5))
    rows, ok = [], True
    for t, h in shapes:
        b = 1 if args.smoke else max(1, args.tokens // t)
        kq, kk, kv, kd = jax.random.split(jax.random.key(t + h), 4)
        q = jax.random.normal(kq, (b, t, h, DK), jnp.float32).astype(jnp.bfloat16)
        k = jax.random.normal(kk, (b, t, h, DK), jnp.float32).astype(jnp.bfloat16)
        v = jax.random.normal(kv, (b, t, h, DV), jnp.float32).astype(jnp.bfloat16)
        do = jax.random.normal(kd, (b, t, h, DV), jnp.float32).astype(jnp.bfloat16)
        scale = DK ** -0.5
        ref = jax.jit(lambda q, k, v: attention.mla_attention_reference(q, k, v, scale=scale))(
            q, k, v).astype(jnp.float32)
        ref_scale = float(jnp.max(jnp.abs(ref)))
        f_fwd = mla_attention_sm90.flops(b, t, h, DK, DV)
        f_bwd = mla_attention_sm90.flops(b, t, h, DK, DV, backward=True)
        label = f"B={b} T={t} H={h}"
        for name, fn, note in impls:
            if fn is None:
                rows.append((label, name, *(float("nan"),) * 5, note))
                continue
            fwd = jax.jit(lambda q, k, v, fn=fn: fn(q, k, v, scale))
            fwd_bwd = jax.jit(lambda q, k, v, fn=fn: jax.vjp(
                lambda q, k, v: fn(q, k, v, scale), q, k, v)[1](do))
            try:
                out = jax.block_until_ready(fwd(q, k, v))
                t_f = _time(fwd, (q, k, v), **timing)
                t_b = _time(fwd_bwd, (q, k, v), **timing)
            except Exception as e:  # noqa: BLE001 - a baseline that fails is reported
                rows.append((label, name, *(float("nan"),) * 5,
                             f"error: {type(e).__name__}: {str(e)[:90]}"))
                ok &= name != "pallas flash (ours)"
                continue
            err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref))) / ref_scale
            if not err < TOLERANCE and name not in ("cudnn, v padded", "tokamax"):
                note, ok = f"MISMATCH: error {err:.2e} >= {TOLERANCE:.2e}", False
            rows.append((label, name, t_f * 1e3, f_fwd / t_f / 1e12, t_b * 1e3,
                         f_bwd / t_b / 1e12, err, note))
    print(f"\nMLA causal attention, qk {DK} / v {DV}, bf16. {provenance(args)}\n")
    print("| shape | implementation | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s "
          "| error vs reference | note |")
    print("|---|---|---|---|---|---|---|---|")
    for label, name, fm, ft, bm, bt, err, note in rows:
        print(f"| {label} | {name} | {_fmt(fm, '.3f')} | {_fmt(ft, '.0f')} | {_fmt(bm, '.3f')} | "
              f"{_fmt(bt, '.0f')} | {_fmt(err, '.1e')} | {note} |")
    if not ok:
        print("\nMISMATCH: see the notes above.", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
