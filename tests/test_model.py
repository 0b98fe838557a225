"""The whole model against the float64 numpy reference, and its structural invariants."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsv3_jax as ds
from dsv3_jax.model.block import Stack
from dsv3_jax.model.transformer import DeepSeekV3, init_latent_cache

from conftest import (TINY32, V2_STYLE, assert_close, init_params, jitted_forward, jitted_loss_grad,
                      random_tokens)
import reference

# float32 against float64 through ~12 matmuls of width <= 384 and a few softmaxes: errors of a few
# 1e-6 relative; 1e-4 leaves room while any real math error is O(1).
RTOL = 1e-4


@pytest.mark.parametrize("cfg", [TINY32, V2_STYLE, TINY32.replace(mtp_depth=2, n_layers=2)],
                         ids=["v3-style", "v2-style-yarn", "mtp-depth-2"])
def test_forward_matches_numpy_reference(cfg):
    params = init_params(cfg)
    tokens = random_tokens(cfg, (2, 16), seed=3)
    out = jitted_forward(cfg)(params, tokens)
    for b in range(tokens.shape[0]):
        logits, mtp_logits = reference.forward(cfg, params, np.asarray(tokens[b]))
        assert_close(out.logits[b], logits, RTOL, f"logits row {b}")
        if cfg.mtp_depth:
            assert_close(out.mtp_logits[:, b], mtp_logits, RTOL, f"mtp logits row {b}")


def test_sequences_shorter_than_the_mtp_depth():
    """MTP module k reads token t_{i+k}; with T <= k there is none, and the shapes still hold."""
    cfg = TINY32.replace(mtp_depth=2, n_layers=2)
    out = jitted_forward(cfg)(init_params(cfg), jnp.array([[7]], jnp.int32))
    assert out.mtp_logits.shape == (2, 1, 1, cfg.vocab_size)


def test_init_and_public_call_api():
    cfg = ds.get_model_config("tiny")
    model = ds.DeepSeekV3(cfg)
    tokens = random_tokens(cfg, (2, 6))
    boxed = jax.jit(model.init)(jax.random.key(0), tokens)["params"]
    params = nn.unbox(boxed)
    # Every parameter carries logical axis names, one per dimension.
    for path, leaf in jax.tree_util.tree_flatten_with_path(
            boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]:
        assert isinstance(leaf, nn.LogicallyPartitioned), jax.tree_util.keystr(path)
        assert len(leaf.names) == leaf.value.ndim, jax.tree_util.keystr(path)
    # Init: norms at one, router biases at zero (fp32), matrices ~ N(0, init_std) in param_dtype.
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = jax.tree_util.keystr(path)
        if name.endswith("['weight']"):
            np.testing.assert_array_equal(leaf, 1.0)
        elif name.endswith("['e_score_correction_bias']"):
            assert leaf.dtype == jnp.float32
            np.testing.assert_array_equal(leaf, 0.0)
        else:
            assert leaf.dtype == jnp.float32, name
            if leaf.size >= 4096:
                assert abs(float(jnp.std(leaf)) / cfg.init_std - 1) < 0.1, name
    logits = jax.jit(model.apply)({"params": boxed}, tokens)
    logits2, mtp_logits = jax.jit(functools.partial(model.apply, return_mtp=True))(
        {"params": params}, tokens)
    assert logits.shape == (2, 6, cfg.vocab_size) and logits.dtype == jnp.float32
    assert mtp_logits.shape == (cfg.mtp_depth, 2, 6, cfg.vocab_size)
    np.testing.assert_array_equal(logits, logits2)
    with pytest.raises(ValueError, match="mtp_depth=0"):
        ds.DeepSeekV3(V2_STYLE).apply({"params": init_params(V2_STYLE)}, tokens, return_mtp=True)
    with pytest.raises(ValueError, match="max_seq_len"):
        model.apply({"params": params}, jnp.zeros((1, cfg.max_seq_len + 1), jnp.int32))
    with pytest.raises(ValueError, match="integer array"):
        model.apply({"params": params}, jnp.zeros((2, 6), jnp.float32))


def _unroll(params):
    """Scanned params ([L, ...] under 'layers') -> unrolled ('layers_0', 'layers_1', ...)."""
    out = dict(params)
    for stack in ("dense_layers", "moe_layers"):
        if stack in params:
            leaves = params[stack]["layers"]
            n = jax.tree.leaves(leaves)[0].shape[0]
            out[stack] = {f"layers_{i}": jax.tree.map(lambda a: a[i], leaves) for i in range(n)}
    return out


def test_scanned_stack_equals_unrolled(tiny_cfg, tiny_params):
    unrolled_cfg = tiny_cfg.replace(scan_layers=False)
    unrolled = _unroll(tiny_params)
    # The unrolled model builds exactly this tree.
    expected = jax.eval_shape(lambda: nn.unbox(DeepSeekV3(unrolled_cfg).init(
        jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]))
    assert jax.tree.structure(expected) == jax.tree.structure(unrolled)
    tokens = random_tokens(tiny_cfg, (2, 16), seed=5)
    a = jitted_forward(tiny_cfg)(tiny_params, tokens)
    b = jitted_forward(unrolled_cfg)(unrolled, tokens)
    for name in ("logits", "mtp_logits", "balance_loss"):
        assert_close(getattr(b, name), getattr(a, name), 1e-5, name)
    np.testing.assert_array_equal(a.expert_load, b.expert_load)

    ga = _unroll(jitted_loss_grad(tiny_cfg)(tiny_params, tokens))
    gb = jitted_loss_grad(unrolled_cfg)(unrolled, tokens)
    jax.tree.map(lambda x, y: assert_close(x, y, 1e-4, "grad"), gb, ga)


def test_remat_policies_give_the_same_gradients(tiny_cfg):
    """The remat policy changes what the backward pass recomputes, never the gradients."""
    x = jax.random.normal(jax.random.key(0), (2, 8, tiny_cfg.dim))
    positions = jnp.broadcast_to(jnp.arange(8), (2, 8))
    params = jax.jit(Stack(tiny_cfg, 2, moe=True).init)(jax.random.key(1), x, positions)

    def grads(policy):
        stack = Stack(tiny_cfg.replace(remat_policy=policy), 2, moe=True)

        def loss(p, x):
            y, routing = stack.apply(p, x, positions)
            return jnp.mean(y ** 2) + routing.balance_loss.sum()

        return jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)

    base = grads("none")
    for policy in ("full", "dots", "dots_no_batch"):
        jax.tree.map(lambda a, b: assert_close(a, b, 1e-5, policy), grads(policy), base)


def test_gradients_finite_and_bias_untouched():
    cfg = ds.get_model_config("tiny")  # the bf16 default
    grads = jitted_loss_grad(cfg)(init_params(cfg), random_tokens(cfg, (2, 16), seed=7))
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        name = jax.tree_util.keystr(path)
        assert np.all(np.isfinite(g)), name
        if "e_score_correction_bias" in name:
            assert not np.any(g), f"{name}: the router bias must get no gradient"
        else:
            assert np.any(g), f"{name}: no gradient reached this parameter"


def test_packed_segments_do_not_interact(tiny_cfg, tiny_params):
    """Two documents packed in one row (plus padding) give the logits of each run alone."""
    tokens = random_tokens(tiny_cfg, (2, 16), seed=8)
    doc_a, doc_b = tokens[0, :5], tokens[1, :7]
    packed = jnp.concatenate([doc_a, doc_b, jnp.zeros(4, jnp.int32)])[None]
    segments = jnp.array([[1] * 5 + [2] * 7 + [0] * 4])
    positions = jnp.array([list(range(5)) + list(range(7)) + list(range(4))])
    fwd = jitted_forward(tiny_cfg)
    out = fwd(tiny_params, packed, positions, segments)
    # Each document alone: causal attention makes the first 5 (7) positions of rows 0 (1) of
    # `tokens` exactly the documents alone, whatever follows them.
    alone = fwd(tiny_params, tokens, jnp.broadcast_to(jnp.arange(16), (2, 16)),
                jnp.ones((2, 16), jnp.int32))
    assert_close(out.logits[0, :5], alone.logits[0, :5], 1e-5, "doc a")
    assert_close(out.logits[0, 5:12], alone.logits[1, :7], 1e-5, "doc b")
    # MTP at position i reads token i+1: comparable while i+1 stays inside the document.
    assert_close(out.mtp_logits[:, 0, :4], alone.mtp_logits[:, 0, :4], 1e-5, "mtp doc a")
    assert_close(out.mtp_logits[:, 0, 5:11], alone.mtp_logits[:, 1, :6], 1e-5, "mtp doc b")
    # Padding is not counted: every valid token sends K tokens to experts in every MoE layer.
    k = tiny_cfg.n_activated_experts
    np.testing.assert_array_equal(out.expert_load.sum(-1), 12 * k)
    np.testing.assert_array_equal(out.mtp_expert_load.sum(-1), 12 * k)


def test_mtp_is_causal_in_the_shifted_tokens(tiny_cfg, tiny_params):
    """mtp_logits at position i may read tokens up to i+1 (it predicts i+2), never beyond."""
    tokens = random_tokens(tiny_cfg, (2, 16), seed=10)
    changed = tokens.at[:, 6].set((tokens[:, 6] + 1) % tiny_cfg.vocab_size)
    fwd = jitted_forward(tiny_cfg)
    a, b = fwd(tiny_params, tokens), fwd(tiny_params, changed)
    np.testing.assert_array_equal(a.mtp_logits[:, :, :5], b.mtp_logits[:, :, :5])
    assert not np.allclose(a.mtp_logits[:, :, 5], b.mtp_logits[:, :, 5])
    np.testing.assert_array_equal(a.logits[:, :6], b.logits[:, :6])


@pytest.mark.parametrize("cfg", [TINY32, V2_STYLE], ids=["v3-style", "v2-style-yarn"])
def test_latent_cache_decode_equals_forward(cfg):
    """Prefill a prompt through the absorbed path, then decode token by token: every step's logits
    equal the training forward pass at that position (rows with different prompt lengths)."""
    params = init_params(cfg)
    model = DeepSeekV3(cfg)
    tokens = random_tokens(cfg, (2, 16), seed=11)
    full = jitted_forward(cfg)(params, tokens).logits
    decode = jax.jit(lambda p, t, pos, c: model.apply({"params": p}, t, pos, c,
                                                       method=DeepSeekV3.decode))
    cache = init_latent_cache(cfg, 2, 20)
    prompt = 5
    positions = jnp.broadcast_to(jnp.arange(prompt), (2, prompt))
    logits, _, cache = decode(params, tokens[:, :prompt], positions, cache)
    assert_close(logits, full[:, :prompt], RTOL, "prefill")
    for t in range(prompt, 16):
        pos = jnp.full((2, 1), t)
        logits, _, cache = decode(params, tokens[:, t:t + 1], pos, cache)
        assert_close(logits[:, 0], full[:, t], RTOL, f"decode step {t}")
    # Row 1 restarted at a different length: its own prefix only.
    cache = init_latent_cache(cfg, 1, 20)
    logits, _, _ = decode(params, tokens[1:, :9], jnp.arange(9)[None], cache)
    assert_close(logits, full[1:, :9], RTOL, "second prefill")


def test_bf16_decode_runs_and_tracks_forward():
    cfg = ds.get_model_config("tiny")
    params = init_params(cfg)
    tokens = random_tokens(cfg, (2, 8), seed=12)
    full = jitted_forward(cfg)(params, tokens).logits
    logits, _, cache = DeepSeekV3(cfg).apply(
        {"params": params}, tokens, jnp.broadcast_to(jnp.arange(8), (2, 8)),
        init_latent_cache(cfg, 2, 8), method=DeepSeekV3.decode)
    assert cache.dtype == jnp.bfloat16
    # bf16 activations (8 mantissa bits) through 3 blocks: ~1% of the logit scale.
    assert_close(logits, full, 3e-2, "bf16 decode")
