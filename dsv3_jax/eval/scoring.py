"""Scoring and generating for evaluation: many requests of mixed lengths, batched by length.

Legend (the package's, `dsv3_jax.model`): B batch, T positions, D model dim, V vocabulary.

What an evaluation harness asks of a model, over token ids (`lm_eval_model.py` adds the text):

- `Scorer.loglikelihood(pairs)`: for each (context, continuation), log p(continuation | context)
  summed over the continuation's tokens, and whether greedy decoding produces it (each of its
  tokens is the argmax at its position). The model reads (context + continuation)[:-1]; a request
  longer than the window (`max_length` + 1 tokens) loses the front of its context, as lm-eval's
  own models cut it (said once per Scorer, with the count).
- `rolling_windows(ids, prefix, max_length)`: the (context, continuation) pairs that score every
  token of a long text exactly once, each with the most context the window holds (lm-eval's
  loglikelihood_rolling): the first window reads prefix + ids[:L-1] and scores ids[:L]; each later
  one scores the next L tokens (fewer at the end) after the L tokens before them, less one.
  The text's log-likelihood is the sum of the windows' `loglikelihood`s.
- `Scorer.generate(prompts, ...)`: continuations over the latent cache (`infer.generate`), a row
  ending at a stop token, at `max_new_tokens`, or as soon as its text holds a stop string; a
  prompt too long for its continuation loses its front the same way.

Batching: requests are sorted longest first, cut into batches of `batch_size` rows, each padded
to a power-of-two length (at most the window) and the last batch filled with copies of its last
row: one jitted call per batch, one compile per length bucket. Padding is segment 0 and every row
sits at positions 0.., so a row's result does not depend on the rows beside it (tests check it).
The head runs over `HEAD_CHUNK` positions at a time: [B, HEAD_CHUNK, V] float32 logits, never
[B, T, V] (at V = 129,280 and 8 x 4,096 tokens that would be 17 GB).

On a mesh, the batch is split over its data-like axes (parallel/mesh.py) and `batch_size` rounded
up to a multiple of their size.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import ModelConfig
from dsv3_jax.infer.generate import bucket_length, generate_tokens
from dsv3_jax.infer.sampling import Sampling
from dsv3_jax.model.transformer import DeepSeekV3

log = logging.getLogger("dsv3_jax.eval")

HEAD_CHUNK = 256  # positions per head application in token_scores
Pair = tuple[Sequence[int], Sequence[int]]  # (context ids, continuation ids)


@functools.partial(jax.jit, static_argnames="cfg")
def token_scores(cfg: ModelConfig, params, tokens, segment_ids, targets):
    """(log p(targets[b, t] | tokens[b, :t + 1]) float32 [B, T], targets[b, t] is the argmax there
    bool [B, T]) for tokens, segment_ids, targets int [B, T]; the head in HEAD_CHUNK slices."""
    model = DeepSeekV3(cfg)
    out = model.apply({"params": params}, tokens, None, segment_ids, with_mtp=False,
                      with_logits=False, method=DeepSeekV3.forward)
    b, t, d = out.head_input.shape
    chunk = min(HEAD_CHUNK, t)
    n = -(-t // chunk)
    pad = n * chunk - t
    h = jnp.pad(out.head_input, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, d).swapaxes(0, 1)
    tg = jnp.pad(targets, ((0, 0), (0, pad))).reshape(b, n, chunk).swapaxes(0, 1)

    def body(_, x):
        hc, tc = x  # [B, C, D], [B, C]
        logits = model.apply({"params": params}, hc, method=lambda m, v: m.head(v))
        logits = logits.astype(jnp.float32)  # [B, C, V]
        target = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]
        logp = target - jax.nn.logsumexp(logits, axis=-1)
        return None, (logp, jnp.argmax(logits, axis=-1) == tc)

    _, (logp, greedy) = jax.lax.scan(body, None, (h, tg))
    unchunk = lambda x: x.swapaxes(0, 1).reshape(b, n * chunk)[:, :t]
    return unchunk(logp), unchunk(greedy)


def rolling_windows(ids: Sequence[int], prefix: int, max_length: int) -> list[tuple[list[int],
                                                                                    list[int]]]:
    """The (context, continuation) pairs that score each of `ids` once (the module docstring):
    windows of at most max_length tokens read, the first conditioned on `prefix` alone."""
    if max_length < 1:
        raise ValueError(f"max_length={max_length} must be at least 1 (tokens per window).")
    ids = [int(i) for i in ids]
    pairs = []
    for start in range(0, len(ids), max_length):
        end = min(start + max_length, len(ids))
        if start == 0:
            pairs.append(([prefix], ids[:end]))
        else:  # the max_length tokens before `end` (less the last) are read: the most context
            read_from = max(end - max_length - 1, 0)
            pairs.append((ids[read_from:start], ids[start:end]))
    return pairs


def _batches(order: list[int], batch_size: int) -> Iterator[tuple[list[int], int]]:
    """`order` in chunks of batch_size, the last padded with copies of its last index: (chunk,
    how many are real)."""
    for i in range(0, len(order), batch_size):
        chunk = order[i:i + batch_size]
        yield chunk + [chunk[-1]] * (batch_size - len(chunk)), len(chunk)


class Scorer:
    """Batched scoring and generation of `cfg` with `params` (see the module docstring).

    max_length: the window in tokens (default and at most cfg.max_seq_len); batch_size: rows per
    model call; mesh: a jax Mesh the params live on (None: the default device)."""

    def __init__(self, cfg: ModelConfig, params, *, batch_size: int = 8,
                 max_length: int | None = None, mesh=None):
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be a positive integer (rows per "
                             "model call).")
        max_length = cfg.max_seq_len if max_length is None else max_length
        if not isinstance(max_length, int) or not 2 <= max_length <= cfg.max_seq_len:
            raise ValueError(f"max_length={max_length!r} must be an integer in [2, "
                             f"{cfg.max_seq_len}] (the model's max_seq_len).")
        self.cfg, self.params, self.mesh = cfg, params, mesh
        self.max_length = max_length
        self.batch_size = batch_size
        if mesh is not None:
            from dsv3_jax.parallel.mesh import batch_ways

            ways = batch_ways(mesh.shape)
            self.batch_size = -(-batch_size // ways) * ways
        self._noticed: set[str] = set()

    # ----------------------------------------------------------------------------- helpers

    @contextlib.contextmanager
    def _on_mesh(self):
        if self.mesh is None:
            yield
            return
        import flax.linen as nn

        from dsv3_jax.parallel.mesh import LOGICAL_AXIS_RULES

        with jax.set_mesh(self.mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
            yield

    def _put(self, array: np.ndarray):
        if self.mesh is None:
            return jnp.asarray(array)
        from dsv3_jax.parallel.mesh import batch_sharding

        return jax.device_put(array, batch_sharding(self.mesh))

    def notice(self, kind: str, message: str) -> None:
        """Logs `message` as a warning the first time `kind` comes up in this Scorer."""
        if kind not in self._noticed:
            self._noticed.add(kind)
            log.warning(message)

    # ----------------------------------------------------------------------------- scoring

    def loglikelihood(self, pairs: Sequence[Pair],
                      progress: Callable[[list[int]], None] | None = None
                      ) -> list[tuple[float, bool]]:
        """[(sum of log p of the continuation's tokens, greedy)] per (context, continuation) pair
        (the module docstring); progress(indices) after each batch, with the requests it
        scored."""
        rows, spans = [], []
        for i, (context, continuation) in enumerate(pairs):
            context, continuation = [int(t) for t in context], [int(t) for t in continuation]
            if not continuation:
                raise ValueError(f"request {i} has an empty continuation: nothing to score.")
            if not context:
                raise ValueError(f"request {i} has an empty context; condition on a prefix token "
                                 "(BOS or EOS), as lm-eval does for an empty context.")
            if len(continuation) > self.max_length:
                raise ValueError(f"request {i}'s continuation has {len(continuation)} tokens, "
                                 f"more than the model's window (max_length={self.max_length}); "
                                 "score it in windows (loglikelihood_rolling) or shorten it.")
            whole = context + continuation
            rows.append(whole[-(self.max_length + 1):])
            spans.append(len(continuation))
        cut = sum(len(c) + len(x) > self.max_length + 1 for c, x in pairs)
        if cut:
            self.notice("truncated", f"{cut} of {len(pairs)} requests are longer than the "
                        f"model's window (max_length={self.max_length} tokens, + 1); their "
                        "contexts were cut from the left, as lm-eval's models cut them.")
        results: list[tuple[float, bool] | None] = [None] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: (-len(rows[i]), i))
        with self._on_mesh():
            for chunk, real in _batches(order, self.batch_size):
                width = bucket_length(max(len(rows[i]) - 1 for i in chunk), self.max_length)
                tokens = np.zeros((len(chunk), width), np.int32)
                targets = np.zeros((len(chunk), width), np.int32)
                segments = np.zeros((len(chunk), width), np.int32)
                for r, i in enumerate(chunk):
                    n = len(rows[i]) - 1
                    tokens[r, :n], targets[r, :n] = rows[i][:-1], rows[i][1:]
                    segments[r, :n] = 1
                logp, greedy = jax.device_get(token_scores(
                    self.cfg, self.params, self._put(tokens), self._put(segments),
                    self._put(targets)))
                for r, i in enumerate(chunk[:real]):
                    n, k = len(rows[i]) - 1, spans[i]
                    results[i] = (float(np.sum(logp[r, n - k:n], dtype=np.float64)),
                                  bool(np.all(greedy[r, n - k:n])))
                if progress is not None:
                    progress(chunk[:real])
        return results

    def rolling_loglikelihood(self, texts: Sequence[Sequence[int]], prefix: int,
                              progress: Callable[[int], None] | None = None) -> list[float]:
        """The log-likelihood of all of each text's ids, scored in rolling_windows conditioned on
        `prefix` (an empty text: 0.0); progress(n) after each batch, n the tokens it scored."""
        windows, owner = [], []
        for i, ids in enumerate(texts):
            for pair in rolling_windows(ids, prefix, self.max_length):
                windows.append(pair)
                owner.append(i)
        report = None if progress is None else (
            lambda done: progress(sum(len(windows[j][1]) for j in done)))
        totals = np.zeros(len(texts), np.float64)
        for i, (logp, _) in zip(owner, self.loglikelihood(windows, report)):
            totals[i] += logp
        return totals.tolist()

    # ----------------------------------------------------------------------------- generating

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                 decode: Callable[[list[int]], str], stop_strings: Sequence[str] = (),
                 stop_tokens: Sequence[int] = (), sampling: Sampling = Sampling(), seed: int = 0,
                 progress: Callable[[int], None] | None = None) -> list[str]:
        """The text generated after each prompt, cut before the first stop string it holds.
        decode(ids) -> text turns a row's new tokens (a stop token included) into text."""
        room = self.max_length - max_new_tokens
        if room < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the "
                             f"model's window (max_length={self.max_length}); ask for at most "
                             f"{self.max_length - 1} new tokens.")
        rows = []
        for i, ids in enumerate(prompts):
            ids = [int(t) for t in ids]
            if not ids:
                raise ValueError(f"prompt {i} is empty; generation needs at least one token.")
            rows.append(ids[-room:])
        cut = sum(len(p) > room for p in prompts)
        if cut:
            self.notice("truncated_generation", f"{cut} of {len(prompts)} prompts do not leave "
                        f"max_gen_toks={max_new_tokens} tokens of room in the model's window "
                        f"(max_length={self.max_length}); they were cut from the left to {room} "
                        "tokens, as lm-eval's models cut them.")
        stops = [s for s in stop_strings if s]
        texts: list[str | None] = [None] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: (-len(rows[i]), i))
        with self._on_mesh():
            for n_batch, (chunk, real) in enumerate(_batches(order, self.batch_size)):
                new: list[list[int]] = [[] for _ in chunk]

                def seen(row: int, tokens: list[int]) -> bool:
                    if row >= real:  # a filler row: stop it at once
                        return True
                    new[row].extend(tokens)
                    return bool(stops) and any(s in decode(new[row]) for s in stops)

                generate_tokens(self.cfg, self.params, [rows[i] for i in chunk],
                                max_new_tokens=max_new_tokens, sampling=sampling,
                                seed=seed + n_batch, stop_tokens=list(stop_tokens),
                                on_tokens=seen)
                for r, i in enumerate(chunk[:real]):
                    text = decode(new[r])
                    for s in stops:
                        text = text.split(s, 1)[0]
                    texts[i] = text
                if progress is not None:
                    progress(real)
        return texts
