"""GRPO (dsv3_jax/rl): the loss and its gradient against the formula written out here, the
advantages, the chunked log-probs, and the loop end to end on a random tiny checkpoint (metrics,
reward failures counted, bad inputs refused, prompts too long skipped, SIGKILL resume bit for bit).

The loss is checked against a per-token numpy loop in float64 (rtol 1e-5: the jax version is
float32, a few roundings per token); the gradient against the hand derivative of each token's
term. Loop tests use a random model: they check plumbing and invariants, never learning.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsv3_jax as ds
from dsv3_jax.rl import grpo
from dsv3_jax.train import losses

from conftest import random_checkpoint, stdlib_tokenizer

CLIP_LOW, CLIP_HIGH, BETA = 0.2, 0.28, 0.05


# ------------------------------------------------------------------------------ advantages

def test_group_advantages_standardise_within_each_group():
    r = np.array([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [3.0, 1.0, 2.0, 0.0]])
    a = grpo.group_advantages(r)
    for g in range(3):
        mean = sum(r[g]) / 4
        std = (sum((x - mean) ** 2 for x in r[g]) / 4) ** 0.5  # population std
        np.testing.assert_allclose(a[g], [(x - mean) / (std + grpo.ADV_EPS) for x in r[g]],
                                   rtol=1e-6)
    assert np.all(a[1] == 0.0)  # equal rewards: no advantage at all


def test_group_advantages_refuse_groups_of_one():
    with pytest.raises(ValueError, match="at least 2 samples"):
        grpo.group_advantages(np.ones((3, 1)))


# ------------------------------------------------------------------------------ the loss

def _hand_batch():
    """N = 4 samples (2 groups of 2), T = 6: the first tokens are prompt, the last padding.
    Ratios are chosen on both sides of both clips, with both signs of advantage."""
    rng = np.random.default_rng(0)
    old = rng.normal(-2.0, 0.5, (4, 6))
    log_ratio = np.array([[0.0, 0.5, -0.5, 0.1, 0.3, 0.0],   # A > 0: 0.5 is clipped (above)
                          [0.0, -0.4, 0.05, 0.4, -0.1, 0.0],  # A < 0: -0.4 clipped (below)
                          [0.0, 0.0, 0.2, -0.3, 0.0, 0.0],
                          [0.0, 0.0, -0.6, 0.35, 0.0, 0.0]])
    logp = old + log_ratio
    ref = logp + rng.normal(0.0, 0.3, (4, 6))
    mask = np.array([[0, 1, 1, 1, 1, 0],  # prompt at 0, padding at 5
                     [0, 1, 1, 1, 1, 1],
                     [0, 0, 1, 1, 0, 0],
                     [0, 0, 1, 1, 0, 0]], np.float64)
    adv = np.array([1.3, -0.7, 0.9, -1.1])
    return logp, old, ref, adv, mask


def _formula(logp, old, ref, adv, mask, normalisation):
    """-J and d(-J)/d logp, token by token (the module docstring's equations)."""
    n, t = logp.shape
    per_tok, grad_tok = np.zeros((n, t)), np.zeros((n, t))
    for i in range(n):
        for s in range(t):
            rho = np.exp(logp[i, s] - old[i, s])
            clipped = min(max(rho, 1 - CLIP_LOW), 1 + CLIP_HIGH)
            a = adv[i]
            unclipped_taken = rho * a <= clipped * a
            d = ref[i, s] - logp[i, s]
            kl = np.exp(d) - d - 1
            per_tok[i, s] = -min(rho * a, clipped * a) + BETA * kl
            # d/dlogp: -rho * A where the unclipped term is the minimum (else the clipped
            # constant's 0), and beta * (1 - exp(d)) from the k3 term.
            grad_tok[i, s] = (-rho * a if unclipped_taken else 0.0) + BETA * (1 - np.exp(d))
    if normalisation == "token":
        w = mask / mask.sum()
    else:
        w = mask / mask.sum(axis=1, keepdims=True) / n
    return float((per_tok * w).sum()), grad_tok * w


@pytest.mark.parametrize("normalisation", ["token", "sequence"])
def test_grpo_loss_and_gradient_match_the_formula(normalisation):
    logp, old, ref, adv, mask = _hand_batch()
    expected, expected_grad = _formula(logp, old, ref, adv, mask, normalisation)

    def loss(lp):
        return grpo.grpo_loss(lp, jnp.asarray(old, jnp.float32), jnp.asarray(ref, jnp.float32),
                              jnp.asarray(adv, jnp.float32), jnp.asarray(mask),
                              clip_low=CLIP_LOW, clip_high=CLIP_HIGH, kl_beta=BETA,
                              normalisation=normalisation)

    (value, stats), grad = jax.value_and_grad(loss, has_aux=True)(jnp.asarray(logp, jnp.float32))
    np.testing.assert_allclose(float(value), expected, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), expected_grad, rtol=1e-4, atol=1e-7)
    assert np.all(np.asarray(grad)[mask == 0] == 0.0)  # prompt and padding never count
    rho = np.exp(logp - old)
    a = adv[:, None]
    took = ((a > 0) & (rho > 1 + CLIP_HIGH)) | ((a < 0) & (rho < 1 - CLIP_LOW))
    np.testing.assert_allclose(float(stats["clip_fraction"]), (took * mask).sum() / mask.sum(),
                               rtol=1e-6)
    assert 0 < float(stats["clip_fraction"]) < 1  # both clipped and unclipped tokens present
    d = ref - logp
    np.testing.assert_allclose(float(stats["kl"]), ((np.exp(d) - d - 1) * mask).sum() / mask.sum(),
                               rtol=1e-5)


def test_ratio_one_and_kl_zero_when_all_policies_agree():
    logp, _, _, adv, mask = _hand_batch()
    lp = jnp.asarray(logp, jnp.float32)
    value, stats = grpo.grpo_loss(lp, lp, lp, jnp.asarray(adv, jnp.float32), jnp.asarray(mask),
                                  clip_low=CLIP_LOW, clip_high=CLIP_HIGH, kl_beta=BETA)
    assert float(stats["ratio"]) == 1.0 and float(stats["kl"]) == 0.0
    assert float(stats["clip_fraction"]) == 0.0
    # -J = -mean_token(A): the advantage-weighted token mean.
    np.testing.assert_allclose(float(value), -(adv[:, None] * mask).sum() / mask.sum(), rtol=1e-6)


def test_a_group_of_equal_rewards_gives_no_policy_gradient():
    logp, old, ref, _, mask = _hand_batch()
    rewards = np.array([[1.0, 1.0], [1.0, 0.0]])  # group 0 all equal
    adv = grpo.group_advantages(rewards).reshape(-1)
    assert np.all(adv[:2] == 0.0)
    grad = jax.grad(lambda lp: grpo.grpo_loss(
        lp, jnp.asarray(old, jnp.float32), None, jnp.asarray(adv), jnp.asarray(mask),
        clip_low=CLIP_LOW, clip_high=CLIP_HIGH, kl_beta=0.0)[0])(jnp.asarray(logp, jnp.float32))
    grad = np.asarray(grad)
    assert np.all(grad[:2] == 0.0)  # exactly zero, not merely small
    assert np.any(grad[2:] != 0.0)  # the other group does learn


def test_grpo_loss_refuses_an_unknown_normalisation():
    x = jnp.zeros((1, 2))
    with pytest.raises(ValueError, match="normalisation"):
        grpo.grpo_loss(x, x, x, jnp.zeros(1), x, clip_low=0.2, clip_high=0.2, kl_beta=0.0,
                       normalisation="batch")


def test_chunked_target_log_probs_match_log_softmax_and_its_gradient():
    rng = np.random.default_rng(1)
    h = jnp.asarray(rng.normal(size=(37, 16)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(16, 50)) * 0.3, jnp.float32)
    t = jnp.asarray(rng.integers(0, 50, 37))
    g = jnp.asarray(rng.normal(size=37), jnp.float32)

    def full(h, w):
        return jnp.take_along_axis(jax.nn.log_softmax(h @ w), t[:, None], axis=1)[:, 0]

    chunked = lambda h, w: losses.chunked_target_log_probs(h, w, t, chunk=8)
    np.testing.assert_allclose(chunked(h, w), full(h, w), rtol=1e-5, atol=1e-5)
    gc = jax.grad(lambda h, w: jnp.sum(chunked(h, w) * g), argnums=(0, 1))(h, w)
    gf = jax.grad(lambda h, w: jnp.sum(full(h, w) * g), argnums=(0, 1))(h, w)
    for a, b in zip(gc, gf):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------ the loop

CFG = ds.get_model_config("tiny", vocab_size=512, max_seq_len=128, dtype="float32")

REWARDS_MODULE = '''
import math, os, time
from dsv3_jax.rl.rewards import exact_match

def raises(prompt, completion, **fields):
    raise RuntimeError("checker crashed")

def nan(prompt, completion, **fields):
    return math.nan

def length(prompt, completion, **fields):
    return len(completion) / 100.0

CALLS = [0]

def hangs_later(prompt, completion, **fields):
    """length(); once DSV3_TEST_HANG_AFTER calls are made, hangs (a process to be killed)."""
    CALLS[0] += 1
    after = int(os.environ.get("DSV3_TEST_HANG_AFTER", "0"))
    if after and CALLS[0] > after:
        time.sleep(3600)
    return len(completion) / 100.0
'''


@pytest.fixture(scope="module")
def rl_env(tmp_path_factory):
    """(random checkpoint folder, folder holding the test rewards module `grpo_test_rewards`)."""
    root = tmp_path_factory.mktemp("grpo")
    (root / "tok").mkdir()
    tokenizer = stdlib_tokenizer(root / "tok")
    ckpt = random_checkpoint(root / "ckpt", CFG, tokenizer)
    (root / "mods").mkdir()
    (root / "mods" / "grpo_test_rewards.py").write_text(REWARDS_MODULE)
    return ckpt, root / "mods"


def _config(ckpt, **rl):
    from dsv3_jax.rl.config import grpo_base_config

    c = grpo_base_config("tiny")
    c.model.vocab_size, c.model.max_seq_len, c.model.dtype = 512, 128, "float32"
    c.train.init_from = str(ckpt)
    c.train.steps, c.train.lr = 2, 1e-3
    c.train.checkpoint_every = 2
    c.train.eval_every = 2
    c.train.async_checkpoint = False
    c.rl.prompts_per_step, c.rl.samples_per_prompt = 2, 4
    c.rl.max_new_tokens, c.rl.eval_prompts = 12, 4
    c.rl.rewards = "exact_match=1.0,think_format=0.1"
    for k, v in rl.items():
        c.rl[k] = v
    return c


def _rows(workdir):
    return [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").open()]


def test_grpo_steps_log_metrics_count_reward_failures_and_checkpoint(rl_env, tmp_path,
                                                                       monkeypatch):
    from dsv3_jax.rl.loop import train_grpo

    ckpt, mods = rl_env
    monkeypatch.syspath_prepend(str(mods))
    config = _config(ckpt, rewards="grpo_test_rewards.length=1.0,grpo_test_rewards.raises=1.0,"
                                    "grpo_test_rewards.nan=0.5")
    result = train_grpo(config, str(tmp_path / "run"))
    assert result["step"] == 2
    rows = _rows(tmp_path / "run")
    train = [r for r in rows if "reward_mean" in r]
    assert [r["step"] for r in train] == [1, 2]
    first = train[0]
    # The first update samples and scores with the same weights: ratio 1 and KL 0 (up to the
    # float32 rounding of two compiled programs computing the same log-probs).
    assert abs(first["ratio_first_update"] - 1.0) < 1e-5
    assert abs(first["kl_first_update"]) < 1e-6
    samples = 2 * 4
    assert first["reward_failures/grpo_test_rewards.raises/error"] == samples
    assert first["reward_failures/grpo_test_rewards.nan/not_finite"] == samples
    assert first["reward/grpo_test_rewards.raises"] == 0.0
    assert first["reward/grpo_test_rewards.length"] > 0  # the good reward is kept
    for key in ("reward_max", "reward_group_std", "clip_fraction", "response_length",
                "sample_tokens_per_sec", "train_tokens_per_sec", "grad_norm", "kl"):
        assert np.isfinite(first[key]), key
    assert "expert_load_max" in first or any(k.startswith("expert_load") for k in first)
    evals = [r for r in rows if "eval_reward" in r]
    assert [r["step"] for r in evals] == [0, 2]
    for e in evals:  # greedy and sampled held-out rewards, each reward named
        for key in ("eval_reward", "eval_sampled_reward", "eval_grpo_test_rewards.length",
                    "eval_sampled_grpo_test_rewards.length"):
            assert np.isfinite(e[key]), key
    assert (tmp_path / "run" / "checkpoints" / "2").is_dir()
    # The RL workdir's weights load wherever a training workdir's do.
    from dsv3_jax.train.checkpoint import read_params
    cfg, params, meta = read_params(str(tmp_path / "run"))
    assert meta["step"] == 2 and cfg.vocab_size == 512


def test_bad_settings_are_refused_with_the_setting_named(rl_env):
    from dsv3_jax.rl.config import check_grpo_config

    ckpt, _ = rl_env
    with pytest.raises(ValueError, match="samples_per_prompt=1.*baseline"):
        check_grpo_config(_config(ckpt, samples_per_prompt=1))
    with pytest.raises(ValueError, match="max_new_tokens=128"):
        check_grpo_config(_config(ckpt, max_new_tokens=128))
    with pytest.raises(ValueError, match="minibatches=3"):
        check_grpo_config(_config(ckpt, minibatches=3))
    with pytest.raises(ValueError, match="temperature=0"):
        check_grpo_config(_config(ckpt, temperature=0.0))
    c = _config(ckpt)
    c.train.init_from = ""
    with pytest.raises(ValueError, match="init_from is empty"):
        check_grpo_config(c)


def test_cli_refuses_a_group_of_one_in_one_line(rl_env, tmp_path):
    ckpt, _ = rl_env
    proc = subprocess.run(
        [sys.executable, "-m", "dsv3_jax.rl", "--config=configs/grpo.py",
         f"--workdir={tmp_path / 'run'}", f"--config.train.init_from={ckpt}",
         "--config.rl.samples_per_prompt=1"], capture_output=True, text=True, timeout=300,
        cwd=pathlib.Path(__file__).parents[1])
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) <= 2 and "samples_per_prompt=1" in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "dsv3_jax.rl", "--config=configs/grpo.py",
         f"--workdir={tmp_path / 'run'}", "--config.rl.samplez_per_prompt=4"],
        capture_output=True, text=True, timeout=300, cwd=pathlib.Path(__file__).parents[1])
    assert proc.returncode == 2 and "did you mean config.rl.samples_per_prompt" in proc.stderr


def test_prompts_longer_than_the_context_are_skipped_and_counted(rl_env, tmp_path):
    from dsv3_jax.rl.loop import PromptError, train_grpo

    ckpt, _ = rl_env
    long_prompt = "word " * 400
    records = [{"prompt": long_prompt if i % 3 == 0 else f"What is {i} plus 1?",
                "answer": str(i + 1)} for i in range(60)]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    config = _config(ckpt, task=str(path), eval_prompts=2, rewards="exact_match=1.0")
    config.train.steps = 1
    train_grpo(config, str(tmp_path / "run"))
    row = [r for r in _rows(tmp_path / "run") if "reward_mean" in r][-1]
    assert row["prompts_skipped"] >= 1
    assert row["prompts_seen"] == 2 + row["prompts_skipped"]

    path.write_text("".join(json.dumps({"prompt": long_prompt, "answer": "1"}) + "\n"
                            for _ in range(20)))
    with pytest.raises(PromptError, match="too long"):
        train_grpo(_config(ckpt, task=str(path), eval_prompts=0), str(tmp_path / "run2"))


def _final_params(workdir):
    from dsv3_jax.train.checkpoint import read_params
    return read_params(str(workdir))[1]


def test_resume_after_sigkill_continues_bit_for_bit(rl_env, tmp_path):
    """A run killed (SIGKILL) after its step-2 checkpoint and resumed equals, at step 4, the run
    that was never interrupted: weights and every logged row but the timings."""
    from dsv3_jax.rl.loop import train_grpo

    ckpt, mods = rl_env
    reward = "grpo_test_rewards.hangs_later=1.0,exact_match=0.5"
    overrides = dict(rewards=reward, reward_timeout_s=3600.0, eval_prompts=2)

    def config():
        c = _config(ckpt, **overrides)
        c.train.steps = 4
        c.train.eval_every = 4
        return c

    sys.path.insert(0, str(mods))
    try:
        train_grpo(config(), str(tmp_path / "whole"))
    finally:
        sys.path.remove(str(mods))

    killed = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=f"{mods}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               DSV3_TEST_HANG_AFTER=str(2 + 2 * 4 + 2 * 8))  # step 0's eval: 2 greedy, 2 x 4
                                                              # sampled; steps 1, 2: 8 each
    args = [sys.executable, "-m", "dsv3_jax.rl", "--config=configs/grpo.py",
            f"--workdir={killed}", f"--config.train.init_from={ckpt}",
            "--config.model.vocab_size=512", "--config.model.max_seq_len=128",
            "--config.model.dtype=float32", "--config.train.steps=4", "--config.train.lr=0.001",
            "--config.train.checkpoint_every=2", "--config.train.eval_every=4",
            "--config.train.async_checkpoint=False", "--config.rl.prompts_per_step=2",
            "--config.rl.samples_per_prompt=4", "--config.rl.max_new_tokens=12",
            "--config.rl.eval_prompts=2", "--config.rl.levels=1-3",  # _config's (the base's)
            f"--config.rl.rewards={reward}",
            "--config.rl.reward_timeout_s=3600"]
    proc = subprocess.Popen(args, env=env, cwd=pathlib.Path(__file__).parents[1],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not (killed / "checkpoints" / "2").is_dir():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no step-2 checkpoint within 300 s"
            time.sleep(0.2)
        time.sleep(1.0)  # the step-3 samples are being scored: the process hangs there
        assert proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert not (killed / "checkpoints" / "4").exists()

    sys.path.insert(0, str(mods))
    try:
        result = train_grpo(config(), str(killed))
    finally:
        sys.path.remove(str(mods))
    assert result["step"] == 4
    a, b = _final_params(tmp_path / "whole"), _final_params(killed)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    timing = ("sample_tokens_per_sec", "train_tokens_per_sec")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]
    assert strip(_rows(tmp_path / "whole")) == strip(_rows(killed))
