"""The lm-evaluation-harness model `dsv3_jax` (dsv3_jax/eval/lm_eval_model.py, scoring.py) and the
eval CLI's perplexity and lm-eval commands, offline, on a tiny random model.

References are independent of the adapter: log-likelihoods come from the model's full forward
(float32, every logit) through a float64 log-softmax written out in numpy; lm-eval's rolling
windows are rebuilt here from its documented example; generation is compared with
`infer.generate.generate` and the stop string cut by hand. The random model scores ~0 on the
tasks: only agreement between lm-eval's metrics and these references is asserted.

Tolerances: a log-likelihood is a float32 sum over at most 64 tokens of log-softmax values of
magnitude ~6, each within ~1e-6 of float64; 1e-4 absolute leaves a wide margin, and differences
between batch shapes are of the same order (the same float32 numbers summed in another order).
"""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # before lm_eval imports datasets
os.environ.setdefault("HF_HUB_OFFLINE", "1")

lm_eval = pytest.importorskip("lm_eval")

from conftest import (COMPILATION_CACHE, TINY32, init_params, jitted_forward,  # noqa: E402
                      random_checkpoint, stdlib_tokenizer)
from dsv3_jax.eval import LM_EVAL_MODEL  # noqa: E402  (importing dsv3_jax.eval registers it)
from dsv3_jax.chat.template import render_chat  # noqa: E402
from dsv3_jax.eval.lm_eval_model import DSV3LM, ModelArgError  # noqa: E402
from dsv3_jax.eval.perplexity import run_perplexity  # noqa: E402
from dsv3_jax.eval.scoring import Scorer, rolling_windows  # noqa: E402
from dsv3_jax.infer.generate import generate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
WINDOW = 64
CFG = TINY32.replace(vocab_size=512, max_seq_len=WINDOW)
ENV = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(COMPILATION_CACHE),
           HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
ENV.pop("DSV3_DEBUG", None)
ATOL = 1e-4

CONTEXTS = ["def add(a, b):", "import json\n", "x", "class Message:\n    " * 12, "  y = 1  "]
CONTINUATIONS = ["\n    return a + b\n", "json.dumps({})", " = 3", "pass", " + 2"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A 512-piece tokenizer (split digits) trained on about 20 stdlib files."""
    return stdlib_tokenizer(tmp_path_factory.mktemp("tok_corpus"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    """A converted Orbax folder (params/, model_config.json, tokenizer.model) of random params."""
    return random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny_random", CFG, tokenizer)


@pytest.fixture(scope="module")
def lm(checkpoint):
    return DSV3LM(checkpoint=str(checkpoint), batch_size=3, dtype="float32")


def log_softmax64(logits) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def direct_score(context_ids, continuation_ids, window=WINDOW):
    """(log p, greedy) of the continuation by one full forward over the last window + 1 tokens."""
    whole = (list(context_ids) + list(continuation_ids))[-(window + 1):]
    logits = jitted_forward(CFG)(init_params(CFG), jnp.asarray([whole[:-1]], jnp.int32)).logits
    logp = log_softmax64(logits[0])
    n, k = len(whole) - 1, len(continuation_ids)
    rows = range(n - k, n)
    total = sum(logp[t, whole[t + 1]] for t in rows)
    greedy = all(int(np.argmax(logp[t])) == whole[t + 1] for t in rows)
    return total, greedy


def encode_pair(tokenizer, context, continuation):
    """lm-eval's TemplateLM split, written out: trailing spaces move to the continuation; each
    text starts with the document-start token (eos for this tokenizer); the context is encoded
    alone, the continuation is what follows as many tokens of the whole text's encoding."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = [tokenizer.eos_id] + tokenizer.encode(context + continuation)
    context_ids = [tokenizer.eos_id] + tokenizer.encode(context)
    return context_ids, whole[len(context_ids):]


def requests(kind, args_list):
    return [Instance(request_type=kind, doc={}, arguments=args, idx=i)
            for i, args in enumerate(args_list)]


# ------------------------------------------------------------------------------ loglikelihood

def test_loglikelihood_equals_the_forward(lm, tokenizer):
    got = lm.loglikelihood(requests("loglikelihood", list(zip(CONTEXTS, CONTINUATIONS))),
                           disable_tqdm=True)
    for context, continuation, (logp, greedy) in zip(CONTEXTS, CONTINUATIONS, got):
        ids = encode_pair(tokenizer, context, continuation)
        want, want_greedy = direct_score(*ids)
        assert abs(logp - want) < ATOL, (context, logp, want)
        assert greedy == want_greedy
    # The long context (12 class lines) was cut to the window from the left.
    assert len(sum(encode_pair(tokenizer, CONTEXTS[3], CONTINUATIONS[3]), [])) > WINDOW + 1


def test_empty_context_conditions_on_the_prefix_token(lm, tokenizer):
    (logp, _), = lm.loglikelihood(requests("loglikelihood", [("", "import os")]),
                                  disable_tqdm=True)
    want, _ = direct_score([tokenizer.eos_id], tokenizer.encode("import os"))
    assert abs(logp - want) < ATOL


def test_greedy_flag_on_the_model_s_own_continuation(checkpoint):
    """A continuation of the model's own argmax tokens is greedy; changing its last token is not."""
    params = init_params(CFG)
    prompt = [5, 17, 42, 99, 7]
    own = generate(CFG, params, [prompt], max_new_tokens=6)[0][len(prompt):]
    other = own[:-1] + [(own[-1] + 1) % CFG.vocab_size]
    scorer = Scorer(CFG, params, batch_size=2)
    (lp_own, g_own), (lp_other, g_other) = scorer.loglikelihood([(prompt, own), (prompt, other)])
    assert g_own and not g_other
    assert abs(lp_own - direct_score(prompt, own)[0]) < ATOL
    assert abs(lp_other - direct_score(prompt, other)[0]) < ATOL


def test_batching_does_not_change_results():
    """Each request alone == inside a batch of mixed lengths (sorted, padded, filler rows)."""
    rng = np.random.default_rng(1)
    pairs = [(rng.integers(0, 512, n).tolist(), rng.integers(0, 512, k).tolist())
             for n, k in [(3, 2), (30, 5), (61, 3), (9, 1), (90, 4), (1, 1), (17, 8)]]
    params = init_params(CFG)
    mixed = Scorer(CFG, params, batch_size=4).loglikelihood(pairs)
    alone = Scorer(CFG, params, batch_size=1)
    for pair, (logp, greedy) in zip(pairs, mixed):
        (logp1, greedy1), = alone.loglikelihood([pair])
        assert abs(logp - logp1) < ATOL and greedy == greedy1


def test_truncation_is_said_once(checkpoint, caplog):
    model = DSV3LM(checkpoint=str(checkpoint), batch_size=2)
    long = [("x = 1\n" * 80, " y"), ("z", " = 2")]
    with caplog.at_level(logging.WARNING, logger="dsv3_jax.eval"):
        model.loglikelihood(requests("loglikelihood", long), disable_tqdm=True)
        model.loglikelihood(requests("loglikelihood", long), disable_tqdm=True)
    said = [r.getMessage() for r in caplog.records if "cut from the left" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("1 of 2 requests"), said


def test_continuation_longer_than_the_window_is_refused():
    scorer = Scorer(CFG, init_params(CFG))
    with pytest.raises(ValueError, match="more than the model's window"):
        scorer.loglikelihood([([1], list(range(WINDOW + 1)))])


# ------------------------------------------------------------------------------ rolling

def test_rolling_windows_follow_lm_eval_s_example():
    """lm-eval's docstring: tokens 0..9, window 4 -> inputs [BOS 0 1 2], [3 4 5 6], [5 6 7 8]
    predicting [0 1 2 3], [4 5 6 7], [8 9]."""
    pairs = rolling_windows(list(range(10)), -1, 4)
    inputs = [(c + x)[:-1] for c, x in pairs]
    assert inputs == [[-1, 0, 1, 2], [3, 4, 5, 6], [5, 6, 7, 8]]
    assert [x for _, x in pairs] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert rolling_windows([], -1, 4) == []


def test_rolling_loglikelihood_is_the_sum_over_windows(lm, tokenizer):
    text = "import json\n\n\ndef load(path):\n    with open(path) as f:\n" * 6
    ids = tokenizer.encode(text)
    assert len(ids) > 3 * WINDOW
    (got,) = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]),
                                      disable_tqdm=True)
    # Windows written plainly: chunks of WINDOW targets; each reads the WINDOW tokens before its
    # last target (the first: eos, then the text).
    padded = [tokenizer.eos_id] + ids
    want, scored = 0.0, []
    for start in range(0, len(ids), WINDOW):
        end = min(start + WINDOW, len(ids))
        read = padded[max(end - WINDOW, 0):end]  # padded[j] precedes ids[j]
        logp = log_softmax64(jitted_forward(CFG)(init_params(CFG),
                                                 jnp.asarray([read], jnp.int32)).logits[0])
        for j in range(start, end):
            want += logp[j - max(end - WINDOW, 0), ids[j]]
            scored.append(j)
    assert scored == list(range(len(ids)))
    assert abs(got - want) < 10 * ATOL, (got, want)


# ------------------------------------------------------------------------------ generation

def test_generate_until_equals_greedy_generation_cut_at_the_stop(lm, tokenizer):
    prompt = "def parse(text):\n"
    ids = [tokenizer.eos_id] + tokenizer.encode(prompt)
    new = generate(CFG, init_params(CFG), [ids], max_new_tokens=12,
                   stop_tokens=[tokenizer.eos_id])[0][len(ids):]
    free = tokenizer.decode(new, keep_special=True).split(tokenizer.decode(
        [tokenizer.eos_id], keep_special=True))[0]
    assert len(free) >= 4, free
    stop = free[2:4]
    got = lm.generate_until(requests("generate_until", [
        (prompt, {"until": [stop], "max_gen_toks": 12}),
        (prompt, {"until": [], "max_gen_toks": 12}),
        ("x", {"until": ["\n"], "max_gen_toks": 3})]), disable_tqdm=True)
    assert got[0] == free.split(stop)[0]
    assert got[1] == free


def test_apply_chat_template(lm):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    assert lm.apply_chat_template(messages) == render_chat(messages)
    prefilled = lm.apply_chat_template(messages + [{"role": "assistant", "content": "Well,"}],
                                       add_generation_prompt=False)
    assert prefilled == render_chat(messages) + "Well,"
    assert lm.tok_encode(render_chat(messages))[0] != lm.prefix_token_id  # BOS already there


# ------------------------------------------------------------------------------ lm-eval tasks

def write_tasks(folder: pathlib.Path, answer: str) -> None:
    """Three local tasks over JSONL files: multiple choice (acc), generation (exact_match) and
    rolling perplexity."""
    data = {
        "mc": [{"q": "import", "choices": ["json", "os", "42"], "label": 1},
               {"q": "def f(x):\n    return", "choices": ["x", "None"], "label": 0}],
        "gen": [{"q": "def parse(text):\n", "a": answer}, {"q": "x =", "a": "never this"}],
        "ppl": [{"text": "import json\n\nprint(json.dumps([1, 2]))\n" * 3}],
    }
    for name, rows in data.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = (f"dataset_path: json\ndataset_kwargs:\n  cache_dir: {folder / 'hf_cache'}\n"
              "  data_files:\n    test: {file}\ntest_split: test\n")
    (folder / "t_mc.yaml").write_text(
        "task: dsv3_t_mc\n" + common.format(file=folder / "mc.jsonl") + textwrap.dedent("""\
        output_type: multiple_choice
        doc_to_text: "{{q}}"
        doc_to_choice: "{{choices}}"
        doc_to_target: label
        metric_list:
          - metric: acc
            aggregation: mean
            higher_is_better: true
        """))
    (folder / "t_gen.yaml").write_text(
        "task: dsv3_t_gen\n" + common.format(file=folder / "gen.jsonl") + textwrap.dedent("""\
        output_type: generate_until
        doc_to_text: "{{q}}"
        doc_to_target: "{{a}}"
        generation_kwargs:
          until: ["\\n\\n"]
          max_gen_toks: 12
        metric_list:
          - metric: exact_match
            aggregation: mean
            higher_is_better: true
        """))
    (folder / "t_ppl.yaml").write_text(
        "task: dsv3_t_ppl\n" + common.format(file=folder / "ppl.jsonl") + textwrap.dedent("""\
        output_type: loglikelihood_rolling
        doc_to_text: ""
        doc_to_target: "{{text}}"
        metric_list:
          - metric: bits_per_byte
            aggregation: bits_per_byte
            higher_is_better: false
        """))


def test_simple_evaluate_on_local_tasks(lm, tokenizer, tmp_path):
    """The three tasks through lm_eval.simple_evaluate; each metric equals what our own calls
    give: acc from the choices' log-likelihoods, exact_match from the greedy text (the first doc's
    answer is the model's own, so it scores 1 and the other 0), bits_per_byte from the rolling
    log-likelihood."""
    from lm_eval.tasks import TaskManager

    own = lm.generate_until(requests("generate_until", [
        ("def parse(text):\n", {"until": ["\n\n"], "max_gen_toks": 12})]), disable_tqdm=True)[0]
    write_tasks(tmp_path, own)
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    out = lm_eval.simple_evaluate(model=lm, tasks=["dsv3_t_mc", "dsv3_t_gen", "dsv3_t_ppl"],
                                  task_manager=manager)
    results = out["results"]

    # lm-eval joins context and choice with its target_delimiter, " ".
    mc = [("import", ["json", "os", "42"], 1), ("def f(x):\n    return", ["x", "None"], 0)]
    right = []
    for q, choices, label in mc:
        scores = [s for s, _ in lm.loglikelihood(requests("loglikelihood", [
            (q, " " + c) for c in choices]), disable_tqdm=True)]
        right.append(int(np.argmax(scores)) == label)
    assert results["dsv3_t_mc"]["acc,none"] == pytest.approx(np.mean(right))
    assert results["dsv3_t_gen"]["exact_match,none"] == pytest.approx(0.5)

    text = "import json\n\nprint(json.dumps([1, 2]))\n" * 3
    (logp,) = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]),
                                       disable_tqdm=True)
    bpb = -logp / (math.log(2) * len(text.encode("utf-8")))
    assert results["dsv3_t_ppl"]["bits_per_byte,none"] == pytest.approx(bpb, rel=1e-6)


# ------------------------------------------------------------------------------ model args

def test_model_args_are_checked(checkpoint, tmp_path):
    with pytest.raises(ModelArgError, match="unknown model arg pretrainde"):
        DSV3LM(checkpoint=str(checkpoint), pretrainde="x")
    with pytest.raises(ModelArgError, match="needs model_args=checkpoint="):
        DSV3LM()
    with pytest.raises(ModelArgError, match="dtype='float16' is not one of"):
        DSV3LM(checkpoint=str(checkpoint), dtype="float16")
    with pytest.raises(ModelArgError, match="batch_size=0 must be an integer >= 1"):
        DSV3LM(checkpoint=str(checkpoint), batch_size=0)
    bare = tmp_path / "bare"
    bare.mkdir()
    for item in ("params", "model_config.json"):
        os.symlink(checkpoint / item, bare / item)
    with pytest.raises(ModelArgError, match="has no tokenizer .* add tokenizer="):
        DSV3LM(checkpoint=str(bare))
    model = DSV3LM(checkpoint=str(bare), tokenizer=str(checkpoint / "tokenizer.model"),
                   batch_size="auto", max_length=32)
    assert model.max_length == 32 and model.batch_size == 8


def test_lm_eval_registry_knows_the_model():
    from lm_eval.api.registry import get_model

    assert LM_EVAL_MODEL == "dsv3_jax" and get_model(LM_EVAL_MODEL) is DSV3LM
    assert get_model("dummy").__name__ == "DummyLM"  # lm-eval's own names still load


@pytest.mark.multidevice
def test_a_mesh_gives_the_one_device_results(lm, checkpoint):
    """mesh=data=2;expert=4: params read into their shardings, the batch split 8 ways (batch 3 is
    rounded up to 8), the routed experts exchanged between devices; same scores and text."""
    on_mesh = DSV3LM(checkpoint=str(checkpoint), batch_size=3, dtype="float32",
                     mesh="data=2;expert=4")
    assert on_mesh.batch_size == 8
    reqs = requests("loglikelihood", list(zip(CONTEXTS, CONTINUATIONS)))
    for (a, ga), (b, gb) in zip(lm.loglikelihood(reqs, disable_tqdm=True),
                                on_mesh.loglikelihood(reqs, disable_tqdm=True)):
        assert abs(a - b) < ATOL and ga == gb
    gen = requests("generate_until", [("def parse(text):\n", {"until": [], "max_gen_toks": 8})])
    assert on_mesh.generate_until(gen, disable_tqdm=True) == lm.generate_until(
        gen, disable_tqdm=True)


# ------------------------------------------------------------------------------ perplexity

def test_perplexity_equals_the_forward(tokenizer):
    texts = ["import os\n", "def f():\n    return 1\n"]
    result = run_perplexity(CFG, init_params(CFG), tokenizer, texts, progress=False)
    nll = 0.0
    for text, doc in zip(texts, result["per_document"]):
        ids = tokenizer.encode(text) + [tokenizer.eos_id]
        logp, _ = direct_score([tokenizer.eos_id], ids)
        assert doc["tokens"] == len(ids)
        assert abs(doc["nll"] + logp) < ATOL
        nll -= logp
    tokens = result["tokens"]
    assert result["nll_per_token"] == pytest.approx(nll / tokens, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    n_bytes = sum(len(t.encode()) for t in texts)
    assert result["bits_per_byte"] == pytest.approx(nll / (math.log(2) * n_bytes), rel=1e-5)


def run_eval(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "dsv3_jax.eval", *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=300)


def test_perplexity_cli(checkpoint, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"m{i}.py").write_text(f"def f{i}(x):\n    return x * {i}\n" * (i + 1))
    out = tmp_path / "ppl"
    done = run_eval("perplexity", f"--checkpoint={checkpoint}", f"--corpus={corpus}/*.py",
                    "--split=train", "--max_length=32", f"--output_dir={out}")
    assert done.returncode == 0, done.stderr
    assert "perplexity" in done.stdout and "bits/byte" in done.stdout
    result = json.loads((out / "perplexity.json").read_text())
    assert result["window"] == 32 and result["documents"] == len(result["per_document"]) >= 1
    assert result["perplexity"] == pytest.approx(math.exp(result["nll_per_token"]))

    bad = run_eval("perplexity", f"--checkpoint={checkpoint}", "--split=test")
    assert bad.returncode == 2 and bad.stderr.strip() == (
        "error: --split='test' is not one of train, validation.")
    missing = run_eval("perplexity", f"--checkpoint={tmp_path / 'nothing'}")
    assert missing.returncode == 1 and "is not a checkpoint" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_lm_eval_cli(checkpoint, tmp_path):
    write_tasks(tmp_path, "anything")
    out = tmp_path / "results"
    done = run_eval("lm-eval", "--model_args", f"checkpoint={checkpoint},dtype=float32",
                    "--tasks", "dsv3_t_mc,dsv3_t_ppl", "--include_path", str(tmp_path),
                    "--output_path", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "dsv3_t_mc" in done.stdout and "bits_per_byte" in done.stdout
    written = [line.split(" ", 1)[1] for line in done.stdout.splitlines()
               if line.startswith("wrote ")]
    assert written and all(str(out) in p for p in written)
    results = json.loads(pathlib.Path(written[0]).read_text())["results"]
    assert set(results) >= {"dsv3_t_mc", "dsv3_t_ppl"}

    # Refused before lm-eval starts: an unknown model arg, a missing checkpoint.
    bad = run_eval("lm-eval", "--model_args", f"checkpoint={checkpoint},colour=red", "--tasks",
                   "dsv3_t_mc", "--include_path", str(tmp_path), cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.strip().startswith("error: --model_args: unknown model arg colour for "
                                         "model dsv3_jax; it takes checkpoint, ")
    missing = run_eval("lm-eval", "--model_args", "dtype=float32", "--tasks", "dsv3_t_mc",
                       cwd=tmp_path)
    assert missing.returncode == 2 and "needs --model_args=checkpoint=" in missing.stderr
    # Refused by the model inside lm-eval: one line, status 1.
    absent = run_eval("lm-eval", "--model_args", f"checkpoint={tmp_path / 'nothing'}", "--tasks",
                      "dsv3_t_mc", "--include_path", str(tmp_path), cwd=tmp_path)
    assert absent.returncode == 1, absent.stderr[-2000:]
    assert absent.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "is not a checkpoint" in absent.stderr and "Traceback" not in absent.stderr
