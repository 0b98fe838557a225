"""Token sampling and the speculative-decoding acceptance rule.

Legend (the package's, in `dsv3_jax.model`): B batch, V vocabulary.

A `Sampling` turns logits into a distribution: divide by the temperature, keep the top_k most
likely tokens (0 = all) and the smallest set whose probability reaches top_p (1.0 = all).
Temperature 0 is greedy (argmax); the other settings are then ignored.

Speculative decoding (Leviathan et al. 2023; Chen et al. 2023): a draft token d ~ q is accepted
with probability min(1, p(d) / q(d)); on rejection the token is drawn from norm(max(0, p - q)).
The emitted token is then distributed exactly as p. Greedy: accepted iff d == argmax p, and the
emitted token is argmax p either way.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np


def as_int(value) -> int | None:
    """value as a Python int when it is an integer (Python, numpy, or a 0-d integer array; not a
    bool), else None. The one test of "is an integer" for user-facing generation arguments."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    scalar = isinstance(value, (np.ndarray, jax.Array)) and value.ndim == 0
    return int(value) if scalar and np.issubdtype(value.dtype, np.integer) else None


def as_real(value) -> float | None:
    """value as a Python float when it is a real number (int or float of Python or numpy, or a
    0-d array of either; not a bool), else None. NaN and infinities pass: callers check range."""
    if as_int(value) is not None or isinstance(value, (float, np.floating)):
        return float(value)
    scalar = isinstance(value, (np.ndarray, jax.Array)) and value.ndim == 0
    return float(value) if scalar and np.issubdtype(value.dtype, np.floating) else None


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How logits become tokens. Validated here, the one place for these checks; the fields are
    stored as Python numbers (the object is a cache key of the compiled programs).

    vocab_limit: only ids below it are ever drawn (0: all). A tokenizer can have fewer pieces than
    the model has ids (DeepSeek-V3 pads its vocabulary to 129,280); ids past its end decode to
    nothing, so generation for text limits itself to the tokenizer's vocab_size."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    vocab_limit: int = 0

    def __post_init__(self):
        temperature, top_k, top_p = as_real(self.temperature), as_int(self.top_k), as_real(self.top_p)
        vocab_limit = as_int(self.vocab_limit)
        if vocab_limit is None or vocab_limit < 0:
            raise ValueError(f"vocab_limit={self.vocab_limit!r} must be an integer >= 0 (0 = every "
                             "id; else the tokenizer's vocab_size).")
        object.__setattr__(self, "vocab_limit", vocab_limit)
        if temperature is None or not math.isfinite(temperature) or temperature < 0:
            raise ValueError(f"temperature={self.temperature!r} must be a finite number >= 0 "
                             "(0 = greedy, 1 = the model's own distribution).")
        if top_k is None or top_k < 0:
            raise ValueError(f"top_k={self.top_k!r} must be an integer >= 0 (0 = no top-k cut).")
        if top_p is None or not 0 < top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r} must be a number in (0, 1] (1 = no nucleus cut).")
        for name, value in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p)):
            object.__setattr__(self, name, value)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def limited(logits: jax.Array, s: Sampling) -> jax.Array:
    """logits [..., V] with the ids at or past s.vocab_limit set to -inf (unchanged for 0)."""
    if not s.vocab_limit or s.vocab_limit >= logits.shape[-1]:
        return logits
    ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    return jnp.where(ids < s.vocab_limit, logits, -jnp.inf)


def log_probs(logits: jax.Array, s: Sampling) -> jax.Array:
    """The sampling distribution as log-probabilities [..., V] (-inf outside top-k / top-p and
    past the vocab limit)."""
    logits = limited(logits.astype(jnp.float32), s) / s.temperature
    if s.top_k and s.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, s.top_k)[0][..., -1:]
        logits = jnp.where(logits >= kth, logits, -jnp.inf)
    if s.top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
        before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs  # mass of strictly likelier tokens
        keep_sorted = before < s.top_p  # always keeps the most likely token
        keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), axis=-1)  # vocab order
        logits = jnp.where(keep, logits, -jnp.inf)
    return jax.nn.log_softmax(logits, axis=-1)


def sample(logits: jax.Array, key: jax.Array, s: Sampling) -> jax.Array:
    """int32 [...]: argmax when greedy, else a draw from `log_probs`."""
    if s.greedy:
        return jnp.argmax(limited(logits, s), axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, log_probs(logits, s), axis=-1).astype(jnp.int32)


def accept_draft(target_logits: jax.Array, draft: jax.Array, draft_logq: jax.Array | None,
                 key: jax.Array, s: Sampling) -> tuple[jax.Array, jax.Array]:
    """The acceptance rule for one draft token per row.

    Args:
      target_logits: [B, V] main-model logits at the draft's position.
      draft: int [B] draft tokens; draft_logq: [B, V] the log-distribution they were drawn from
        (None when greedy).
    Returns:
      (accepted bool [B], token int32 [B]): the draft when accepted, else the correction.
    """
    if s.greedy:
        target = jnp.argmax(limited(target_logits, s), axis=-1).astype(jnp.int32)
        return draft == target, target
    logp = log_probs(target_logits, s)
    pick = lambda t: jnp.take_along_axis(t, draft[:, None], axis=-1)[:, 0]
    u_key, r_key = jax.random.split(key)
    ratio = jnp.exp(pick(logp) - pick(draft_logq))
    accepted = jax.random.uniform(u_key, draft.shape) < ratio
    residual = jnp.maximum(jnp.exp(logp) - jnp.exp(draft_logq), 0.0)
    has_mass = residual.sum(-1, keepdims=True) > 0  # p == q: rejection has probability 0
    residual = jnp.where(has_mass, residual, jnp.exp(logp))
    correction = jax.random.categorical(r_key, jnp.log(residual), axis=-1).astype(jnp.int32)
    return accepted, jnp.where(accepted, draft, correction)
