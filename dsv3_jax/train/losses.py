"""The training objective (SPEC.md "Multi-token prediction", "Load balance").

Letters (`dsv3_jax/NOTATION.md`): B, T, V, X MTP depth.

  loss = CE(main) + mtp_lambda * mean_k CE(MTP depth k) + balance_alpha * sum_layers L_bal

The main head at position t predicts t+1; MTP depth k at position t predicts t+k+1. A target counts
only when it lies in the same document as the position predicting it (equal, non-zero segment ids:
segments are contiguous runs, so equal ids at t and t+j mean the whole span is one document).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def same_document(segment_ids: jax.Array, offset: int) -> jax.Array:
    """bool [B, T - offset]: position t and t + offset lie in one (non-padding) document."""
    return (segment_ids[:, :-offset] == segment_ids[:, offset:]) & (segment_ids[:, offset:] != 0)


def token_stats(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> dict:
    """Sums over masked positions: cross-entropy, count, correct argmax. logits [B, T, V] float32."""
    logits = logits.astype(jnp.float32)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - target_logit
    maskf = mask.astype(jnp.float32)
    return {"nll_sum": jnp.sum(nll * maskf), "count": jnp.sum(maskf),
            "correct": jnp.sum((jnp.argmax(logits, axis=-1) == targets) * maskf)}


def prediction_stats(out, tokens: jax.Array, segment_ids: jax.Array) -> dict:
    """token_stats of the main head (key 'main') and of each MTP depth (list under 'mtp')."""
    stats = {"main": token_stats(out.logits[:, :-1], tokens[:, 1:], same_document(segment_ids, 1)),
             "mtp": []}
    if out.mtp_logits is not None:
        for d in range(out.mtp_logits.shape[0]):
            k = d + 2  # depth d+1 predicts t + d + 2
            stats["mtp"].append(token_stats(out.mtp_logits[d][:, :-k], tokens[:, k:],
                                            same_document(segment_ids, k)))
    return stats


def _mean_nll(s: dict) -> jax.Array:
    return s["nll_sum"] / jnp.maximum(s["count"], 1.0)


def training_loss(out, tokens: jax.Array, segment_ids: jax.Array, *, mtp_lambda: float,
                  balance_alpha: float) -> tuple[jax.Array, dict]:
    """(loss, its terms) for one batch; see the module docstring."""
    stats = prediction_stats(out, tokens, segment_ids)
    ce = _mean_nll(stats["main"])
    mtp_ce = (sum(_mean_nll(s) for s in stats["mtp"]) / len(stats["mtp"])
              if stats["mtp"] else jnp.zeros([], jnp.float32))
    balance = sum((jnp.sum(b) for b in (out.balance_loss, out.mtp_balance_loss) if b is not None),
                  jnp.zeros([], jnp.float32))
    loss = ce + mtp_lambda * mtp_ce + balance_alpha * balance
    return loss, {"ce": ce, "mtp_ce": mtp_ce, "balance_loss": balance,
                  "accuracy": stats["main"]["correct"] / jnp.maximum(stats["main"]["count"], 1.0)}
