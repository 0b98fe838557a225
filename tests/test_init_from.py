"""config.train.init_from (a run starting from trained weights) and the extension configs.

One source run is trained for two steps; the same weights are then written as a converted Orbax
folder and a Hugging Face folder, and a context-extension run (longer sequences, YaRN on) starts
from each of the three."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import COMPILATION_CACHE, stdlib_corpus

from dsv3_jax.model.rope import rope_frequencies, yarn_summary
from dsv3_jax.train import init_from
from dsv3_jax.train.checkpoint import read_params
from dsv3_jax.train.loop import Run, train_and_evaluate
from dsv3_jax.train.run_config import base_config, model_config

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _source_config(corpus: str):
    c = base_config("tiny")
    c.model.vocab_size = 512
    c.model.max_seq_len = 64
    c.data.corpus = corpus
    c.data.seq_len, c.data.batch_size, c.data.validation_fraction = 32, 4, 0.2
    c.train.steps, c.train.warmup_steps, c.train.lr = 2, 1, 1e-3
    c.train.eval_batches, c.train.log_every, c.train.checkpoint_every = 0, 1, 2
    c.train.async_checkpoint = False
    return c


def _extension_config(corpus: str, source: str):
    """The source's model at 64 positions with YaRN from its 32 (s = 2), fresh settings."""
    c = _source_config(corpus)
    c.model.original_seq_len, c.model.rope_factor = 32, 2.0
    c.data.seq_len = 64
    c.train.lr, c.train.seed = 3e-4, 7  # another schedule and seed: only the params come over
    c.train.init_from = source
    return c


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """{kind: path} of the same weights as a training workdir, an Orbax folder and an HF folder,
    the corpus glob, and the workdir's params."""
    from dsv3_jax.convert.__main__ import hf_to_orbax, orbax_to_hf

    root = tmp_path_factory.mktemp("init_from")
    (root / "corpus").mkdir()
    corpus = stdlib_corpus(root / "corpus")
    workdir = str(root / "source_run")
    train_and_evaluate(_source_config(corpus), workdir)
    orbax_to_hf(workdir, str(root / "hf"), progress=False)
    hf_to_orbax(str(root / "hf"), str(root / "orbax"), progress=False)
    _, params, _ = read_params(workdir)
    return {"workdir": workdir, "orbax": str(root / "orbax"), "hf": str(root / "hf"),
            "corpus": corpus, "params": jax.device_get(params)}


def _zeros(tree) -> bool:
    return all(not np.any(np.asarray(x)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("kind", ["workdir", "orbax", "hf"])
def test_a_run_starts_from_each_source_with_its_params_and_a_fresh_optimizer(
        sources, kind, tmp_path):
    config = _extension_config(sources["corpus"], sources[kind])
    with contextlib.ExitStack() as resources:
        run = Run(config, str(tmp_path / "extended"), resources)
        state = jax.device_get(run.state)
        assert run.start_step == 0 and int(state.step) == 0
        # The parameters are the source's exactly (fp32 through every layout), biases included.
        flat = jax.tree_util.tree_flatten_with_path(state.params)[0]
        want = dict(jax.tree_util.tree_flatten_with_path(sources["params"])[0])
        assert len(flat) == len(want)
        for path, value in flat:
            np.testing.assert_array_equal(value, want[path], err_msg=jax.tree_util.keystr(path))
        assert any("e_score_correction_bias" in jax.tree_util.keystr(p) for p, _ in flat)
        # A fresh AdamW: zero moments, zero counts.
        assert _zeros(state.opt_state)
        assert run.meta["init_from"].startswith(os.path.abspath(sources[kind]))
        assert run.meta["rope"]["use_yarn"] and run.meta["rope"]["scale"] == 2.0
    # The source's tokenizer came along, so token ids keep their meaning.
    source_tokenizer = pathlib.Path(sources["workdir"]) / "tokenizer.model"
    assert (tmp_path / "extended" / "tokenizer.model").read_bytes() == source_tokenizer.read_bytes()


def test_an_architecture_change_is_refused_with_the_fields_named(sources, tmp_path):
    config = _extension_config(sources["corpus"], sources["workdir"])
    config.model.n_routed_experts, config.model.moe_inter_dim = 16, 32
    with contextlib.ExitStack() as resources, pytest.raises(init_from.InitFromError) as e:
        Run(config, str(tmp_path / "w"), resources)
    message = str(e.value)
    assert "model.n_routed_experts: source 8, this run 16" in message
    assert "model.moe_inter_dim: source 64, this run 32" in message
    assert "max_seq_len" in message  # what may change is said too
    assert not os.path.exists(tmp_path / "w" / "checkpoints")  # refused before anything ran


def test_the_context_fields_may_change_and_nothing_else():
    cfg = model_config(_source_config("x"))
    extended = cfg.replace(max_seq_len=1024, original_seq_len=32, rope_factor=8.0, mscale=0.9,
                           rope_theta=50000.0, beta_fast=16.0, beta_slow=2.0, dtype="float32",
                           remat_policy="full")
    assert init_from.architecture_differences(cfg, extended) == []
    assert init_from.architecture_differences(cfg, cfg.replace(norm_eps=1e-5)) == [
        "model.norm_eps: source 1e-06, this run 1e-05"]


def test_a_source_without_a_tokenizer_needs_one_configured(sources, tmp_path):
    import shutil

    bare = tmp_path / "bare_orbax"
    shutil.copytree(sources["orbax"], bare)
    os.remove(bare / "tokenizer.model")
    config = _extension_config(sources["corpus"], str(bare))
    with contextlib.ExitStack() as resources, pytest.raises(init_from.InitFromError,
                                                            match="config.data.tokenizer"):
        Run(config, str(tmp_path / "w"), resources)


def test_a_missing_source_is_refused(sources, tmp_path):
    config = _extension_config(sources["corpus"], str(tmp_path / "nowhere"))
    with contextlib.ExitStack() as resources, pytest.raises(init_from.InitFromError,
                                                            match="init_from=.*nowhere"):
        Run(config, str(tmp_path / "w"), resources)


def test_resuming_the_extended_run_resumes_it_not_the_init(sources, tmp_path):
    workdir = str(tmp_path / "extended")
    config = _extension_config(sources["corpus"], sources["workdir"])
    config.train.steps = 1
    train_and_evaluate(config, workdir)
    _, saved, meta = read_params(workdir)
    assert meta["step"] == 1 and meta["init_from"].startswith(sources["workdir"])
    config.train.steps = 2
    with contextlib.ExitStack() as resources:
        run = Run(config, workdir, resources)
        assert run.start_step == 1
        state = jax.device_get(run.state)
        assert not _zeros(state.opt_state)  # the run's own moments, not a fresh optimizer
        jax.tree.map(np.testing.assert_array_equal, state.params, jax.device_get(saved))
        # One step of training moved them off the source.
        moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), state.params, sources["params"])
        assert any(jax.tree.leaves(moved))


# ---- configs/extend.py ---------------------------------------------------------------------------

def _extend(variant: str):
    spec = importlib.util.spec_from_file_location("extend", ROOT / "configs" / "extend.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


@pytest.mark.parametrize("variant,seq_len,batch", [("32k", 32768, 1920), ("128k", 131072, 480)])
def test_the_v3_stages_use_the_reports_yarn_and_schedule(variant, seq_len, batch):
    """DeepSeek-V3 report, section 4.3: s = 40, alpha = 1, beta = 32, sqrt(t) = 0.1 ln s + 1,
    lr 7.3e-6, batch 1,920 at 32K and 480 at 128K, 1,000 steps, YaRN from the 4K pre-training."""
    from dsv3_jax.train.optimizer import learning_rate_schedule
    from dsv3_jax.train.run_config import check_run_config

    c = _extend(variant)
    check_run_config(c)
    cfg = model_config(c)
    s, alpha, beta = 40.0, 1.0, 32.0
    assert (cfg.rope_factor, cfg.beta_slow, cfg.beta_fast) == (s, alpha, beta)
    assert cfg.original_seq_len == 4096 and cfg.max_seq_len == c.data.seq_len == seq_len
    assert c.data.batch_size == batch and c.train.steps == 1000
    assert c.data.batch_size % c.train.grad_accum_steps == 0
    lr = learning_rate_schedule(c.train)
    assert [float(lr(i)) for i in (0, 500, 999)] == pytest.approx([7.3e-6] * 3, rel=1e-6)
    sqrt_t = 0.1 * math.log(s) + 1
    summary = yarn_summary(cfg)
    assert summary["sqrt_t"] == pytest.approx(sqrt_t, rel=1e-12)
    assert cfg.softmax_scale == pytest.approx((128 + 64) ** -0.5 * sqrt_t ** 2, rel=1e-12)
    # YaRN's frequencies written out: pair i has f_i = theta^(-2i/d); the ramp runs over pair
    # indices between the dims that turn beta and alpha times in the original context.
    d, theta, length = 64, 10000.0, 4096
    dim_of = lambda turns: d * math.log(length / (turns * 2 * math.pi)) / (2 * math.log(theta))
    low, high = max(math.floor(dim_of(beta)), 0), min(math.ceil(dim_of(alpha)), d - 1)
    assert (low, high) == (10, 23) and summary["ramp_pairs"] == [low, high]
    f = theta ** (-np.arange(0, d, 2) / d)
    gamma = np.clip((np.arange(d // 2) - low) / (high - low), 0, 1)
    np.testing.assert_allclose(rope_frequencies(cfg), f / s * gamma + f * (1 - gamma), rtol=1e-12)


def test_the_tiny_stage_and_its_control():
    tiny, control = model_config(_extend("tiny")), model_config(_extend("tiny_noyarn"))
    base = model_config(base_config("tiny"))
    assert tiny.max_seq_len == control.max_seq_len == 1024 == _extend("tiny").data.seq_len
    assert tiny.use_yarn and tiny.original_seq_len == 128 and tiny.rope_factor == 1024 / 128
    assert not control.use_yarn and control.softmax_scale == base.softmax_scale
    assert yarn_summary(tiny)["sqrt_t"] == pytest.approx(0.1 * math.log(8) + 1)
    for cfg in (tiny, control):  # both start from the make train run's weights
        assert init_from.architecture_differences(base, cfg) == []
    with pytest.raises(ValueError, match="unknown variant 'huge'.*32k"):
        _extend("huge")


def test_extension_then_needle_through_the_clis(sources, tmp_path):
    """A suite-sized extension stage (the :tiny config shrunk to this test's model) from the
    source workdir, then the needle evaluation of its checkpoint, both as a user runs them."""
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(COMPILATION_CACHE), JAX_PLATFORMS="cpu")
    workdir = tmp_path / "extended"
    overrides = dict(vocab_size=512, original_seq_len=32, rope_factor=2.0, max_seq_len=96)
    train = [sys.executable, "-m", "dsv3_jax.train", "--config=configs/extend.py:tiny",
             f"--workdir={workdir}", f"--config.train.init_from={sources['workdir']}",
             f"--config.data.corpus={sources['corpus']}", "--config.data.seq_len=64",
             "--config.data.validation_fraction=0.2", "--config.train.steps=2",
             "--config.train.eval_batches=1", "--config.train.eval_every=2",
             "--config.train.checkpoint_every=2", "--config.train.log_every=1"]
    train += [f"--config.model.{k}={v}" for k, v in overrides.items()]
    out = subprocess.run(train, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "initialised the parameters from" in out.stderr and "'use_yarn': True" in out.stderr
    # Past the run's 96 positions with --max_seq_len (YaRN is on either way).
    needle = [sys.executable, "-m", "dsv3_jax.eval", "needle", f"--checkpoint={workdir}",
              "--lengths=48,112", "--depths=0,0.5,1", "--trials=1", "--max_seq_len=128",
              f"--output_dir={tmp_path / 'needle'}"]
    out = subprocess.run(needle, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "needle" / "needle.json").read_text())
    assert result["lengths"] == [48, 112] and result["model"]["max_seq_len"] == 128
    assert result["model"]["use_yarn"] and len(result["cells"]) == 6
    assert (tmp_path / "needle" / "needle.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The loss-by-position comparison of experiments/long_context.py, source against extension.
    compare = [sys.executable, "experiments/long_context.py", "--length=80", "--documents=2",
               f"--checkpoints={sources['workdir']},{workdir}", "--max_seq_len=96",
               f"--corpus={sources['corpus']}"]
    out = subprocess.run(compare, cwd=ROOT, env=dict(env, PYTHONPATH=str(ROOT)),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| /")]
    assert len(rows) == 2 and "| 0-127 |" not in out.stdout and "| 0-79 |" in out.stdout
    assert "s=2 from 32" in rows[1]
