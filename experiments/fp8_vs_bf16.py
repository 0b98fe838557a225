"""FP8 against BF16 training: the same run twice, `config.model.fp8` off then on.

  python experiments/fp8_vs_bf16.py --config=configs/small.py --steps=2000 --workdir=runs/fp8_vs_bf16
  python experiments/fp8_vs_bf16.py --smoke            # CPU: the tiny config, a few steps

Both runs go through `train_and_evaluate` with the same seed, data order and tokenizer (the FP8 run
reuses the one the BF16 run trained), in `<workdir>/bf16` and `<workdir>/fp8` (an existing workdir
resumes). With fp8 on, every `Linear` (MLA projections, dense MLPs, shared experts, MTP eh_proj)
and the routed experts run their Fprop, Dgrad and Wgrad GEMMs in FP8 (dsv3_jax/ops/fp8.py); the
embedding, output head, router, norms and attention core stay as they are.

Printed: a Markdown table with each run's final training cross-entropy (next-token CE, the mean
over the last 10% of the logged steps, and the last logged value), final eval loss and throughput,
the relative gap (fp8 - bf16) / bf16, and both loss curves at a few steps. The DeepSeek-V3 report's
bar for the relative gap of the training loss is 0.25% (at its scale: larger, longer runs).
Any override: `--set train.lr=1e-3 --set data.batch_size=8` (section.key=value).
"""

from __future__ import annotations

import argparse
import ast
import datetime
import importlib.util
import json
import math
import os
import pathlib
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent

# --smoke: the tiny model, a 512-piece vocabulary trained on 2 MB of the built-in corpus, 4 x 64
# tokens per step.
SMOKE = {"model.vocab_size": 512, "data.seq_len": 64, "data.batch_size": 4,
         "data.tokenizer_train_bytes": 2_000_000, "data.validation_fraction": 0.05,
         "train.lr": 3e-3, "train.warmup_steps": 2, "train.log_every": 1, "train.eval_every": 1000,
         "train.eval_batches": 1, "train.checkpoint_every": 1000, "train.async_checkpoint": False}


def load_config(spec: str):
    """configs/<file>.py[:arg] -> its get_config(arg)."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("run_config_file", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg)


def _parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(config, overrides: dict) -> None:
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        if section not in config or not name:
            raise ValueError(f"--set {key}=...: use section.key with a section of "
                             f"{list(config.keys())}.")
        config[section][name] = _parse_value(value) if isinstance(value, str) else value


def read_metrics(workdir: str) -> tuple[list, list, list]:
    """metrics.jsonl -> ([(step, train CE)], [(step, eval loss)], [tokens/s]).

    The training curve is the main next-token cross-entropy `ce` (the total `loss` adds the MTP and
    balance terms), so that it compares with the eval loss.
    """
    train, evals, tps = [], [], []
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if "loss" in row:
                train.append((row["step"], row.get("ce", row["loss"])))
                if row.get("tokens_per_sec"):
                    tps.append(row["tokens_per_sec"])
            if "eval_loss" in row:
                evals.append((row["step"], row["eval_loss"]))
    return train, evals, tps


def summarize(train, evals, tps) -> dict:
    window = max(1, len(train) // 10)
    tail = [loss for _, loss in train[-window:]]
    return {"steps": train[-1][0] if train else 0,
            "train_tail": sum(tail) / len(tail) if tail else float("nan"),
            "train_last": train[-1][1] if train else float("nan"),
            "eval_last": evals[-1][1] if evals else float("nan"),
            "tokens_per_sec": sorted(tps)[len(tps) // 2] if tps else float("nan"),
            "window": window}


def _gap(a: float, b: float) -> str:
    return "-" if not (math.isfinite(a) and math.isfinite(b) and b) else f"{100 * (a - b) / b:+.3f}%"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny.py"), help="file.py[:arg]")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: the config's)")
    ap.add_argument("--workdir", default="", help="default: a new temporary directory")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--smoke", action="store_true", help="tiny config, 4 steps, CPU")
    args = ap.parse_args(argv)

    import jax

    from dsv3_jax.train.loop import train_and_evaluate

    overrides = dict(SMOKE) if args.smoke else {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected SECTION.KEY=VALUE")
        overrides[key] = value
    steps = args.steps or (4 if args.smoke else None)
    workdir = args.workdir or tempfile.mkdtemp(prefix="fp8_vs_bf16_")

    results = {}
    tokenizer = None
    for name, use_fp8 in (("bf16", False), ("fp8", True)):
        config = load_config(args.config)
        apply_overrides(config, overrides)
        if steps:
            config.train.steps = steps
        config.model.fp8 = use_fp8
        if tokenizer and not config.data.tokenizer:
            config.data.tokenizer = tokenizer  # the same pieces for both runs
        run_dir = os.path.join(workdir, name)
        print(f"--- {name}: {run_dir}", flush=True)
        train_and_evaluate(config, run_dir)
        tokenizer = tokenizer or os.path.join(run_dir, "tokenizer.model")
        results[name] = read_metrics(run_dir)

    bf16, fp8 = summarize(*results["bf16"]), summarize(*results["fp8"])
    device = jax.devices()[0]
    print(f"\nFP8 vs BF16 training: {args.config}, {bf16['steps']} steps, {len(jax.devices())} x "
          f"{device.device_kind}; {datetime.date.today().isoformat()}; jax {jax.__version__}"
          + ("; SMOKE" if args.smoke else "") + "\n")
    print(f"| run | train CE (mean of last {bf16['window']} logged) | last train CE | "
          "last eval loss | tokens/s (median) |")
    print("|---|---|---|---|---|")
    for name, s in (("bf16", bf16), ("fp8", fp8)):
        print(f"| {name} | {s['train_tail']:.4f} | {s['train_last']:.4f} | {s['eval_last']:.4f} | "
              f"{s['tokens_per_sec']:.0f} |")
    print(f"| gap (fp8 - bf16) / bf16 | {_gap(fp8['train_tail'], bf16['train_tail'])} | "
          f"{_gap(fp8['train_last'], bf16['train_last'])} | "
          f"{_gap(fp8['eval_last'], bf16['eval_last'])} | "
          f"{_gap(fp8['tokens_per_sec'], bf16['tokens_per_sec'])} |")

    curve_b, curve_f = dict(results["bf16"][0]), dict(results["fp8"][0])
    common = sorted(set(curve_b) & set(curve_f))
    picks = sorted({common[min(len(common) - 1, round(i * (len(common) - 1) / 9))]
                    for i in range(10)}) if common else []
    print("\n| step | bf16 train CE | fp8 train CE | gap |\n|---|---|---|---|")
    for step in picks:
        print(f"| {step} | {curve_b[step]:.4f} | {curve_f[step]:.4f} | "
              f"{_gap(curve_f[step], curve_b[step])} |")
    finite = all(math.isfinite(s["train_last"]) for s in (bf16, fp8))
    if not finite:
        print("non-finite loss", file=sys.stderr)
    return 0 if finite else 1


if __name__ == "__main__":
    sys.exit(main())
