"""train_and_evaluate end to end on a small corpus: one step, kill-and-resume bit for bit, fallback
past damaged checkpoints, NaN handling, and the bad inputs a user can give."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from dsv3_jax.data.pipeline import DataError
from dsv3_jax.train.checkpoint import CheckpointMismatchError
from dsv3_jax.train.loop import NonFiniteLossError, train_and_evaluate
from dsv3_jax.train.run_config import check_run_config

from conftest import COMPILATION_CACHE, stdlib_corpus

ROOT = pathlib.Path(__file__).resolve().parent.parent

# The smoke variant of the default config, shrunk: a 512-piece vocabulary, 4 x 64-token batches.
SMALL = {"model.vocab_size": 512, "data.seq_len": 64, "data.batch_size": 4,
         "data.validation_fraction": 0.2, "train.log_every": 1, "train.eval_every": 2,
         "train.eval_batches": 1, "train.checkpoint_every": 2, "train.lr": 3e-3,
         "train.warmup_steps": 2}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """About 20 real Python files (this interpreter's json and email packages)."""
    return stdlib_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def tokenizer(corpus, tmp_path_factory):
    from dsv3_jax.data.pipeline import prepare_data

    workdir = tmp_path_factory.mktemp("tokenizer")
    prepare_data(_config(corpus, "").data, str(workdir), model_vocab_size=512)
    return str(workdir / "tokenizer.model")


def _overrides(corpus, tokenizer, **extra):
    values = dict(SMALL, **{"data.corpus": corpus, "data.tokenizer": tokenizer})
    values.update({k.replace("__", "."): v for k, v in extra.items()})
    return values


def _config(corpus, tokenizer, **extra):
    spec = importlib.util.spec_from_file_location("tiny_config", ROOT / "configs" / "tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("smoke")
    for key, value in _overrides(corpus, tokenizer, **extra).items():
        section, name = key.split(".")
        config[section][name] = value
    return config


def _cli(corpus, tokenizer, workdir, **extra):
    flags = [f"--config.{k}={v}" for k, v in _overrides(corpus, tokenizer, **extra).items()]
    return [sys.executable, "-m", "dsv3_jax.train", f"--config={ROOT / 'configs' / 'tiny.py'}:smoke",
            f"--workdir={workdir}", *flags]


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _losses(workdir):
    return {r["step"]: r["loss"] for r in _rows(workdir) if "loss" in r}


def _saved_state(workdir, step):
    return ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))


def _assert_same_state(a, b):
    import jax

    leaves_a = jax.tree_util.tree_flatten_with_path(a)[0]
    leaves_b = jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for (path, x), y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def uninterrupted(corpus, tokenizer, tmp_path_factory):
    """Six steps without interruption: the run every resumed run must equal."""
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    result = train_and_evaluate(_config(corpus, tokenizer, train__steps=6), workdir)
    return workdir, result


def test_one_step(corpus, tokenizer, tmp_path):
    result = train_and_evaluate(_config(corpus, tokenizer, train__steps=1,
                                        train__profile_start_step=1, train__profile_steps=1,
                                        train__log_expert_load=True),
                                str(tmp_path))
    assert result["step"] == 1
    assert list((tmp_path / "profile").rglob("*.xplane.pb"))  # the jax.profiler trace of step 1
    rows = _rows(tmp_path)
    assert rows[0]["step"] == 0 and "eval_loss" in rows[0]  # evaluated before training
    train_row = next(r for r in rows if "loss" in r)
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_sec", "mfu", "ce", "mtp_ce",
                "balance_loss", "expert_load_max_over_mean", "expert_load_cv", "router_bias_norm"):
        assert key in train_row, key
    assert len(train_row["expert_load_cv"]) == 3  # two MoE layers and the MTP block
    assert train_row["moe_dropped_fraction"] == [0.0, 0.0, 0.0]  # one device: no exchange
    # Per-expert vectors: every router sees batch x seq_len valid tokens x K = 2 experts each.
    assert np.asarray(train_row["expert_load"]).shape == (3, 8)
    np.testing.assert_array_equal(np.asarray(train_row["expert_load"]).sum(-1), 4 * 64 * 2)
    assert np.asarray(train_row["router_bias"]).shape == (3, 8)
    np.testing.assert_allclose(np.linalg.norm(train_row["router_bias"], axis=-1),
                               train_row["router_bias_norm"], atol=1e-6)  # logged to 6 decimals
    assert np.isfinite(train_row["loss"]) and train_row["tokens_per_sec"] > 0
    assert rows[-1]["step"] == 1 and {"eval_loss", "eval_perplexity", "eval_accuracy",
                                      "eval_mtp_accuracy"} <= set(rows[-1])
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert (tmp_path / "checkpoints" / "1").is_dir()
    assert result["eval"]["eval_perplexity"] == pytest.approx(np.exp(result["eval"]["eval_loss"]))


def test_training_reduces_the_loss(uninterrupted):
    workdir, result = uninterrupted
    evals = [r["eval_loss"] for r in _rows(workdir) if "eval_loss" in r]
    assert evals[-1] < evals[0] - 0.15, evals  # 6 steps: from ln(512) = 6.24 to about 6.0
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4", "6"]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_and_resumed_run_equals_the_uninterrupted_one(sig, uninterrupted, corpus, tokenizer,
                                                             tmp_path):
    """A real process is killed mid-run (SIGKILL: no warning; SIGTERM: save, then exit); a restart
    in the same workdir ends with the same losses and the same state, bit for bit."""
    reference_dir, _ = uninterrupted
    workdir = tmp_path / "run"
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(COMPILATION_CACHE),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5", JAX_PLATFORMS="cpu")
    log = open(tmp_path / "log.txt", "w")
    # Synchronous saves in the killed process, so that step 2's checkpoint is complete once step 3
    # is logged; the uninterrupted run saves asynchronously.
    proc = subprocess.Popen(_cli(corpus, tokenizer, workdir, train__steps=6,
                                 train__async_checkpoint=False),
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (workdir / "metrics.jsonl").exists() and any(
                "loss" in r and r["step"] >= 3 for r in _rows(workdir)):
            break
        time.sleep(0.2)
    assert proc.poll() is None, (tmp_path / "log.txt").read_text()[-3000:]
    proc.send_signal(sig)
    code = proc.wait(timeout=120)
    stopped_at = max(int(p) for p in os.listdir(workdir / "checkpoints") if p.isdigit())
    if sig == signal.SIGTERM:
        assert code == 0, (tmp_path / "log.txt").read_text()[-3000:]
        assert stopped_at == max(_losses(workdir))  # it saved the step it stopped at
    assert 2 <= stopped_at < 6

    result = train_and_evaluate(_config(corpus, tokenizer, train__steps=6), str(workdir))
    assert result["step"] == 6
    assert _losses(workdir) == _losses(reference_dir)
    _assert_same_state(_saved_state(workdir, 6), _saved_state(reference_dir, 6))


def test_damaged_and_unfinished_checkpoints_are_passed_over(uninterrupted, corpus, tokenizer,
                                                            tmp_path):
    """An interrupted save (a leftover temporary directory) and a damaged newest checkpoint do not
    stop a restart: it resumes from the newest checkpoint that reads back."""
    reference_dir, _ = uninterrupted
    workdir = tmp_path / "run"
    shutil.copytree(reference_dir, workdir)
    ckpts = workdir / "checkpoints"
    shutil.rmtree(ckpts / "6")
    for f in (ckpts / "4" / "state").rglob("*"):  # damage step 4's array data
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(b"garbage")
    (ckpts / "8.orbax-checkpoint-tmp-1234").mkdir()
    result = train_and_evaluate(_config(corpus, tokenizer, train__steps=6), str(workdir))
    assert result["step"] == 6
    assert _losses(workdir) == _losses(reference_dir)
    _assert_same_state(_saved_state(workdir, 6), _saved_state(reference_dir, 6))
    assert len(list(ckpts.glob("4.unreadable-*"))) == 1  # set aside, not deleted


def test_nonfinite_loss_keeps_and_saves_the_last_good_state(corpus, tokenizer, tmp_path):
    config = _config(corpus, tokenizer, train__steps=6, train__lr=1e30, train__warmup_steps=0,
                     train__clip=1e30)
    with pytest.raises(NonFiniteLossError, match=r"Lower config.train.lr") as err:
        train_and_evaluate(config, str(tmp_path))
    bad_step = int(str(err.value).split()[1].rstrip(":"))
    state = _saved_state(str(tmp_path), bad_step)
    import jax

    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state["params"]))
    assert int(state["step"]) == bad_step


def test_checkpoint_from_another_config_is_refused(uninterrupted, corpus, tokenizer, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(uninterrupted[0], workdir)
    with pytest.raises(CheckpointMismatchError, match=r"model.n_layers: checkpoint 3, this run 4"):
        train_and_evaluate(_config(corpus, tokenizer, train__steps=8, model__n_layers=4), str(workdir))


def test_config_typos_are_refused(corpus, tokenizer, tmp_path):
    config = _config(corpus, tokenizer)
    with config.unlocked():
        config.train.stpes = 5
    with pytest.raises(ValueError, match=r"config.train.stpes is not a setting; did you mean config.train.steps\?"):
        check_run_config(config)
    out = subprocess.run(_cli(corpus, tokenizer, tmp_path, train__stpes=5), cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "stpes" in out.stderr


def test_bad_run_inputs(corpus, tokenizer, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(OSError, match="is not writable"):
        train_and_evaluate(_config(corpus, tokenizer), str(blocker / "run"))
    with pytest.raises(DataError, match="matches no file|no such"):
        train_and_evaluate(_config(str(tmp_path / "missing" / "*.txt"), ""), str(tmp_path / "r1"))
    with pytest.raises(DataError, match="512.*256|256.*512"):
        train_and_evaluate(_config(corpus, tokenizer, model__vocab_size=256), str(tmp_path / "r2"))
    with pytest.raises(ValueError, match="seq_len=1024 exceeds the model's max_seq_len=512"):
        train_and_evaluate(_config(corpus, tokenizer, data__seq_len=1024), str(tmp_path / "r3"))
    with pytest.raises(ValueError, match="config.mesh"):
        train_and_evaluate(_config(corpus, tokenizer, mesh__data=3), str(tmp_path / "r4"))


@pytest.mark.parametrize("start, n, resume_at, traced", [
    (2, 3, 0, (2, 4)),  # steps 2..4
    (-1, 5, 0, None),  # -1: no trace, whatever profile_steps says
    (2, 3, 3, None),  # resumed inside the window: nothing to stop
    (5, 10, 0, (5, 8)),  # the run ends (step 8) inside the window: the trace is still stopped
])
def test_profiler_window_starts_and_stops_its_own_trace(monkeypatch, tmp_path, start, n, resume_at,
                                                        traced):
    from dsv3_jax.train import loop
    from dsv3_jax.train.run_config import base_config

    events = []
    monkeypatch.setattr(loop.jax.profiler, "start_trace", lambda d: events.append("start"))
    monkeypatch.setattr(loop.jax.profiler, "stop_trace", lambda: events.append("stop"))
    tc = base_config().train
    tc.profile_start_step, tc.profile_steps = start, n
    profiler, marks = loop._Profiler(tc, str(tmp_path)), []
    for step in range(resume_at + 1, 9):
        profiler.before(step)
        marks.append((step, list(events)))
        profiler.after(step, None)
    profiler.close()
    if traced is None:
        assert events == []
    else:
        first, last = traced
        assert events == ["start", "stop"]
        assert [s for s, e in marks if e == ["start"]] == list(range(first, min(last, 8) + 1))


@pytest.mark.parametrize("section, key, value, pattern", [
    ("train", "grad_accum_steps", 0, r"config.train.grad_accum_steps=0 is invalid"),
    ("train", "grad_accum_steps", 3, r"grad_accum_steps=3 does not divide config.data.batch_size=16"),
    ("train", "moe_dropped_warn_fraction", 1.5, r"moe_dropped_warn_fraction=1.5 is invalid"),
    ("model", "moe_capacity_factor", 0.5, r"moe_capacity_factor=0.5 is invalid: must be 0 \(dropless\)"),
    ("model", "moe_capacity_factor", float("nan"), r"moe_capacity_factor=nan is invalid"),
])
def test_accumulation_and_capacity_settings_are_checked(section, key, value, pattern):
    from dsv3_jax.train.run_config import base_config

    config = base_config("tiny")
    config[section][key] = value
    with pytest.raises(ValueError, match=pattern):
        check_run_config(config)


def test_dropped_pairs_over_the_threshold_are_warned_about(monkeypatch):
    from types import SimpleNamespace

    from dsv3_jax.train import loop
    from dsv3_jax.train.run_config import base_config

    config = base_config("tiny")
    config.model.moe_capacity_factor = 1.25
    warnings = []
    monkeypatch.setattr(loop.logging, "warning", lambda msg, *a: warnings.append(msg % a))
    run = SimpleNamespace(config=config)
    loop.Run._warn_dropped(run, 7, np.array([0.0, 0.01, 0.0]))  # at the threshold: quiet
    assert warnings == []
    loop.Run._warn_dropped(run, 8, np.array([0.0, 0.002, 0.034]))
    assert len(warnings) == 1
    assert "step 8: MoE router 2's exchange dropped 3.40%" in warnings[0]
    assert "moe_capacity_factor (now 1.25" in warnings[0]
