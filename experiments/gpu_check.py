"""The first-GPU-session check, in one command: everything a short H100 / H200 loan should measure.

  python experiments/gpu_check.py                      # on the GPU machine, about 8 minutes
  python experiments/gpu_check.py --only=pytest,train  # some stages only
  python experiments/gpu_check.py --dry-run            # CPU: every stage at tiny shapes, ~1.5 min

Writes `<out>/gpu_check.json` (every stage: status, seconds, return code, summary, parsed tables,
the tail of its output) and `<out>/gpu_check.md` (the same as markdown tables), --out default
`gpu_check_results/`. The files are rewritten after every stage, so a session cut short still
leaves what was measured. Stages, each a subprocess with its own time limit (its failure or
timeout is recorded and the next stage runs), in this order:

  env               jax / jaxlib / CUDA plugin versions, ptxas, device kind and count, driver,
                    the modules the train stage needs (grain, ml_collections, ...)
  pytest            `pytest -m gpu` (tests/test_gpu_kernels.py: every kernel against its
                    reference at V3 dims and ragged shapes; the other gpu-marked tests)
  safety_net        dsv3_jax.ops.safety_net.check_model_kernels at the small and V3 presets (FP8
                    on), then its verdicts() and disk_verdicts()
  bench_fp8_gemm    8192^3 and the V3 projection shapes
  bench_grouped_matmul   the V3 expert shapes, fwd and fwd+bwd
  bench_mla_attention    T = 4096, H = 16 and 128 (the Hopper rows: ours, cuDNN, tokamax, XLA)
  bench_mla_decode       B = 64 S = 4K and B = 8 S = 32K (ours, XLA, a copy)
  train             a few steps of configs/small.py (python -m dsv3_jax.train): loss, tokens/s, MFU
                    from its metrics.jsonl
  bench_decode      experiments/bench_decode.py, the small preset with random weights

Status per stage: passed (exit 0), failed (non-zero exit, the summary says why), timeout (killed
at its limit), skipped (not run: --only, out of the overall --budget, or a missing prerequisite).
The exit status is 0 when every stage that ran passed. The parent process never initialises jax
(each stage gets the whole GPU). --dry-run runs on the CPU: the benchmarks' --smoke modes (kernels
in GPU interpret mode), the tiny config for 2 train steps on a small corpus, the safety net at the
tiny preset, pytest of the gpu tests (skipped there).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXPERIMENTS = ROOT / "experiments"
# --dry-run's overall seconds: it checks the wiring, not the speed, so its limits only catch a
# hang; a cold compilation cache on a busy 2-core machine takes several times the ~1.5 min.
DRY_BUDGET_S = 1800.0
TAIL_CHARS = 4000  # of each stage's output kept in the JSON
TRAIN_MODULES = ("grain", "ml_collections", "tensorboardX", "array_record", "sentencepiece",
                 "orbax.checkpoint")


@dataclasses.dataclass
class Stage:
    """One stage: `argv(ctx)` builds its command; `parse(text, ctx)` turns its output into
    (summary, extra fields) for the report."""

    name: str
    limit_s: float  # on the GPU: sized to the loan's minutes
    dry_limit_s: float  # with --dry-run: a hang guard only, wide enough for a loaded 2-core CPU
    argv: object  # callable(ctx) -> list[str], or None (the stage is skipped; ctx.skip_reason)
    parse: object = None  # callable(text, ctx) -> (summary: str, extra: dict)


# ------------------------------------------------------------------------------------------------
# Output parsing
# ------------------------------------------------------------------------------------------------
def markdown_tables(text: str) -> list[dict]:
    """Every markdown table in `text`: [{"title", "header", "rows"}], the title being the last
    non-empty line before the table."""
    tables, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and re.match(r"^\|[-| :]+\|$",
                                                                         lines[i + 1].strip()):
            title = next((ln.strip() for ln in reversed(lines[:i]) if ln.strip()), "")
            header = [c.strip() for c in lines[i].strip().strip("|").split("|")]
            rows, i = [], i + 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            tables.append({"title": title[:300], "header": header, "rows": rows})
        else:
            i += 1
    return tables


def _json_line(text: str, tag: str):
    """The JSON after the last line starting with `tag` (what a stage's helper script prints)."""
    for line in reversed(text.splitlines()):
        if line.startswith(tag):
            return json.loads(line[len(tag):])
    return None


def _bench_summary(text: str, ctx) -> tuple[str, dict]:
    tables = markdown_tables(text)
    rows = sum(len(t["rows"]) for t in tables)
    bad = [ln.strip() for ln in text.splitlines() if "MISMATCH" in ln or "| error:" in ln]
    summary = f"{rows} rows in {len(tables)} table(s)" + (f"; {len(bad)} MISMATCH/error row(s)"
                                                          if bad else "")
    if not tables:  # the script stopped before its table: its last words say why
        last = [ln.strip() for ln in text.splitlines() if ln.strip()]
        summary = f"no table; last output: {last[-1][:300] if last else '(none)'}"
    return summary, {"tables": tables}


def _pytest_summary(text: str, ctx) -> tuple[str, dict]:
    counts = {}
    final = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", ln)]
    if final:
        for n, what in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed)",
                                  final[-1]):
            counts[what.rstrip("s") if what.startswith("error") else what] = int(n)
    failed = [ln.split(" ", 1)[1][:300] for ln in text.splitlines()
              if ln.startswith(("FAILED ", "ERROR "))]
    if not counts:  # killed before the summary line: count the per-test lines of -v
        for what in re.findall(r"^\S+::\S+ (PASSED|FAILED|SKIPPED|ERROR)", text, re.M):
            counts[what.lower()] = counts.get(what.lower(), 0) + 1
        failed = failed or re.findall(r"^(\S+::\S+) FAILED", text, re.M)
    summary = ", ".join(f"{n} {k}" for k, n in counts.items()) or "no pytest summary line"
    return summary, {"counts": counts, "failed": failed}


# ------------------------------------------------------------------------------------------------
# Stage helpers (small scripts run with `python -c`, so that the parent never imports jax)
# ------------------------------------------------------------------------------------------------
_ENV_SCRIPT = r"""
import importlib.metadata as md, importlib.util, json, os, re, shutil, subprocess, sys
out = {"python": sys.version.split()[0]}
for dist in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda13-pjrt", "jax-cuda12-plugin",
             "jax-cuda12-pjrt", "nvidia-cuda-nvcc", "nvidia-cuda-nvcc-cu12", "flax", "optax"):
    try:
        out[dist] = md.version(dist)
    except md.PackageNotFoundError:
        pass
def run(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
ptxas = [shutil.which("ptxas")] + [os.path.join(p, "nvidia", sub, "bin", "ptxas")
         for p in sys.path if p for sub in ("cuda_nvcc", "cu13", "cu12")]
ptxas = [p for p in ptxas if p and os.path.exists(p)]
out["ptxas"] = {p: (re.findall(r"release \S+ V[\d.]+", run([p, "--version"])) or ["?"])[0]
                for p in dict.fromkeys(ptxas)}
smi = run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap",
           "--format=csv,noheader"])
if smi:
    out["nvidia_smi"] = smi.splitlines()
try:
    with open("/proc/driver/nvidia/version") as f:
        out["driver"] = f.readline().strip()
except OSError:
    pass
out["train_modules_missing"] = [m for m in MODULES if importlib.util.find_spec(m.split(".")[0])
                                is None]
import jax
d = jax.devices()
out.update(backend=jax.default_backend(), device_kind=d[0].device_kind, device_count=len(d),
           compute_capability=str(getattr(d[0], "compute_capability", "")),
           core_count=getattr(d[0], "core_count", None))
try:
    from jax._src.lib import cuda_versions
    if cuda_versions is not None:
        out["cuda"] = {k: getattr(cuda_versions, k)() for k in dir(cuda_versions)
                       if k.endswith("_get_version") or k.endswith("_version")}
except Exception as e:
    out["cuda"] = f"unreadable: {type(e).__name__}"
print("ENV_JSON " + json.dumps(out, default=str))
"""

_SAFETY_SCRIPT = r"""
import importlib.util, json, sys
if importlib.util.find_spec("dsv3_jax.ops.safety_net") is None:
    print("SAFETY_JSON " + json.dumps({"missing": True}))
    sys.exit(3)
import dsv3_jax as ds
from dsv3_jax.ops import safety_net
rows, failed = [], False
for preset in PRESETS:
    cfg = ds.get_model_config(preset, fp8=True)  # with its FP8 GEMM classes
    try:
        found = safety_net.check_model_kernels(cfg, use_cache=False)
    except Exception as e:
        found, failed = [], True
        print(f"check_model_kernels({preset}) raised {type(e).__name__}: {e}", flush=True)
    for r in found:
        verdict = "ok" if r["ok"] else f"FAILED: {r['error']}"
        print(f"{preset}: {r['kernel']} [{r['dims']}] {verdict}", flush=True)
    rows += [dict(r, preset=preset) for r in found]
    print("SAFETY_ROWS " + json.dumps(rows, default=str), flush=True)  # kept if killed later
out = {"checks": rows, "verdicts": safety_net.verdicts(),
       "disk_verdicts": safety_net.disk_verdicts()}
print("SAFETY_JSON " + json.dumps(out, default=str))
sys.exit(1 if failed or not all(r["ok"] for r in rows) else 0)
"""


def _env_argv(ctx):
    return [sys.executable, "-c", f"MODULES = {TRAIN_MODULES!r}\n" + _ENV_SCRIPT]


def _env_parse(text, ctx):
    facts = _json_line(text, "ENV_JSON ") or {}
    ctx.env = facts
    keys = ("device_kind", "device_count", "jax", "jaxlib", "jax-cuda13-plugin", "driver")
    return "; ".join(f"{k} {facts[k]}" for k in keys if facts.get(k)), {"facts": facts}


def _safety_argv(ctx):
    presets = ["tiny"] if ctx.dry_run else ["small", "deepseek-v3-671b"]
    return [sys.executable, "-c", f"PRESETS = {presets!r}\n" + _SAFETY_SCRIPT]


def _safety_parse(text, ctx):
    found = _json_line(text, "SAFETY_JSON ")
    if found is None and _json_line(text, "SAFETY_ROWS ") is not None:  # killed after a preset
        found = {"checks": _json_line(text, "SAFETY_ROWS "), "verdicts": None,
                 "disk_verdicts": None}
    if found is None or found.get("missing"):
        return ("dsv3_jax.ops.safety_net is missing in this checkout: no verdicts (update the "
                "checkout)"), {}
    checks = found["checks"]
    bad = [f"{r['preset']}: {r['kernel']} [{r['dims']}]: {r['error']}" for r in checks
           if not r["ok"]]
    summary = f"{len(checks) - len(bad)}/{len(checks)} kernel classes ok" + (
        "; failed: " + " | ".join(bad)[:600] if bad else "")
    return summary, found


def gpu_test_files() -> list[str]:
    """The test modules with gpu-marked tests. Only these are collected: the GPU machine may lack
    modules other test files import at the top (e.g. ml_collections), and a collection error
    would stop the whole run."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                  if "mark.gpu" in p.read_text(errors="replace"))


def _pytest_argv(ctx):
    return [sys.executable, "-m", "pytest", "-m", "gpu", "-v", "-rfEs", "-p", "no:cacheprovider",
            "--continue-on-collection-errors", "--durations=10", *gpu_test_files()]


def _bench_argv(script, gpu_flags):
    def argv(ctx):
        flags = ["--smoke"] if ctx.dry_run else gpu_flags
        return [sys.executable, str(EXPERIMENTS / script), *flags]
    return argv


_TIMING = ["--warmup=2", "--runs=5", "--inner=5"]


def _stdlib() -> pathlib.Path:
    import sysconfig

    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def _scratch_dir() -> pathlib.Path:
    """A fresh folder for the train stage's workdir: in /dev/shm when it has room (the final
    checkpoint of the small config, params and AdamW moments in fp32, is about 12 GB: a save to
    memory instead of disk), else the temp folder."""
    shm = pathlib.Path("/dev/shm")
    room = shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 40e9
    return pathlib.Path(tempfile.mkdtemp(prefix="gpu_check_train.", dir=shm if room else None))


def _small_corpus(folder: pathlib.Path) -> str:
    """A corpus glob of this Python's json and email package sources (about 20 files)."""
    stdlib = _stdlib()
    folder.mkdir(parents=True, exist_ok=True)
    for package in ("json", "email"):
        for f in sorted((stdlib / package).glob("*.py")):
            shutil.copy(f, folder / f"{package}_{f.name}")
    return str(folder / "*.py")


def _train_argv(ctx):
    if ctx.env.get("train_modules_missing"):
        ctx.skip_reason = (f"modules missing: {', '.join(ctx.env['train_modules_missing'])} "
                           "(install them, then rerun with --only=train)")
        return None
    ctx.train_dir = _scratch_dir()
    common = ["--config.train.log_every=1", "--config.train.eval_batches=1",
              "--config.train.eval_every=1000000", "--config.train.checkpoint_every=1000000",
              "--config.train.async_checkpoint=false"]
    if ctx.dry_run:
        corpus = _small_corpus(ctx.train_dir / "corpus")
        return [sys.executable, "-m", "dsv3_jax.train", f"--config={ROOT / 'configs/tiny.py'}",
                f"--workdir={ctx.train_dir / 'run'}", "--config.train.steps=2",
                f"--config.data.corpus={corpus}", "--config.model.vocab_size=512",
                "--config.data.seq_len=64", "--config.data.batch_size=4",
                "--config.data.validation_fraction=0.2", *common]
    return [sys.executable, "-m", "dsv3_jax.train", f"--config={ROOT / 'configs/small.py'}",
            f"--workdir={ctx.train_dir / 'run'}", f"--config.train.steps={ctx.train_steps}",
            # The standard library's top-level modules (about 5 MB, 1.2M tokens): a quicker
            # tokenizer and token store than the whole built-in corpus; 15% of them for
            # validation (5% gives fewer than 32 x 2048 tokens, one eval batch).
            f"--config.data.corpus={_stdlib() / '*.py'}", "--config.data.validation_fraction=0.15",
            "--config.data.tokenizer_train_bytes=2000000", *common]


def _train_parse(text, ctx):
    path = getattr(ctx, "train_dir", None)
    rows = []
    if path is not None and (path / "run" / "metrics.jsonl").exists():
        for line in (path / "run" / "metrics.jsonl").read_text().splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if "loss" in r:
                rows.append({k: r.get(k) for k in ("step", "loss", "grad_norm", "tokens_per_sec",
                                                   "mfu")})
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)  # a small-config checkpoint is gigabytes
    if not rows:
        return "no training rows in metrics.jsonl", {"steps": rows}
    steady = rows[1:] or rows  # step 1's time includes the compile
    tps = sorted(r["tokens_per_sec"] for r in steady)[len(steady) // 2]
    mfus = sorted(r["mfu"] for r in steady if r["mfu"] is not None)
    mfu = f"{mfus[len(mfus) // 2]:.1%}" if mfus else "n/a (no known peak for this device)"
    return (f"{len(rows)} steps, last loss {rows[-1]['loss']:.4f}, median after step 1: "
            f"{tps:,.0f} tokens/s, MFU {mfu}"), {"steps": rows}


STAGES = (
    Stage("env", 15, 120, _env_argv, _env_parse),
    Stage("pytest", 130, 300, _pytest_argv, _pytest_summary),
    Stage("safety_net", 40, 300, _safety_argv, _safety_parse),
    Stage("bench_fp8_gemm", 50, 240, _bench_argv("bench_fp8_gemm.py", _TIMING), _bench_summary),
    Stage("bench_grouped_matmul", 50, 240,
          _bench_argv("bench_grouped_matmul.py", ["--shapes=V3", "--warmup=1", "--runs=3",
                                                  "--inner=3"]), _bench_summary),
    Stage("bench_mla_attention", 35, 240,
          _bench_argv("bench_mla_attention.py", ["--shapes=4096x16,4096x128",
                                                 "--impls=ours,cudnn,tokamax,reference", *_TIMING]),
          _bench_summary),
    Stage("bench_mla_decode", 25, 240,
          _bench_argv("bench_mla_decode.py", ["--grid=64x4096,8x32768",
                                              "--impls=ours,reference,copy", *_TIMING]),
          _bench_summary),
    Stage("train", 95, 300, _train_argv, _train_parse),
    Stage("bench_decode", 40, 240,
          _bench_argv("bench_decode.py", ["--preset=small", "--batch_sizes=1,8",
                                          "--prompt_len=128", "--new_tokens=64"]),
          _bench_summary),
)


# ------------------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------------------
def run_command(argv, limit_s: float, env: dict, prefix: str) -> tuple[int | None, str, float]:
    """Runs argv in its own process group under ROOT, echoing its output lines with `prefix`;
    kills the group at `limit_s`. Returns (exit code or None on a timeout, output, seconds)."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace",
                            start_new_session=True)
    chunks: list[str] = []

    def pump():
        for line in proc.stdout:
            chunks.append(line)
            print(f"{prefix}{line}", end="", flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=limit_s)
    except subprocess.TimeoutExpired:
        rc = None
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the group this call started, nothing else
        except ProcessLookupError:
            pass
        proc.wait()
    reader.join(timeout=5)
    return rc, "".join(chunks), time.perf_counter() - start


class Context:
    """What the stages share: the mode, the env facts (for the train stage's prerequisites)."""

    def __init__(self, dry_run: bool, train_steps: int):
        self.dry_run, self.train_steps = dry_run, train_steps
        self.env: dict = {}
        self.skip_reason = ""


def run_stage(stage: Stage, ctx: Context, limit_s: float, env: dict) -> dict:
    ctx.skip_reason = ""
    argv = stage.argv(ctx)
    record = {"stage": stage.name, "limit_s": round(limit_s, 1)}
    if argv is None:
        return dict(record, status="skipped", seconds=0.0, returncode=None,
                    summary=ctx.skip_reason, tail="")
    print(f"== [{stage.name}] {' '.join(argv[:3])[:120]} ... (limit {limit_s:.0f} s)", flush=True)
    rc, text, seconds = run_command(argv, limit_s, env, f"[{stage.name}] ")
    status = "timeout" if rc is None else "passed" if rc == 0 else "failed"
    try:
        summary, extra = stage.parse(text, ctx) if stage.parse else ("", {})
    except Exception as e:  # noqa: BLE001 - a report that cannot be parsed is still a report
        summary, extra = f"could not parse the output: {type(e).__name__}: {e}", {}
    if rc is None:
        summary = f"killed after {limit_s:.0f} s. " + summary
    elif rc and not summary:
        summary = f"exit {rc}"
    record.update(status=status, seconds=round(seconds, 1), returncode=rc, summary=summary,
                  command=" ".join(argv) if stage.name not in ("env", "safety_net") else
                  f"{argv[0]} -c <{stage.name} script>", tail=text[-TAIL_CHARS:], **extra)
    print(f"== [{stage.name}] {status} in {seconds:.1f} s: {summary}", flush=True)
    return record


def _md_cell(x) -> str:
    return str(x).replace("|", "/").replace("\n", " ")


def markdown(report: dict) -> str:
    env = report.get("env", {})
    mode = "DRY RUN on CPU" if report["dry_run"] else "GPU"
    lines = [f"# GPU check {report['started']} ({mode})",
             "", f"Device: {env.get('device_kind', '?')} x {env.get('device_count', '?')}; jax "
             f"{env.get('jax', '?')}, jaxlib {env.get('jaxlib', '?')}; driver "
             f"{env.get('driver') or env.get('nvidia_smi') or '?'}; ptxas "
             f"{env.get('ptxas') or '?'}",
             "", "| stage | status | seconds | summary |", "|---|---|---|---|"]
    for s in report["stages"]:
        lines.append(f"| {s['stage']} | {s['status']} | {s['seconds']} | "
                     f"{_md_cell(s['summary'])} |")
    for s in report["stages"]:
        extra = []
        for t in s.get("tables", []):
            extra += ["", f"{t['title']}", "", "| " + " | ".join(t["header"]) + " |",
                      "|" + "---|" * len(t["header"])]
            extra += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in t["rows"]]
        if s.get("failed"):
            extra += ["", *[f"- FAILED {f}" for f in s["failed"]]]
        if s.get("checks"):
            extra += ["", "| preset | kernel | dims | ok | error |", "|---|---|---|---|---|"]
            extra += [f"| {r['preset']} | {r['kernel']} | {_md_cell(r['dims'])} | {r['ok']} | "
                      f"{_md_cell(r['error'] or '')} |" for r in s["checks"]]
        if s.get("steps"):
            extra += ["", "| step | loss | tokens/s | MFU |", "|---|---|---|---|"]
            extra += [f"| {r['step']} | {r['loss']:.4f} | {r['tokens_per_sec']:,.0f} | "
                      f"{'-' if r['mfu'] is None else format(r['mfu'], '.2%')} |"
                      for r in s["steps"]]
        if extra:
            lines += ["", f"## {s['stage']}", *extra]
    return "\n".join(lines) + "\n"


def write_report(report: dict, out: pathlib.Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("gpu_check.json", json.dumps(report, indent=1, default=str)),
                       ("gpu_check.md", markdown(report))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 epilog=textwrap.dedent(__doc__.split("\n", 1)[1]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu_check_results", help="folder for the JSON and markdown")
    ap.add_argument("--dry-run", action="store_true", help="CPU, interpret mode, tiny shapes")
    ap.add_argument("--only", default="", help="comma-separated stage names (default: all)")
    ap.add_argument("--budget", type=float, default=None,
                    help=f"overall seconds (default 480 on the GPU, {DRY_BUDGET_S:.0f} with --dry-run)")
    ap.add_argument("--train_steps", type=int, default=4)
    args = ap.parse_args(argv)
    names = [s.name for s in STAGES]
    only = [n for n in args.only.split(",") if n]
    unknown = sorted(set(only) - set(names))
    if unknown:
        ap.error(f"--only: unknown stage(s) {unknown}; stages: {','.join(names)}")
    if args.budget is not None and not args.budget > 0:
        ap.error(f"--budget={args.budget:g}: the overall seconds must be positive (or leave it "
                 "unset for the default)")
    if args.train_steps < 1:
        ap.error(f"--train_steps={args.train_steps}: must be >= 1")
    budget = args.budget or (DRY_BUDGET_S if args.dry_run else 480.0)
    deadline = time.monotonic() + budget
    out = pathlib.Path(args.out)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    if args.dry_run:
        env["JAX_PLATFORMS"] = "cpu"
        # The tests' on-disk compilation cache (tests/conftest.py): a second dry run, or one
        # inside the test suite, skips most CPU compiles.
        env.setdefault("JAX_COMPILATION_CACHE_DIR",
                       str(ROOT / ".pytest_cache" / "jax_compilation_cache"))
        env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    ctx = Context(args.dry_run, args.train_steps)
    report = {"started": datetime.datetime.now().isoformat(timespec="seconds"),
              "dry_run": args.dry_run, "budget_s": budget, "env": {}, "stages": []}
    print(f"gpu_check: {len(only or names)} stage(s), budget {budget:.0f} s, results in {out}/"
          + (" (DRY RUN: CPU, interpret mode)" if args.dry_run else ""), flush=True)
    for stage in STAGES:
        if only and stage.name not in only and stage.name != "env":  # env: the train stage's facts
            report["stages"].append({"stage": stage.name, "status": "skipped", "seconds": 0.0,
                                     "returncode": None, "summary": "not in --only", "tail": ""})
            continue
        left = deadline - time.monotonic()
        limit = min(stage.dry_limit_s if args.dry_run else stage.limit_s, left)
        if limit < 5:
            record = {"stage": stage.name, "status": "skipped", "seconds": 0.0,
                      "returncode": None, "summary": f"out of the --budget of {budget:.0f} s",
                      "tail": ""}
        else:
            record = run_stage(stage, ctx, limit, env)
        report["stages"].append(record)
        report["env"] = ctx.env
        write_report(report, out)
    write_report(report, out)
    ran = [s for s in report["stages"] if s["status"] != "skipped"]
    print(f"\ngpu_check: {sum(s['status'] == 'passed' for s in ran)}/{len(ran)} stages passed; "
          f"{out / 'gpu_check.md'}")
    return 0 if all(s["status"] == "passed" for s in ran) else 1


if __name__ == "__main__":
    sys.exit(main())
