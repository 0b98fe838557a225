"""Reward functions and the pool that runs them beside the sampler.

A reward is a plain function `fn(prompt: str, completion: str, **fields) -> float`: `prompt` is
the rendered prompt text, `completion` the generated text (it may end with the chat format's EOS
marker and holds `<think>` / `</think>` as written), `fields` the task record's other fields
(e.g. answer="8"); a reward ignores the fields it does not read.

Built in (BUILTIN):
  exact_match   1.0 when the final answer (final_answer) equals fields["answer"]: numbers compare
                as exact numbers ("8.0" == "8", "1,000" == "1000"), anything else as stripped text
  think_format  1.0 when the completion is one <think> non-empty reasoning </think> followed by a
                non-empty answer, and nothing else

`parse_rewards("exact_match=1.0,think_format=0.1,my_module.my_fn=2")` names them with weights;
`RewardPool` runs them on threads or processes while generation goes on. A reward call that
raises, returns something that is not a real number, returns NaN/inf or outlives its timeout
scores 0 for that sample and is counted (reasons: error, bad_value, not_finite, timeout,
pool_broken): a slow or broken checker never stops a run.
"""

from __future__ import annotations

import concurrent.futures as cf
import fractions
import importlib
import math
import multiprocessing
import numbers
import re
import time
from typing import Callable

from absl import logging
import numpy as np

from dsv3_jax.chat.template import parse_assistant
from dsv3_jax.data.special_tokens import EOS, THINK_BEGIN, THINK_END

_BOXED = "\\boxed{"
_NUMBER = re.compile(r"[+-]?(\d{1,3}(,\d{3})+|\d+)(\.\d+)?|[+-]?\.\d+")


def final_answer(completion: str) -> str | None:
    """The answer part of a completion: the text after its last </think> (cut at EOS), or the
    content of its last \\boxed{...}; None when there is none (empty, or reasoning unfinished)."""
    content = parse_assistant(completion)["content"]
    boxed = _last_boxed(content)
    if boxed is not None:
        content = boxed.strip()
    return content or None


def _last_boxed(text: str) -> str | None:
    """The content of the last closed \\boxed{...} in text (nested braces kept), or None."""
    found, start = None, text.find(_BOXED)
    while start >= 0:
        depth, i = 1, start + len(_BOXED)
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            found = text[start + len(_BOXED):i - 1]
        start = text.find(_BOXED, start + 1)
    return found


def _as_number(text: str) -> fractions.Fraction | None:
    text = text.strip()
    if not _NUMBER.fullmatch(text):
        return None
    return fractions.Fraction(text.replace(",", ""))


def exact_match(prompt: str, completion: str, *, answer=None, **_) -> float:
    """1.0 when final_answer(completion) equals `answer` (numbers as numbers), else 0.0."""
    if answer is None:
        raise ValueError("exact_match needs the task's 'answer' field; give each prompt record "
                         "an \"answer\"")
    if isinstance(answer, bool) or not isinstance(answer, (str, numbers.Real)):
        raise ValueError(f"exact_match: answer={answer!r} must be a string or a number")
    got = final_answer(completion)
    if got is None:
        return 0.0
    want = str(answer).strip()
    a, b = _as_number(got), _as_number(want)
    if a is not None and b is not None:
        return float(a == b)
    return float(got.strip() == want)


def think_format(prompt: str, completion: str, **_) -> float:
    """1.0 for '<think> reasoning </think> answer' (both non-empty, one think block), else 0."""
    body = completion.split(EOS, 1)[0].strip()
    if not body.startswith(THINK_BEGIN) or body.count(THINK_BEGIN) != 1 \
            or body.count(THINK_END) != 1:
        return 0.0
    reasoning, answer = body[len(THINK_BEGIN):].split(THINK_END, 1)
    return float(bool(reasoning.strip()) and bool(answer.strip()))


BUILTIN: dict[str, Callable[..., float]] = {"exact_match": exact_match,
                                            "think_format": think_format}
_FIX = (f"name built-ins ({', '.join(BUILTIN)}) or importable functions as module.function, "
        "each with an optional weight: 'exact_match=1.0,think_format=0.1'")


def _resolve(name: str) -> Callable:
    if name in BUILTIN:
        return BUILTIN[name]
    if ":" in name:
        module, attr = name.split(":", 1)
    elif "." in name:
        module, attr = name.rsplit(".", 1)
    else:
        raise ValueError(f"reward {name!r} is not a built-in; {_FIX}")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except ImportError as e:
        raise ValueError(f"reward {name!r}: cannot import module {module!r} ({e}); put it on "
                         "PYTHONPATH or fix the name") from None
    except AttributeError:
        raise ValueError(f"reward {name!r}: module {module!r} has no attribute {attr!r}; fix "
                         "the function's name") from None
    if not callable(fn):
        raise ValueError(f"reward {name!r} is a {type(fn).__name__}, not a function "
                         "(prompt, completion, **fields) -> float")
    return fn


def parse_rewards(spec: str) -> list[tuple[str, float, Callable]]:
    """'name=weight,...' -> [(name, weight, fn), ...] in order (a missing weight is 1.0)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"rewards={spec!r} is empty; {_FIX}")
    out, seen = [], set()
    for item in spec.split(","):
        item = item.strip()
        if not item:
            raise ValueError(f"rewards={spec!r} has an empty item; {_FIX}")
        name, has_weight, weight_text = item.partition("=")
        name = name.strip()
        if not name:
            raise ValueError(f"reward {item!r} has no name; {_FIX}")
        try:
            weight = float(weight_text) if has_weight else 1.0
        except ValueError:
            weight = math.nan
        if not math.isfinite(weight):
            raise ValueError(f"reward {item!r}: the weight {weight_text.strip()!r} is not a "
                             "finite number; write name=1.0")
        if name in seen:
            raise ValueError(f"reward {name!r} is named twice in rewards={spec!r}; name it once "
                             "with the sum of its weights")
        seen.add(name)
        out.append((name, weight, _resolve(name)))
    return out


def _call(fn, prompt: str, completion: str, fields: dict):
    """Runs fn in a worker: (value, None) or (None, error text)."""
    try:
        return fn(prompt, completion, **fields), None
    except Exception as e:  # noqa: BLE001 - any checker's failure is counted, never raised
        return None, f"{type(e).__name__}: {e}"


def _checked(value) -> tuple[float, str | None]:
    """(score, failure reason or None) of a reward's return value."""
    if not isinstance(value, numbers.Real):
        return 0.0, "bad_value"
    value = float(value)
    return (value, None) if math.isfinite(value) else (0.0, "not_finite")


class RewardPool:
    """Runs `rewards` (parse_rewards' list) on `workers` threads or spawned processes.

    submit(index, prompt, completion, fields) starts sample `index`'s reward calls at once;
    collect(n) waits for samples 0..n-1 and returns (scores float64 [n, R], failures {name:
    {reason: count}}), reasons "error", "bad_value", "not_finite", "timeout" (a call unfinished
    timeout_s after collect starts waiting), each such score 0. Then the next batch starts at 0.
    """

    def __init__(self, rewards, *, workers: int = 4, timeout_s: float = 10.0,
                 kind: str = "thread"):
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"reward workers={workers!r} must be an int >= 1")
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) \
                or not math.isfinite(timeout_s) or timeout_s <= 0:
            raise ValueError(f"reward timeout_s={timeout_s!r} must be a finite number > 0")
        if kind not in ("thread", "process"):
            raise ValueError(f"reward pool kind={kind!r} must be 'thread' or 'process'")
        if not rewards:
            raise ValueError("RewardPool needs at least one reward (parse_rewards' list)")
        self.rewards, self.workers, self.timeout_s, self.kind = list(rewards), workers, \
            float(timeout_s), kind
        self._executor, self._pending, self._warned = None, {}, set()

    @property
    def names(self) -> list[str]:
        return [name for name, _, _ in self.rewards]

    @property
    def weights(self) -> np.ndarray:
        return np.array([w for _, w, _ in self.rewards], np.float64)

    def _pool(self):
        if self._executor is None:
            if self.kind == "thread":
                self._executor = cf.ThreadPoolExecutor(self.workers, "reward")
            else:
                self._executor = cf.ProcessPoolExecutor(
                    self.workers, mp_context=multiprocessing.get_context("spawn"))
        return self._executor

    def submit(self, index: int, prompt: str, completion: str, fields: dict) -> None:
        if int(index) in self._pending:
            raise ValueError(f"sample {index} was already submitted in this batch")
        futures = []
        for _, _, fn in self.rewards:
            try:
                futures.append(self._pool().submit(_call, fn, prompt, completion, dict(fields)))
            except (cf.BrokenExecutor, RuntimeError) as e:  # a worker died: a fresh pool next
                self._reset()
                failed = cf.Future()
                failed.set_exception(e)
                futures.append(failed)
        self._pending[int(index)] = futures

    def _reset(self) -> None:
        """Drops the executor (its unfinished calls abandoned; a process pool's workers ended,
        so a hung checker does not live on); the next submit makes a fresh one."""
        if self._executor is not None:
            executor, self._executor = self._executor, None
            workers = list((getattr(executor, "_processes", None) or {}).values())
            executor.shutdown(wait=False, cancel_futures=True)
            for process in workers:
                if process.is_alive():
                    process.terminate()

    def _warn(self, name: str, reason: str, detail: str) -> None:
        if (name, reason) not in self._warned:
            self._warned.add((name, reason))
            logging.warning("reward %s: %s (%s); that sample scores 0 (counted as "
                            "reward_failures/%s/%s; warned once)", name, reason, detail, name,
                            reason)

    def collect(self, n: int) -> tuple[np.ndarray, dict]:
        missing = [i for i in range(n) if i not in self._pending]
        if missing:
            raise ValueError(f"collect({n}): samples {missing[:5]} were not submitted")
        beyond = sorted(i for i in self._pending if not 0 <= i < n)
        if beyond:
            raise ValueError(f"collect({n}): samples {beyond[:5]} lie beyond n={n}")
        scores = np.zeros((n, len(self.rewards)), np.float64)
        failures: dict[str, dict[str, int]] = {}
        deadline = time.monotonic() + self.timeout_s
        broken = stale = False
        for i in range(n):
            for j, future in enumerate(self._pending.pop(i)):
                name = self.rewards[j][0]
                reason, detail = None, ""
                try:
                    value, error = future.result(timeout=max(0.0, deadline - time.monotonic()))
                except cf.TimeoutError:
                    future.cancel()
                    stale = True
                    reason, detail = "timeout", f"no result within {self.timeout_s:g} s"
                except cf.BrokenExecutor as e:  # a worker process died (not the reward's error)
                    broken = True
                    reason, detail = "pool_broken", f"{type(e).__name__}: {e}"
                except Exception as e:  # noqa: BLE001
                    reason, detail = "error", f"{type(e).__name__}: {e}"
                else:
                    if error is not None:
                        reason, detail = "error", error
                    else:
                        scores[i, j], reason = _checked(value)
                        detail = f"returned {value!r}"
                if reason is not None:
                    failures.setdefault(name, {}).setdefault(reason, 0)
                    failures[name][reason] += 1
                    self._warn(name, reason, detail)
        self._pending.clear()
        if broken or stale:
            self._reset()
        return scores, failures

    def close(self) -> None:
        self._pending.clear()
        self._reset()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
