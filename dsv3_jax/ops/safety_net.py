"""The safety net under the GPU kernels: each is checked against its reference on first use.

The first time "auto" dispatch is about to use a GPU kernel for a given class of calls (kernel,
dtype, the dims that change its code: e.g. attention at dtype, A, O, with segments or not), the
dispatcher hands this module a `Check`: a function that compiles and runs the kernel once at a
small shape of that class on fresh random inputs and compares it with its reference at the
tolerance the kernel's tests state. The verdict decides whether the kernel or the dispatcher's
next fallback runs:
  - it is kept in this process (one check per class) and on disk, one small JSON per verdict in
    `cache_dir()` (DSV3_KERNEL_CACHE, else ~/.cache/dsv3_jax/kernel_verdicts), valid for the jax
    and jaxlib versions, the device kind and the hash of the kernel's source files it was made
    with; an unreadable or stale file is ignored and rewritten;
  - a kernel that raises (lowering, compiling, running), disagrees beyond its tolerance, or gives
    no answer within DSV3_KERNEL_CHECK_TIMEOUT seconds (a hang) is skipped, with ONE warning per
    kernel and class in a process naming the kernel, the error and the DSV3_* variable that
    forces either way.
The check runs in a worker thread: dispatch happens at trace time, inside the caller's jit or
grad, and a fresh thread has a fresh trace state (jax keeps it per thread), so the probe computes
concrete numbers however deep the caller's transformations are; the thread also bounds the wait.

Forcing an implementation (DSV3_ATTENTION=sm90, DSV3_GROUPED_MATMUL=sm90, DSV3_FP8_GEMM=sm90)
skips the net, and DSV3_KERNEL_CHECK=off turns it off (every kernel "auto" picks is then used
unchecked). Known-bad toolchains are refused before any probe (`refuse`: e.g. causal kernels on
CUDA 12.8.0-12.9.0, ops/platform.py).

`check_model_kernels(cfg)` runs every check a ModelConfig's kernels need (the GPU check script's
entry; on a CPU the kernels run in GPU interpret mode, so only small configs are practical).
Dispatchers register their classes here (`register_model_checks`); this module imports none of
them (ops/ has no import cycle: tests/test_ops_structure.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import threading
import time
import warnings
from typing import Callable

import jax
import numpy as np

from dsv3_jax.files import atomic_file
from dsv3_jax.ops import platform

_FORMAT = 1  # bumped when a verdict file's fields change: older files are then ignored


class Mismatch(AssertionError):
    """A kernel's result disagrees with its reference beyond the stated tolerance."""


@dataclasses.dataclass(frozen=True)
class Check:
    """One class of calls of one kernel, and how to check it.

    kernel: the kernel's name, e.g. "mla_attention_sm90".
    dims: the class, a short string, e.g. "bfloat16 A=192 O=128 segments".
    probe: compiles and runs the kernel at a small shape of the class on fresh random inputs and
      raises (`Mismatch` or any error) when it fails; runs outside any trace.
    sources: files whose contents key the verdict (the kernel's file, ops/pallas/hopper.py).
    variable, forces, fallback: the DSV3_* variable that picks the implementation, its value that
      forces this kernel and the name of what runs instead (for the warning).
    """

    kernel: str
    dims: str
    probe: Callable[[], None] = dataclasses.field(compare=False, repr=False)
    sources: tuple[str, ...] = ()
    variable: str = ""
    forces: str = ""
    fallback: str = "reference"

    @property
    def key(self) -> tuple[str, str]:
        return self.kernel, self.dims


_VERDICTS: dict[tuple[str, str], dict] = {}
_WARNED: set[tuple[str, str]] = set()
_LOCK = threading.RLock()
_MODEL_CHECKS: dict[str, Callable] = {}


# ------------------------------------------------------------------------------------------------
# The verdict of one check
# ------------------------------------------------------------------------------------------------
def cache_dir() -> pathlib.Path:
    """The folder of the on-disk verdicts: DSV3_KERNEL_CACHE, else
    ~/.cache/dsv3_jax/kernel_verdicts."""
    return pathlib.Path(platform.kernel_cache_dir())


_default_cache_dir = cache_dir  # disk_verdicts' argument shadows the name


def _source_hash(sources) -> str:
    digest = hashlib.sha256()
    for path in sources:
        digest.update(os.path.basename(path).encode() + b"\0")
        digest.update(pathlib.Path(path).read_bytes())
    return digest.hexdigest()[:16]


def _identity(check: Check) -> dict:
    """What a verdict holds for: the class, the versions, the device and the sources' hash."""
    return {"format": _FORMAT, "kernel": check.kernel, "dims": check.dims,
            **platform.versions(), "device": platform.device_kind(),
            "source_hash": _source_hash(check.sources)}


def _path(identity: dict) -> pathlib.Path:
    blob = json.dumps(identity, sort_keys=True).encode()
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in identity["kernel"])
    return cache_dir() / f"{safe}-{hashlib.sha256(blob).hexdigest()[:20]}.json"


def _read_disk(identity: dict) -> dict | None:
    """The stored verdict for `identity`, or None when there is none or it cannot be used."""
    path = _path(identity)
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict) or not isinstance(record.get("ok"), bool):
            return None
        if any(record.get(k) != v for k, v in identity.items()):
            return None
        return {"kernel": identity["kernel"], "dims": identity["dims"], "ok": record["ok"],
                "error": record.get("error"), "source": "disk"}
    except (OSError, ValueError):  # missing, unreadable, not JSON: ignored, rewritten
        return None


def _write_disk(identity: dict, verdict: dict) -> None:
    record = {**identity, "ok": verdict["ok"], "error": verdict["error"],
              "seconds": verdict.get("seconds"), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    path = _path(identity)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(str(path), "w") as f:
            json.dump(record, f, indent=1, sort_keys=True)
    except OSError as e:  # a read-only home: the in-process verdict still holds
        warnings.warn(f"dsv3_jax: cannot store the kernel verdict in {path} ({e}); it is kept for "
                      "this process only (set DSV3_KERNEL_CACHE to a writable folder).",
                      RuntimeWarning, stacklevel=3)


def _one_line(error: BaseException) -> str:
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    text = f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return text if len(text) <= 300 else text[:297] + "..."


def _run_probe(check: Check) -> dict:
    """Runs `check.probe` in a fresh thread (fresh trace state) with the timeout."""
    timeout = platform.kernel_check_timeout()
    result: dict = {}

    def work():
        try:
            check.probe()
            result["error"] = None
        except BaseException as e:  # anything the kernel raises is its verdict
            result["error"] = _one_line(e)

    start = time.perf_counter()
    worker = threading.Thread(target=work, name=f"dsv3-kernel-check-{check.kernel}", daemon=True)
    worker.start()
    worker.join(timeout)
    error = result.get("error") if "error" in result else (
        f"no result within {timeout:g} s (a hang?; DSV3_KERNEL_CHECK_TIMEOUT sets the limit)")
    return {"kernel": check.kernel, "dims": check.dims, "ok": error is None, "error": error,
            "source": "probe", "seconds": round(time.perf_counter() - start, 3)}


def _warn(check: Check, verdict: dict) -> None:
    if check.key in _WARNED:
        return
    _WARNED.add(check.key)
    how = (f"{check.variable}={check.forces} forces the kernel, {check.variable}={check.fallback} "
           "the fallback" if check.variable else "")
    warnings.warn(
        f"dsv3_jax: GPU kernel {check.kernel} [{check.dims}] is skipped: {verdict['error']}. "
        f"Running {check.fallback} instead. {how}; DSV3_KERNEL_CHECK=off turns the check off "
        f"(verdicts in {cache_dir()}).", RuntimeWarning, stacklevel=4)


def verdict(check: Check, *, use_cache: bool = True) -> dict:
    """The verdict for `check` (in-process cache, then disk, then the probe; module docstring)."""
    with _LOCK:  # one probe per class, however many threads trace at once
        if use_cache and check.key in _VERDICTS:
            return _VERDICTS[check.key]
        identity = _identity(check)
        found = _read_disk(identity) if use_cache else None
        if found is None:
            found = _run_probe(check)
            _write_disk(identity, found)
        _VERDICTS[check.key] = found
        return found


def passes(check: Check) -> bool:
    """Whether "auto" dispatch may use `check.kernel` for this class: True when the net is off or
    the verdict is good; else False after the class's one warning (the caller falls back)."""
    if not platform.kernel_check():
        return True
    found = verdict(check)
    if not found["ok"]:
        _warn(check, found)
    return found["ok"]


def refuse(check: Check, why: str) -> bool:
    """Records that `check.kernel` is refused for this class without a probe (a known-bad
    toolchain, `why`), warns once, and returns False (the caller falls back)."""
    with _LOCK:
        found = {"kernel": check.kernel, "dims": check.dims, "ok": False, "error": why,
                 "source": "refused"}
        _VERDICTS[check.key] = found
    _warn(check, found)
    return False


def compare(what: str, got, want, rtol: float, *, elementwise: bool = False,
            floor: float = 0.0) -> None:
    """Raises `Mismatch` unless max|got - want| <= rtol * max|want| (scale-aware, as the kernels'
    tests' `assert_close`), or with `elementwise` |got - want| <= rtol * |want| + floor *
    max|want| everywhere (the floor covers outputs near zero, where a different fp32 summation
    order is a large relative change); float64 on the host. Shapes must agree; NaN never passes."""
    got = np.asarray(jax.device_get(got), np.float64)
    want = np.asarray(jax.device_get(want), np.float64)
    if got.shape != want.shape:
        raise Mismatch(f"{what}: shape {got.shape}, expected {want.shape}")
    err = np.abs(got - want)
    scale = np.max(np.abs(want), initial=0.0)
    bound = (rtol * np.abs(want) + floor * scale if elementwise else rtol * scale) + 1e-30
    if not np.all(err <= bound):  # NaN fails here
        worst = float(np.nanmax(err)) if np.isfinite(err).any() else float("nan")
        limit = (f"{rtol:.3g} x |reference| + {floor:.3g} x max|reference|" if elementwise
                 else f"{rtol:.3g} x max|reference|")
        raise Mismatch(f"{what}: max |kernel - reference| = {worst:.3g} exceeds {limit} "
                       f"(max|reference| = {float(scale):.3g})")


def fresh_key():
    """A fresh random key for a probe's inputs (new numbers every probe: seeded from the clock)."""
    return jax.random.key(time.time_ns() % (2 ** 31))


# ------------------------------------------------------------------------------------------------
# The API other modules use
# ------------------------------------------------------------------------------------------------
def verdicts() -> list[dict]:
    """This process's verdicts: dicts with kernel, dims (str), ok (bool), error (str or None),
    source ("probe", "disk", or "refused" for a known-bad toolchain)."""
    with _LOCK:
        return [{k: v[k] for k in ("kernel", "dims", "ok", "error", "source")}
                for v in _VERDICTS.values()]


def disk_verdicts(cache_dir: str | os.PathLike | None = None) -> list[dict]:
    """Every readable verdict file in `cache_dir` (default `cache_dir()`): kernel, dims, ok, error,
    source ("disk"), jax, device; sorted by kernel and dims. Unreadable files are left out."""
    folder = pathlib.Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    out = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else ():
        try:
            r = json.loads(path.read_text())
            out.append({"kernel": r["kernel"], "dims": r["dims"], "ok": bool(r["ok"]),
                        "error": r.get("error"), "source": "disk", "jax": r["jax"],
                        "device": r["device"]})
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return sorted(out, key=lambda r: (r["kernel"], r["dims"]))


def clear() -> None:
    """Forgets this process's verdicts and warnings (tests); the disk cache is left alone."""
    with _LOCK:
        _VERDICTS.clear()
        _WARNED.clear()


def register_model_checks(name: str, checks: Callable) -> None:
    """A dispatcher's `checks(cfg) -> list[Check]`: the kernel classes a ModelConfig makes it use
    (called at the dispatcher's import)."""
    _MODEL_CHECKS[name] = checks


_DISPATCHERS = ("attention", "grouped_matmul", "fp8")


def check_model_kernels(cfg, *, use_cache: bool = True) -> list[dict]:
    """Runs the check of every GPU kernel class `cfg` (a ModelConfig) uses and returns their
    verdicts (as `verdicts()`): attention at (dtype, A, O) with and without segments, decode at
    (dtype, C, R), the routed experts' gmm (both directions of (D, moe_inter_dim), plain and
    transposed) and tgmm, and with cfg.fp8 the FP8 GEMMs of the projections' Fprop and Dgrad.
    Classes a kernel does not take (dims it refuses) are left out: dispatch never uses it there.
    Off a GPU the kernels run in GPU interpret mode (slow: small configs only). Forcing variables
    and DSV3_KERNEL_CHECK do not apply: this always checks. use_cache=False re-runs every probe
    (and rewrites its file)."""
    missing = [n for n in _DISPATCHERS if n not in _MODEL_CHECKS]
    if missing:
        raise RuntimeError(f"check_model_kernels: the dispatchers {missing} registered no checks; "
                           "import dsv3_jax (it imports them) before calling this.")
    out = []
    for name in _DISPATCHERS:
        for check in _MODEL_CHECKS[name](cfg):
            found = verdict(check, use_cache=use_cache)
            out.append({k: found[k] for k in ("kernel", "dims", "ok", "error", "source")})
    return out


__all__ = ["Check", "Mismatch", "cache_dir", "check_model_kernels", "clear", "compare",
           "disk_verdicts", "fresh_key", "passes", "refuse", "register_model_checks", "verdict",
           "verdicts"]
