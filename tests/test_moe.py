"""The router and DeepSeekMoE against hand-made cases and a per-token float64 loop."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsv3_jax as ds
from dsv3_jax.model.moe import Gate, MoE, routed_experts, sequence_balance_loss

from conftest import TINY32, V2_STYLE, assert_close
import reference


def _logit(p):
    p = np.asarray(p, np.float64)
    return np.log(p / (1 - p))


def _gate(cfg, scores, bias=None, valid=None):
    """Runs Gate with kernel = identity, so sigmoid(logits) are exactly `scores` [B, T, E]."""
    scores = np.asarray(scores, np.float64)
    e = scores.shape[-1]
    params = {"kernel": jnp.eye(e, dtype=jnp.float32)}
    if cfg.has_score_correction_bias:
        params["e_score_correction_bias"] = jnp.asarray(np.zeros(e) if bias is None else bias, jnp.float32)
    x = jnp.asarray(_logit(scores) if cfg.score_func == "sigmoid" else np.log(scores), jnp.float32)
    valid = jnp.ones(scores.shape[:2], bool) if valid is None else jnp.asarray(valid)
    return Gate(cfg.replace(dim=e)).apply({"params": params}, x, valid)


def _cfg(**kw):
    base = dict(dim=8, n_routed_experts=8, n_expert_groups=4, n_limited_groups=2,
                n_activated_experts=2, route_scale=2.5, dtype="float32")
    base.update(kw)
    return ds.get_model_config("tiny", **base)


def test_masked_groups_are_minus_infinity_when_biased_scores_are_negative():
    """With biased scores all negative, a 0.0 group mask (the transformers port) would let experts
    of dropped groups win; -inf (the reference code) keeps them out."""
    cfg = _cfg()
    logits = np.array([2.0, 1.0, 1.5, 0.5, -1.0, -2.0, -1.5, -0.5])
    s = 1 / (1 + np.exp(-logits))
    bias = -np.ones(8)  # s + b in (-1, 0): every selection score negative
    # group scores (sum of the top 2 of s + b): g0 -0.388, g1 -0.560, g2 -1.612, g3 -1.440
    r = _gate(cfg, s[None, None], bias)
    assert sorted(np.asarray(r.indices[0, 0]).tolist()) == [0, 2]
    expected = np.array([s[0], s[2]]) / (s[0] + s[2]) * 2.5
    np.testing.assert_allclose(np.sort(np.asarray(r.weights[0, 0])), np.sort(expected), rtol=1e-6)


def test_bias_changes_the_selection_but_not_the_weights():
    cfg = _cfg(n_routed_experts=4, n_expert_groups=1, n_limited_groups=1, route_scale=1.0)
    s = np.array([0.7, 0.6, 0.5, 0.4])
    plain = _gate(cfg, s[None, None])
    assert np.asarray(plain.indices[0, 0]).tolist() == [0, 1]
    np.testing.assert_allclose(plain.weights[0, 0], [0.7 / 1.3, 0.6 / 1.3], rtol=1e-6)
    biased = _gate(cfg, s[None, None], bias=[0.0, 0.0, 0.3, 0.0])  # expert 2 selects at 0.8
    assert np.asarray(biased.indices[0, 0]).tolist() == [2, 0]
    # Gate values come from the unbiased scores 0.5 and 0.7.
    np.testing.assert_allclose(biased.weights[0, 0], [0.5 / 1.2, 0.7 / 1.2], rtol=1e-6)


def test_sigmoid_weights_without_renormalisation_hand_checked():
    """norm_topk_prob=False (transformers' DeepseekV3 option): the chosen sigmoid scores times
    route_scale, not divided by their sum; selection is unchanged."""
    cfg = _cfg(n_routed_experts=4, n_expert_groups=1, n_limited_groups=1, route_scale=2.5,
               norm_topk_prob=False)
    s = np.array([0.7, 0.6, 0.5, 0.4])
    r = _gate(cfg, s[None, None], bias=[0.0, 0.0, 0.3, 0.0])  # expert 2 selects at 0.8
    assert np.asarray(r.indices[0, 0]).tolist() == [2, 0]
    np.testing.assert_allclose(r.weights[0, 0], [0.5 * 2.5, 0.7 * 2.5], rtol=1e-6)
    renormalised = _gate(cfg.replace(norm_topk_prob=True), s[None, None], bias=[0.0, 0.0, 0.3, 0.0])
    np.testing.assert_allclose(renormalised.weights[0, 0], [0.5 / 1.2 * 2.5, 0.7 / 1.2 * 2.5], rtol=1e-6)


def test_softmax_router_ignores_norm_topk_prob():
    """Softmax routers never renormalise (SPEC.md "Gate"), whatever norm_topk_prob says."""
    s = np.array([0.4, 0.3, 0.2, 0.1])
    for norm in (True, False):
        cfg = _cfg(score_func="softmax", n_routed_experts=4, n_expert_groups=1, n_limited_groups=1,
                   route_scale=1.0, norm_topk_prob=norm)
        r = _gate(cfg, s[None, None])
        np.testing.assert_allclose(r.weights[0, 0], [0.4, 0.3], rtol=1e-5)


def test_unbiased_group_score_is_the_group_max():
    cfg = _cfg(score_func="softmax", n_routed_experts=4, n_expert_groups=2, n_limited_groups=1,
               n_activated_experts=2, route_scale=1.0)
    # Group 0 = {0.30, 0.05} (max 0.30, sum 0.35); group 1 = {0.28, 0.27} (max 0.28, sum 0.55).
    # Max keeps group 0 (a top-2 sum would keep group 1); softmax weights are not renormalised.
    s = np.array([0.30, 0.05, 0.28, 0.27]) / 0.90
    r = _gate(cfg, s[None, None])
    assert np.asarray(r.indices[0, 0]).tolist() == [0, 1]
    np.testing.assert_allclose(r.weights[0, 0], s[[0, 1]], rtol=1e-5)


def test_load_counts_and_balance_loss_hand_checked():
    """E = 4, K = 2, one sequence of two tokens:
    t0 scores [0.8, 0.4, 0.2, 0.6] -> top-2 {0, 3}; t1 [0.1, 0.7, 0.3, 0.9] -> {3, 1}.
    f_i = E / (K T) x count = count = [1, 1, 0, 2];
    P = mean of scores / their sum (both sum to 2.0) = [0.225, 0.275, 0.125, 0.375];
    sum f_i P_i = 0.225 + 0.275 + 0 + 0.75 = 1.25."""
    cfg = _cfg(n_routed_experts=4, n_expert_groups=1, n_limited_groups=1, route_scale=1.0)
    scores = np.array([[[0.8, 0.4, 0.2, 0.6], [0.1, 0.7, 0.3, 0.9]]])
    r = _gate(cfg, scores)
    np.testing.assert_array_equal(r.expert_load, [1, 1, 0, 2])
    assert float(r.balance_loss) == pytest.approx(1.25, rel=1e-6)
    # A padding token (third position) changes neither.
    padded = np.concatenate([scores, [[[0.9, 0.9, 0.1, 0.1]]]], axis=1)
    r = _gate(cfg, padded, valid=[[True, True, False]])
    np.testing.assert_array_equal(r.expert_load, [1, 1, 0, 2])
    assert float(r.balance_loss) == pytest.approx(1.25, rel=1e-6)


def test_balance_loss_is_one_when_routing_is_uniform():
    # Each expert chosen equally often and equal scores: f_i = 1, P_i = 1/E, sum = 1.
    e, t = 4, 4  # 4 experts, 4 tokens, top-2
    indices = jnp.array([[[0, 1], [2, 3], [0, 2], [1, 3]]])
    loss = sequence_balance_loss(jnp.full((1, t, e), 0.5), indices, jnp.ones((1, t), bool), e)
    assert float(loss) == pytest.approx(1.0, rel=1e-6)
    # ... and it averages over sequences.
    two = sequence_balance_loss(jnp.full((2, t, e), 0.5), jnp.concatenate([indices, indices]),
                                jnp.ones((2, t), bool), e)
    assert float(two) == pytest.approx(1.0, rel=1e-6)


def test_router_matches_reference_per_token():
    """Indices exactly, weights to rtol 1e-5 (float32 gate vs the float64 reference)."""
    rng = np.random.default_rng(0)
    for cfg in (TINY32, TINY32.replace(norm_topk_prob=False), V2_STYLE):
        x = rng.standard_normal((3, 5, cfg.dim))
        params = {"kernel": 0.3 * rng.standard_normal((cfg.dim, cfg.n_routed_experts))}
        if cfg.has_score_correction_bias:
            params["e_score_correction_bias"] = 0.1 * rng.standard_normal(cfg.n_routed_experts)
        r = Gate(cfg).apply({"params": jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)},
                            jnp.asarray(x, jnp.float32), jnp.ones((3, 5), bool))
        counts = np.zeros(cfg.n_routed_experts)
        for b in range(3):
            for t in range(5):
                idx, w = reference.route(cfg, params, x[b, t])
                np.testing.assert_array_equal(np.asarray(r.indices[b, t]), idx)
                np.testing.assert_allclose(r.weights[b, t], w, rtol=1e-5)
                counts[idx] += 1
        np.testing.assert_array_equal(r.expert_load, counts)


@pytest.mark.parametrize("cfg", [TINY32, TINY32.replace(norm_topk_prob=False), V2_STYLE],
                         ids=["v3-style", "v3-unnormalised", "v2-style"])
def test_moe_equals_per_token_loop(cfg):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 6, cfg.dim))
    moe = MoE(cfg)
    params = jax.jit(moe.init)(jax.random.key(0), jnp.zeros((1, 2, cfg.dim)), jnp.ones((1, 2), bool))
    params = nn.unbox(params["params"])
    # Larger weights than init so expert outputs are not tiny; a random bias.
    params = jax.tree.map(lambda a: jnp.asarray(0.2 * rng.standard_normal(a.shape), jnp.float32), params)
    y, routing = jax.jit(moe.apply)({"params": params}, jnp.asarray(x, jnp.float32), jnp.ones((2, 6), bool))
    p64 = reference.np_params(params)
    for b in range(2):
        assert_close(y[b], reference.moe(cfg, p64, x[b]), 1e-5, f"row {b}")
    assert int(routing.expert_load.sum()) == 12 * cfg.n_activated_experts


def test_routed_experts_with_empty_experts_and_gradients():
    """Dropless dispatch when some experts get no token; gradients through x and the weights
    match a dense per-pair computation."""
    rng = np.random.default_rng(2)
    n, d, f, e, k = 7, 6, 5, 5, 2
    x = jnp.asarray(rng.standard_normal((n, d)), jnp.float32)
    indices = jnp.array([[0, 3], [3, 0], [0, 3], [3, 4], [4, 0], [0, 4], [3, 0]])  # 1, 2 empty
    weights = jnp.asarray(rng.random((n, k)), jnp.float32)
    w1, w3 = (jnp.asarray(rng.standard_normal((e, d, f)), jnp.float32) for _ in range(2))
    w2 = jnp.asarray(rng.standard_normal((e, f, d)), jnp.float32)

    def dense(x, weights, w1, w2, w3):
        h = jax.nn.silu(jnp.einsum("nd,nkdf->nkf", x, w1[indices])) * jnp.einsum("nd,nkdf->nkf", x, w3[indices])
        return jnp.einsum("nkf,nkfd,nk->nd", h, w2[indices], weights)

    args = (x, weights, w1, w2, w3)
    got, dropped = routed_experts(x, indices, weights, w1, w2, w3)
    assert int(dropped) == 0  # one device: never drops
    assert_close(got, dense(*args), 1e-5, "forward")
    loss = lambda fn: (lambda *a: jnp.sum(jnp.sin(fn(*a))))
    g_got = jax.grad(loss(lambda x, wt, a, b, c: routed_experts(x, indices, wt, a, b, c)[0]), argnums=range(5))(*args)
    g_ref = jax.grad(loss(dense), argnums=range(5))(*args)
    for name, a, b in zip(["x", "weights", "w1", "w2", "w3"], g_got, g_ref):
        assert_close(a, b, 1e-5, name)
    np.testing.assert_array_equal(g_got[2][1], 0.0)  # an empty expert gets no gradient
