"""python -m dsv3_jax.rl.sft_data --output=runs/arithmetic_sft.jsonl [--count=20000]
    [--levels=1-3] [--seed=0]

The arithmetic task's worked solutions as SFT conversations (JSONL, one {"messages": [...]} per
line, dsv3_jax.rl.tasks.sft_conversations): a model fine-tuned on them answers in the format GRPO
then rewards, "<think> steps </think> answer". The file is written beside its final name and
renamed into place, so a failed run leaves no half-written file.
"""

from __future__ import annotations

import json
import os

from absl import flags

from dsv3_jax import cli
from dsv3_jax.files import atomic_file
from dsv3_jax.rl.tasks import ArithmeticTask, parse_levels, sft_conversations

_OUTPUT = flags.DEFINE_string("output", None, "The JSONL file to write (its folder is created).")
_COUNT = flags.DEFINE_integer("count", 20000, "How many conversations.")
_LEVELS = flags.DEFINE_string("levels", "1-3", "Difficulty levels of 1..5: '1-3', '1,2,5', '4'.")
_SEED = flags.DEFINE_integer("seed", 0, "The task's seed (a GRPO run on the same seed trains on "
                             "the same problems; the held-out ones are never written).")


def write_sft_data(path: str, count: int, levels, seed: int = 0) -> int:
    """Writes `count` conversations of ArithmeticTask(levels, seed)'s train problems to `path`
    atomically (the parent folder created); returns the count. `levels` is a parse_levels spec
    or a sequence of levels."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count={count!r} must be an int >= 1 (conversations to write).")
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(path):
        raise ValueError(f"output {path} is a directory; give a file path, e.g. "
                         f"{os.path.join(path, 'arithmetic_sft.jsonl')}.")
    task = ArithmeticTask(levels, seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_file(path, "w") as f:
        for record in sft_conversations(task, count):
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return count


def main(argv):
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments {argv[1:]}; every setting is a flag "
                             "(--output, --count, --levels, --seed).")
    output = (_OUTPUT.value or "").strip()
    if not output:
        raise cli.UsageError("--output is missing; pass the JSONL file to write, e.g. "
                             "--output=runs/arithmetic_sft.jsonl.")
    if _COUNT.value < 1:
        raise cli.UsageError(f"--count={_COUNT.value} must be >= 1; e.g. --count=20000.")
    if _SEED.value < 0:
        raise cli.UsageError(f"--seed={_SEED.value} must be >= 0; e.g. --seed=0.")
    try:
        levels = parse_levels(_LEVELS.value)
    except ValueError as e:
        raise cli.UsageError(f"--{e}") from e
    n = write_sft_data(output, _COUNT.value, levels, _SEED.value)
    shown = ",".join(map(str, levels))
    print(f"wrote {n} conversations (levels {shown}) to {os.path.abspath(output)}")


if __name__ == "__main__":
    cli.run(main)
