"""Helpers shared by the benchmark scripts beside this file (imported as `benchutil`: each script's
folder is on sys.path when it runs, and the tests put it there before importing a script)."""

from __future__ import annotations

import datetime
import statistics
import time

import jax


def time_median(fn, args, warmup: int, runs: int, inner: int) -> float:
    """Median seconds per call of fn(*args): `warmup` untimed calls, then `runs` samples of `inner`
    back-to-back calls each, every sample ended by block_until_ready."""
    out = None
    for _ in range(warmup):
        out = fn(*args)
    jax.block_until_ready(out)
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) / inner)
    return statistics.median(samples)


def fmt(x, spec: str) -> str:
    """format(x, spec), or "-" for NaN (a cell with no number)."""
    return "-" if x != x else format(x, spec)


def add_timing_flags(parser) -> None:
    """--warmup, --runs, --inner (unset: `fill_timing` picks the defaults)."""
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls first")
    parser.add_argument("--runs", type=int, default=None, help="timed samples (the median is kept)")
    parser.add_argument("--inner", type=int, default=None, help="back-to-back calls per sample")


def fill_timing(args, full: tuple[int, int, int]) -> dict:
    """Sets args.warmup / runs / inner left unset: (0, 1, 1) with --smoke, else `full`; returns
    them as the keyword arguments of `time_median`."""
    defaults = (0, 1, 1) if args.smoke else full
    for name, default in zip(("warmup", "runs", "inner"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, default)
    return dict(warmup=args.warmup, runs=args.runs, inner=args.inner)


def provenance(args) -> str:
    """"Device: ...; date; jax version; median of R runs x I calls after W warm-up" for a table's
    title (and, with --smoke, that the times are meaningless)."""
    device = jax.devices()[0]
    text = (f"Device: {device.device_kind}; {datetime.date.today().isoformat()}; jax "
            f"{jax.__version__}; median of {args.runs} runs x {args.inner} calls after "
            f"{args.warmup} warm-up")
    return text + ("; SMOKE: CPU interpret mode, times meaningless" if args.smoke else "")


def int_pairs(text: str, script: str, flag: str, form: str, example: str) -> list[tuple[int, int]]:
    """A flag's "AxB,AxB" value -> [(A, B), ...] ([] when empty); anything else exits with one
    line naming the script, the flag, its value, the form (e.g. "TxH") and an example."""
    try:
        pairs = (item.split("x") for item in filter(None, text.split(",")))
        return [(int(a), int(b)) for a, b in pairs]
    except ValueError:
        raise SystemExit(f"{script}: {flag}={text!r}; expected {form},{form},... "
                         f"(e.g. {example})") from None


def pick_rows(rows: list, text: str, keys: dict[str, str], script: str) -> list:
    """The rows (tuples whose first item is a row name) that the --impls value `text` names, by
    the short keys of `keys` (key -> row name); all of them when `text` is empty. An unknown key
    exits with one line naming the script, the value and the valid keys."""
    wanted = [k for k in text.split(",") if k]
    unknown = sorted(set(wanted) - set(keys))
    if unknown:
        raise SystemExit(f"{script}: --impls={text!r}: unknown {unknown}; use some of "
                         f"{','.join(keys)}")
    names = {keys[k] for k in wanted}
    return [row for row in rows if not names or row[0] in names]
