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
from dsv3_jax.infer.generate import generate_tokens
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


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained for 60 steps on highly regular text: its MTP head drafts well."""
    from dsv3_jax.train.loop import train_and_evaluate
    from dsv3_jax.train.run_config import base_config

    corpus = tmp_path_factory.mktemp("corpus")
    for i in range(40):
        lines = [f"value_{(i + j) % 7} = compute(value_{(i + j + 1) % 7}, {j % 3})\n" for j in range(60)]
        (corpus / f"doc{i}.txt").write_text("".join(lines))
    config = base_config("tiny")
    config.model.vocab_size = 512
    config.data.corpus = str(corpus / "*.txt")
    config.data.seq_len, config.data.batch_size, config.data.validation_fraction = 64, 8, 0.1
    config.train.steps, config.train.lr, config.train.warmup_steps = 60, 1e-2, 5
    config.train.eval_batches, config.train.log_every = 1, 20
    config.train.eval_every = config.train.checkpoint_every = 60
    workdir = tmp_path_factory.mktemp("trained")
    train_and_evaluate(config, str(workdir))
    return str(workdir)


def test_speculative_greedy_equals_greedy_on_a_trained_model(trained):
    cfg, params, tokenizer_path = load_for_inference(trained)
    from dsv3_jax.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    prompts = [tok.encode("value_3 = compute(value_4, 1)\nvalue_"), tok.encode("value_0 = ")]
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


def test_bad_input_is_refused():
    params = init_params(TINY32)
    no_mtp = V2_STYLE
    cases = [
        (dict(prompts=[[]]), "prompt 0 is empty"),
        (dict(prompts="hello"), "list of token-id lists"),
        (dict(prompts=[[1, 2, TINY32.vocab_size]]), f"token id {TINY32.vocab_size}, outside the vocabulary"),
        (dict(prompts=[[-1]]), "token id -1"),
        (dict(prompts=[[1] * TINY32.max_seq_len]), "exceeds the model's context"),
        (dict(max_new_tokens=0), "max_new_tokens=0 must be a positive integer"),
    ]
    for kwargs, message in cases:
        args = dict(prompts=[[1, 2]], max_new_tokens=4) | kwargs
        with pytest.raises(ValueError, match=message):
            ds.generate(TINY32, params, args["prompts"], max_new_tokens=args["max_new_tokens"])
    with pytest.raises(ValueError, match="temperature=-0.5 must be >= 0"):
        ds.generate(TINY32, params, [[1, 2]], max_new_tokens=4, temperature=-0.5)
    with pytest.raises(ValueError, match="mtp_depth=0"):
        ds.generate(no_mtp, init_params(no_mtp), [[1, 2]], max_new_tokens=4, speculative=True)
    with pytest.raises(CheckpointNotFoundError, match="is not a checkpoint"):
        load_for_inference(str(ROOT / "configs"))


def test_cli_streams_a_continuation(trained):
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(COMPILATION_CACHE), JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-m", "dsv3_jax.generate", f"--checkpoint={trained}",
                          "--prompt=value_1 = compute(", "--max_new_tokens=12", "--speculative"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("value_1 = compute(") and len(out.stdout) > len("value_1 = compute(") + 5
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
