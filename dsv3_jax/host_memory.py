"""Host memory: glibc's malloc asked to back its large blocks with transparent huge pages.

XLA:CPU allocates the temporaries of each call of a compiled program as one block (574 MB for the
"mid" config's train step in experiments/bench_cpu_step.py), which glibc maps fresh from the kernel
and unmaps when the call ends. The kernel zero-fills such a mapping one 4 KiB page at a time on
first touch, on every call: 140,000 page faults and a sixth of that train step on 2 cores
(experiments/RESULTS.md). glibc >= 2.35's tunable `glibc.malloc.hugetlb=1` makes malloc mark its
mappings MADV_HUGEPAGE, so a kernel whose transparent huge pages (THP) are in `madvise` mode backs
them with 2 MiB pages: about 700 faults a step.

glibc reads tunables when a process starts, so `prefer_huge_pages()` restarts the running command
(`os.execv`: same interpreter, arguments and environment, plus the tunable) when all of these hold:
Linux with glibc >= 2.35, THP in `madvise` mode (`always` needs nothing, `never` cannot be
helped), GLIBC_TUNABLES does not already set glibc.malloc.hugetlb (so it restarts at most once),
and DSV3_HUGE_PAGES is not "0". The command-line entry points call it first (`cli.run`), as does
experiments/bench_cpu_step.py (its PyTorch worker inherits the setting); the Makefile exports the
tunable for everything it runs. A Python session or notebook can set
GLIBC_TUNABLES=glibc.malloc.hugetlb=1 before it starts.
"""

from __future__ import annotations

import os
import sys

TUNABLE = "glibc.malloc.hugetlb"
SETTING = f"{TUNABLE}=1"
OPT_OUT = "DSV3_HUGE_PAGES"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the C library when it is glibc, else None."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        major, minor = version.split(".")[:2]
        return (int(major), int(minor)) if name == "glibc" else None
    except (AttributeError, OSError, ValueError):  # not glibc, or an unusual version string
        return None


def thp_mode(path: str = THP_MODE_FILE) -> str | None:
    """The kernel's transparent huge page mode (always, madvise or never), None when unknown."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def tunable_set(environ=os.environ) -> bool:
    """True when GLIBC_TUNABLES already gives glibc.malloc.hugetlb a value (any value)."""
    return any(item.split("=", 1)[0] == TUNABLE
               for item in environ.get("GLIBC_TUNABLES", "").split(":"))


def restart_needed(environ=os.environ, glibc=None, mode=None) -> bool:
    """Whether `prefer_huge_pages` would restart this process (see the module docstring)."""
    glibc = glibc_version() if glibc is None else glibc
    mode = thp_mode() if mode is None else mode
    return (sys.platform.startswith("linux") and glibc is not None and glibc >= (2, 35)
            and mode == "madvise" and not tunable_set(environ)
            and environ.get(OPT_OUT, "") != "0")


def with_setting(environ=os.environ) -> dict:
    """A copy of `environ` whose GLIBC_TUNABLES also holds the setting."""
    tunables = [item for item in environ.get("GLIBC_TUNABLES", "").split(":") if item]
    return {**environ, "GLIBC_TUNABLES": ":".join(tunables + [SETTING])}


def prefer_huge_pages() -> None:
    """Restarts the running command with the setting when `restart_needed()`; else returns. Call
    it before any work (nothing is kept across the restart). A restart that fails returns."""
    if not restart_needed():
        return
    argv = list(getattr(sys, "orig_argv", ()) or [sys.executable] + sys.argv)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    try:
        os.execve(sys.executable, [sys.executable] + argv[1:], with_setting())
    except OSError:
        return
