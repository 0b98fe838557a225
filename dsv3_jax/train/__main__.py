"""python -m dsv3_jax.train --config=configs/tiny.py --workdir=runs/tiny [--config.train.steps=N ...]

A thin absl entry point over `dsv3_jax.train.loop.train_and_evaluate`. The config file's
`get_config(arg)` receives what follows a colon (`--config=configs/tiny.py:short`); any setting can be
overridden with `--config.<section>.<key>=value` (unknown keys are refused).
"""

from absl import app, flags, logging
from ml_collections import config_flags

from dsv3_jax.cli import quiet_library_logs

from dsv3_jax.train.loop import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, tokenizer "
                               "and token store; a run resumes from it.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    quiet_library_logs()
    result = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    logging.info("finished at step %d: train %s, eval %s", result["step"], result["train"],
                 result["eval"])
    if not result["train"]:
        print(f"nothing to train: {_WORKDIR.value} is already at step {result['step']} "
              f"(config.train.steps={_CONFIG.value.train.steps}); raise the steps or use a new --workdir.")
    elif result["eval"]:
        print(f"step {result['step']}: eval loss {result['eval']['eval_loss']:.4f}, "
              f"perplexity {result['eval']['eval_perplexity']:.2f}")


if __name__ == "__main__":
    app.run(main)
