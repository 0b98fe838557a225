"""The chunked cross-entropy (losses.chunked_token_stats) against token_stats on full logits: the
sums, their gradients in the head's input and kernel, the training loss of the tiny model with MTP,
and the memory it saves at V3's vocabulary (compiled, never run).

Tolerances. In float32 both paths take the same products (each logit is one float32 dot of the
same two rows); they differ only in the order the sums over tokens and chunks are taken, so the
results agree to a few float32 ulps of the largest value (2e-6 relative; 2^-24 = 6e-8 is one ulp).
In bfloat16 the forward logits are the same products again, but the kernel gradient is rounded to
bfloat16 per chunk instead of once over all tokens: a 2^-8 relative rounding, so 1e-2 of the largest
gradient entry.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest

from dsv3_jax.model.transformer import DeepSeekV3
from dsv3_jax.train import losses
from dsv3_jax.train.loop import loss_fn
from dsv3_jax.train.run_config import base_config, check_train_config

from conftest import TINY32, assert_close, init_params, random_tokens


def _inputs(n, d, v, dtype, seed):
    k = jax.random.split(jax.random.key(seed), 4)
    h = jax.random.normal(k[0], (n, d), jnp.float32).astype(dtype)
    w = jax.random.normal(k[1], (d, v), jnp.float32) * 0.5  # logits of a few units: a real softmax
    targets = jax.random.randint(k[2], (n,), 0, v)
    mask = jax.random.bernoulli(k[3], 0.7, (n,))
    return h, w, targets, mask


def _full(h, w, targets, mask):
    """Today's head and loss: Linear(fp8=False) logits [N, V] float32, then token_stats."""
    logits = jnp.dot(h, w.astype(h.dtype), preferred_element_type=jnp.float32)
    return losses.token_stats(logits, targets, mask)


def _value_and_grads(stats_fn, h, w, targets, mask):
    def nll(h, w):
        s = stats_fn(h, w, targets, mask)
        return s["nll_sum"], s
    (_, stats), grads = jax.jit(jax.value_and_grad(nll, argnums=(0, 1), has_aux=True))(h, w)
    return stats, grads


@pytest.mark.parametrize("n, chunk", [(37, 8), (37, 1), (37, 100), (64, 16), (64, 64)],
                         ids=["ragged", "chunk1", "chunk_over_n", "even", "one_chunk"])
def test_chunked_stats_equal_full_logits_float32(n, chunk):
    h, w, targets, mask = _inputs(n, 24, 70, jnp.float32, seed=n + chunk)
    assert not bool(mask.all())  # some positions are masked
    chunked = functools.partial(losses.chunked_token_stats, chunk=chunk)
    got, (dh, dw) = _value_and_grads(chunked, h, w, targets, mask)
    want, (dh_ref, dw_ref) = _value_and_grads(_full, h, w, targets, mask)
    assert float(got["count"]) == float(want["count"]) == float(mask.sum())
    assert float(got["correct"]) == float(want["correct"])
    assert_close(got["nll_sum"], want["nll_sum"], 2e-6, "nll_sum")
    assert_close(dh, dh_ref, 2e-6, "d h")
    assert_close(dw, dw_ref, 2e-6, "d w")
    # Masked rows get no gradient.
    assert float(jnp.abs(dh[~mask]).max()) == 0.0


def test_chunked_stats_bfloat16_compute():
    h, w, targets, mask = _inputs(50, 32, 90, jnp.bfloat16, seed=7)
    chunked = functools.partial(losses.chunked_token_stats, chunk=16)
    got, (dh, dw) = _value_and_grads(chunked, h, w, targets, mask)
    want, (dh_ref, dw_ref) = _value_and_grads(_full, h, w, targets, mask)
    assert dh.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
    assert float(got["correct"]) == float(want["correct"])
    assert_close(got["nll_sum"], want["nll_sum"], 2e-6, "nll_sum")  # same float32 logits
    assert_close(dh, dh_ref, 1e-2, "d h")
    assert_close(dw, dw_ref, 1e-2, "d w")


def test_chunked_stats_refuse_a_bad_chunk():
    h, w, targets, mask = _inputs(8, 4, 10, jnp.float32, seed=0)
    with pytest.raises(ValueError, match="chunk=0 must be a positive int"):
        losses.chunked_token_stats(h, w, targets, mask, chunk=0)


def test_loss_chunk_tokens_is_validated():
    train = base_config().train
    assert train.loss_chunk_tokens == losses.DEFAULT_CHUNK_TOKENS
    train.loss_chunk_tokens = 0
    with pytest.raises(ValueError, match=r"config\.train\.loss_chunk_tokens=0 is invalid"):
        check_train_config(train)


def test_training_loss_and_gradients_equal_the_full_logits_path():
    """loop.loss_fn (chunked, 7-token chunks over a 2 x 24 batch: ragged) against the model's
    logits through training_loss, on the tiny float32 model with one MTP depth and packed
    documents with padding."""
    cfg = TINY32
    assert cfg.mtp_depth >= 1
    params = init_params(cfg, seed=3)
    tokens = random_tokens(cfg, (2, 24), seed=11)
    segment_ids = jnp.array([[1] * 10 + [2] * 14, [1] * 19 + [0] * 5], jnp.int32)
    positions = jnp.array([list(range(10)) + list(range(14)), list(range(24))], jnp.int32)
    batch = {"tokens": tokens, "segment_ids": segment_ids, "positions": positions}
    train_cfg = base_config().train
    model = DeepSeekV3(cfg)

    def old_loss(params):
        out = model.apply({"params": params}, tokens, positions, segment_ids,
                          method=DeepSeekV3.forward)
        assert out.logits is not None and out.mtp_logits is not None
        return losses.training_loss(out, tokens, segment_ids, mtp_lambda=train_cfg.mtp_lambda,
                                    balance_alpha=train_cfg.balance_alpha)

    def new_loss(params):
        loss, (terms, _, _, _) = loss_fn(params, batch, model=model, train_cfg=train_cfg,
                                         chunk_tokens=7)
        return loss, terms

    (loss, terms), grads = jax.jit(jax.value_and_grad(new_loss, has_aux=True))(params)
    (loss_ref, terms_ref), grads_ref = jax.jit(jax.value_and_grad(old_loss, has_aux=True))(params)
    assert_close(loss, loss_ref, 2e-6, "loss")
    for key in ("ce", "mtp_ce", "accuracy"):
        assert_close(terms[key], terms_ref[key], 2e-6, key)
    flat, flat_ref = jax.tree.leaves_with_path(grads), jax.tree.leaves(grads_ref)
    assert len(flat) == len(flat_ref)
    for (path, g), g_ref in zip(flat, flat_ref):
        # Through the whole network: a few float32 ulps of each leaf's largest entry.
        assert_close(g, g_ref, 1e-5, jax.tree_util.keystr(path))
    # The chunked path made no [B, T, V] array.
    out = jax.eval_shape(lambda p: model.apply({"params": p}, tokens, positions, segment_ids,
                                               with_logits=False, method=DeepSeekV3.forward),
                         params)
    assert out.logits is None and out.mtp_logits is None
    assert out.head_input.shape == (2, 24, cfg.dim)
    assert out.mtp_head_input.shape == (cfg.mtp_depth, 2, 24, cfg.dim)
    assert out.head_kernel.shape == (cfg.dim, cfg.vocab_size)


def test_memory_at_v3_vocabulary_is_8x_below_full_logits():
    """Loss + gradient at B*T = 8192, V = 129,280, D = 512, bfloat16 compute and the default chunk:
    XLA's temporary bytes (compiled on CPU from shapes, never run) at least 8x below full logits'
    (which hold [8192, V] float32 twice: 8.1 GiB)."""
    n, d, v = 8192, 512, 129_280
    specs = (jax.ShapeDtypeStruct((n, d), jnp.bfloat16), jax.ShapeDtypeStruct((d, v), jnp.float32),
             jax.ShapeDtypeStruct((n,), jnp.int32), jax.ShapeDtypeStruct((n,), jnp.bool_))
    chunked = functools.partial(losses.chunked_token_stats, chunk=losses.DEFAULT_CHUNK_TOKENS)

    def temp_bytes(stats_fn):
        f = lambda h, w, t, m: stats_fn(h, w, t, m)["nll_sum"]
        analysis = jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(*specs).compile(
            ).memory_analysis()
        assert analysis is not None, "memory_analysis() gave nothing on this backend"
        return analysis.temp_size_in_bytes

    full, small = temp_bytes(_full), temp_bytes(chunked)
    assert full >= 2 * n * v * 4  # the reference does hold the logits
    assert small * 8 <= full, (small / 2**20, full / 2**20)
