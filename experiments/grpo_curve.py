"""What GRPO changed: a GRPO workdir's held-out and training rewards by step, as a table and a PNG.

    PYTHONPATH=. .venv/bin/python experiments/grpo_curve.py --workdir=runs/tiny_rl \
        --png=experiments/figures/grpo_arithmetic.png

Reads <workdir>/metrics.jsonl (what `python -m dsv3_jax.rl` writes). The table has one row per
evaluation: the greedy held-out rewards (eval_reward, weighted; eval_<name> per reward) and the
training rewards of the sampled groups averaged over the steps since the previous evaluation.
The PNG has the held-out rewards (lines) over the training steps' mean sampled reward (dots).
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np


def read_rows(workdir: str) -> tuple[list[dict], list[dict]]:
    """(training rows, evaluation rows) of the workdir's metrics.jsonl, in step order."""
    path = os.path.join(workdir, "metrics.jsonl")
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    train = [r for r in rows if "reward_mean" in r]
    evals = [r for r in rows if "eval_reward" in r]
    return train, evals


def table(train: list[dict], evals: list[dict]) -> str:
    names = sorted(k for k in evals[0] if k.startswith("eval_") and k not in
                   ("eval_reward", "eval_response_length"))
    head = ["step", "eval_reward", *names, "eval_len", "train reward (since last)", "kl"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    previous = -1
    for e in evals:
        window = [r for r in train if previous < r["step"] <= e["step"]]
        reward = f"{np.mean([r['reward_mean'] for r in window]):.3f}" if window else "-"
        kl = f"{np.mean([r['kl'] for r in window]):.4f}" if window else "-"
        cells = [str(e["step"]), f"{e['eval_reward']:.3f}", *(f"{e[n]:.3f}" for n in names),
                 f"{e['eval_response_length']:.1f}", reward, kl]
        lines.append("| " + " | ".join(cells) + " |")
        previous = e["step"]
    return "\n".join(lines)


def plot(train: list[dict], evals: list[dict], path: str, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([r["step"] for r in train], [r["reward_mean"] for r in train], ".", color="0.7",
            markersize=3, label="sampled groups' mean reward (training)")
    steps = [e["step"] for e in evals]
    for key in sorted(k for k in evals[0] if k.startswith("eval_") and k != "eval_response_length"):
        ax.plot(steps, [e[key] for e in evals], "-o", markersize=3, label=f"held-out {key[5:]}")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("reward")
    ax.set_ylim(-0.02, 1.1)
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="a python -m dsv3_jax.rl workdir")
    parser.add_argument("--png", default="", help="where to write the curve (PNG); '' skips it")
    parser.add_argument("--title", default="GRPO on the arithmetic task (tiny model, CPU)")
    args = parser.parse_args()
    try:
        train, evals = read_rows(args.workdir)
    except OSError as e:
        raise SystemExit(f"error: {args.workdir} has no readable metrics.jsonl ({e.strerror}); "
                         "give a python -m dsv3_jax.rl workdir.")
    if not evals:
        raise SystemExit(f"error: {args.workdir}/metrics.jsonl holds no evaluation rows; run with "
                         "config.rl.eval_prompts > 0.")
    print(table(train, evals))
    if args.png:
        plot(train, evals, args.png, args.title)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
