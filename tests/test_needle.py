"""The needle-in-a-haystack evaluation (dsv3_jax/eval): the prompt builder at the token level, the
haystack's source, the two scores against plain references, and the CLI end to end on a tiny
random model (which scores ~0: no retrieval quality is asserted).

References are independent: expected needle positions are worked out by hand, the validation split
by sha1 as dsv3_jax/data/corpus.py's docstring defines it, log-probabilities by a log-softmax
written out in numpy float64.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import (COMPILATION_CACHE, TINY32, assert_close, init_params, jitted_forward,
                      random_checkpoint, stdlib_tokenizer)
from dsv3_jax.data.corpus import open_corpus
from dsv3_jax.eval import needle_report
from dsv3_jax.eval.needle import (NeedleError, answer_logprob, build_case, draw_needles,
                                  filler_stream, is_retrieved, plan_cases, score_answers)
from dsv3_jax.train.run_config import base_config

ROOT = pathlib.Path(__file__).resolve().parent.parent
CFG = TINY32.replace(vocab_size=512)  # max_seq_len 512
ENV = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(COMPILATION_CACHE))
ENV.pop("DSV3_DEBUG", None)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A 512-piece tokenizer (split digits) trained on about 20 stdlib files."""
    return stdlib_tokenizer(tmp_path_factory.mktemp("tok_corpus"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    """A converted Orbax folder (params/, model_config.json, tokenizer.model) of random params."""
    return random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny_random", CFG, tokenizer)


@pytest.fixture(scope="module")
def bare_checkpoint(checkpoint, tmp_path_factory):
    """The same checkpoint without its tokenizer.model."""
    import shutil

    folder = tmp_path_factory.mktemp("bare") / "no_tokenizer"
    shutil.copytree(checkpoint, folder, ignore=shutil.ignore_patterns("tokenizer.model"))
    return folder


def run_eval(*args: str):
    return subprocess.run([sys.executable, "-m", "dsv3_jax.eval", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)


# ------------------------------------------------------------------------------ the builder

NEEDLE, QUESTION = [-1, -2, -3], [-7, -8]  # ids no filler token has
FILLER = list(range(1000, 1100))


@pytest.mark.parametrize("length, depth, start", [
    # n = length - 5 filler tokens; start = n * depth rounded, halves up
    (20, 0.0, 0), (20, 1.0, 15), (20, 0.5, 8), (20, 0.25, 4), (20, 0.75, 11),
    (6, 0.0, 0), (6, 1.0, 1), (6, 0.5, 1), (64, 0.5, 30), (64, 0.1, 6),
])
def test_the_needle_sits_at_its_depth_in_a_prompt_of_the_asked_length(length, depth, start):
    prompt, needle_start = build_case(FILLER, NEEDLE, QUESTION, length, depth)
    n = length - 5
    assert len(prompt) == length and needle_start == start
    assert prompt[start:start + 3] == NEEDLE and prompt[-2:] == QUESTION
    assert prompt[:start] == FILLER[:start]  # the filler in order around the needle
    assert prompt[start + 3:-2] == FILLER[start:n]


@pytest.mark.parametrize("length, depth, message", [
    (20, 1.5, r"depths: 1\.5 is not a fraction in \[0, 1\]"),
    (20, -0.25, r"depths: -0\.25 is not a fraction in \[0, 1\]"),
    (20, float("nan"), r"depths: nan is not a fraction"),
    (5, 0.5, r"length=5 leaves no room for a haystack: .* take 5 tokens; use a length of at "
             r"least 6"),
    (200, 0.5, r"the filler has 100 tokens but length=200 needs 195"),
])
def test_the_builder_refuses_what_it_cannot_build(length, depth, message):
    with pytest.raises(NeedleError, match=message):
        build_case(FILLER, NEEDLE, QUESTION, length, depth)


def test_cases_lay_the_haystacks_out_per_trial_and_draw_a_needle_per_cell(tokenizer):
    lengths, depths, trials = [48, 80], [0.0, 0.5, 1.0], 3
    filler = np.arange(10_000, 10_000 + trials * max(lengths))  # position i holds 10000 + i
    needles = draw_needles(tokenizer, lengths, depths, trials, seed=7)
    cases = plan_cases(needles, filler, seed=7)
    assert len(cases) == len(lengths) * len(depths) * trials
    assert len({c["key"] for c in cases.values()}) == len(cases)  # each cell its own needle
    for (length, depth, trial), c in cases.items():
        nd = needles[length, depth, trial]
        ids, k = c["prompt_ids"], c["needle_start"]
        n = length - len(nd.needle_ids) - len(nd.question_ids)
        assert len(ids) == length and k == math.floor(depth * n + 0.5)
        assert ids[k:k + len(nd.needle_ids)] == list(nd.needle_ids)
        assert ids[length - len(nd.question_ids):] == list(nd.question_ids)
        assert re.fullmatch(r"needle_[a-z]{5}", c["key"])
        assert re.fullmatch(r"[1-9]\d{5}", c["value"])
        assert tokenizer.decode(nd.answer_ids) == c["value"]
        haystack = np.asarray(ids[:k] + ids[k + len(nd.needle_ids):length - len(nd.question_ids)])
        assert np.all(np.diff(haystack) == 1)  # one contiguous run of the stream
        assert trial * max(lengths) <= haystack[0] - 10_000  # inside its trial's block
        assert haystack[-1] - 10_000 < (trial + 1) * max(lengths)
        same_trial = cases[length, 0.0, trial]  # every depth reads the same haystack
        assert haystack[0] == same_trial["prompt_ids"][same_trial["needle_start"] + len(
            needles[length, 0.0, trial].needle_ids)]
    # A cell's needle depends on the seed and the cell, not on the rest of the grid.
    alone = draw_needles(tokenizer, [80], [0.5], 2, seed=7)
    assert alone[80, 0.5, 1] == needles[80, 0.5, 1]
    assert draw_needles(tokenizer, [80], [0.5], 2, seed=8)[80, 0.5, 1] != needles[80, 0.5, 1]


# ------------------------------------------------------------------------------ the haystack

def _validation(key: str, fraction: float) -> bool:
    """corpus.py's split rule, written out: sha1's first 8 bytes as a fraction of 2**64."""
    return int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big") / 2**64 < fraction


def test_the_filler_is_the_validation_documents_each_followed_by_eos(tmp_path, tokenizer):
    names = [f"doc{i}.txt" for i in range(8)]
    for i, name in enumerate(names):
        (tmp_path / name).write_text(f"def f{i}(x):\n    return x * {i}\n" * (3 + i))
    data = base_config().data
    data.corpus, data.validation_fraction = str(tmp_path / "*.txt"), 0.5
    corpus = open_corpus(data)
    held_out = [n for n in names if _validation(n, 0.5)]
    assert 0 < len(held_out) < len(names)  # both splits have documents
    expected = []
    for name in held_out:  # corpus order: the glob's sorted order
        expected += tokenizer.encode((tmp_path / name).read_text()) + [tokenizer.eos_id]
    for n in (1, 37, len(expected)):
        np.testing.assert_array_equal(filler_stream(corpus, tokenizer, n), expected[:n])
    with pytest.raises(NeedleError, match=rf"the validation split of corpus .* holds only "
                                          rf"{len(expected)} tokens, but the haystacks need "
                                          rf"{len(expected) + 1} \(trials x the longest length\)"):
        filler_stream(corpus, tokenizer, len(expected) + 1)


# ------------------------------------------------------------------------------ the scores

def _log_softmax64(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def test_answer_logprob_is_the_log_softmax_of_each_answer_token():
    rng = np.random.default_rng(0)
    logits = (3 * rng.standard_normal((2, 7, 11))).astype(np.float32)
    ids, first = np.array([[4, 0, 10], [9, 9, 1]]), 3
    ref = _log_softmax64(logits)
    want = np.array([[ref[b, first + j, ids[b, j]] for j in range(3)] for b in range(2)])
    got = np.asarray(answer_logprob(logits, ids, first))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)  # float32 log-softmax of |x| < 15
    np.testing.assert_allclose(np.asarray(answer_logprob(logits[1], ids[1], first)), want[1],
                               rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"first=5 with 3 answer tokens reaches position 7"):
        answer_logprob(logits, ids, 5)
    with pytest.raises(ValueError, match=r"do not go together"):
        answer_logprob(logits, ids[0], first)


@pytest.mark.parametrize("text, retrieved", [
    ("123456", True), (" 123456\n", True), ("\n\t 1234567", True), ("123456abc", True),
    ("12345", False), ("x123456", False), ("", False), ("1 23456", False), ("654321", False),
])
def test_exact_retrieval_rule(text, retrieved):
    assert is_retrieved(text, "123456") is retrieved


def test_teacher_forced_answer_scores_match_the_full_forward_logits():
    """score_answers applies the head at the answer positions only: it must give what the full
    forward pass's logits give (float32 both ways: within 1e-5 of the largest |log p|)."""
    params = init_params(CFG)
    rng = np.random.default_rng(1)
    prompt_len, n = 13, 4
    answers = rng.integers(3, CFG.vocab_size, (2, n)).astype(np.int32)
    tokens = np.concatenate([rng.integers(3, CFG.vocab_size, (2, prompt_len)), answers[:, :-1]],
                            axis=1).astype(np.int32)
    got = score_answers(CFG, params, tokens, answers)
    full = np.asarray(jitted_forward(CFG)(params, tokens).logits)
    ref = _log_softmax64(full)
    want = np.array([[ref[b, prompt_len - 1 + j, answers[b, j]] for j in range(n)]
                     for b in range(2)])
    assert_close(got, want, 1e-5, "answer log-probs")


# ------------------------------------------------------------------------------ the report

def _result(exact, prob):
    return {"checkpoint": "/x/run7/", "lengths": [64, 128], "depths": [0.0, 0.5], "trials": 2,
            "exact": exact, "answer_prob": prob}


def test_tables_have_a_row_per_depth_and_a_column_per_length():
    text = needle_report.format_tables(_result([[1.0, 0.5], [0.0, 0.25]],
                                               [[0.9, 0.8], [0.1, 0.125]]))
    lines = text.splitlines()
    assert lines[0] == "exact retrieval (mean over 2 trial(s))"
    assert lines[1].split() == ["depth", "\\", "length", "64", "128"]
    assert lines[2].split() == ["0%", "1.000", "0.000"] and lines[3].split() == ["50%", "0.500",
                                                                                 "0.250"]
    assert lines[5] == "answer probability (mean over 2 trial(s))"
    assert lines[8].split() == ["50%", "0.800", "0.125"]
    assert needle_report.checkpoint_name(_result(None, None)) == "run7"


def test_without_matplotlib_the_json_is_still_written_and_no_stale_png_stays(tmp_path,
                                                                             monkeypatch):
    result = _result([[1.0, 0.5], [0.0, 0.25]], [[0.9, 0.8], [0.1, 0.125]])
    (tmp_path / "needle.png").write_bytes(b"an older heatmap")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    json_path, png_path = needle_report.write_results(result, str(tmp_path))
    assert png_path is None and not (tmp_path / "needle.png").exists()
    assert json.loads(pathlib.Path(json_path).read_text()) == result


# ------------------------------------------------------------------------------ the CLI

def test_cli_end_to_end_on_a_tiny_random_model(checkpoint, tokenizer, tmp_path):
    out_dir = tmp_path / "out"
    out = run_eval("needle", f"--checkpoint={checkpoint}", "--lengths=64,128",
                   "--depths=0,0.5,1", "--trials=1", f"--output_dir={out_dir}", "--seed=3")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "exact retrieval (mean over 1 trial(s))" in out.stdout
    assert "answer probability" in out.stdout and "depth \\ length" in out.stdout
    if importlib.util.find_spec("matplotlib"):  # the test extras install it
        assert (out_dir / "needle.png").read_bytes()[:8] == PNG_MAGIC
    else:
        assert "needle.png skipped" in out.stderr and "pip install matplotlib" in out.stderr
    r = json.loads((out_dir / "needle.json").read_text())
    assert r["lengths"] == [64, 128] and r["depths"] == [0.0, 0.5, 1.0] and r["trials"] == 1
    assert r["checkpoint"] == str(checkpoint) and r["split"] == "validation"
    assert r["corpus"] == "builtin" and r["seed"] == 3
    assert r["model"] == {"max_seq_len": CFG.max_seq_len, "original_seq_len":
                          CFG.original_seq_len, "rope_factor": CFG.rope_factor,
                          "use_yarn": CFG.use_yarn}
    cells = {(c["length"], c["depth"], c["trial"]): c for c in r["cells"]}
    assert len(cells) == len(r["cells"]) == 6
    for i, length in enumerate(r["lengths"]):
        for j, depth in enumerate(r["depths"]):
            c = cells[length, depth, 0]
            assert r["exact"][i][j] == c["exact"] and r["answer_prob"][i][j] == c["answer_prob"]
            assert c["exact"] in (0.0, 1.0)
            assert c["exact"] == float(c["generated"].lstrip().startswith(c["value"]))
            assert 0.0 < c["answer_prob"] <= 1.0 and c["logprob"] < 0
            assert math.isclose(c["answer_prob"], math.exp(c["logprob"] / 6), rel_tol=1e-9)
            n = (length - len(tokenizer.encode(f"\n{c['key']} = {c['value']}\n"))
                 - len(tokenizer.encode(f"\n{c['key']} = ")))
            assert c["needle_start"] == math.floor(depth * n + 0.5)


def _assert_refused(out, status: int, pattern: str) -> None:
    where = f"exit {out.returncode}\nstdout: {out.stdout[-1500:]}\nstderr: {out.stderr[-3000:]}"
    assert out.returncode == status, where
    assert "Traceback" not in out.stderr, where
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and re.search(pattern, errors[0]), where


@pytest.mark.parametrize("args, status, pattern", [
    (["needle", "{ckpt}", "--lengths=64,600"], 2,
     r"--lengths: 600 needs 607 positions .* max_seq_len=512; use lengths <= 505, or raise "
     r"max_seq_len with a context extension run"),
    (["needle", "{ckpt}", "--lengths=64", "--depths=0,1.5"], 2,
     r"--depths: 1\.5 is not a fraction in \[0, 1\]"),
    (["needle", "--checkpoint={tmp}/missing", "--lengths=64"], 1, r"missing is not a checkpoint"),
    (["needle", "{ckpt}", "--lengths=64", "--trials=0"], 2, r"--trials=0 must be an integer >= 1"),
    (["needle", "{ckpt}", "--lengths=64", "--max_seq_len=-1"], 2,
     r"--max_seq_len=-1 must be a positive number"),
    (["needle", "--checkpoint={bare}", "--lengths=64"], 2,
     r"no_tokenizer has no tokenizer \(tokenizer.json or tokenizer.model\); pass --tokenizer="),
    (["needle", "{ckpt}", "--lengths=64", "--output_dir={tmp}/a_file"], 1,
     r"--output_dir .*a_file is not writable"),
    (["bogus"], 2, r"give a command first, one of needle, perplexity, lm-eval; got 'bogus'"),
    ([], 2, r"give a command first, one of needle, perplexity, lm-eval; got no command"),
], ids=["length>max_seq_len", "depth 1.5", "missing checkpoint", "trials 0", "max_seq_len -1", "no tokenizer",
        "output_dir a file", "unknown command", "no command"])
def test_cli_refusals_are_one_line(args, status, pattern, checkpoint, bare_checkpoint, tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    args = [a.format(ckpt=f"--checkpoint={checkpoint}", bare=bare_checkpoint, tmp=tmp_path)
            for a in args]
    _assert_refused(run_eval(*args), status, pattern)
