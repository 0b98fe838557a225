"""Generation: cached decoding against a cache-free argmax loop, speculative decoding against plain
decoding, sampling, the acceptance rule's distribution, batching, and bad input."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsv3_jax as ds
from dsv3_jax.infer import sampling as sampling_lib
from dsv3_jax.infer.generate import check_prompts, check_seed, check_stop_tokens, generate_tokens
from dsv3_jax.infer.load import CheckpointNotFoundError, load_for_inference
from dsv3_jax.infer.sampling import Sampling

from conftest import COMPILATION_CACHE, TINY32, V2_STYLE, init_params, jitted_forward

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROMPTS = [[5, 17, 300, 42, 9], [77, 3], [1000, 2000, 3000, 4000, 5000, 6000, 7000, 11]]


def _argmax_loop(cfg, params, prompt, n):
    """Greedy continuation by re-running the full training forward pass on the whole sequence at
    every step (no cache): padded to one length, which causal attention makes harmless."""
    total = len(prompt) + n
    fwd = jitted_forward(cfg)
    seq = list(prompt)
    for _ in range(n):
        tokens = jnp.asarray([seq + [0] * (total - len(seq))], jnp.int32)
        seq.append(int(jnp.argmax(fwd(params, tokens).logits[0, len(seq) - 1])))
    return seq


def test_cached_greedy_equals_cache_free_argmax_loop():
    params = init_params(TINY32)
    result = generate_tokens(TINY32, params, PROMPTS, max_new_tokens=8)
    for prompt, got in zip(PROMPTS, result.tokens):
        assert got == _argmax_loop(TINY32, params, prompt, 8)


def test_batch_of_different_lengths_equals_each_prompt_alone():
    params = init_params(TINY32)
    batched = ds.generate(TINY32, params, PROMPTS, max_new_tokens=6)
    for prompt, got in zip(PROMPTS, batched):
        assert got == ds.generate(TINY32, params, [prompt], max_new_tokens=6)[0]


@pytest.mark.parametrize("cfg", [TINY32, V2_STYLE.replace(mtp_depth=1)], ids=["v3", "v2-yarn"])
def test_speculative_greedy_equals_greedy_on_random_models(cfg):
    params = init_params(cfg)
    plain = generate_tokens(cfg, params, PROMPTS, max_new_tokens=10)
    spec = generate_tokens(cfg, params, PROMPTS, max_new_tokens=10, speculative=True)
    assert spec.tokens == plain.tokens
    assert 0.0 <= spec.stats["acceptance_rate"] <= 1.0


# The trained model's corpus: one line, repeated. The tokenizer splits digits into single tokens,
# so the token stream is the cycle  x, " =", " ", 0, 1, ..., 9, "\n"  in which every token has
# exactly one successor: the next token and the one after it are functions of the current token,
# which the main head and the MTP head both learn exactly. Measured with the settings below
# (seeds 0-3; lr 1e-3 .. 5e-3): eval accuracy and MTP accuracy 1.0 by step 20 of the 40, and
# draft acceptance 1.0. (The corpus it replaces, lines of `value_a = compute(value_b, c)`, left
# both heads near 0.7 after 60 steps at lr 1e-2, where training was unstable, and its acceptance
# rate then depended on the CPU's rounding: 0.24 on one machine, 0.6-0.68 on another.)
CYCLE_LINE = "x = 0123456789\n"
TRAINED_PROMPTS = ["x = 3456", "x = 0123456789\nx = 4", "x = 7777"]  # the last one off-pattern
PREMISE_ACCURACY = 0.9


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained for 40 steps on the CYCLE_LINE corpus; fails (as a training failure,
    not a speculation one) unless both heads predict the held-out text with PREMISE_ACCURACY."""
    from dsv3_jax.train.loop import train_and_evaluate
    from dsv3_jax.train.run_config import base_config

    corpus = tmp_path_factory.mktemp("corpus")
    for i in range(40):  # each document starts at a different digit of the cycle
        start = CYCLE_LINE.index("0") + i % 10
        (corpus / f"doc{i}.txt").write_text((CYCLE_LINE * 61)[start:start + 60 * len(CYCLE_LINE)])
    config = base_config("tiny")
    config.model.vocab_size = 512
    config.data.corpus = str(corpus / "*.txt")
    config.data.seq_len, config.data.batch_size, config.data.validation_fraction = 64, 8, 0.1
    config.train.steps, config.train.lr, config.train.warmup_steps = 40, 3e-3, 5
    config.train.eval_batches, config.train.log_every = 1, 20
    config.train.eval_every = config.train.checkpoint_every = 40
    workdir = tmp_path_factory.mktemp("trained")
    evaluation = train_and_evaluate(config, str(workdir))["eval"]
    reached = {k: evaluation[k] for k in ("eval_accuracy", "eval_mtp_accuracy")}
    if min(reached.values()) < PREMISE_ACCURACY:
        pytest.fail(f"training did not reach the premise of the tests that use this model: after "
                    f"{config.train.steps} steps on a corpus where every token has one successor, "
                    f"{reached} (each must be >= {PREMISE_ACCURACY}). This is a failure of training "
                    f"(loop, loss, optimizer or data), not of generation.", pytrace=False)
    return str(workdir)


def test_speculative_greedy_equals_greedy_on_a_trained_model(trained):
    cfg, params, tokenizer_path = load_for_inference(trained)
    from dsv3_jax.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    prompts = [tok.encode(p) for p in TRAINED_PROMPTS]
    plain = generate_tokens(cfg, params, prompts, max_new_tokens=24)
    spec = generate_tokens(cfg, params, prompts, max_new_tokens=24, speculative=True)
    assert spec.tokens == plain.tokens
    assert spec.stats["acceptance_rate"] > 0.5, spec.stats  # the drafts really are being accepted
    assert spec.stats["steps"] < plain.stats["steps"]
    # Sampling with speculation runs and is reproducible.
    s = Sampling(temperature=0.7, top_k=20, top_p=0.9)
    a = generate_tokens(cfg, params, prompts, max_new_tokens=12, sampling=s, speculative=True, seed=4)
    b = generate_tokens(cfg, params, prompts, max_new_tokens=12, sampling=s, speculative=True, seed=4)
    assert a.tokens == b.tokens


def test_sampling_is_seeded():
    params = init_params(TINY32)
    s = Sampling(temperature=1.0)
    a = generate_tokens(TINY32, params, PROMPTS, max_new_tokens=8, sampling=s, seed=1).tokens
    b = generate_tokens(TINY32, params, PROMPTS, max_new_tokens=8, sampling=s, seed=1).tokens
    c = generate_tokens(TINY32, params, PROMPTS, max_new_tokens=8, sampling=s, seed=2).tokens
    assert a == b and a != c


def test_stop_tokens_end_a_prompt_and_are_kept():
    params = init_params(TINY32)
    plain = ds.generate(TINY32, params, PROMPTS[:1], max_new_tokens=8)[0]
    stop = plain[len(PROMPTS[0]) + 2]  # the third generated token
    stopped = ds.generate(TINY32, params, PROMPTS[:1], max_new_tokens=8, stop_tokens=[stop])[0]
    assert stopped == plain[:plain.index(stop, len(PROMPTS[0])) + 1]


def test_top_k_and_top_p_masks():
    logits = jnp.log(jnp.array([[0.4, 0.3, 0.2, 0.1]]))
    keep = lambda s: np.isfinite(np.asarray(sampling_lib.log_probs(logits, s)))[0].tolist()
    assert keep(Sampling(temperature=1.0, top_k=2)) == [True, True, False, False]
    # top_p = 0.65: 0.4 + 0.3 reach it, so two tokens remain; 0.7 needs a third.
    assert keep(Sampling(temperature=1.0, top_p=0.65)) == [True, True, False, False]
    assert keep(Sampling(temperature=1.0, top_p=0.75)) == [True, True, True, False]
    assert keep(Sampling(temperature=1.0, top_p=0.01)) == [True, False, False, False]
    renormed = np.exp(np.asarray(sampling_lib.log_probs(logits, Sampling(temperature=1.0, top_k=2))))
    np.testing.assert_allclose(renormed[0, :2], [0.4 / 0.7, 0.3 / 0.7], rtol=1e-6)


def test_the_vocab_limit_keeps_draws_inside_the_tokenizer():
    """Ids past vocab_limit (a padded model vocabulary) are never drawn: greedy takes the argmax
    of the ids below it, draws and speculative decoding stay below it."""
    logits = jnp.log(jnp.array([[0.1, 0.2, 0.3, 0.4]] * 3))
    s = Sampling(vocab_limit=3)
    assert sampling_lib.sample(logits, jax.random.key(0), s).tolist() == [2, 2, 2]
    assert sampling_lib.sample(logits, jax.random.key(0), Sampling()).tolist() == [3, 3, 3]
    p = np.exp(np.asarray(sampling_lib.log_probs(logits, Sampling(temperature=1.0, vocab_limit=3))))
    np.testing.assert_allclose(p[0], [1 / 6, 2 / 6, 3 / 6, 0], rtol=1e-6)
    params, limit = init_params(TINY32), 100
    for speculative in (False, True):
        for temperature in (0.0, 1.0):
            out = generate_tokens(TINY32, params, [[5, 7, 9]], max_new_tokens=12,
                                  speculative=speculative, seed=1, sampling=Sampling(
                                      temperature=temperature, vocab_limit=limit))
            assert max(out.tokens[0][3:]) < limit, (speculative, temperature)
    with pytest.raises(ValueError, match="vocab_limit"):
        Sampling(vocab_limit=-1)


def test_rejection_rule_preserves_the_target_distribution():
    """Drafts drawn from q, accepted with min(1, p/q), corrected from norm(max(0, p - q)): the
    emitted tokens follow p. N = 400,000 draws; each frequency must lie within 5 standard errors
    sqrt(p (1 - p) / N) of p (a false alarm has probability ~1e-5 over the 6 tokens)."""
    n = 400_000
    p = np.array([0.30, 0.25, 0.20, 0.15, 0.07, 0.03])
    q = np.array([0.05, 0.10, 0.40, 0.05, 0.30, 0.10])
    key_d, key_a = jax.random.split(jax.random.key(0))
    logq = jnp.broadcast_to(jnp.log(jnp.asarray(q, jnp.float32)), (n, 6))
    draft = jax.random.categorical(key_d, logq, axis=-1).astype(jnp.int32)
    target = jnp.broadcast_to(jnp.log(jnp.asarray(p, jnp.float32)), (n, 6))
    accepted, token = sampling_lib.accept_draft(target, draft, logq, key_a, Sampling(temperature=1.0))
    freq = np.bincount(np.asarray(token), minlength=6) / n
    se = np.sqrt(p * (1 - p) / n)
    assert np.all(np.abs(freq - p) < 5 * se), (freq, p)
    # ... and the acceptance rate is sum_i min(p_i, q_i).
    expected_accept = np.minimum(p, q).sum()
    assert abs(float(np.mean(accepted)) - expected_accept) < 5 * np.sqrt(0.25 / n)


def test_array_prompts_equal_lists_of_lists():
    """A [B, T] integer array (numpy or jax), a tuple of tuples and a list of 1-D arrays are the
    same prompts as the list of lists."""
    params = init_params(TINY32)
    rows = [[5, 17, 300, 42, 9, 8, 1], [77, 3, 2, 1000, 4, 4, 12]]
    expected = ds.generate(TINY32, params, rows, max_new_tokens=5)
    assert [len(r) for r in expected] == [12, 12]
    for prompts in (np.array(rows, np.int64), np.array(rows, np.int32), jnp.array(rows, jnp.int32),
                    tuple(tuple(r) for r in rows), [np.array(r) for r in rows],
                    [[np.int32(t) for t in r] for r in rows]):
        assert ds.generate(TINY32, params, prompts, max_new_tokens=5) == expected, type(prompts)


def test_arguments_are_normalised():
    """numpy integers and floats are accepted where ints and floats are, and stored as Python
    numbers (Sampling is a cache key of the compiled programs)."""
    s = Sampling(temperature=np.float32(0.5), top_k=np.int64(3), top_p=np.float64(0.9))
    assert s == Sampling(temperature=0.5, top_k=3, top_p=0.9) and hash(s) == hash(Sampling(0.5, 3, 0.9))
    assert type(s.temperature) is float and type(s.top_k) is int and type(s.top_p) is float
    assert check_stop_tokens(TINY32, np.array([7, 3, 7])) == [3, 7]
    assert check_stop_tokens(TINY32, None) == [] and check_seed(np.uint32(5)) == 5
    # The context is used to the last slot: prompt length + max_new_tokens == max_seq_len.
    assert check_prompts(TINY32, [[1] * (TINY32.max_seq_len - 4)], 4) == [[1] * (TINY32.max_seq_len - 4)]


_V, _L = TINY32.vocab_size, TINY32.max_seq_len
_BAD_INPUT = {  # id: (arguments replacing prompts=[[1, 2]], max_new_tokens=4; the message's words)
    # prompts: forms that are not a batch of token-id lists
    "string": (dict(prompts="hello"), r"prompts is the string 'hello'; encode the text with"),
    "bytes": (dict(prompts=b"hi"), r"prompts is the string b'hi'; encode"),
    "int": (dict(prompts=5), r"prompts has type int \(5\); pass a list of token-id lists"),
    "none": (dict(prompts=None), r"prompts has type NoneType"),
    "flat list": (dict(prompts=[1, 2, 3]),
                  r"prompts is a flat list of 3 token ids \(\[1, 2, 3\]\), not a batch.*\[ids\]"),
    "1-D numpy": (dict(prompts=np.array([1, 2, 3])),
                  r"prompts is a 1-D array of shape \(3,\).*\[B, T\].*prompts\[None\]"),
    "1-D jax": (dict(prompts=jnp.array([1, 2, 3])), r"prompts is a 1-D array of shape \(3,\)"),
    "3-D array": (dict(prompts=np.zeros((1, 2, 3), int)),
                  r"prompts is a 3-D array of shape \(1, 2, 3\); pass .* a \[B, T\] integer array"),
    "float array": (dict(prompts=np.zeros((2, 3))),
                    r"prompts \(shape \(2, 3\)\) is a float64 array; token ids are integers"),
    "float jax": (dict(prompts=jnp.zeros((2, 3))), r"is a float32 array; token ids are integers"),
    "bool array": (dict(prompts=np.ones((2, 3), bool)), r"is a bool array; token ids are integers"),
    "empty batch": (dict(prompts=[]), r"prompts is empty: no prompts to continue"),
    "empty batch array": (dict(prompts=np.zeros((0, 3), int)),
                          r"prompts has shape \(0, 3\): no prompts to continue"),
    "empty rows array": (dict(prompts=np.zeros((2, 0), int)),
                         r"prompts has shape \(2, 0\): every prompt is empty"),
    # prompts: bad rows
    "empty row": (dict(prompts=[[1, 2], []]), r"prompt 1 is empty; every prompt needs at least one"),
    "string row": (dict(prompts=["hello"]), r"prompt 0 is the string 'hello'; prompts are token ids"),
    "int row": (dict(prompts=[[1, 2], 3]), r"prompt 1 is the single token id 3, not a list of ids"),
    "dict row": (dict(prompts=[{1: 2}]), r"prompt 0 has type dict"),
    "2-D row": (dict(prompts=[np.zeros((2, 2), int)]), r"prompt 0 is an array of shape \(2, 2\)"),
    "float row": (dict(prompts=[np.array([1.0, 2.0])]), r"prompt 0 is a float64 array"),
    "nested deeper": (dict(prompts=[[[1, 2]]]),
                      r"prompt 0 holds a sequence at position 0 \(\[1, 2\]\): prompts nest two"),
    "float id": (dict(prompts=[[1, 2.0]]), r"prompt 0 holds 2.0 \(float\) at position 1; token ids"),
    "numpy float id": (dict(prompts=[[np.float32(3)]]), r"prompt 0 holds .*3.* \(float32\) at position 0"),
    "bool id": (dict(prompts=[[1, True]]), r"prompt 0 holds True \(bool\) at position 1"),
    "none id": (dict(prompts=[[1, None]]), r"prompt 0 holds None \(NoneType\) at position 1"),
    "string id": (dict(prompts=[["a"]]), r"prompt 0 holds 'a' \(str\) at position 0"),
    "id=vocab_size": (dict(prompts=[[1, 2, _V]]),
                        rf"prompt 0 holds token id {_V} at position 2, outside the vocabulary \[0, {_V}\)"),
    "negative id": (dict(prompts=[[3], [-1]]), r"prompt 1 holds token id -1 at position 0, outside"),
    "array id out of range": (dict(prompts=np.array([[1, 2], [3, _V + 5]])),
                              rf"prompt 1 holds token id {_V + 5} at position 1, outside"),
    "beyond the context": (dict(prompts=[[1] * _L]),
                           rf"prompt 0 has {_L} tokens; with max_new_tokens=4 that needs {_L + 4} "
                           rf"positions, which exceeds the model's context \(max_seq_len={_L}\)\. "
                           rf"Shorten the prompt to at most {_L - 4} tokens\.$"),
    "beyond the context by 2": (dict(prompts=[[1], [1] * (_L - 2)]),
                                rf"prompt 1 has {_L - 2} tokens.*needs {_L + 2} positions.*at most "
                                rf"{_L - 4} tokens or ask for at most 2 new tokens"),
    # the other arguments
    "max_new_tokens=0": (dict(max_new_tokens=0), r"max_new_tokens=0 must be a positive integer"),
    "max_new_tokens=-3": (dict(max_new_tokens=-3), r"max_new_tokens=-3 must be a positive integer"),
    "max_new_tokens=2.5": (dict(max_new_tokens=2.5), r"max_new_tokens=2.5 must be a positive integer"),
    "max_new_tokens str": (dict(max_new_tokens="4"), r"max_new_tokens='4' must be a positive integer"),
    "max_new_tokens=True": (dict(max_new_tokens=True), r"max_new_tokens=True must be a positive"),
    "max_new_tokens=context": (dict(max_new_tokens=_L), rf"max_new_tokens={_L} leaves no room for a "
                               rf"prompt .*max_seq_len={_L}\); ask for at most {_L - 1}"),
    "temperature<0": (dict(temperature=-0.5), r"temperature=-0.5 must be a finite number >= 0"),
    "temperature=nan": (dict(temperature=float("nan")), r"temperature=nan must be a finite number"),
    "temperature=inf": (dict(temperature=float("inf")), r"temperature=inf must be a finite number"),
    "temperature str": (dict(temperature="0.7"), r"temperature='0.7' must be a finite number"),
    "temperature=None": (dict(temperature=None), r"temperature=None must be a finite number"),
    "top_k<0": (dict(top_k=-1), r"top_k=-1 must be an integer >= 0"),
    "top_k float": (dict(top_k=2.5), r"top_k=2.5 must be an integer >= 0"),
    "top_k bool": (dict(top_k=True), r"top_k=True must be an integer >= 0"),
    "top_p=0": (dict(top_p=0.0), r"top_p=0.0 must be a number in \(0, 1\]"),
    "top_p>1": (dict(top_p=1.5), r"top_p=1.5 must be a number in \(0, 1\]"),
    "top_p=nan": (dict(top_p=float("nan")), r"top_p=nan must be a number in \(0, 1\]"),
    "top_p str": (dict(top_p="0.9"), r"top_p='0.9' must be a number"),
    "seed float": (dict(seed=1.5), r"seed=1.5 must be an integer"),
    "seed str": (dict(seed="1"), r"seed='1' must be an integer"),
    "seed None": (dict(seed=None), r"seed=None must be an integer"),
    "seed too big": (dict(seed=2**63), r"seed=9223372036854775808 must be an integer in \[-2\*\*63"),
    "stop_tokens int": (dict(stop_tokens=2), r"stop_tokens=2 is a single id; pass a list .*\[2\] for"),
    "stop_tokens str": (dict(stop_tokens="</s>"), r"stop_tokens='</s>' is a string; pass a list"),
    "stop_tokens id": (dict(stop_tokens=[1, _V]), rf"stop_tokens holds {_V}; stop tokens are token "
                       rf"ids in \[0, {_V}\)"),
    "stop_tokens negative": (dict(stop_tokens=[-1]), r"stop_tokens holds -1; stop tokens are"),
    "stop_tokens float": (dict(stop_tokens=[1.0]), r"stop_tokens holds 1.0; stop tokens are"),
    "stop_tokens nested": (dict(stop_tokens=[[1]]), r"stop_tokens holds \[1\]; stop tokens are"),
    "stop_tokens 2-D": (dict(stop_tokens=np.ones((1, 2), int)), r"stop_tokens is an array of shape"),
    "speculative str": (dict(speculative="yes"), r"speculative='yes' must be True or False"),
    "speculative without MTP": (dict(cfg=V2_STYLE, speculative=True),
                                r"speculative=True needs an MTP module, but this model has mtp_depth=0"),
    # generate_tokens only
    "sampling": (dict(fn=generate_tokens, sampling="greedy"), r"sampling='greedy' must be a Sampling\("),
    "chunk=0": (dict(fn=generate_tokens, chunk=0), r"chunk=0 must be a positive integer"),
    "on_tokens": (dict(fn=generate_tokens, on_tokens=5), r"on_tokens=5 must be a function"),
}


@pytest.mark.parametrize("case", list(_BAD_INPUT), ids=list(_BAD_INPUT))
def test_bad_input_is_refused(case):
    """Each refusal is a ValueError whose one message names the argument, the value (or the row
    and position) and the fix; nothing is compiled or run first."""
    overrides, message = _BAD_INPUT[case]
    args = dict(fn=ds.generate, cfg=TINY32, prompts=[[1, 2]], max_new_tokens=4) | overrides
    fn, cfg, prompts = args.pop("fn"), args.pop("cfg"), args.pop("prompts")
    with pytest.raises(ValueError, match=message):
        fn(cfg, init_params(cfg), prompts, **args)


def test_a_hugging_face_folder_loads_for_inference():
    """The third place weights live: an HF folder goes through the converter (same cfg and params)."""
    from dsv3_jax.convert import load_hf_checkpoint

    folder = str(ROOT / "tests" / "fixtures" / "hf" / "yarn_mtp_fp32")
    cfg, params, tokenizer_path = load_for_inference(folder)
    want_cfg, want = load_hf_checkpoint(folder)
    assert cfg == want_cfg and tokenizer_path is None
    jax.tree.map(np.testing.assert_array_equal, params, want)


def test_a_missing_checkpoint_is_refused():
    with pytest.raises(CheckpointNotFoundError, match="is not a checkpoint"):
        load_for_inference(str(ROOT / "configs"))


def test_cli_streams_a_continuation(trained):
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(COMPILATION_CACHE), JAX_PLATFORMS="cpu")
    prompt = TRAINED_PROMPTS[0]
    out = subprocess.run([sys.executable, "-m", "dsv3_jax.generate", f"--checkpoint={trained}",
                          f"--prompt={prompt}", "--max_new_tokens=12", "--speculative"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith(prompt) and len(out.stdout) > len(prompt) + 5
    assert "MTP draft acceptance" in out.stderr


def test_streaming_in_chunks_gives_the_same_tokens():
    params = init_params(TINY32)
    streamed = {i: [] for i in range(len(PROMPTS))}
    result = generate_tokens(TINY32, params, PROMPTS, max_new_tokens=7, chunk=3,
                             on_tokens=lambda row, new: streamed[row].extend(new))
    whole = generate_tokens(TINY32, params, PROMPTS, max_new_tokens=7)
    assert result.tokens == whole.tokens
    for i, prompt in enumerate(PROMPTS):
        assert prompt + streamed[i] == result.tokens[i]


def test_bench_decode_smoke(capsys):
    """The benchmark script runs and checks speculative == plain greedy (tiny model, CPU)."""
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        import bench_decode
    finally:
        sys.path.pop(0)
    assert bench_decode.main(["--smoke"]) == 0
    table = capsys.readouterr().out
    assert "| 3 |" in table and "| yes |" in table and "NO" not in table
