"""Shared tiny configs, parameters and compiled functions: built once per session."""

from __future__ import annotations

import functools
import os
import pathlib
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsv3_jax as ds
from dsv3_jax.model.tree import abstract_params
from dsv3_jax.model.transformer import DeepSeekV3

# Compiled programs are cached on disk across tests, workers and the subprocesses tests start:
# compile time dominates this suite on CPU. The cache key is the program and the jax version.
COMPILATION_CACHE = pathlib.Path(__file__).resolve().parent.parent / ".pytest_cache" / "jax_compilation_cache"
jax.config.update("jax_compilation_cache_dir", str(COMPILATION_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
# The safety net's verdicts (ops/safety_net.py; probes run only on a GPU, or where a test forces
# them) go beside it, never into the user's own cache; a test may still point it elsewhere.
os.environ.setdefault("DSV3_KERNEL_CACHE", str(COMPILATION_CACHE.parent / "kernel_verdicts"))

# float32 compute so comparisons against float64 references are tight; a larger init std than
# training's 0.006 so activations, router scores and logits are far from zero.
# Dropless (moe_capacity_factor=0): the sharded-vs-one-device tests compare every token.
TINY32 = ds.get_model_config("tiny", dtype="float32", init_std=0.05, moe_capacity_factor=0.0)
# V2-Lite / 16B-style routing: softmax scores, no bias, no q compression, no groups, 2 shared
# experts, no MTP; and YaRN switched on by a short original_seq_len.
V2_STYLE = TINY32.replace(score_func="softmax", q_lora_rank=0, n_expert_groups=1,
                          n_limited_groups=1, route_scale=1.0, n_shared_experts=2, mtp_depth=0,
                          original_seq_len=64, mscale=0.707)


@functools.lru_cache(maxsize=None)
def init_params(cfg: ds.ModelConfig, seed: int = 0):
    """Random parameters with the model's exact tree, drawn with numpy (no init compile).

    Matrices ~ N(0, init_std); norm weights 1 + N(0, 0.1) and router biases N(0, 0.05), so that
    neither a forgotten norm weight nor a forgotten bias can hide. The real `model.init` is tested
    on its own in test_model.py.
    """
    shapes = abstract_params(cfg)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        if name.endswith("['weight']"):
            value = 1.0 + 0.1 * rng.standard_normal(leaf.shape)
        elif name.endswith("['e_score_correction_bias']"):
            value = 0.05 * rng.standard_normal(leaf.shape)
        else:
            value = cfg.init_std * rng.standard_normal(leaf.shape)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


@functools.lru_cache(maxsize=None)
def jitted_forward(cfg: ds.ModelConfig):
    model = DeepSeekV3(cfg)
    return jax.jit(lambda p, tokens, positions=None, segment_ids=None: model.apply(
        {"params": p}, tokens, positions, segment_ids, method=DeepSeekV3.forward))


@functools.lru_cache(maxsize=None)
def jitted_decode(cfg: ds.ModelConfig):
    model = DeepSeekV3(cfg)
    return jax.jit(lambda p, tokens, positions, cache: model.apply(
        {"params": p}, tokens, positions, cache, method=DeepSeekV3.decode))


def random_tokens(cfg, shape, seed=0):
    return jax.random.randint(jax.random.key(seed), shape, 0, cfg.vocab_size, dtype=jnp.int32)


@pytest.fixture(scope="session")
def tiny_cfg():
    return TINY32


@pytest.fixture(scope="session")
def tiny_params():
    return init_params(TINY32)


def assert_close(actual, expected, rtol, what=""):
    """|actual - expected| <= rtol * max|expected| elementwise (a scale-aware tolerance)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    scale = np.max(np.abs(expected))
    err = np.max(np.abs(actual - expected))
    assert err <= rtol * scale, f"{what}: max error {err:.3g} > {rtol} x max|expected| {scale:.3g}"


def _cross_entropy(logits, targets):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))


@functools.lru_cache(maxsize=None)
def jitted_loss_grad(cfg: ds.ModelConfig):
    """grad of a training-like loss: next-token CE + 0.3 x MTP CE + 1e-4 x balance loss."""
    model = DeepSeekV3(cfg)

    def loss(params, tokens):
        out = model.apply({"params": params}, tokens, method=DeepSeekV3.forward)
        total = _cross_entropy(out.logits[:, :-1], tokens[:, 1:])
        if cfg.mtp_depth:
            total += 0.3 * _cross_entropy(out.mtp_logits[0][:, :-2], tokens[:, 2:])
        if cfg.n_moe_layers:
            total += 1e-4 * out.balance_loss.sum()
        return total

    return jax.jit(jax.grad(loss))


def stdlib_corpus(root: pathlib.Path) -> str:
    """About 20 real Python files (this interpreter's json and email packages) copied into `root`;
    returns their glob, a `config.data.corpus` value."""
    import shutil
    import sysconfig

    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    for package in ("json", "email"):
        for f in sorted((stdlib / package).glob("*.py")):
            shutil.copy(f, root / f"{package}_{f.name}")
    return str(root / "*.py")


def stdlib_tokenizer(root: pathlib.Path):
    """A 512-piece tokenizer trained on stdlib_corpus(root), saved as root/tokenizer.model."""
    from dsv3_jax.data.tokenizer import train_tokenizer

    stdlib_corpus(root)
    texts = [p.read_text() for p in sorted(root.glob("*.py"))]
    return train_tokenizer(texts, str(root / "tokenizer.model"), vocab_size=512)


def random_checkpoint(folder: pathlib.Path, cfg: ds.ModelConfig, tokenizer) -> pathlib.Path:
    """A converted Orbax folder (params/, model_config.json, tokenizer.model) of init_params(cfg)
    at `folder` (created)."""
    import json

    import orbax.checkpoint as ocp

    folder.mkdir(parents=True)
    saver = ocp.StandardCheckpointer()
    saver.save(folder / "params", init_params(cfg))
    saver.wait_until_finished()
    (folder / "model_config.json").write_text(json.dumps(cfg.to_dict()))
    (folder / "tokenizer.model").write_bytes(pathlib.Path(tokenizer.path).read_bytes())
    return folder


def pytest_collection_modifyitems(config, items):
    """Tests marked `slow` (minutes each: the notebooks) run first, so that with `pytest -n 2` the
    two workers share them instead of one worker finishing them alone at the end. (Only mark
    tests whose fixtures are function-scoped: moving a test away from its module would set a
    module-scoped fixture up twice.)

    Tests marked `multidevice` need 8 devices; `make test` runs them in a second pytest with
    XLA_FLAGS=--xla_force_host_platform_device_count=8."""
    items.sort(key=lambda item: "slow" not in item.keywords)  # stable: order kept otherwise
    if jax.device_count() >= 8:
        return
    skip = pytest.mark.skip(reason="needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
    for item in items:
        if "multidevice" in item.keywords:
            item.add_marker(skip)
