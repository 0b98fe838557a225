"""python experiments/moe_capacity.py [--factors=0,1,1.25,1.5] [--steps=300] [--mesh=expert=8]

How many token-expert pairs the bounded expert-parallel exchange drops while the aux-loss-free
bias balancing settles: the tiny model (`configs/tiny.py`, 8 experts, top-2) trained on 8
simulated CPU devices once per capacity factor (0 = dropless, the baseline), on the built-in
corpus, reading `moe_dropped_fraction` from each run's metrics.jsonl. Prints one row per factor:
the dropped share (mean over routers) over the first tenth of the steps, over the last 100 steps
(mean and worst logged step), the final training loss and tokens/s. Rows are logged every 5
steps (every step in runs under 50 steps). The default `ModelConfig.moe_capacity_factor` is
chosen from this table (experiments/RESULTS.md).
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()

import json  # noqa: E402
import pathlib  # noqa: E402
import tempfile  # noqa: E402

from absl import app, flags, logging  # noqa: E402
import numpy as np  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

_FACTORS = flags.DEFINE_list("factors", ["0", "1", "1.25", "1.5"], "Capacity factors to run "
                             "(0: dropless).")
_STEPS = flags.DEFINE_integer("steps", 300, "Training steps per run.")
_MESH = flags.DEFINE_string("mesh", "expert=8", "Mesh sizes over the 8 devices, e.g. "
                            "'data=2,expert=4'.")
_GAMMA = flags.DEFINE_float("bias_gamma", -1.0, "config.train.bias_gamma of the runs (-1: "
                            "configs/tiny.py's, the report's 0.001).")
_WORKDIR = flags.DEFINE_string("workdir", "", "Where the runs write (default: a temporary "
                               "directory, removed afterwards).")


def _rows(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "moe_dropped_fraction" in r]


def summarize(rows: list[dict], steps: int) -> dict:
    """The dropped share (mean over routers) over the first tenth of the steps (at least the first
    logged row) and the last 100 (mean, worst), the last loss, the median tokens/s."""
    step = np.array([r["step"] for r in rows])
    dropped = np.array([np.mean(r["moe_dropped_fraction"]) for r in rows])
    early, late = step <= max(steps // 10, step[0]), step > steps - 100
    speeds = [r["tokens_per_sec"] for r in rows[1:]] or [rows[0]["tokens_per_sec"]]
    return {"early": float(dropped[early].mean()), "late": float(dropped[late].mean()),
            "late_max": float(dropped[late].max()), "loss": rows[-1]["loss"],
            "tokens_per_sec": float(np.median(speeds))}


def _configs(factors: list[float]) -> list:
    """One run config per capacity factor, each checked as a run would check it."""
    import ml_collections

    from configs import tiny
    from dsv3_jax.parallel.mesh import parse_mesh_sizes
    from dsv3_jax.train.run_config import check_run_config, model_config

    mesh = ml_collections.ConfigDict(parse_mesh_sizes(_MESH.value))
    configs = []
    for factor in factors:
        config = tiny.get_config()
        config.model.moe_capacity_factor = factor
        config.train.steps = _STEPS.value
        if _GAMMA.value >= 0:
            config.train.bias_gamma = _GAMMA.value
        config.train.eval_batches = 0
        config.train.checkpoint_every = _STEPS.value
        config.train.log_every = max(1, min(5, _STEPS.value // 10))
        config.mesh = mesh
        check_run_config(config)
        model_config(config)  # refuses a bad moe_capacity_factor
        configs.append(config)
    return configs


def main(argv):
    del argv
    import shutil

    from dsv3_jax.train.loop import train_and_evaluate

    # Every setting is checked before the first run: a mistake ends in one line, not a traceback.
    try:
        factors = [float(f) for f in _FACTORS.value]
        configs = _configs(factors)
    except ValueError as e:
        raise SystemExit(f"moe_capacity.py: {e}") from None
    root = _WORKDIR.value or tempfile.mkdtemp(prefix="moe_capacity_")
    tokenizer, results = "", {}
    for factor, config in zip(factors, configs):
        config.data.tokenizer = tokenizer  # the first run trains it, the others reuse it
        workdir = os.path.join(root, f"factor_{factor:g}")
        logging.info("capacity factor %g -> %s", factor, workdir)
        train_and_evaluate(config, workdir)
        tokenizer = tokenizer or str(next(pathlib.Path(workdir).rglob("*.model")))
        results[factor] = summarize(_rows(workdir), _STEPS.value)
    if not _WORKDIR.value:
        shutil.rmtree(root)  # the temporary runs; the table below is what they were for
    gamma = configs[0].train.bias_gamma
    print(f"\ntiny model, {_STEPS.value} steps, bias_gamma {gamma:g}, 8 simulated CPU devices, "
          f"mesh {_MESH.value}; moe_dropped_fraction as % of token-expert pairs (mean over "
          "routers)\n")
    print("| capacity factor | steps 1-%d | last 100 steps, mean | last 100 steps, worst | "
          "final loss | tokens/s |" % max(_STEPS.value // 10, 1))
    print("|---|---|---|---|---|---|")
    for factor, r in results.items():
        print(f"| {'0 (dropless)' if factor == 0 else f'{factor:g}'} | {100 * r['early']:.2f} | "
              f"{100 * r['late']:.3f} | {100 * r['late_max']:.3f} | {r['loss']:.4f} | "
              f"{r['tokens_per_sec']:,.0f} |")


if __name__ == "__main__":
    app.run(main)
