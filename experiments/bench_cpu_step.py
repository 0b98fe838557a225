"""CPU speed of the whole model: ours (JAX) against transformers' PyTorch DeepseekV3, same weights.

  python experiments/bench_cpu_step.py --setup_torch      # once: .bench-venv with torch (below)
  python experiments/bench_cpu_step.py                    # all: 2 configs x 3 work x 2 dtypes
  python experiments/bench_cpu_step.py --configs=mid --work=train --dtypes=bf16 --rounds=3
  python experiments/bench_cpu_step.py --smoke            # ours only, tiny, fp32: does it run?

Models: "tiny" is the tiny preset; "mid" is the tiny preset at dim 512, 4 layers (1 dense), 8
heads, dense FFN 1536, 16 routed experts of width 256 (top-4; 8 groups, 4 kept), q_lora_rank 192,
kv_lora_rank 128: 32.6M parameters. Both with mtp_depth=0: transformers has no MTP module, so
both sides do the same work. Seeded random weights (the init's shapes and scale) are exported
with save_hf_checkpoint to a temporary folder and loaded by DeepseekV3ForCausalLM.from_pretrained
(float32, eager attention); a sanity line gives the largest difference of the two models'
float32 logits on one batch.

Work (tokens/s = the tokens of one call / its seconds):
  train    ours: the training loop's own jitted step (loop.TrainSteps: chunked cross-entropy and
           balance loss, gradients, AdamW with clipping at 1.0, the router-bias update); theirs:
           model(input_ids, labels=input_ids) (forward + cross-entropy) + backward +
           clip_grad_norm_ + torch.optim.AdamW step, eager. Batch x seq tokens: 8x128, and 16x256
           too for mid in bf16.
  prefill  a forward over 4x256 prompt tokens giving all logits: ours the jitted model.apply,
           theirs model(input_ids) under torch.no_grad().
  decode   greedy, batch 8, prompt 32, 64 new tokens: ours generate_tokens (latent cache), theirs
           model.generate(do_sample=False) with its cache; 8 x 64 tokens / the whole call's
           seconds (prefill included on both sides).
dtypes: fp32 computes in float32; bf16 is ours with ModelConfig.dtype="bfloat16" (param_dtype
float32) and theirs under torch.autocast("cpu", dtype=torch.bfloat16) over float32 weights: the
same mixed precision, float32 master weights and optimizer state on both sides.

Timing: a warm-up round (compiles ours, warms theirs, and sets each side's calls per sample so that
a sample takes at least --min_seconds), then --rounds rounds, each timing every work item ours
then theirs, so a drift in the machine's load hits both. The table gives the medians of rounds.
Host memory: the script first restarts itself with glibc's malloc preferring transparent huge pages
(dsv3_jax/host_memory.py; DSV3_HUGE_PAGES=0 turns that off), and the torch worker inherits that
environment, so both sides run with the same allocator settings; the header prints them.

The torch side runs in experiments/bench_cpu_step_torch.py, a worker subprocess speaking
line-delimited JSON (torch is never imported here), under --torch_python (default
.bench-venv/bin/python under the repository root). --setup_torch makes that venv with
--setup_python (default: this interpreter) and installs torch==2.13.0 (the CPU wheel from the
PyTorch index when it answers, else from the default index, where Linux wheels are the CUDA build
with large dependencies; pip's find-links may hold a CPU wheel for some Python, which is what
--setup_python is for), transformers==5.23.0, safetensors and accelerate. Without a torch Python
at the default place the script says how to get one and times ours only; --ours_only skips torch
on purpose; a --torch_python given but missing is an error (exit 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import pathlib
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import jax
import jax.numpy as jnp
import numpy as np

import dsv3_jax as ds
from dsv3_jax import host_memory
from dsv3_jax.infer.generate import generate_tokens
from dsv3_jax.model import tree
from dsv3_jax.model.transformer import DeepSeekV3

SCRIPT = "bench_cpu_step"
ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKER = pathlib.Path(__file__).with_name("bench_cpu_step_torch.py")
DEFAULT_VENV = ROOT / ".bench-venv"
TORCH_PINS = ("torch==2.13.0",)
HF_PINS = ("transformers==5.23.0", "safetensors", "accelerate")
CPU_INDEX = "https://download.pytorch.org/whl/cpu"

CONFIGS = {
    "tiny": dict(mtp_depth=0),
    "mid": dict(mtp_depth=0, dim=512, n_layers=4, n_heads=8, inter_dim=1536, moe_inter_dim=256,
                n_routed_experts=16, n_activated_experts=4, n_expert_groups=8,
                n_limited_groups=4, q_lora_rank=192, kv_lora_rank=128),
}
WORKS = ("train", "prefill", "decode")
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


class UsageError(Exception):
    """Bad input: one line on stderr, exit 2."""


class WorkerError(Exception):
    """The transformers worker failed: one line on stderr (and its log's tail), exit 1."""


@dataclasses.dataclass(frozen=True)
class Item:
    """One work item: `batch` sequences of `seq` tokens (decode: prompts, plus new_tokens)."""
    work: str
    config: str
    dtype: str
    batch: int
    seq: int
    new_tokens: int = 0

    @property
    def key(self) -> str:
        return f"{self.work}:{self.config}:{self.dtype}:{self.shape}"

    @property
    def shape(self) -> str:
        if self.work == "decode":
            return f"{self.batch} x ({self.seq}+{self.new_tokens})"
        return f"{self.batch}x{self.seq}"

    @property
    def tokens(self) -> int:
        return self.batch * (self.new_tokens if self.work == "decode" else self.seq)


def work_items(configs, works, dtypes, smoke: bool) -> list[Item]:
    """The items in table order (work, config, dtype); --smoke shrinks every shape."""
    items = []
    for work in works:
        for config in configs:
            for dtype in dtypes:
                if smoke:
                    shapes = [(2, 16, 2)] if work == "decode" else [(2, 16, 0)]
                elif work == "train":
                    shapes = [(8, 128, 0)] + ([(16, 256, 0)] if (config, dtype) == ("mid", "bf16")
                                              else [])
                elif work == "prefill":
                    shapes = [(4, 256, 0)]
                else:
                    shapes = [(8, 32, 64)]
                items += [Item(work, config, dtype, *s) for s in shapes]
    return items


def model_config(name: str, dtype: str) -> ds.ModelConfig:
    return ds.get_model_config("tiny", dtype=DTYPES[dtype], **CONFIGS[name])


def _tokens(vocab: int, shape, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, vocab, shape).astype(np.int32)


# ------------------------------------------------------------------------------------- ours
class Ours:
    """dsv3_jax's side: the params of each config (seeded init) and the prepared work."""

    def __init__(self, seed: int):
        self.seed, self.params, self.works = seed, {}, {}

    def params_of(self, name: str):
        """Random float32 params of config `name`, seeded: normal(0, init_std) matrices, norm
        weights 1, router biases 0 (the model's own init, without compiling it)."""
        if name not in self.params:
            cfg = model_config(name, "fp32")
            rng = np.random.default_rng(self.seed)

            def draw(path, leaf):
                key = jax.tree_util.keystr(path)
                if key.endswith("['weight']"):
                    return np.ones(leaf.shape, leaf.dtype)
                if tree.ROUTER_BIAS in key:
                    return np.zeros(leaf.shape, leaf.dtype)
                return (cfg.init_std * rng.standard_normal(leaf.shape)).astype(leaf.dtype)

            self.params[name] = jax.device_put(
                jax.tree_util.tree_map_with_path(draw, tree.abstract_params(cfg)))
        return self.params[name]

    def logits(self, name: str, tokens: np.ndarray) -> np.ndarray:
        cfg = model_config(name, "fp32")
        fwd = jax.jit(lambda p, t: DeepSeekV3(cfg).apply({"params": p}, t))
        return np.asarray(fwd(self.params_of(name), jnp.asarray(tokens)))

    def prepare(self, item: Item) -> float:
        """Builds the item's call and runs it once (compiling it): its seconds."""
        cfg, params = model_config(item.config, item.dtype), self.params_of(item.config)
        tokens = _tokens(cfg.vocab_size, (item.batch, item.seq), self.seed + 1)
        if item.work == "train":
            run = _train_call(cfg, params, tokens, self.seed)
        elif item.work == "prefill":
            fwd = jax.jit(lambda p, t: DeepSeekV3(cfg).apply({"params": p}, t))
            tokens = jnp.asarray(tokens)
            run = lambda: jax.block_until_ready(fwd(params, tokens))
        else:
            prompts = tokens.tolist()

            def run():
                out = generate_tokens(cfg, params, prompts, max_new_tokens=item.new_tokens)
                if out.stats["new_tokens"] != item.tokens:
                    raise RuntimeError(f"generate_tokens made {out.stats['new_tokens']} tokens, "
                                       f"not {item.tokens}")
        self.works[item.key] = run
        start = time.perf_counter()
        run()
        return time.perf_counter() - start

    def time(self, key: str, reps: int) -> float:
        run = self.works[key]
        start = time.perf_counter()
        for _ in range(reps):
            run()
        return (time.perf_counter() - start) / reps


def _train_call(cfg: ds.ModelConfig, params, tokens: np.ndarray, seed: int):
    """One call of the run's own compiled train step (loop.TrainSteps on a one-device mesh, its
    state donated and carried over) on the fixed batch `tokens` [B, T] (one document a row)."""
    from dsv3_jax.parallel import mesh as mesh_lib
    from dsv3_jax.train import loop
    from dsv3_jax.train.run_config import base_config

    config = base_config("tiny")
    preset = ds.get_model_config("tiny").to_dict()
    for field, value in cfg.to_dict().items():
        if value != preset[field]:
            config.model[field] = value
    config.data.batch_size, config.data.seq_len = tokens.shape
    config.train.seed = seed
    mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:1])
    steps = loop.TrainSteps(config, mesh)
    with jax.set_mesh(mesh):
        step = steps.lower_train_step().compile()
    state = loop.TrainState(step=jnp.zeros([], jnp.int32), params=jax.tree.map(jnp.copy, params),
                            opt_state=steps.tx.init(params),
                            rng=jax.random.key_data(jax.random.key(seed)))
    state = [jax.device_put(state, steps.state_shardings)]
    b, t = tokens.shape
    batch = jax.device_put(
        {"tokens": tokens, "segment_ids": np.ones((b, t), np.int32),
         "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()},
        mesh_lib.batch_sharding(mesh))

    def run():
        state[0], metrics = step(state[0], batch)
        jax.block_until_ready((state[0], metrics["loss"]))

    return run


# ------------------------------------------------------------------------------------- theirs
class Theirs:
    """The transformers worker subprocess (bench_cpu_step_torch.py), one JSON line each way."""

    def __init__(self, python: str, workdir: str):
        self.log_path = os.path.join(workdir, "torch_worker.log")
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen([python, str(WORKER)], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=log, text=True,
                                         bufsize=1, env=env, cwd=workdir)

    def ask(self, cmd: str, **fields) -> dict:
        try:
            self.proc.stdin.write(json.dumps(dict(cmd=cmd, **fields)) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        if not line:
            raise WorkerError(f"the transformers worker exited during {cmd!r}{self._tail()}")
        reply = json.loads(line)
        if "error" in reply:
            raise WorkerError(f"transformers worker, {cmd!r}: {reply['error']}")
        return reply

    def _tail(self) -> str:
        try:
            lines = pathlib.Path(self.log_path).read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return f"; its stderr ended: {lines[-1]}" if lines else ""

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


# ------------------------------------------------------------------------------------- setup
def _reachable(url: str, timeout: float = 5.0) -> bool:
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout)
        return True
    except OSError:
        return False


def setup_torch(venv: pathlib.Path, python: str) -> int:
    """Makes `venv` with `python` and installs the torch side's packages (pip's output shown)."""
    if shutil.which(python) is None:
        raise UsageError(f"{SCRIPT}: --setup_python={python!r} is not an executable")
    target = venv / "bin" / "python"
    if not target.exists() and subprocess.run([python, "-m", "venv", str(venv)]).returncode:
        print(f"{SCRIPT}: could not create the venv {venv}", file=sys.stderr)
        return 1
    pip = [str(target), "-m", "pip", "install"]
    ok = False
    if _reachable(CPU_INDEX + "/"):
        print(f"# {SCRIPT}: torch from the PyTorch CPU index", flush=True)
        ok = subprocess.run(pip + ["--index-url", CPU_INDEX, *TORCH_PINS]).returncode == 0
    if not ok:
        print(f"# {SCRIPT}: torch from the default index (the PyTorch CPU index did not answer "
              "or failed; on Linux this may be the CUDA build, large)", flush=True)
        ok = subprocess.run(pip + list(TORCH_PINS)).returncode == 0
    if not ok or subprocess.run(pip + list(HF_PINS)).returncode:
        print(f"{SCRIPT}: pip failed (its output is above)", file=sys.stderr)
        return 1
    print(f"# {SCRIPT}: ready; the benchmark uses {target}")
    return 0


# ------------------------------------------------------------------------------------- report
def _pick(text: str, valid, flag: str) -> list[str]:
    wanted = [v for v in text.split(",") if v]
    unknown = [v for v in wanted if v not in valid]
    if unknown or not wanted:
        raise UsageError(f"{SCRIPT}: {flag}={text!r}: unknown {unknown or 'empty'}; use some of "
                         f"{','.join(valid)}")
    return [v for v in valid if v in wanted]


def _cpu_name() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _machine() -> str:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = "/".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{_cpu_name()}, {os.cpu_count()} cores ({usable} usable), load average {load}"


def _table(items: list[Item], samples: dict, with_torch: bool) -> list[str]:
    rows = ["| work | config | dtype | shape | ours tok/s | transformers tok/s | ours/theirs |",
            "|---|---|---|---|---|---|---|"]
    for item in items:
        ours = item.tokens / statistics.median(samples[item.key]["ours"])
        theirs = (item.tokens / statistics.median(samples[item.key]["theirs"])
                  if with_torch else math.nan)
        ratio = "-" if theirs != theirs else f"{ours / theirs:.2f}x"
        theirs = "-" if theirs != theirs else f"{theirs:,.0f}"
        rows.append(f"| {item.work} | {item.config} | {item.dtype} | {item.shape} | {ours:,.0f} "
                    f"| {theirs} | {ratio} |")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="tiny,mid", help="some of " + ",".join(CONFIGS))
    ap.add_argument("--work", default="train,prefill,decode", help="some of " + ",".join(WORKS))
    ap.add_argument("--dtypes", default="", help="some of " + ",".join(DTYPES)
                    + " (default: both; fp32 with --smoke)")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds (medians are reported)")
    ap.add_argument("--min_seconds", type=float, default=1.0,
                    help="calls per sample are chosen so that a sample takes at least this")
    ap.add_argument("--torch_python", default="", help="a Python with torch and transformers "
                    "(default: .bench-venv/bin/python under the repository root)")
    ap.add_argument("--ours_only", action="store_true", help="time dsv3_jax only, no torch")
    ap.add_argument("--setup_torch", action="store_true",
                    help="create .bench-venv with torch + transformers, then exit")
    ap.add_argument("--setup_python", default=sys.executable,
                    help="the interpreter --setup_torch makes the venv with")
    ap.add_argument("--smoke", action="store_true",
                    help="ours only: tiny model, 2x16 tokens, 2 new tokens, fp32 unless "
                    "--dtypes says otherwise, one round: the script works")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        return _run(args)
    except UsageError as e:
        print(e, file=sys.stderr)
        return 2
    except WorkerError as e:
        print(f"{SCRIPT}: {e}", file=sys.stderr)
        return 1


def _run(args) -> int:
    if args.setup_torch:
        return setup_torch(DEFAULT_VENV, args.setup_python)
    configs = _pick(args.configs, tuple(CONFIGS), "--configs")
    works = _pick(args.work, WORKS, "--work")
    dtypes = _pick(args.dtypes or ("fp32" if args.smoke else ",".join(DTYPES)), tuple(DTYPES),
                   "--dtypes")
    if args.rounds < 1:
        raise UsageError(f"{SCRIPT}: --rounds={args.rounds}; use a positive number of rounds")
    if not args.min_seconds >= 0:
        raise UsageError(f"{SCRIPT}: --min_seconds={args.min_seconds}; use a number >= 0")
    if args.smoke:
        configs, args.rounds, args.min_seconds = ["tiny"], 1, 0.0
    torch_python = None
    if not (args.smoke or args.ours_only):
        if args.torch_python:
            if shutil.which(args.torch_python) is None:
                raise UsageError(f"{SCRIPT}: --torch_python={args.torch_python!r} is not an "
                                 "executable; make one with --setup_torch or pass --ours_only")
            torch_python = args.torch_python
        elif (DEFAULT_VENV / "bin" / "python").exists():
            torch_python = str(DEFAULT_VENV / "bin" / "python")
        else:
            print(f"# {SCRIPT}: no torch Python at .bench-venv/bin/python (make it with "
                  "--setup_torch, or pass --torch_python=...): timing ours only", flush=True)
    items = work_items(configs, works, dtypes, args.smoke)
    with tempfile.TemporaryDirectory(prefix=f"{SCRIPT}_") as workdir:
        theirs = Theirs(torch_python, workdir) if torch_python else None
        try:
            return _bench(args, items, configs, Ours(args.seed), theirs, workdir)
        finally:
            if theirs is not None:
                theirs.close()


def _bench(args, items: list[Item], configs: list[str], ours: Ours, theirs: Theirs | None,
           workdir: str) -> int:
    start_machine, began = _machine(), time.perf_counter()
    versions = f"jax {jax.__version__}"
    sanity = []
    if theirs is not None:
        hello = theirs.ask("hello")
        versions += (f", torch {hello['torch']} ({hello['threads']} threads), transformers "
                     f"{hello['transformers']}")
        for name in configs:
            cfg = model_config(name, "fp32")
            path = ds.save_hf_checkpoint(os.path.join(workdir, name), cfg, ours.params_of(name))
            theirs.ask("load", name=name, path=path)
            tokens = _tokens(cfg.vocab_size, (2, 32), args.seed + 2)
            np.save(os.path.join(workdir, "tokens.npy"), tokens)
            out = os.path.join(workdir, "logits.npy")
            theirs.ask("logits", name=name, tokens=os.path.join(workdir, "tokens.npy"), out=out)
            mine, hf = ours.logits(name, tokens), np.load(out)
            sanity.append(f"{name} fp32 logits [2, 32, {cfg.vocab_size}]: max |ours - "
                          f"transformers| = {np.abs(mine - hf).max():.2e} (max |logit| "
                          f"{np.abs(hf).max():.2e})")

    # ---- warm-up round: compile / warm, then one call each to set calls per sample
    reps = {}
    for item in items:
        print(f"# warm-up: {item.key} ({time.perf_counter() - began:.0f} s)", file=sys.stderr,
              flush=True)
        ours.prepare(item)
        t = ours.time(item.key, 1)
        reps[item.key] = {"ours": max(1, math.ceil(args.min_seconds / t))}
        if theirs is not None:
            t = theirs.ask("prepare", key=item.key, name=item.config, work=item.work,
                           dtype=item.dtype, batch=item.batch, seq=item.seq,
                           new_tokens=item.new_tokens, seed=args.seed + 1)["seconds"]
            if t < 4 * args.min_seconds:  # else one call per sample anyway
                t = theirs.ask("time", key=item.key, reps=1)["seconds"]
            reps[item.key]["theirs"] = max(1, math.ceil(args.min_seconds / t))

    # ---- timed rounds: every item, ours then theirs
    samples = {item.key: {"ours": [], "theirs": []} for item in items}
    for r in range(args.rounds):
        print(f"# round {r + 1}/{args.rounds} ({time.perf_counter() - began:.0f} s)",
              file=sys.stderr, flush=True)
        for item in items:
            samples[item.key]["ours"].append(ours.time(item.key, reps[item.key]["ours"]))
            if theirs is not None:
                samples[item.key]["theirs"].append(
                    theirs.ask("time", key=item.key, reps=reps[item.key]["theirs"])["seconds"])

    print(f"# {SCRIPT}: ours (dsv3_jax) vs transformers DeepseekV3 on the same weights, CPU")
    print(f"# machine: {start_machine} at start; load average "
          f"{'/'.join(f'{x:.2f}' for x in os.getloadavg())} at end")
    print(f"# {datetime.datetime.now().isoformat(timespec='minutes')}; python "
          f"{platform.python_version()}, {versions}; device {jax.devices()[0].device_kind}")
    print(f"# host malloc: GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}, "
          f"transparent huge pages {host_memory.thp_mode()} (dsv3_jax/host_memory.py)")
    print(f"# median of {args.rounds} round(s) after a warm-up round; calls per sample chosen for "
          f">= {args.min_seconds:g} s" + ("; SMOKE: tiny shapes, times meaningless"
                                           if args.smoke else ""))
    for line in sanity:
        print(f"# sanity: {line}")
    print("\n".join(_table(items, samples, theirs is not None)), flush=True)
    return 0


if __name__ == "__main__":
    host_memory.prefer_huge_pages()  # both sides: the torch worker inherits the environment
    sys.exit(main())
