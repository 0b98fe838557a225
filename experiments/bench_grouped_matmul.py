"""MoE grouped matmul: our kernels and the portable tiled backend against XLA's ragged_dot and a
dense matmul, in one run.

  python experiments/bench_grouped_matmul.py            # H100 / TPU: V3 and small shapes
  python experiments/bench_grouped_matmul.py --shapes=V3 --runs=20
  python experiments/bench_grouped_matmul.py            # CPU / other GPU: the expert-count sweep
  python experiments/bench_grouped_matmul.py --smoke    # CPU, tiny shapes, kernels interpreted

Shapes (rows M = token-expert pairs on one device, G local experts, K -> N one expert matmul):
  V3 w1/w3 7168->2048 and w2 2048->7168 with 256 experts over EP 8 / 32 / 64 (32 / 8 / 4 local
  experts), M = 32768 rows per device (4096 tokens x top-8); configs/small.py's experts 1024->512
  and 512->1024, 64 experts on one device, M = 49152 (8192 tokens x top-6).
Group sizes are router-like: expert popularity drawn from a log-normal (sigma 1, fixed seed), an
eighth of the experts left empty, M rows split multinomially; every row belongs to a group.

Rows per shape, each forward (y = grouped x w) and forward+backward (y, dx, dw), bf16 in/out
(--dtype=float32 for fp32):
  pallas sm90 (ours)   dsv3_jax/ops/pallas/grouped_matmul_sm90.py via grouped_matmul(impl="sm90")
                       (on a TPU: "megablox" through the same entry point)
  tiled (portable)     grouped_matmul(impl="tiled"): ops/tiled_grouped_matmul.py, the default on
                       the CPU and on GPUs without our kernels
  xla ragged_dot       grouped_matmul(impl="ragged_dot"): XLA's lax.ragged_dot(_general)
  dense matmul         jnp.dot [M, K] x [K, N], the same FLOPs (fwd+bwd: its vjp), the ceiling
TFLOP/s counts useful FLOPs: 2 M K N forward, 6 M K N forward+backward. "% of dense" divides by
the dense row's TFLOP/s of the same run. Correctness: y, dx, dw of every grouped row against
ragged_dot's with an fp32 result (max error <= 2^-6 x max|ref|: bf16 rounding of both, fp32 sums
in another order); a mismatch is marked MISMATCH and the script exits 1.

Timing: jitted functions on inputs already on the device, `--warmup` calls, then `--runs` timed
runs of `--inner` back-to-back calls each ended by block_until_ready; the median per call.
The sweep (SWEEP_SHAPES) ends with the cost of G = 16 over G = 4 experts per implementation and
mode (1.0: the cost follows the routed rows; ragged_dot on a CPU grows with G).
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.ops import grouped_matmul as gm

from benchutil import add_timing_flags, fill_timing, provenance, fmt as _fmt, time_median as _time

# (label, M rows, K, N, G local experts)
FULL_SHAPES = tuple(
    (f"V3 {name} EP{ep}", 32768, k, n, 256 // ep)
    for name, k, n in (("w1/w3 7168->2048", 7168, 2048), ("w2 2048->7168", 2048, 7168))
    for ep in (8, 32, 64)
) + (
    ("small w1/w3 1024->512", 49152, 1024, 512, 64),
    ("small w2 512->1024", 49152, 512, 1024, 64),
)
# Without a kernel backend (CPU, other GPUs): the "mid" config's routed experts (D 512 -> F 256,
# bench_cpu_step.py) at a fixed M = 4096 rows (1024 tokens x top-4) and 4..32 experts: the same
# active FLOPs, so a grouped matmul that costs the routed rows takes the same time at every G.
SWEEP_SHAPES = tuple((f"mid w1 512->256 G{g}", 4096, 512, 256, g) for g in (4, 8, 16, 32)) + tuple(
    (f"mid w2 256->512 G{g}", 4096, 256, 512, g) for g in (4, 16))
SMOKE_SHAPES = (("smoke ragged", 128, 64, 64, 4),)
RTOL = 2.0 ** -6


def router_like_sizes(m: int, groups: int, seed: int = 0) -> np.ndarray:
    """int32 [G] summing to m: log-normal popularity, an eighth of the groups empty (at least one
    when G >= 4), multinomial counts. Fixed seed: every run benchmarks the same split."""
    rng = np.random.default_rng(seed)
    p = rng.lognormal(0.0, 1.0, groups)
    n_empty = groups // 8 if groups >= 8 else int(groups >= 4)
    p[rng.choice(groups, n_empty, replace=False)] = 0.0
    return rng.multinomial(m, p / p.sum()).astype(np.int32)


def _grouped(impl):
    fwd = jax.jit(lambda x, w, gs: gm.grouped_matmul(x, w, gs, impl=impl))

    @jax.jit
    def fwd_bwd(x, w, gs, dy):
        y, pullback = jax.vjp(lambda x, w: gm.grouped_matmul(x, w, gs, impl=impl), x, w)
        return (y, *pullback(dy))

    return fwd, fwd_bwd


def _dense():
    fwd = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype))

    @jax.jit
    def fwd_bwd(x, w, dy):
        y, pullback = jax.vjp(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32
                                                   ).astype(x.dtype), x, w)
        return (y, *pullback(dy))

    return fwd, fwd_bwd


@jax.jit
def _rel_err(out, ref):
    out, ref = out.astype(jnp.float32), ref.astype(jnp.float32)
    return jnp.max(jnp.abs(out - ref)) / jnp.maximum(jnp.max(jnp.abs(ref)), 1e-30)


def _bench_shape(label, m, k, n, g, impls, args, rows) -> bool:
    kx, kw, kd = jax.random.split(jax.random.key(m + 7 * k + 13 * n + g), 3)
    dtype = jnp.dtype(args.dtype)
    x = jax.random.normal(kx, (m, k), jnp.float32).astype(dtype)
    w = (jax.random.normal(kw, (g, k, n), jnp.float32) / np.sqrt(k)).astype(dtype)
    dy = jax.random.normal(kd, (m, n), jnp.float32).astype(dtype)
    gs = jnp.asarray(router_like_sizes(m, g))
    timing = dict(warmup=args.warmup, runs=args.runs, inner=args.inner)
    dims = f"{m}x{k}x{n}"
    ok = True

    # The accuracy reference: ragged_dot's products with fp32 results.
    x32 = x.astype(jnp.float32)
    ref = jax.jit(lambda x, w, gs, dy: (
        gm.grouped_matmul_reference(x, w, gs),
        gm.grouped_matmul_reference(dy, jnp.swapaxes(w, 1, 2), gs),
        gm.transposed_grouped_matmul_reference(x, dy, gs)))(x32, w.astype(jnp.float32), gs,
                                                            dy.astype(jnp.float32))

    dense_fwd, dense_fwd_bwd = _dense()
    t_dense = {"fwd": _time(dense_fwd, (x, w[0]), **timing),
               "fwd+bwd": _time(dense_fwd_bwd, (x, w[0], dy), **timing)}
    flops = {"fwd": 2.0 * m * k * n, "fwd+bwd": 6.0 * m * k * n}
    for mode in ("fwd", "fwd+bwd"):
        rows.append((label, dims, g, mode, "dense matmul", t_dense[mode], flops[mode],
                     t_dense[mode], ""))

    for name, impl in impls:
        fwd, fwd_bwd = _grouped(impl)
        for mode, fn, fargs in (("fwd", fwd, (x, w, gs)), ("fwd+bwd", fwd_bwd, (x, w, gs, dy))):
            try:
                start = time.perf_counter()
                out = jax.block_until_ready(fn(*fargs))
                first_call = time.perf_counter() - start
            except Exception as e:  # noqa: BLE001 - a backend that does not compile is reported
                rows.append((label, dims, g, mode, name, float("nan"), flops[mode], t_dense[mode],
                             f"error: {type(e).__name__}: {str(e)[:100]}"))
                ok &= impl == "ragged_dot"  # XLA failing is a finding; our kernel failing is not ok
                continue
            outs = (out,) if mode == "fwd" else out
            errs = [float(_rel_err(o, r)) for o, r in zip(outs, ref)]
            note = "max err " + "/".join(f"{e:.1e}" for e in errs)
            if not all(e <= RTOL for e in errs):
                note = f"MISMATCH ({note} > {RTOL:.1e} of max)"
                ok = False
            # --smoke: the checked call's time (compile included; interpret mode is slow enough).
            seconds = first_call if args.smoke else _time(fn, fargs, **timing)
            rows.append((label, dims, g, mode, name, seconds, flops[mode], t_dense[mode], note))
    return ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU: tiny shapes, kernels interpreted")
    ap.add_argument("--shapes", default="", help="only shapes whose label contains this text")
    ap.add_argument("--no_xla", action="store_true", help="skip the (slow on GPU) ragged_dot rows")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                    help="operand and output dtype")
    add_timing_flags(ap)
    args = ap.parse_args(argv)
    fill_timing(args, full=(3, 10, 5))

    ours = gm.grouped_matmul_impl()
    if args.smoke:
        ours = "sm90"  # the Hopper kernels in GPU interpret mode
    impls = [] if ours == "tiled" else [(f"pallas {ours} (ours)", ours)]
    impls.append(("tiled (portable)", "tiled"))
    if not args.no_xla:
        impls.append(("xla ragged_dot", "ragged_dot"))

    table = SMOKE_SHAPES if args.smoke else SWEEP_SHAPES if ours == "tiled" else FULL_SHAPES
    shapes = [s for s in table if args.shapes in s[0]]
    if not shapes:
        labels = ", ".join(s[0] for s in table)
        print(f"bench_grouped_matmul: no shape label contains {args.shapes!r}; the labels here: "
              f"{labels}.", file=sys.stderr)
        return 2
    rows, ok = [], True
    for label, m, k, n, g in shapes:
        ok &= _bench_shape(label, m, k, n, g, impls, args, rows)

    print(f"\nMoE grouped matmul, {args.dtype}. {provenance(args)}\n")
    print("| shape | M x K x N | G | pass | implementation | ms | TFLOP/s | % of dense | note |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, dims, g, mode, impl, seconds, flop, t_dense, note in rows:
        tflops = flop / seconds / 1e12
        pct = 100.0 * t_dense / seconds
        print(f"| {label} | {dims} | {g} | {mode} | {impl} | {_fmt(seconds * 1e3, '.3f')} | "
              f"{_fmt(tflops, '.1f')} | {_fmt(pct, '.0f')}% | {note} |".replace("| -% |", "| - |"))
    _print_growth(rows)
    if not ok:
        print("\nMISMATCH or error: see the notes above.", file=sys.stderr)
    return 0 if ok else 1


def _print_growth(rows) -> None:
    """The sweep's cost at G = 16 over G = 4 (same M, K, N: the same active FLOPs)."""
    times = {(label.rsplit(" G", 1)[0], g, mode, impl): seconds
             for label, _, g, mode, impl, seconds, *_ in rows if " G" in label}
    pairs = sorted({(base, mode, impl) for base, g, mode, impl in times
                    if (base, 4, mode, impl) in times and (base, 16, mode, impl) in times})
    if not pairs:
        return
    print("\nCost at 16 experts over 4 (same rows and FLOPs):\n")
    print("| shape | pass | implementation | G=4 ms | G=16 ms | G16 / G4 |")
    print("|---|---|---|---|---|---|")
    for base, mode, impl in pairs:
        t4, t16 = times[(base, 4, mode, impl)], times[(base, 16, mode, impl)]
        print(f"| {base} | {mode} | {impl} | {_fmt(t4 * 1e3, '.2f')} | {_fmt(t16 * 1e3, '.2f')} "
              f"| {_fmt(t16 / t4, '.2f')} |")


if __name__ == "__main__":
    sys.exit(main())
