"""GRPO's rewards, reward pool, prompt tasks and SFT data (dsv3_jax/rl/rewards.py, tasks.py,
sft_data.py)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from dsv3_jax.data.special_tokens import EOS, THINK_BEGIN, THINK_END
from dsv3_jax.rl import rewards as R
from dsv3_jax.rl import tasks as T
from dsv3_jax.rl.sft_data import write_sft_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def think(reasoning: str, answer: str) -> str:
    return f"{THINK_BEGIN}\n{reasoning}\n{THINK_END}\n\n{answer}"


# ------------------------------------------------------------------------------- final_answer

def test_final_answer():
    assert R.final_answer(think("3 + 5 = 8", "8") + EOS) == "8"
    assert R.final_answer("  8  ") == "8"  # no reasoning: all of it is content
    assert R.final_answer("8" + EOS + "junk 9") == "8"  # cut at EOS
    assert R.final_answer(think("a", "so \\boxed{7} or \\boxed{\\frac{1}{2}}")) == "\\frac{1}{2}"
    assert R.final_answer("the answer is \\boxed{ 42 }.") == "42"
    assert R.final_answer("\\boxed{4 and no close") == "\\boxed{4 and no close"
    assert R.final_answer("") is None
    assert R.final_answer(EOS + "8") is None
    assert R.final_answer(THINK_BEGIN + " still thinking 3 + 5") is None  # unfinished reasoning
    assert R.final_answer(think("3 + 5 = 8", "")) is None


@pytest.mark.parametrize("got,want,score", [
    ("8", "8", 1.0), ("8.0", "8", 1.0), ("08", "8", 1.0), ("8.01", "8", 0.0), ("+8", "8", 1.0),
    ("-8", "8", 0.0), ("1,000", "1000", 1.0), ("1,00", "100", 0.0), (" 12 ", "12", 1.0),
    ("\\boxed{12}", "12", 1.0), ("twelve", "12", 0.0), ("Paris", "Paris", 1.0),
    ("paris", "Paris", 0.0), ("0.5", ".5", 1.0),
])
def test_exact_match_numbers_and_strings(got, want, score):
    assert R.exact_match("p", think("work", got) + EOS, answer=want) == score


def test_exact_match_edges():
    assert R.exact_match("p", think("x", "8"), answer=8) == 1.0  # a JSON number as the answer
    assert R.exact_match("p", think("x", "8"), answer="8", level=3, other="ignored") == 1.0
    assert R.exact_match("p", "", answer="8") == 0.0
    assert R.exact_match("p", THINK_BEGIN + "8", answer="8") == 0.0  # never closed its reasoning
    assert R.exact_match("p", "9" + EOS + "8", answer="8") == 0.0  # after EOS does not count
    with pytest.raises(ValueError, match="'answer' field"):
        R.exact_match("p", "8")
    with pytest.raises(ValueError, match="answer="):
        R.exact_match("p", "8", answer=["8"])


def test_think_format():
    assert R.think_format("p", think("3 + 5 = 8", "8")) == 1.0
    assert R.think_format("p", "  " + think("r", "8") + EOS + THINK_BEGIN + "after EOS") == 1.0
    negatives = [
        "8",  # no think block
        f"{THINK_BEGIN}a{THINK_END}{THINK_BEGIN}b{THINK_END} 8",  # two blocks
        think("3 + 5 = 8", ""),  # empty answer
        think("3 + 5 = 8", "") + EOS + "8",  # the answer only after EOS
        think("  ", "8"),  # empty reasoning
        "8 " + think("r", "8"),  # text before <think>
        f"{THINK_BEGIN}r {THINK_END} 8 {THINK_END}",  # a stray marker in the answer
        f"{THINK_BEGIN}r {THINK_BEGIN} r {THINK_END} 8",
        f"r {THINK_END} 8",  # no opening marker
    ]
    for completion in negatives:
        assert R.think_format("p", completion) == 0.0, completion


# ------------------------------------------------------------------------------- parse_rewards

def test_parse_rewards_good():
    got = R.parse_rewards(" exact_match=1.0 , think_format=0.2")
    assert [(n, w) for n, w, _ in got] == [("exact_match", 1.0), ("think_format", 0.2)]
    assert got[0][2] is R.exact_match and got[1][2] is R.think_format
    assert [(n, w) for n, w, _ in R.parse_rewards("think_format")] == [("think_format", 1.0)]
    (name, weight, fn), = R.parse_rewards("dsv3_jax.rl.rewards.exact_match=-0.5")
    assert (name, weight, fn) == ("dsv3_jax.rl.rewards.exact_match", -0.5, R.exact_match)
    (_, _, fn), = R.parse_rewards("dsv3_jax.rl.rewards:think_format=2")
    assert fn is R.think_format


@pytest.mark.parametrize("spec,message", [
    ("", "empty"), ("  ", "empty"), ("exact_match,,think_format", "empty item"),
    ("=1.0", "no name"), ("exact_match=abc", "not a finite"), ("exact_match=nan", "not a finite"),
    ("exact_match=inf", "not a finite"), ("exact_match=", "not a finite"),
    ("exact_match=1,exact_match=2", "twice"), ("exact_mach", "exact_match, think_format"),
    ("no_such_pkg_xyz.fn", "cannot import"), ("dsv3_jax.rl.rewards.nope", "no attribute"),
    ("dsv3_jax.rl.rewards:nope", "no attribute"), ("dsv3_jax.rl.rewards.BUILTIN", "not a function"),
])
def test_parse_rewards_refusals(spec, message):
    with pytest.raises(ValueError, match=re.escape(message)) as e:
        R.parse_rewards(spec)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------- RewardPool

def _raises(prompt, completion, **_):
    raise RuntimeError("checker crashed")


def _nan(prompt, completion, **_):
    return math.nan


def _text(prompt, completion, **_):
    return "1.0"


def _slow(prompt, completion, **_):
    time.sleep(1.0)
    return 1.0


def _true(prompt, completion, **_):
    return True


def _die_if(prompt, completion, *, die=False, **_):
    """Kills its worker process when the sample says so (a checker crashing hard)."""
    if die:
        os._exit(3)
    return 0.5


def test_pool_validates_settings():
    rewards = R.parse_rewards("exact_match")
    for kwargs, field in [({"workers": 0}, "workers"), ({"workers": 1.5}, "workers"),
                          ({"timeout_s": 0}, "timeout_s"), ({"timeout_s": math.inf}, "timeout_s"),
                          ({"kind": "fiber"}, "kind")]:
        with pytest.raises(ValueError, match=field):
            R.RewardPool(rewards, **kwargs)


def test_thread_pool_counts_each_failure_and_keeps_the_good_scores(caplog):
    rewards = [("exact_match", 1.0, R.exact_match), ("raises", 0.5, _raises), ("nan", 1.0, _nan),
               ("text", 1.0, _text), ("slow", 1.0, _slow), ("bool", 2.0, _true)]
    with R.RewardPool(rewards, workers=8, timeout_s=0.3) as pool:
        assert pool.names == [n for n, _, _ in rewards]
        np.testing.assert_array_equal(pool.weights, [1.0, 0.5, 1.0, 1.0, 1.0, 2.0])
        for i in range(3):
            pool.submit(i, "prompt", think("x", str(i)), {"answer": "1", "level": 1})
        t0 = time.monotonic()
        scores, failures = pool.collect(3)
        assert time.monotonic() - t0 < 0.9  # waited the timeout, not the slow calls
        assert scores.shape == (3, 6) and scores.dtype == np.float64
        np.testing.assert_array_equal(scores[:, 0], [0.0, 1.0, 0.0])  # only sample 1 is right
        np.testing.assert_array_equal(scores[:, 1:5], 0.0)
        np.testing.assert_array_equal(scores[:, 5], 1.0)
        assert failures == {"raises": {"error": 3}, "nan": {"not_finite": 3},
                            "text": {"bad_value": 3}, "slow": {"timeout": 3}}
        # The next batch starts again at 0, on a fresh executor (the slow calls were abandoned).
        pool.submit(0, "prompt", "1", {"answer": "1"})
        scores, failures = pool.collect(1)
        assert scores[0, 0] == 1.0 and failures["slow"] == {"timeout": 1}
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 4  # once per (reward, reason), not per sample or batch
    assert any("raises: error (RuntimeError: checker crashed)" in m for m in warned), warned


def test_pool_refuses_incomplete_or_repeated_batches():
    with R.RewardPool(R.parse_rewards("exact_match"), workers=1) as pool:
        pool.submit(0, "p", "8", {"answer": "8"})
        with pytest.raises(ValueError, match="already submitted"):
            pool.submit(0, "p", "8", {"answer": "8"})
        pool.submit(2, "p", "8", {"answer": "8"})
        with pytest.raises(ValueError, match=r"samples \[1\] were not submitted"):
            pool.collect(3)
        with pytest.raises(ValueError, match="beyond n=1"):
            pool.collect(1)
        pool.submit(1, "p", "7", {"answer": "8"})
        scores, failures = pool.collect(3)
        np.testing.assert_array_equal(scores[:, 0], [1.0, 0.0, 1.0])
        assert failures == {}


def test_missing_answer_field_is_counted_as_an_error():
    with R.RewardPool(R.parse_rewards("exact_match,think_format"), workers=2) as pool:
        pool.submit(0, "p", think("r", "8"), {"level": 1})
        scores, failures = pool.collect(1)
    np.testing.assert_array_equal(scores, [[0.0, 1.0]])
    assert failures == {"exact_match": {"error": 1}}


def test_process_pool_scores_and_survives_a_dead_worker():
    rewards = R.parse_rewards("exact_match,think_format=0.5") + [("die", 1.0, _die_if)]
    with R.RewardPool(rewards, workers=2, timeout_s=60.0, kind="process") as pool:
        completions = [think("3 + 5 = 8", "8"), "8", think("r", "9") + EOS]
        for i, completion in enumerate(completions):
            pool.submit(i, "p", completion, {"answer": "8"})
        scores, failures = pool.collect(3)
        np.testing.assert_array_equal(scores, [[1, 1, 0.5], [1, 0, 0.5], [0, 1, 0.5]])
        assert failures == {}
        pool.submit(0, "p", "8", {"answer": "8", "die": True})
        scores, failures = pool.collect(1)
        assert scores[0, 2] == 0.0 and failures["die"] == {"pool_broken": 1}
        pool.submit(0, "p", "8", {"answer": "8"})  # a new executor
        scores, failures = pool.collect(1)
        np.testing.assert_array_equal(scores, [[1, 0, 0.5]])
        assert failures == {}


# ------------------------------------------------------------------------------- ArithmeticTask

_OPS = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y}
_STEP = re.compile(r"(\d+) ([-+*]) (\d+) = (\d+)")


def check_solution(example: T.Example) -> int:
    """Re-derives the answer from the reasoning lines (each "x op y = z" recomputed, each step
    starting from the previous result); returns the number of steps."""
    lines = example.reasoning.split("\n")
    previous = None
    for line in lines:
        match = _STEP.fullmatch(line)
        assert match, line
        x, op, y, z = int(match[1]), match[2], int(match[3]), int(match[4])
        assert _OPS[op](x, y) == z >= 0, line
        assert previous is None or x == previous, (line, previous)
        previous = z
    assert str(previous) == example.answer == example.fields["answer"]
    # The operands are the problem's numbers: the first step's x and every step's y.
    in_text = set(re.findall(r"\d+", example.messages[-1]["content"]))
    operands = [_STEP.fullmatch(lines[0])[1]] + [_STEP.fullmatch(line)[3] for line in lines]
    assert set(operands) <= in_text, (operands, in_text)
    return len(lines)


def test_arithmetic_levels_are_correct():
    task = T.ArithmeticTask(levels=T.LEVELS, seed=3)
    steps = {level: set() for level in T.LEVELS}
    for i in range(150):
        ex = task.example(i, "train" if i % 3 else "eval")
        assert [m["role"] for m in ex.messages] == ["user"]
        assert ex.fields["level"] == T.LEVELS[i % 5]
        steps[ex.fields["level"]].add(check_solution(ex))
        operands = [int(n) for n in re.findall(r"\d+", ex.reasoning.split(" = ")[0])]
        if ex.fields["level"] == 1:
            assert all(1 <= n <= 9 for n in operands)
        if ex.fields["level"] == 2:
            assert all(10 <= n <= 99 for n in operands)
    assert steps == {1: {1}, 2: {1}, 3: {2}, 4: {1, 2}, 5: {3}}


def test_arithmetic_is_deterministic_and_seeded():
    texts = lambda task: [task.example(i).messages[0]["content"] for i in range(20)]  # noqa: E731
    assert texts(T.ArithmeticTask(seed=0)) == texts(T.ArithmeticTask(seed=0))
    assert texts(T.ArithmeticTask(seed=0)) != texts(T.ArithmeticTask(seed=1))
    assert T.ArithmeticTask().example(5) == T.ArithmeticTask().example(5)
    # Pinned: the same problems on every platform and Python version (string-seeded Random).
    first = T.ArithmeticTask(levels=(5,), seed=0).example(0)
    assert first.messages[0]["content"] == (
        "Ava has 2 boxes with 27 stamps in each box, finds 47 more and then gives 2 away. How "
        "many stamps does Ava have now?")
    assert first.reasoning == "2 * 27 = 54\n54 + 47 = 101\n101 - 2 = 99"
    assert first == T.ArithmeticTask(levels="5", seed=0).example(0)
    assert [e.fields["level"] for e in T.ArithmeticTask(levels=(2, 4)).eval_examples(4)] == \
        [2, 4, 2, 4]


def test_arithmetic_train_and_eval_are_disjoint():
    from dsv3_jax.data.corpus import unit_hash

    task = T.ArithmeticTask(levels=(1, 2, 3))
    train = {task.example(i, "train").messages[0]["content"] for i in range(300)}
    held_out = [e.messages[0]["content"] for e in task.eval_examples(300)]
    assert len(held_out) == 300 and len(set(held_out)) > 100
    assert not train & set(held_out)
    assert all(unit_hash(t) < T.EVAL_FRACTION for t in held_out)
    assert all(unit_hash(t) >= T.EVAL_FRACTION for t in train)


def test_parse_levels():
    assert T.parse_levels("1-3") == (1, 2, 3)
    assert T.parse_levels("1,2,5") == (1, 2, 5)
    assert T.parse_levels(" 5 , 1-2 ") == (1, 2, 5)
    assert T.parse_levels("4") == (4,) and T.parse_levels(4) == (4,)
    for bad in ["", "0", "6", "1-6", "3-1", "a", "1-", "1;2", 1.5, True, None, [1]]:
        with pytest.raises(ValueError, match="levels=") as e:
            T.parse_levels(bad)
        assert "\n" not in str(e.value)


def test_arithmetic_task_refuses_bad_settings():
    for kwargs, field in [({"levels": ()}, "levels"), ({"levels": (0, 1)}, "levels"),
                          ({"levels": (True,)}, "levels"), ({"seed": -1}, "seed"),
                          ({"seed": 1.0}, "seed")]:
        with pytest.raises(ValueError, match=field):
            T.ArithmeticTask(**kwargs)
    with pytest.raises(ValueError, match="split="):
        T.ArithmeticTask().example(0, "test")
    with pytest.raises(ValueError, match="index="):
        T.ArithmeticTask().example(-1)


# ------------------------------------------------------------------------------- JsonlTask

def write_lines(path, lines) -> str:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_jsonl_task(tmp_path):
    records = [{"prompt": f"What is {i} + 1?", "answer": str(i + 1), "tag": i} for i in range(40)]
    records[3] = {"messages": [{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": "Say hi."}], "answer": "hi"}
    path = write_lines(tmp_path / "prompts.jsonl", [json.dumps(r) for r in records[:20]] + [""]
                       + [json.dumps(r) for r in records[20:]])
    task = T.make_task(path, eval_fraction=0.25)
    assert isinstance(task, T.JsonlTask)
    assert task.size("train") + task.size("eval") == 40 and task.size("eval") > 0
    seen = task.eval_examples(1000) + [task.example(i) for i in range(task.size("train"))]
    assert len(task.eval_examples(1000)) == task.size("eval")
    by_answer = {e.fields["answer"]: e for e in seen}
    assert len(by_answer) == 40
    assert by_answer["hi"].messages[-1] == {"role": "user", "content": "Say hi."}
    assert len(by_answer["hi"].messages) == 2
    assert by_answer["5"].messages == ({"role": "user", "content": "What is 4 + 1?"},)
    assert by_answer["5"].fields == {"answer": "5", "tag": 4}
    # The index wraps around the split, so a stream never runs out.
    assert task.example(task.size("train") + 2) == task.example(2)


@pytest.mark.parametrize("line,message", [
    ("{not json", "not valid JSON"), ("[1, 2]", "not an object"),
    ('{"answer": "1"}', "neither of 'prompt' and 'messages'"),
    ('{"prompt": "a", "messages": [{"role": "user", "content": "a"}]}', "both"),
    ('{"prompt": 3}', "not a non-empty str"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}',
     "last message's role is 'assistant'"),
    ('{"messages": [{"role": "robot", "content": "a"}]}', "role='robot'"),
    ('{"messages": []}', "messages is empty"),
])
def test_jsonl_task_refuses_bad_lines(tmp_path, line, message):
    path = write_lines(tmp_path / "p.jsonl", ['{"prompt": "fine"}', "", line])
    with pytest.raises(ValueError, match=re.escape(message)) as e:
        T.JsonlTask(path)
    assert str(e.value).startswith(f"{path}:3: ") and "\n" not in str(e.value)


def test_jsonl_task_refuses_missing_files_empty_splits_and_other_tasks(tmp_path):
    with pytest.raises(ValueError, match="cannot read"):
        T.JsonlTask(str(tmp_path / "missing.jsonl"))
    path = write_lines(tmp_path / "one.jsonl", ['{"prompt": "only one"}'])
    with pytest.raises(ValueError, match=r"1 train and 0 eval records .*eval_fraction"):
        T.JsonlTask(path)
    with pytest.raises(ValueError, match="eval_fraction="):
        T.JsonlTask(path, eval_fraction=0.0)
    with pytest.raises(ValueError, match="use 'arithmetic' or a .jsonl file"):
        T.make_task("prompts.txt")
    assert T.make_task("arithmetic", levels="2,4", seed=7).levels == (2, 4)
    with pytest.raises(ValueError, match="levels="):
        T.make_task("arithmetic", levels="0-2")


# ------------------------------------------------------------------------------- SFT data

def test_sft_conversations_get_full_rewards():
    task = T.ArithmeticTask(levels=T.LEVELS)
    conversations = T.sft_conversations(task, 25)
    assert len(conversations) == 25
    for i, record in enumerate(conversations):
        *prompt, reply = record["messages"]
        ex = task.example(i, "train")
        assert prompt == list(ex.messages) and reply["role"] == "assistant"
        completion = reply["content"] + EOS
        answer = ex.fields["answer"]
        assert R.exact_match("p", completion, answer=answer) == 1.0
        assert R.think_format("p", completion) == 1.0
        assert R.exact_match("p", completion, answer=str(int(answer) + 1)) == 0.0
    offset = T.sft_conversations(task, 2, seed_offset=10)
    assert offset == T.sft_conversations(task, 12)[10:]
    with pytest.raises(ValueError, match="ArithmeticTask"):
        T.sft_conversations("arithmetic", 1)


def test_write_sft_data(tmp_path):
    path = tmp_path / "new" / "sft.jsonl"
    assert write_sft_data(str(path), 30, "4-5", seed=2) == 30
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 30
    assert json.loads(lines[0]) == T.sft_conversations(T.ArithmeticTask((4, 5), 2), 1)[0]
    assert os.listdir(path.parent) == ["sft.jsonl"]  # no temporary file left
    with pytest.raises(ValueError, match="is a directory"):
        write_sft_data(str(tmp_path), 1, "1")
    with pytest.raises(ValueError, match="levels="):
        write_sft_data(str(path), 1, "9")
    assert len(path.read_text(encoding="utf-8").splitlines()) == 30


def test_sft_data_cli_refuses_a_zero_count(tmp_path):
    out = tmp_path / "x.jsonl"
    proc = subprocess.run([sys.executable, "-m", "dsv3_jax.rl.sft_data", f"--output={out}",
                           "--count=0"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "--count=0" in proc.stderr, proc.stderr
    assert not out.exists()
