"""The training objective (SPEC.md "Multi-token prediction", "Load balance").

Letters (`dsv3_jax/NOTATION.md`): B, T, V, X MTP depth.

  loss = CE(main) + mtp_lambda * mean_k CE(MTP depth k) + balance_alpha * sum_layers L_bal

The main head at position t predicts t+1; MTP depth k at position t predicts t+k+1. A target counts
only when it lies in the same document as the position predicting it (equal, non-zero segment ids:
segments are contiguous runs, so equal ids at t and t+j mean the whole span is one document), and,
when the batch carries a `loss_mask` (supervised fine-tuning: True on the assistants' answer
tokens, dsv3_jax/data/conversations.py), only when the target token is one the mask marks: the
main head and every MTP depth learn the answers only, from whatever context precedes them.

Two ways to the same sums. With a ModelOutput that holds logits, `token_stats` reduces them. The
training and eval steps ask the model for no logits (`forward(..., with_logits=False)`) and use
`chunked_token_stats`: the head is applied `chunk` tokens at a time, each chunk's float32 logits
[chunk, V] reduced to its sums and dropped, and recomputed in the backward pass (a custom_vjp
over two `lax.scan`s; the forward keeps one log-sum-exp per token), so neither pass holds
[B, T, V]: at V3 scale (V = 129,280) 0.26 GB of logits per 512-token chunk instead of 4.2 GB per
8192 tokens, for the main head and again for each MTP depth.
The numerics are the head's own: inputs cast to the compute dtype, float32 accumulation, float32
logits and log-sum-exp, so the loss and its gradients equal the full-logits path's up to float32
rounding (the sums are taken in another order; in a bfloat16 compute dtype the kernel gradient
is rounded to bfloat16 per chunk, as autodiff of the head rounds it, and summed over chunks in
float32).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

DEFAULT_CHUNK_TOKENS = 512  # config.train.loss_chunk_tokens' default (train/run_config.py)


def same_document(segment_ids: jax.Array, offset: int) -> jax.Array:
    """bool [B, T - offset]: position t and t + offset lie in one (non-padding) document."""
    return (segment_ids[:, :-offset] == segment_ids[:, offset:]) & (segment_ids[:, offset:] != 0)


def counted_targets(segment_ids: jax.Array, offset: int,
                    loss_mask: jax.Array | None = None) -> jax.Array:
    """bool [B, T - offset]: the prediction made at t of the token at t + offset counts: both in
    one document and, with a loss_mask [B, T] (bool or 0/1), the token at t + offset marked."""
    counted = same_document(segment_ids, offset)
    return counted if loss_mask is None else counted & (loss_mask[:, offset:] != 0)


def token_stats(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> dict:
    """Sums over masked positions: cross-entropy, count, correct argmax. logits [B, T, V] float32."""
    logits = logits.astype(jnp.float32)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - target_logit
    maskf = mask.astype(jnp.float32)
    return {"nll_sum": jnp.sum(nll * maskf), "count": jnp.sum(maskf),
            "correct": jnp.sum((jnp.argmax(logits, axis=-1) == targets) * maskf)}


def chunked_token_stats(h: jax.Array, w: jax.Array, targets: jax.Array, mask: jax.Array, *,
                        chunk: int, compute_dtype=None) -> dict:
    """token_stats(h @ w, targets, mask) without holding the logits: `chunk` tokens at a time.

    Args:
      h: [N, D] the head's input (the final-normed hidden states), any float dtype.
      w: [D, V] the head's kernel (the float32 master weight).
      targets: int [N]; mask: bool or 0/1 [N], the positions that count.
      chunk: tokens per chunk, >= 1 (more than N: one chunk of N). N is padded to a multiple of
        it with masked rows. Chunk j holds tokens j, j + n_chunks, j + 2 n_chunks, ... (a strided
        split: rows of a batch-sharded N stay on their devices).
      compute_dtype: the head's compute dtype (default h.dtype): logits are
        dot(h.astype(dtype), w.astype(dtype)) accumulated and returned in float32, exactly as
        model/layers.py's Linear with fp8=False computes them.
    Returns:
      {"nll_sum", "count", "correct"} float32 scalars, as token_stats. nll_sum is differentiable
      in h and w; the backward pass recomputes each chunk's logits (its softmax minus the target's
      one-hot), holding a few [chunk, V] float32 arrays at a time. `correct` (argmax) and `count`
      carry no gradient. (A custom_vjp: the forward keeps only each row's log-sum-exp.)
    """
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise ValueError(f"chunk={chunk!r} must be a positive int (tokens per loss chunk; "
                         "config.train.loss_chunk_tokens).")
    if h.ndim != 2 or w.ndim != 2 or h.shape[1] != w.shape[0]:
        raise ValueError(f"h must be [N, D] and w [D, V]; got {h.shape} and {w.shape}.")
    n, d = h.shape
    dtype = jnp.dtype(compute_dtype or h.dtype)
    chunk = min(chunk, n)
    n_chunks = -(-n // chunk)
    pad = n_chunks * chunk - n
    maskf = mask.astype(jnp.float32)
    if pad:
        h = jnp.pad(h, ((0, pad), (0, 0)))
        targets = jnp.pad(targets, (0, pad))
        maskf = jnp.pad(maskf, (0, pad))  # padded rows count for nothing
    # [n_chunks, chunk, ...]: chunk j = tokens j + i * n_chunks.
    hs = h.reshape(chunk, n_chunks, d).swapaxes(0, 1)
    ts, ms = targets.reshape(chunk, n_chunks).T, maskf.reshape(chunk, n_chunks).T
    nll_sum, correct = _chunked_nll(dtype, hs, w, ts, ms)
    return {"nll_sum": nll_sum, "count": jnp.sum(maskf), "correct": correct}


def _head(dtype, hc: jax.Array, w: jax.Array) -> jax.Array:
    """[C, D] x [D, V] -> float32 logits [C, V]: model/layers.py Linear with fp8=False."""
    return jnp.dot(hc.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunked_nll(dtype, hs, w, ts, ms):
    """(sum of masked nll, masked correct argmax) over chunks hs [n, C, D] (targets ts, mask ms
    [n, C]); the gradient flows to hs and w through the nll only."""
    return _chunked_nll_fwd(dtype, hs, w, ts, ms)[0]


def _chunked_nll_fwd(dtype, hs, w, ts, ms):
    wc = w.astype(dtype)

    def body(carry, x):
        hc, tc, mc = x
        logits = _head(dtype, hc, wc)  # [C, V] float32, dropped after this chunk
        lse = jax.nn.logsumexp(logits, axis=-1)
        nll = lse - jnp.take_along_axis(logits, tc[:, None], axis=-1)[:, 0]
        correct = (jnp.argmax(logits, axis=-1) == tc).astype(jnp.float32)
        return (carry[0] + jnp.sum(nll * mc), carry[1] + jnp.sum(correct * mc)), lse

    zero = jnp.zeros([], jnp.float32)
    (nll_sum, correct), lse = jax.lax.scan(body, (zero, zero), (hs, ts, ms))
    return (nll_sum, correct), (hs, w, ts, ms, lse)


def _chunked_nll_bwd(dtype, res, cts):
    hs, w, ts, ms, lse = res
    g = cts[0]  # the nll sum's cotangent; `correct` has none

    wc = w.astype(dtype)  # cast once; the head's product is then taken as Linear takes it

    def body(dw, x):
        hc, tc, mc, lse_c = x
        logits, pull = jax.vjp(functools.partial(_head, dtype), hc, wc)  # recomputed
        onehot = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1) == tc[:, None]
        # d nll / d logits = softmax - onehot, per counted row, times the incoming cotangent.
        dlogits = (jnp.exp(logits - lse_c[:, None]) - onehot) * (mc * g)[:, None]
        dhc, dwc = pull(dlogits)  # the head's own transposed products, as autodiff takes them
        return dw + dwc.astype(jnp.float32), dhc

    dw, dhs = jax.lax.scan(body, jnp.zeros(w.shape, jnp.float32), (hs, ts, ms, lse))
    return dhs, dw.astype(w.dtype), None, None


_chunked_nll.defvjp(_chunked_nll_fwd, _chunked_nll_bwd)


def chunked_target_log_probs(h: jax.Array, w: jax.Array, targets: jax.Array, *, chunk: int,
                             compute_dtype=None) -> jax.Array:
    """log softmax(h @ w)[targets] float32 [N] without holding [N, V] logits: `chunk` rows at a
    time (contiguous chunks; N padded to a multiple with row 0's target), each chunk's logits
    recomputed in the backward pass (jax.checkpoint), so a few [chunk, V] float32 arrays live at
    once. h [N, D], w [D, V] (the head's master kernel), targets int [N]; the head's numerics are
    `_head`'s (compute dtype inputs, float32 accumulation), as in chunked_token_stats.
    Differentiable in h and w: what a policy-gradient loss over sampled tokens needs."""
    n, d = h.shape
    dtype = compute_dtype or h.dtype
    chunk = max(1, min(int(chunk), n))
    k = -(-n // chunk)
    pad = k * chunk - n
    hs = jnp.pad(h, ((0, pad), (0, 0))).reshape(k, chunk, d)
    ts = jnp.pad(targets, (0, pad)).reshape(k, chunk)
    wc = w.astype(dtype)

    @jax.checkpoint
    def one(hc, tc, wc):
        logits = _head(dtype, hc, wc)  # [C, V] float32
        target = jnp.take_along_axis(logits, tc[:, None], axis=-1)[:, 0]
        return target - jax.nn.logsumexp(logits, axis=-1)

    _, logp = jax.lax.scan(lambda _, x: (None, one(x[0], x[1], wc)), None, (hs, ts))
    return logp.reshape(-1)[:n]


def prediction_stats(out, tokens: jax.Array, segment_ids: jax.Array, *,
                     chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                     loss_mask: jax.Array | None = None) -> dict:
    """token_stats of the main head (key 'main') and of each MTP depth (list under 'mtp'), over the
    targets counted_targets(segment_ids, k, loss_mask) counts.

    From `out.logits` / `out.mtp_logits` when the output holds them; otherwise (a forward pass
    with with_logits=False) chunked_token_stats over `out.head_input` / `out.mtp_head_input` and
    `out.head_kernel`, `chunk_tokens` at a time (over the whole [B, T] batch)."""
    if out.logits is not None:
        stats = {"main": token_stats(out.logits[:, :-1], tokens[:, 1:],
                                     counted_targets(segment_ids, 1, loss_mask)), "mtp": []}
        if out.mtp_logits is not None:
            for d in range(out.mtp_logits.shape[0]):
                k = d + 2  # depth d+1 predicts t + d + 2
                stats["mtp"].append(token_stats(out.mtp_logits[d][:, :-k], tokens[:, k:],
                                                counted_targets(segment_ids, k, loss_mask)))
        return stats

    def chunked(h, k):
        # Every position, the last k masked (no target in the sequence): [B * T] rows, no slice.
        targets = jnp.pad(tokens[:, k:], ((0, 0), (0, k)))
        mask = jnp.pad(counted_targets(segment_ids, k, loss_mask), ((0, 0), (0, k)))
        return chunked_token_stats(h.reshape(-1, h.shape[-1]), out.head_kernel,
                                   targets.reshape(-1), mask.reshape(-1), chunk=chunk_tokens)

    stats = {"main": chunked(out.head_input, 1), "mtp": []}
    if out.mtp_head_input is not None:
        for d in range(out.mtp_head_input.shape[0]):
            stats["mtp"].append(chunked(out.mtp_head_input[d], d + 2))
    return stats


def sequences_with_tokens(segment_ids: jax.Array) -> jax.Array:
    """float32 []: rows of [B, T] segment_ids holding at least one real (non-zero) token."""
    return jnp.sum(jnp.any(segment_ids != 0, axis=1).astype(jnp.float32))


def loss_normalizers(segment_ids: jax.Array, mtp_depth: int,
                     loss_mask: jax.Array | None = None) -> dict:
    """What training_loss divides by, over a whole step's batch (segment_ids [B, T], the optional
    loss_mask [B, T]): the counted targets of the main head ('main') and of each MTP depth ('mtp',
    a list), and the sequences holding a real token ('sequences', over which the balance loss is
    averaged). float32 scalars.

    Gradient accumulation gives each microbatch the step's normalizers: every term of the loss
    is then a sum over tokens (or sequences) divided by the step's count, so the microbatches'
    losses, terms and gradients add up to those of the whole batch."""
    count = lambda k: jnp.sum(counted_targets(segment_ids, k, loss_mask).astype(jnp.float32))
    return {"main": count(1), "mtp": [count(d + 2) for d in range(mtp_depth)],
            "sequences": sequences_with_tokens(segment_ids)}


def training_loss(out, tokens: jax.Array, segment_ids: jax.Array, *, mtp_lambda: float,
                  balance_alpha: float, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                  normalizers: dict | None = None,
                  loss_mask: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """(loss, its terms) for one batch; see the module docstring (`chunk_tokens`: as in
    prediction_stats, used when `out` holds no logits; `loss_mask` [B, T]: the target tokens that
    count, None for all).

    normalizers: `loss_normalizers` of the whole step's batch when this batch is one microbatch
    of it (the terms are then this microbatch's share, and sum over the step's microbatches to
    the step's); default this batch's own, the plain per-batch means."""
    stats = prediction_stats(out, tokens, segment_ids, chunk_tokens=chunk_tokens,
                             loss_mask=loss_mask)
    norm = normalizers or loss_normalizers(segment_ids, len(stats["mtp"]), loss_mask)
    mean = lambda s, count: s["nll_sum"] / jnp.maximum(count, 1.0)
    ce = mean(stats["main"], norm["main"])
    mtp_ce = (sum(mean(s, c) for s, c in zip(stats["mtp"], norm["mtp"])) / len(stats["mtp"])
              if stats["mtp"] else jnp.zeros([], jnp.float32))
    balance = sum((jnp.sum(b) for b in (out.balance_loss, out.mtp_balance_loss) if b is not None),
                  jnp.zeros([], jnp.float32))
    # Each layer's balance loss averages over this batch's sequences with tokens; rescaled to
    # the step's (a factor of exactly 1 for a whole batch that has any).
    balance = balance * (sequences_with_tokens(segment_ids) / jnp.maximum(norm["sequences"], 1.0))
    loss = ce + mtp_lambda * mtp_ce + balance_alpha * balance
    return loss, {"ce": ce, "mtp_ce": mtp_ce, "balance_loss": balance,
                  "accuracy": stats["main"]["correct"] / jnp.maximum(norm["main"], 1.0)}
