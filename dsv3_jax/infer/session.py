"""One conversation over a latent cache that lives across turns: what a chat keeps between replies.

Legend (the package's, `dsv3_jax.model`): L layers, S cache slots (the context), C + R a
latent-cache row, V vocabulary.

A ChatSession holds the cache [L, 1, S, C + R] and `ids`, the tokens whose rows it holds (slot s
holds ids[s], as in generate.py). Each turn the caller asks for the whole conversation's ids
(`prefill(wanted)`): the session keeps the longest common prefix of `ids` and `wanted`, and feeds
only the rest through the model, at the positions after that prefix. Rolling back is free, as in
speculative decoding: slot s is overwritten before any query at position >= s reads it (a query
at t attends to slots 0..t, and each call writes its own tokens before attending).

So a chat re-renders the conversation every turn and pays only for what changed: the new user
turn; or, when the chat format rewrites history (DeepSeek's drops an earlier answer's <think>
reasoning, a new system prompt changes the front), everything after the first changed token.
The answer's generated tokens stay in the cache as generated; where the re-encoded text of the
answer tokenizes differently, the tail is re-fed from the first differing token (correct either
way: the cache always matches `ids`).

Feeds are padded to power-of-two lengths, at most MAX_FEED tokens and never past the last slot
(few shapes, so few compiles; a decode step is one token wide); the padding lands in slots after
the real end, which the next tokens overwrite before anything reads them. Only the last real
token's logits leave the model call.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import ModelConfig
from dsv3_jax.infer import sampling as sampling_lib
from dsv3_jax.infer.generate import _decode
from dsv3_jax.infer.sampling import Sampling
from dsv3_jax.model.transformer import init_latent_cache


class ContextFullError(ValueError):
    """The conversation does not fit the session's context (the model's max_seq_len)."""


@dataclasses.dataclass
class TurnStats:
    reused: int = 0  # tokens of the conversation already in the cache
    fed: int = 0  # tokens run through the model to bring the cache up to date
    new_tokens: int = 0  # tokens generated
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    stopped: str = ""  # "stop" (a stop token), "max_new_tokens" or "context"

    @property
    def tokens_per_sec(self) -> float:
        return self.new_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0


MAX_FEED = 2048  # tokens per model call when a long history is fed (bounds its activations)


@functools.partial(jax.jit, static_argnames="cfg", donate_argnames="cache")
def _feed(cfg: ModelConfig, params, tokens, start, last, cache):
    """tokens int32 [1, n] at positions start.. -> (float32 logits [V] at index `last`, the
    cache)."""
    positions = start + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
    logits, _, cache = _decode(cfg, params, tokens, positions, cache)
    return logits[0, last].astype(jnp.float32), cache


def _width(n: int, room: int) -> int:
    """The power of two a feed of n tokens is padded to: the smallest >= n, at most MAX_FEED and
    the largest power of two <= room (the slots left); the feed then takes min(n, width)."""
    cap = 1 << (min(room, MAX_FEED).bit_length() - 1)
    return min(1 << (n - 1).bit_length(), cap)


@functools.partial(jax.jit, static_argnames="s")
def _sample(s: Sampling, logits, key, step):
    return sampling_lib.sample(logits[None], jax.random.fold_in(key, step), s)[0]


class ChatSession:
    """One conversation (batch 1) of `cfg` with `params`, its latent cache kept across turns.

      prefill(wanted ids) -> TurnStats      the cache brought to `wanted` (common prefix reused)
      generate(...)       -> (new ids, TurnStats)   sampled after the cache's last token, each
                                             fed back as it comes; the stop token is not fed
      reset()                                forget everything (the cache is left to be
                                             overwritten)
    """

    def __init__(self, cfg: ModelConfig, params, *, max_len: int | None = None):
        self.cfg, self.params = cfg, params
        self.max_len = int(max_len or cfg.max_seq_len)
        if not 2 <= self.max_len <= cfg.max_seq_len:
            raise ValueError(f"max_len={max_len!r} must be in [2, max_seq_len="
                             f"{cfg.max_seq_len}] (the cache slots of one conversation).")
        self.cache = init_latent_cache(cfg, 1, self.max_len)
        self.ids: list[int] = []
        self._logits: jax.Array | None = None  # float32 [V] on the device: after ids[-1]

    def reset(self) -> None:
        self.ids, self._logits = [], None

    @property
    def logits(self) -> np.ndarray | None:
        """float32 [V]: the next-token logits after the cache's last token (None when empty)."""
        return None if self._logits is None else np.asarray(self._logits)

    def prefill(self, wanted: Sequence[int]) -> TurnStats:
        """Brings the cache to hold exactly `wanted` (a non-empty list of ids, at most max_len):
        the longest common prefix with the cache is kept, the rest fed. ContextFullError when
        `wanted` does not fit; ValueError for ids outside the vocabulary."""
        wanted = [int(t) for t in wanted]
        if not wanted:
            raise ValueError("prefill needs at least one token.")
        if len(wanted) > self.max_len:
            raise ContextFullError(f"the conversation is {len(wanted)} tokens, more than the "
                                   f"context of {self.max_len}.")
        bad = [t for t in wanted if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, "
                             f"{self.cfg.vocab_size}).")
        common = 0
        for a, b in zip(self.ids, wanted):
            if a != b:
                break
            common += 1
        if common == len(wanted) and common == len(self.ids) and self._logits is not None:
            return TurnStats(reused=common)
        # The logits after wanted[-1] are needed: at least its token is fed again.
        common = min(common, len(wanted) - 1)
        start = time.perf_counter()
        self.ids = self.ids[:common]
        self._extend(wanted[common:])
        return TurnStats(reused=common, fed=len(wanted) - common,
                         prefill_seconds=time.perf_counter() - start)

    def _extend(self, new: list[int]) -> None:
        """Feeds `new` after self.ids (which must leave room) in chunks padded to powers of two
        (a decode step is one token wide): few shapes, so few compiles."""
        while new:
            start = len(self.ids)
            width = _width(len(new), self.max_len - start)
            n = min(len(new), width)
            tokens = np.zeros((1, width), np.int32)
            tokens[0, :n] = new[:n]
            self._logits, self.cache = _feed(self.cfg, self.params, jnp.asarray(tokens),
                                             jnp.int32(start), jnp.int32(n - 1), self.cache)
            self.ids += new[:n]
            new = new[n:]

    def generate(self, *, max_new_tokens: int, sampling: Sampling = Sampling(), seed: int = 0,
                 stop_tokens: Sequence[int] = (),
                 on_token: Callable[[int], None] | None = None) -> tuple[list[int], TurnStats]:
        """Samples (`sampling`, its vocab_limit included) up to `max_new_tokens` after the cache's
        last token, feeding each back; stops after a stop token (returned, not fed) or when the
        context is full. `on_token(id)` is called for each token as it comes (for streaming).
        Returns (the new ids, stats)."""
        if self._logits is None:
            raise ValueError("generate needs a prefilled conversation: call prefill first.")
        stats, out = TurnStats(), []
        key, stops = jax.random.key(seed), {int(t) for t in stop_tokens}
        start = time.perf_counter()
        while True:
            if len(out) >= max_new_tokens:
                stats.stopped = "max_new_tokens"
                break
            token = int(_sample(sampling, self._logits, key, len(self.ids)))
            out.append(token)
            if on_token is not None:
                on_token(token)
            if token in stops:
                stats.stopped = "stop"
                break
            if len(self.ids) >= self.max_len:
                stats.stopped = "context"
                break
            self._extend([token])
        stats.new_tokens = len(out)
        stats.decode_seconds = time.perf_counter() - start
        return out, stats


__all__ = ["ChatSession", "ContextFullError", "TurnStats"]
