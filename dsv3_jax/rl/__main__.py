"""python -m dsv3_jax.rl --config=configs/grpo.py --workdir=runs/tiny_rl \
    --config.train.init_from=<SFT workdir | Orbax folder | HF folder> [--config.rl.x=...]

A thin absl entry point over `dsv3_jax.rl.loop.train_grpo` (GRPO with verifiable rewards; the
settings are config.rl's, dsv3_jax/rl/config.py). A workdir with checkpoints resumes its run.
"""

from absl import flags, logging
from ml_collections import config_flags

from dsv3_jax import cli
from dsv3_jax.rl.loop import train_grpo

_CONFIG = config_flags.DEFINE_config_file("config", None, "GRPO run config (configs/grpo.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the "
                               "tokenizer; a run resumes from it.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments {argv[1:]}; every setting is a flag "
                             "(--config.<section>.<key>=value).")
    if not _WORKDIR.value.strip():
        raise cli.UsageError("--workdir is empty; pass the directory the run writes to (and "
                             "resumes from), e.g. --workdir=runs/tiny_rl.")
    if "rl" not in _CONFIG.value:
        raise cli.UsageError("--config has no config.rl section: give a GRPO config "
                             "(configs/grpo.py, built on dsv3_jax.rl.config.grpo_base_config).")
    result = train_grpo(_CONFIG.value, _WORKDIR.value)
    logging.info("finished at step %d: train %s, eval %s", result["step"], result["train"],
                 result["eval"])
    if not result["train"]:
        print(f"nothing to do: {_WORKDIR.value} is already at step {result['step']} "
              f"(config.train.steps={_CONFIG.value.train.steps}); raise the steps or use a new "
              "--workdir.")
        return
    line = f"step {result['step']}: reward {result['train']['reward_mean']:.3f}"
    if result["eval"]:
        line += f", held-out reward {result['eval']['eval_reward']:.3f}"
    print(line)


if __name__ == "__main__":
    cli.run(main)
