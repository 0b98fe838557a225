"""Helpers shared by the benchmark scripts beside this file (imported as `benchutil`: each script's
folder is on sys.path when it runs, and the tests put it there before importing a script)."""

from __future__ import annotations

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
