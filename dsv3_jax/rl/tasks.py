"""Where GRPO's prompts come from: generated arithmetic word problems, or a JSONL file of prompts.

  task = make_task("arithmetic", levels="1-3", seed=0)   # or make_task("prompts.jsonl")
  ex = task.example(i, "train")       # Example(messages, fields, reasoning, answer)
  held_out = task.eval_examples(64)   # the "eval" split: never a train problem
  sft_conversations(task, n)          # worked solutions in the format GRPO rewards

An Example's `messages` are the prompt conversation (ending with a user turn); `fields` go to the
reward functions as keyword arguments (dsv3_jax/rl/rewards.py: exact_match reads "answer");
`reasoning` and `answer` are a worked solution, for SFT data only.

The arithmetic task (ArithmeticTask): English word problems at difficulty levels 1..5,
  1  one addition or subtraction of numbers 1-9 (result >= 0)
  2  one addition or subtraction of two-digit numbers (result >= 0)
  3  two steps, a + b - c or a - b + c, numbers 1-20 (every result >= 0)
  4  a one-digit by a one- or two-digit multiplication, possibly followed by an addition
  5  three steps mixing multiplication, addition and subtraction (every result >= 0)
The reasoning is one line per step, "x op y = z" (op one of + - *), the last z the answer. The
prompt holds only the problem: the output format (<think> steps </think> answer) is taught by
the SFT data. Example i of a split is a pure function of (seed, split, i); a problem's text
decides its split (unit_hash(text) < EVAL_FRACTION: eval), so no train problem is an eval one.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import os
import random
from typing import Any, Callable, Sequence

from dsv3_jax.chat.template import MessageError, check_messages
from dsv3_jax.data.corpus import unit_hash
from dsv3_jax.data.special_tokens import THINK_BEGIN, THINK_END

LEVELS = (1, 2, 3, 4, 5)
SPLITS = ("train", "eval")
EVAL_FRACTION = 0.1  # the arithmetic task's held-out share of problem texts
_MAX_DRAWS = 10_000  # candidates drawn for one example before giving up (expected: 1 / fraction)


@dataclasses.dataclass(frozen=True)
class Example:
    """One prompt: `messages` [{"role", "content"}, ...] ending with a user turn, `fields` for
    the rewards, and (generated tasks only) a worked solution: `reasoning` lines and `answer`."""
    messages: Sequence[dict]
    fields: dict
    reasoning: str | None = None
    answer: str | None = None


def _check_split(split: Any) -> str:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not a split; use one of {', '.join(SPLITS)}.")
    return split


def _check_index(index: Any) -> int:
    if isinstance(index, bool) or not isinstance(index, numbers.Integral) or index < 0:
        raise ValueError(f"index={index!r} must be an int >= 0 (the example's position).")
    return int(index)


def _check_count(n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
        raise ValueError(f"n={n!r} must be an int >= 0 (how many examples).")
    return int(n)


# ------------------------------------------------------------------------------- levels

def parse_levels(spec: Any) -> tuple[int, ...]:
    """The sorted distinct levels of `spec`: an int (4), or a str of comma-separated levels and
    ranges ("1-3", "1,2,5", "1-2,5"), each in 1..5."""
    example = "e.g. '1-3', '1,2,5' or '4'"
    if isinstance(spec, bool) or not isinstance(spec, (int, str)):
        raise ValueError(f"levels={spec!r} is a {type(spec).__name__}; give levels of "
                         f"{LEVELS[0]}..{LEVELS[-1]} as a str, {example}.")
    out: set[int] = set()
    for item in str(spec).split(","):
        low, dash, high = item.strip().partition("-")
        bounds = [low.strip(), high.strip()] if dash else [low.strip()]
        if not all(b.isdigit() for b in bounds):
            raise ValueError(f"levels={spec!r}: {item.strip()!r} is not a level or a range of "
                             f"them; {example}.")
        first, last = int(bounds[0]), int(bounds[-1])
        if first > last:
            raise ValueError(f"levels={spec!r}: the range {item.strip()!r} runs backwards; write "
                             f"it low-high, e.g. '{last}-{first}'.")
        if first < LEVELS[0] or last > LEVELS[-1]:
            raise ValueError(f"levels={spec!r}: {item.strip()!r} is outside "
                             f"{LEVELS[0]}..{LEVELS[-1]}; use levels of {LEVELS}, {example}.")
        out.update(range(first, last + 1))
    return tuple(sorted(out))


# ------------------------------------------------------------------------------- problems

_NAMES = ("Mia", "Leo", "Ava", "Noah", "Zoe", "Sam", "Ivy", "Omar", "Lena", "Ravi", "Kai", "Nora")
_OBJECTS = (("marble", "marbles"), ("apple", "apples"), ("sticker", "stickers"),
            ("book", "books"), ("shell", "shells"), ("coin", "coins"), ("pencil", "pencils"),
            ("card", "cards"), ("stamp", "stamps"), ("cookie", "cookies"))

# The templates: {n} a name, {x} the plural object, {a} {b} ... counts ("3 marbles" / "1 marble"
# where the count is written with its object: {a_x}).
_ADD = ("{n} has {a_x} and finds {b} more. How many {x} does {n} have now?",
        "There are {a_x} in a box and {b_x} on the table. How many {x} are there in all?",
        "{n} had {a_x}. A friend gave {n} {b} more. How many {x} does {n} have now?")
_SUB = ("{n} has {a_x} and gives {b} to a friend. How many {x} does {n} have left?",
        "A jar holds {a_x}. {n} takes out {b}. How many {x} are still in the jar?",
        "{n} had {a_x} and lost {b} of them. How many {x} does {n} have left?")
_ADD_SUB = ("{n} has {a_x}, finds {b} more and then gives {c} away. How many {x} does {n} have "
            "now?",
            "A shelf holds {a_x}. {n} puts {b} more on it and later takes {c} off. How many {x} "
            "are on the shelf now?")
_SUB_ADD = ("{n} had {a_x}, gave {b} to a friend and then bought {c} more. How many {x} does {n} "
            "have now?",
            "A basket holds {a_x}. {n} eats {b} of them and then adds {c} more. How many {x} are "
            "in the basket now?")
_MUL = ("{n} buys {a} bags with {b_x} in each bag. How many {x} does {n} buy?",
        "There are {a} rows of {b_x}. How many {x} are there in all?")
_MUL_ADD = ("{n} buys {a} bags with {b_x} in each bag and already had {c_x}. How many {x} does "
            "{n} have now?",
            "There are {a} rows of {b_x} and {c} more {x} on the side. How many {x} are there in "
            "all?")
_MUL_ADD_SUB = ("{n} has {a} boxes with {b_x} in each box, finds {c} more and then gives {d} "
                "away. How many {x} does {n} have now?",)
_MUL_SUB_ADD = ("{n} packs {a} bags of {b_x}, gives {c} away and then buys {d} more. How many {x} "
                "does {n} have now?",)
_ADD_MUL_SUB = ("Each of {c} boxes holds {a} red and {b} blue {x}. {n} takes {d} of them out. "
                "How many {x} are left in the boxes?",)

Steps = list[tuple[int, str, int, int]]  # (x, op, y, z): the line "x op y = z"
_APPLY: dict[str, Callable[[int, int], int]] = {"+": lambda x, y: x + y,
                                                "-": lambda x, y: x - y,
                                                "*": lambda x, y: x * y}


def _chain(first: int, *ops: tuple[str, int]) -> Steps:
    """The steps of ((first op1 y1) op2 y2) ...: one (x, op, y, z) per operation."""
    steps, x = [], first
    for op, y in ops:
        z = _APPLY[op](x, y)
        steps.append((x, op, y, z))
        x = z
    return steps


def _draw(rng: random.Random, level: int) -> tuple[str, Steps]:
    """One problem of `level`: (its text, its steps)."""
    name = rng.choice(_NAMES)
    singular, plural = rng.choice(_OBJECTS)
    counts: dict[str, int] = {}
    if level in (1, 2):
        low, high = (1, 9) if level == 1 else (10, 99)
        a, b = rng.randint(low, high), rng.randint(low, high)
        if rng.random() < 0.5:
            templates, steps = _ADD, _chain(a, ("+", b))
        else:
            a, b = max(a, b), min(a, b)
            templates, steps = _SUB, _chain(a, ("-", b))
        counts = {"a": a, "b": b}
    elif level == 3:
        a, b, c = (rng.randint(1, 20) for _ in range(3))
        if rng.random() < 0.5:
            c = min(c, a + b)
            templates, steps = _ADD_SUB, _chain(a, ("+", b), ("-", c))
        else:
            a, b = max(a, b), min(a, b)
            templates, steps = _SUB_ADD, _chain(a, ("-", b), ("+", c))
        counts = {"a": a, "b": b, "c": c}
    elif level == 4:
        a, b, c = rng.randint(2, 9), rng.randint(2, 99), rng.randint(1, 99)
        if rng.random() < 0.5:
            templates, steps = _MUL, _chain(a, ("*", b))
        else:
            templates, steps = _MUL_ADD, _chain(a, ("*", b), ("+", c))
        counts = {"a": a, "b": b, "c": c}
    else:
        kind = rng.randrange(3)
        if kind == 2:  # (a + b) * c - d
            a, b, c = rng.randint(1, 20), rng.randint(1, 20), rng.randint(2, 9)
            d = rng.randint(1, (a + b) * c)
            templates, steps = _ADD_MUL_SUB, _chain(a, ("+", b), ("*", c), ("-", d))
        else:
            a, b, c = rng.randint(2, 9), rng.randint(2, 30), rng.randint(1, 50)
            if kind == 0:  # a * b + c - d
                d = rng.randint(1, a * b + c)
                templates, steps = _MUL_ADD_SUB, _chain(a, ("*", b), ("+", c), ("-", d))
            else:  # a * b - c + d
                c, d = rng.randint(1, a * b), c
                templates, steps = _MUL_SUB_ADD, _chain(a, ("*", b), ("-", c), ("+", d))
        counts = {"a": a, "b": b, "c": c, "d": d}
    values: dict[str, Any] = {"n": name, "x": plural, **counts}
    values.update({f"{k}_x": f"{v} {singular if v == 1 else plural}" for k, v in counts.items()})
    return rng.choice(templates).format(**values), steps


class ArithmeticTask:
    """Generated arithmetic word problems with exact integer answers (the levels: module
    docstring). example(i) cycles through `levels`: level levels[i % len(levels)]."""

    def __init__(self, levels: Sequence[int] | str | int = (1, 2, 3), seed: int = 0):
        if isinstance(levels, (str, int)):
            levels = parse_levels(levels)
        if (not isinstance(levels, (tuple, list)) or not levels
                or any(isinstance(v, bool) or v not in LEVELS for v in levels)):
            raise ValueError(f"levels={levels!r} must be a non-empty sequence of levels of "
                             f"{LEVELS}; e.g. levels=(1, 2, 3) or parse_levels('1-3').")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise ValueError(f"seed={seed!r} must be an int >= 0; e.g. seed=0.")
        self.levels, self.seed = tuple(int(v) for v in levels), int(seed)

    def example(self, index: int, split: str = "train") -> Example:
        """Example `index` of `split`: the first candidate drawn from Random(f"{seed}:{split}:
        {index}") whose text belongs to `split`."""
        index, split = _check_index(index), _check_split(split)
        level = self.levels[index % len(self.levels)]
        rng = random.Random(f"{self.seed}:{split}:{index}")
        for _ in range(_MAX_DRAWS):
            text, steps = _draw(rng, level)
            if (unit_hash(text) < EVAL_FRACTION) == (split == "eval"):
                break
        else:  # only a level with fewer than ~1 / EVAL_FRACTION distinct problems could get here
            raise ValueError(f"level {level} drew no {split} problem in {_MAX_DRAWS} tries; use "
                             "other levels.")
        answer = str(steps[-1][3])
        reasoning = "\n".join(f"{x} {op} {y} = {z}" for x, op, y, z in steps)
        return Example(messages=({"role": "user", "content": text},),
                       fields={"answer": answer, "level": level}, reasoning=reasoning,
                       answer=answer)

    def eval_examples(self, n: int) -> list[Example]:
        return [self.example(i, "eval") for i in range(_check_count(n))]


# ------------------------------------------------------------------------------- JSONL prompts

class JsonlTask:
    """Prompts read from a JSONL file, one record per line (blank lines skipped):
    {"prompt": str} (one user message) or {"messages": [...]} (a conversation ending with a user
    turn), any other keys being the example's fields. Record i (0-based, in file order) is held
    out when unit_hash(f"{basename}:{i}") < eval_fraction. example(i, split) takes i modulo the
    split's size, so a stream of prompts never runs out."""

    def __init__(self, path: str, *, eval_fraction: float = 0.1):
        if (isinstance(eval_fraction, bool) or not isinstance(eval_fraction, numbers.Real)
                or not 0.0 < eval_fraction < 1.0):
            raise ValueError(f"eval_fraction={eval_fraction!r} must be a number strictly between "
                             "0 and 1 (the held-out share); e.g. 0.1.")
        self.path = path
        base = os.path.basename(path)
        self._splits: dict[str, list[Example]] = {s: [] for s in SPLITS}
        for i, example in enumerate(_read_records(path)):
            self._splits["eval" if unit_hash(f"{base}:{i}") < eval_fraction else "train"].append(
                example)
        sizes = {s: len(v) for s, v in self._splits.items()}
        if not all(sizes.values()):
            raise ValueError(f"{path}: {sizes['train']} train and {sizes['eval']} eval records "
                             f"(eval_fraction={eval_fraction}); a split is empty: add records, "
                             "or choose another eval_fraction.")

    def size(self, split: str) -> int:
        return len(self._splits[_check_split(split)])

    def example(self, index: int, split: str = "train") -> Example:
        records = self._splits[_check_split(split)]
        return records[_check_index(index) % len(records)]

    def eval_examples(self, n: int) -> list[Example]:
        return self._splits["eval"][:_check_count(n)]


def _read_records(path: str) -> list[Example]:
    """The examples of the JSONL file at `path`; ValueError "path:line: what; fix" for the first
    bad line."""
    shape = 'write one {"prompt": "..."} or {"messages": [...]} object per line'
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ValueError(f"{path}: cannot read the prompts ({why}); give a readable UTF-8 .jsonl "
                         "file of prompts.") from e
    examples = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg}); {shape}.") from e
        if not isinstance(record, dict):
            raise ValueError(f"{where}: a JSON {type(record).__name__}, not an object; {shape}.")
        if ("prompt" in record) == ("messages" in record):
            has = "both" if "prompt" in record else "neither"
            raise ValueError(f"{where}: the record has {has} of 'prompt' and 'messages'; give "
                             "exactly one.")
        fields = {k: v for k, v in record.items() if k not in ("prompt", "messages")}
        if "prompt" in record:
            prompt = record["prompt"]
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"{where}: prompt={prompt!r:.60} is not a non-empty str; give the "
                                 "prompt text as a str.")
            messages: Sequence[dict] = ({"role": "user", "content": prompt},)
        else:
            messages = record["messages"]
            try:
                check_messages(messages)
            except MessageError as e:
                raise ValueError(f"{where}: {e}.") from e
            if messages[-1]["role"] != "user":
                raise ValueError(f"{where}: the last message's role is "
                                 f"{messages[-1]['role']!r}; end the prompt conversation with "
                                 "the user turn to answer.")
            messages = tuple(dict(m) for m in messages)
        examples.append(Example(messages=messages, fields=fields))
    return examples


# ------------------------------------------------------------------------------- choosing, SFT

def make_task(name: str, *, levels: Any = "1-3", seed: int = 0,
              eval_fraction: float = 0.1) -> ArithmeticTask | JsonlTask:
    """"arithmetic" -> ArithmeticTask(parse_levels(levels), seed); a path ending in .jsonl or
    .json -> JsonlTask(path, eval_fraction=eval_fraction)."""
    if name == "arithmetic":
        return ArithmeticTask(parse_levels(levels), seed)
    if isinstance(name, str) and name.lower().endswith((".jsonl", ".json")):
        return JsonlTask(os.path.expanduser(name), eval_fraction=eval_fraction)
    raise ValueError(f"task={name!r} is not a task; use 'arithmetic' or a .jsonl file of prompts.")


def sft_conversations(task: ArithmeticTask, n: int, *, seed_offset: int = 0) -> list[dict]:
    """n conversations {"messages": [user turn, assistant turn]} of train examples seed_offset ..
    seed_offset + n - 1, the assistant content "<think>\\n" + reasoning + "\\n</think>\\n\\n" +
    answer: the completion format think_format and exact_match reward with 1.0."""
    if not isinstance(task, ArithmeticTask):
        raise ValueError(f"task is a {type(task).__name__}; SFT conversations need worked "
                         "solutions, which only the arithmetic task has: pass an ArithmeticTask.")
    start = _check_index(seed_offset)
    out = []
    for i in range(start, start + _check_count(n)):
        ex = task.example(i, "train")
        content = f"{THINK_BEGIN}\n{ex.reasoning}\n{THINK_END}\n\n{ex.answer}"
        out.append({"messages": [*map(dict, ex.messages),
                                 {"role": "assistant", "content": content}]})
    return out
