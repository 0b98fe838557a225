"""Gradient accumulation (config.train.grad_accum_steps): A microbatches under lax.scan give the
loss, its terms, the expert loads and the fp32 gradients of one step over the whole batch.

The batches mix documents and padding so that the microbatches' target counts and their
sequences with tokens differ (a plain mean of microbatch losses would then be wrong). float32
compute: the only differences are the order of fp32 sums over tokens and the shape-dependent
rounding of the model's own forward pass (bounds in each test). In bfloat16 compute, each
microbatch's weight gradients are rounded to bf16 before they are added, as autodiff rounds them,
so there the agreement is bf16's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.model import tree
from dsv3_jax.model.transformer import DeepSeekV3
from dsv3_jax.train import loop
from dsv3_jax.train.run_config import base_config

from conftest import TINY32, assert_close, init_params, random_tokens


def mixed_batch(cfg, batch: int, seq: int, seed: int = 0) -> dict:
    """int32 [batch, seq] tokens, segment ids and positions: rows of 1-3 documents, some rows
    ending in padding (segment 0), one row all padding."""
    rng = np.random.default_rng(seed)
    segments = np.zeros((batch, seq), np.int32)
    positions = np.zeros((batch, seq), np.int32)
    for b in range(batch - 1):  # the last row stays all padding
        cuts = np.sort(rng.choice(np.arange(2, seq - 1), rng.integers(0, 3), replace=False))
        end = seq - int(rng.integers(0, seq // 3))  # padding after `end`
        bounds = [0, *[c for c in cuts if c < end], end]
        for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            segments[b, lo:hi] = i + 1
            positions[b, lo:hi] = np.arange(hi - lo)
    tokens = np.asarray(random_tokens(cfg, (batch, seq), seed=seed))
    order = rng.permutation(batch)  # the empty row lands in some microbatch, not always last
    return {"tokens": jnp.asarray(tokens[order]), "segment_ids": jnp.asarray(segments[order]),
            "positions": jnp.asarray(positions[order])}


def _train_cfg(accum: int):
    tc = base_config("tiny").train
    with tc.unlocked():
        tc.grad_accum_steps = accum
    return tc


@functools.lru_cache(maxsize=None)
def _loss_and_grads(accum: int):
    model = DeepSeekV3(TINY32)
    return jax.jit(functools.partial(loop._loss_and_grads, model=model, train_cfg=_train_cfg(accum),
                                     chunk_tokens=32))


def _relative(a, b) -> float:
    """||a - b|| / ||b|| over a whole tree (float64)."""
    diff = sum(float(np.sum((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    norm = sum(float(np.sum(np.asarray(y, np.float64) ** 2)) for y in jax.tree.leaves(b))
    return (diff / norm) ** 0.5


def test_accumulated_gradients_equal_one_step_over_the_whole_batch():
    """2 microbatches against the whole batch: 1e-6 of the gradients' norm (measured 1.9e-7).
    The forward pass alone changes by about 6e-7 of its scale between a 2-row and an 8-row batch
    (XLA's CPU kernels are chosen by shape), so the bound cannot be much tighter, and it grows
    with the microbatches (8.5e-7 measured with 4; test_accumulation_adds_the_microbatches_own_
    gradients checks the sum itself at 4)."""
    accum = 2
    params, batch = init_params(TINY32), mixed_batch(TINY32, 8, 24, seed=1)
    (loss1, (terms1, load1, mtp_load1, drop1)), grads1 = _loss_and_grads(1)(params, batch)
    (loss_a, (terms_a, load_a, mtp_load_a, drop_a)), grads_a = _loss_and_grads(accum)(params, batch)
    # The microbatches really differ: their target counts are unequal.
    counts = [float(jnp.sum(loop.losses.same_document(s, 1)))
              for s in loop._microbatches(batch, accum)["segment_ids"]]
    assert len(set(counts)) > 1, counts
    assert_close(loss_a, loss1, 1e-6, "loss")
    for k in terms1:
        assert_close(terms_a[k], terms1[k], 1e-6, k)
    np.testing.assert_array_equal(load_a, load1)  # the bias rule sees the whole step's load
    np.testing.assert_array_equal(mtp_load_a, mtp_load1)
    np.testing.assert_array_equal(drop_a, drop1)  # one device: dropless, zeros
    assert _relative(grads_a, grads1) <= 1e-6
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads_a))


def test_accumulation_adds_the_microbatches_own_gradients():
    """The scan's sum against the microbatches run one by one (same shapes, so the same rounding
    inside each) with the step's normalizers and added in float64: only the fp32 additions of the
    carry differ, bound 1e-6 of each gradient's scale."""
    params, batch = init_params(TINY32), mixed_batch(TINY32, 8, 24, seed=3)
    accum = 4
    (loss_a, _), grads_a = _loss_and_grads(accum)(params, batch)
    norms = loop.losses.loss_normalizers(batch["segment_ids"], TINY32.mtp_depth)
    grad_fn = jax.jit(jax.value_and_grad(functools.partial(
        loop.loss_fn, model=DeepSeekV3(TINY32), train_cfg=_train_cfg(1), chunk_tokens=32,
        normalizers=norms), has_aux=True))
    micro = loop._microbatches(batch, accum)
    parts = [grad_fn(params, jax.tree.map(lambda x: x[a], micro)) for a in range(accum)]
    f64 = lambda x: np.asarray(x, np.float64)
    total = jax.tree.map(lambda *g: sum(f64(x) for x in g), *[p[1] for p in parts])
    assert_close(loss_a, sum(f64(p[0][0]) for p in parts), 1e-6, "loss")
    jax.tree.map(lambda a, b: assert_close(a, b, 1e-6, "grads"), grads_a, total)


def test_accumulation_with_a_loss_mask_equals_one_step():
    """Supervised fine-tuning's batches: a loss mask (answers only) whose counted targets differ
    between the microbatches; the step's normalizers count only marked targets, so 2
    microbatches give the whole batch's loss and gradients (the bound of the unmasked test)."""
    params, batch = init_params(TINY32), mixed_batch(TINY32, 8, 24, seed=5)
    rng = np.random.default_rng(5)
    mask = (rng.random((8, 24)) < 0.4) * (np.asarray(batch["segment_ids"]) != 0)
    batch = dict(batch, loss_mask=jnp.asarray(mask, jnp.int32))
    (loss1, (terms1, *_)), grads1 = _loss_and_grads(1)(params, batch)
    (loss_a, (terms_a, *_)), grads_a = _loss_and_grads(2)(params, batch)
    counts = [float(jnp.sum(loop.losses.counted_targets(s, 1, m))) for s, m in zip(
        *(loop._microbatches(batch, 2)[k] for k in ("segment_ids", "loss_mask")))]
    assert len(set(counts)) > 1 and 0 < sum(counts) < float(jnp.sum(
        loop.losses.same_document(batch["segment_ids"], 1))), counts
    assert_close(loss_a, loss1, 1e-6, "loss")
    for k in terms1:
        assert_close(terms_a[k], terms1[k], 1e-6, k)
    assert _relative(grads_a, grads1) <= 1e-6


def test_microbatches_hold_every_row_once_strided():
    batch = {"tokens": jnp.arange(12 * 3, dtype=jnp.int32).reshape(12, 3)}
    micro = loop._microbatches(batch, 3)["tokens"]
    assert micro.shape == (3, 4, 3)
    np.testing.assert_array_equal(micro[1], batch["tokens"][1::3])


def test_train_step_with_accumulation_updates_biases_from_the_whole_load():
    """One optimizer step with 2 microbatches: the router biases move exactly as with one batch
    (the sign rule on equal loads), the loss and gradient norm agree, the step counts once. (The
    gradients themselves are compared above; Adam's first step divides g by |g|, so comparing
    its updates would hinge on the sign of near-zero gradients.)"""
    params, batch = init_params(TINY32), mixed_batch(TINY32, 8, 24, seed=2)
    model = DeepSeekV3(TINY32)
    states, metrics = [], []
    for accum in (1, 2):
        tc = _train_cfg(accum)
        tx = loop.optim.make_optimizer(tc, params)
        state = loop.TrainState(step=jnp.zeros([], jnp.int32), params=params,
                                opt_state=tx.init(params), rng=jnp.zeros([2], jnp.uint32))
        step = jax.jit(functools.partial(loop._train_step, model=model, tx=tx, train_cfg=tc,
                                         chunk_tokens=32))
        new, m = step(state, batch)
        states.append(new)
        metrics.append(m)
    one, two = states
    assert int(two.step) == 1
    for path in tree.router_bias_paths(params):
        np.testing.assert_array_equal(tree.get(two.params, path), tree.get(one.params, path))
        assert not np.array_equal(tree.get(two.params, path), tree.get(params, path))
    np.testing.assert_array_equal(metrics[1]["expert_load"], metrics[0]["expert_load"])
    assert_close(metrics[1]["loss"], metrics[0]["loss"], 1e-6, "loss")
    assert_close(metrics[1]["grad_norm"], metrics[0]["grad_norm"], 1e-6, "grad norm")
