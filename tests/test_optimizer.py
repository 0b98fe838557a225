"""Optimizer, schedules and the aux-loss-free bias rule."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dsv3_jax as ds
from dsv3_jax.model.moe import Gate
from dsv3_jax.train import optimizer as optim
from dsv3_jax.train.run_config import base_config


def _train_cfg(**kw):
    tc = base_config().train
    for k, v in kw.items():
        tc[k] = v
    return tc


def _toy_params():
    rng = np.random.default_rng(0)
    return {"moe_layers": {"layers": {"ffn": {"gate": {
                "kernel": jnp.asarray(rng.standard_normal((2, 4, 8)), jnp.float32),
                "e_score_correction_bias": jnp.asarray(rng.standard_normal((2, 8)), jnp.float32)}},
            "attn_norm": {"weight": jnp.ones((2, 4))}}},
            "head": {"kernel": jnp.asarray(rng.standard_normal((4, 5)), jnp.float32)}}


def test_adamw_matches_optax_and_leaves_the_bias_alone():
    tc = _train_cfg(schedule="cosine", warmup_steps=2, steps=10, lr=1e-2, clip=1e9)
    params = _toy_params()
    tx = optim.make_optimizer(tc, params)
    mask = optim.decay_mask(params)
    reference = optax.adamw(optim.learning_rate_schedule(tc), b1=0.9, b2=0.95, eps=1e-8,
                            weight_decay=0.1, mask=mask)
    state, ref_state = tx.init(params), reference.init(params)
    p, q = params, params
    rng = np.random.default_rng(1)
    for _ in range(5):
        g = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), params)
        u, state = tx.update(g, state, p)
        p = optax.apply_updates(p, u)
        r, ref_state = reference.update(g, ref_state, q)
        q = optax.apply_updates(q, r)
    bias = ("moe_layers", "layers", "ffn", "gate", "e_score_correction_bias")
    get = lambda t, path: (t := t, [t := t[k] for k in path])[1][-1]
    np.testing.assert_array_equal(get(p, bias), get(params, bias))  # frozen
    for path in [("head", "kernel"), ("moe_layers", "layers", "ffn", "gate", "kernel"),
                 ("moe_layers", "layers", "attn_norm", "weight")]:
        np.testing.assert_allclose(get(p, path), get(q, path), rtol=1e-5, atol=1e-7)
    # Decay on matrices only.
    assert mask["head"]["kernel"] and not mask["moe_layers"]["layers"]["attn_norm"]["weight"]
    assert not mask["moe_layers"]["layers"]["ffn"]["gate"]["e_score_correction_bias"]


def test_bf16_moments_are_stored_in_bf16():
    params = _toy_params()
    tx = optim.make_optimizer(_train_cfg(bf16_moments=True), params)
    state = tx.init(params)
    dtypes = {x.dtype for x in jax.tree.leaves(state) if hasattr(x, "dtype") and x.ndim >= 1}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}
    g = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(g, state, params)
    assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))


def test_warmup_constant_cosine_schedule():
    tc = _train_cfg(steps=100, warmup_steps=10, lr=1.0, decay_start_fraction=0.6, final_lr_ratio=0.1)
    lr = optim.learning_rate_schedule(tc)
    assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(0.5)
    assert float(lr(10)) == pytest.approx(1.0) and float(lr(59)) == pytest.approx(1.0)
    assert float(lr(80)) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 20 / 40)), rel=1e-5)
    assert float(lr(100)) == pytest.approx(0.1, rel=1e-5)
    cos = optim.learning_rate_schedule(_train_cfg(steps=100, warmup_steps=10, lr=1.0,
                                                  schedule="cosine", final_lr_ratio=0.0))
    assert float(cos(55)) == pytest.approx(0.5, rel=1e-5) and float(cos(100)) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="schedule='linear'"):
        optim.learning_rate_schedule(_train_cfg(schedule="linear"))


def test_bias_update_rule():
    b = optim.bias_update(jnp.zeros((2, 4)), jnp.array([[10, 2, 2, 2], [4, 4, 4, 4]]), 0.01)
    np.testing.assert_allclose(b, [[-0.01, 0.01, 0.01, 0.01], [0, 0, 0, 0]])


def test_bias_update_moves_a_skewed_router_toward_balance():
    cfg = ds.get_model_config("tiny", dtype="float32", n_expert_groups=1, n_limited_groups=1)
    rng = np.random.default_rng(0)
    common = rng.standard_normal(cfg.dim)  # a direction every token shares...
    x = jnp.asarray(rng.standard_normal((4, 64, cfg.dim)) + common, jnp.float32)
    kernel = 0.05 * rng.standard_normal((cfg.dim, cfg.n_routed_experts))
    kernel[:, :2] += 0.01 * common[:, None]  # ... that experts 0 and 1 answer to
    params = {"kernel": jnp.asarray(kernel, jnp.float32),
              "e_score_correction_bias": jnp.zeros(cfg.n_routed_experts, jnp.float32)}
    route = jax.jit(lambda p: Gate(cfg).apply({"params": p}, x, jnp.ones(x.shape[:2], bool)))

    def imbalance(p):
        load = np.asarray(route(p).expert_load, np.float64)
        return load.max() / load.mean()

    start = imbalance(params)
    assert start > 2.0, start
    for _ in range(200):
        load = route(params).expert_load
        params = dict(params, e_score_correction_bias=optim.bias_update(
            params["e_score_correction_bias"], load, 0.005))
    assert imbalance(params) < 1.3 < start


def test_update_router_bias_reaches_every_router(tiny_cfg):
    from conftest import init_params

    params = init_params(tiny_cfg)
    e = tiny_cfg.n_routed_experts
    load = jnp.tile(jnp.arange(e), (tiny_cfg.n_moe_layers, 1))
    new = optim.update_router_bias(params, load, load[:1], 0.5)
    before = params["moe_layers"]["layers"]["ffn"]["gate"]["e_score_correction_bias"]
    after = new["moe_layers"]["layers"]["ffn"]["gate"]["e_score_correction_bias"]
    np.testing.assert_allclose(after - before, 0.5 * np.sign(np.mean(np.arange(e)) - np.arange(e))[None].repeat(2, 0))
    mtp = lambda t: t["mtp_0"]["block"]["ffn"]["gate"]["e_score_correction_bias"]
    assert np.all(mtp(new) != mtp(params))
    # Unrolled layout too.
    unrolled = {**params, "moe_layers": {f"layers_{i}": jax.tree.map(lambda a: a[i], params["moe_layers"]["layers"])
                                         for i in range(tiny_cfg.n_moe_layers)}}
    new_u = optim.update_router_bias(unrolled, load, None, 0.5)
    np.testing.assert_allclose(new_u["moe_layers"]["layers_1"]["ffn"]["gate"]["e_score_correction_bias"], after[1])


def test_router_biases_unrolled_keep_layer_order():
    """With 12 unrolled MoE layers the logged biases come in layer order (layers_2 before
    layers_10), then the MTP module's, the rows of ModelOutput's expert loads; the bias rule
    updates layer j with load row j."""
    from dsv3_jax.model import tree
    from dsv3_jax.train.loop import _router_biases

    cfg = ds.get_model_config("tiny", n_layers=13, n_dense_layers=1, scan_layers=False, mtp_depth=1)
    e = cfg.n_routed_experts
    params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), tree.abstract_params(cfg))
    for j in range(12):
        params["moe_layers"][f"layers_{j}"]["ffn"]["gate"]["e_score_correction_bias"][:] = j
    params["mtp_0"]["block"]["ffn"]["gate"]["e_score_correction_bias"][:] = 100
    biases = _router_biases(params)
    assert biases.shape == (13, e)
    np.testing.assert_array_equal(biases[:, 0], list(range(12)) + [100])
    # Row j of the load: expert 0 overloaded in layer j only for odd j.
    load = np.ones((12, e), np.int32)
    load[1::2, 0] = 10
    new = optim.update_router_bias(params, jnp.asarray(load), None, 1.0)
    got = _router_biases(new)
    for j in range(12):
        expected = j + np.sign(load[j].mean() - load[j])
        np.testing.assert_allclose(got[j], expected, err_msg=f"layers_{j}")
    np.testing.assert_array_equal(got[12], 100)  # mtp_expert_load None: MTP router untouched


def test_guarded_step_applies_a_finite_step_and_skips_a_nonfinite_one():
    """guarded_step against its definition: a finite step is tx's update plus the bias rule
    (written out here with optax and bias_update); a non-finite one returns the inputs bit for
    bit, whatever the gradients hold."""
    tc = _train_cfg(schedule="cosine", warmup_steps=0, steps=10, lr=1e-2, clip=1e9)
    params = _toy_params()
    tx = optim.make_optimizer(tc, params)
    opt_state = tx.init(params)
    rng = np.random.default_rng(1)
    grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
    load = jnp.asarray(rng.integers(0, 50, (2, 8)), jnp.float32)
    step = jax.jit(optim.guarded_step, static_argnums=(0, 7))

    got_p, got_s = step(tx, grads, params, opt_state, jnp.bool_(True), load, None, 0.5)
    updates, want_s = tx.update(grads, opt_state, params)
    want_p = optax.apply_updates(params, updates)
    gate = want_p["moe_layers"]["layers"]["ffn"]["gate"]
    gate["e_score_correction_bias"] = optim.bias_update(gate["e_score_correction_bias"], load, 0.5)
    for got, want in ((got_p, want_p), (got_s, want_s)):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                     got, want)
    assert not np.allclose(got_p["head"]["kernel"], params["head"]["kernel"])  # it moved

    nan_grads = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), grads)
    kept_p, kept_s = step(tx, nan_grads, params, opt_state, jnp.bool_(False), load, None, 0.5)
    for got, want in ((kept_p, params), (kept_s, opt_state)):
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                     got, want)
