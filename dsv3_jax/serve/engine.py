"""Continuous batching: one scheduler thread owns the device and the latent cache of every stream.

Legend (dsv3_jax/NOTATION.md): B batch slots (max_batch), S cache slots per stream
(max_seq_len), T positions of one call, L layers, D model dim, C + R a latent-cache row,
V vocabulary; the paged cache: Z pages in the pool, Y positions per page, W pages in a table row.

The latent cache is paged: one pool [L, Z, Y, C + R] of Z pages of Y = page_size positions,
shared by all streams. A stream is given the pages for its prompt + max_new_tokens when it is
admitted (so it can never run out mid-answer) and gives them back when it ends; its page table
maps position s to slot s % Y of page table[s // Y]. Page 0 is never given out: unused table
entries point at it, and what is written there is never read. So the memory is the pool's, shared
by whatever runs, not max_batch x max_seq_len. Attention reads through the table by gathering
first: each model call gathers the running rows' pages into a contiguous [L, B, W * Y, C + R] view
(W = the longest live allocation, rounded up to a power of two pages), runs the ordinary cached
decode on it (`ops.attention`'s dispatch, the Hopper decode kernel included), and writes the
positions it wrote back into their pages: one copy of the live rows' pages per call, on top of
the attention itself (a kernel that reads through the table would save it). Within a row, slot s
holds the stream's token at position s (as in infer/generate.py). The scheduler loops, between
device calls:

  admit    queued requests take free batch slots (first come, first served); a request that
           waited longer than `queue_timeout` seconds ends with an error instead
  prefill  one chunk (at most `prefill_chunk` tokens, padded to a power of two) of one admitted
           prompt goes through the model into its row (`_prefill_row`); after the prompt's last
           chunk its first token is sampled. So a long prompt shares the device with the
           running streams chunk by chunk instead of stalling them.
  decode   one step for every batch slot at once (`_decode_rows`: [B, 1] tokens at each row's
           position, each row sampled with its own temperature / top-k / top-p and seed); rows
           that are not decoding feed a dummy token at the row's next free position, which the
           row's own next write overwrites before anything reads it (a query at position t
           sees slots 0..t, and every call writes its tokens before attending).

A stream ends at one of its stop tokens (kept in its output), after max_new_tokens, when its row
is full (S positions), or when cancelled (`Request.cancel()`: a client that went away); its batch
slot is free for the next request at once. Greedy rows take the argmax of the same logits offline
decoding takes, and no row's numbers depend on the others', so batching never changes a greedy
output (tests/test_serve.py checks it token for token against `generate_tokens`).

Requests hear back through `Request.on_event(kind, value)`, called on the scheduler thread:
("tokens", [ids]) after each step that produced some, then ("done", finish_reason) with
finish_reason "stop", "length" or "cancelled", or ("error", Refusal) for a request that could
not be served. `shutdown()` stops admitting new requests (`submit` raises ShuttingDown), ends the
queued ones with an error, lets the running streams finish, then stops the thread.
With `speculative` (a model with an MTP module), every decode step is infer/generate.py's
speculative step for the whole batch: each row feeds [last, draft] at [cur, cur + 1], the draft is
accepted or corrected by the acceptance rule (greedy rows: kept when it is the argmax, so greedy
answers are exactly the plain ones), an accepted draft's position gives a bonus token, and the
first MTP module, over its own paged pool (the same page tables), drafts the next one: 1 or 2
tokens per row and step. The MTP module's pass over a prompt runs chunk by chunk behind the
main model's, one position behind (the token after a position must be known), from the hidden
states each prefill chunk keeps ([B, S, D]); the row's first draft comes with its first token.
The acceptance rate is a metric.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import ModelConfig
from dsv3_jax.infer.generate import _decode
from dsv3_jax.model.transformer import DeepSeekV3, init_latent_cache, init_mtp_cache
from dsv3_jax.serve.metrics import Metrics


class Refusal(Exception):
    """A request the engine will not run; `status` is the HTTP status a server answers with."""

    status = 400
    code = "invalid_request"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class QueueFull(Refusal):
    status, code = 429, "queue_full"


class ShuttingDown(Refusal):
    status, code = 503, "shutting_down"


class QueueTimeout(Refusal):
    status, code = 503, "queue_timeout"


_ids = itertools.count()


@dataclasses.dataclass
class Request:
    """One stream: prompt ids, how to sample, and where events go (see the module docstring)."""

    prompt: list[int]
    max_new_tokens: int
    on_event: Callable[[str, Any], None]
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_tokens: tuple[int, ...] = ()
    id: int = dataclasses.field(default_factory=lambda: next(_ids))
    submitted: float = dataclasses.field(default_factory=time.monotonic)
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Ends the stream at the scheduler's next visit (queued: it never starts)."""
        self.cancelled.set()


@dataclasses.dataclass
class _Row:
    """A batch slot's stream: its request, position and progress."""

    request: Request
    pending: list[int]  # prompt tokens not yet fed
    pages: list[int]  # its pages in the pool, in position order
    cur: int = 0  # the next position to write (tokens at 0..cur-1 are in the cache)
    last: int = 0  # the newest sampled token, not yet fed (decoding rows)
    generated: int = 0
    mtp_done: int = 0  # speculative: prompt positions the MTP module has been through
    draft: int = 0  # speculative: the MTP draft for position cur + 1
    first_token_at: float | None = None
    last_token_at: float | None = None

    @property
    def decoding(self) -> bool:
        return not self.pending


def _width(n: int, room: int, cap: int) -> int:
    """The power of two a prefill chunk of n tokens is padded to: at least n (up to cap), at most
    the largest power of two <= room (the cache slots left in the row)."""
    limit = 1 << (min(room, cap).bit_length() - 1)
    return min(1 << (n - 1).bit_length(), limit)


def _limit(logits, vocab_limit: int):
    """float32 logits [..., V] with ids at or past vocab_limit (when > 0) at -inf."""
    v = logits.shape[-1]
    logits = logits.astype(jnp.float32)
    if vocab_limit and vocab_limit < v:
        logits = jnp.where(jnp.arange(v) < vocab_limit, logits, -jnp.inf)
    return logits


def _log_dist(logits, temperature, top_k, top_p):
    """Each row's sampling distribution as log-probabilities [B, V]: temperature, then top-k,
    then top-p, as infer/sampling.py's log_probs (meaningful where temperature > 0)."""
    v = logits.shape[-1]

    def one(row, t, k, p):
        scaled = row / jnp.maximum(t, 1e-6)
        ordered = -jnp.sort(-scaled)
        kth = jnp.where(k > 0, ordered[jnp.clip(k - 1, 0, v - 1)], -jnp.inf)
        ordered = jnp.where(ordered >= kth, ordered, -jnp.inf)
        probs = jax.nn.softmax(ordered)
        before = jnp.cumsum(probs) - probs  # mass of the strictly likelier tokens
        kept = jnp.sum(before < p)  # always the most likely token
        cutoff = jnp.maximum(ordered[jnp.clip(kept - 1, 0, v - 1)], kth)
        return jax.nn.log_softmax(jnp.where(scaled >= cutoff, scaled, -jnp.inf))

    return jax.vmap(one)(logits, temperature, top_k, top_p)


def _keys(seed, step, stream: int):
    """A key per row: (seed, step) and one of the draws a step makes (`stream`)."""
    fold = lambda s, i: jax.random.fold_in(jax.random.fold_in(jax.random.key(s), i), stream)
    return jax.vmap(fold)(seed, step)


def _pick(logits, temperature, top_k, top_p, seed, step, vocab_limit: int, stream: int = 0):
    """One token per row of logits [B, V]: the argmax where temperature is 0, else a draw from
    `_log_dist` keyed by the row's (seed, step, stream). Ids at or past vocab_limit (when > 0)
    are never picked."""
    logits = _limit(logits, vocab_limit)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sample():
        logq = _log_dist(logits, temperature, top_k, top_p)
        return jax.vmap(jax.random.categorical)(_keys(seed, step, stream), logq).astype(jnp.int32)

    drawn = jax.lax.cond(jnp.any(temperature > 0), sample, lambda: greedy)
    return jnp.where(temperature > 0, drawn, greedy)


def _gather(pool, tables):
    """pool [L, Z, Y, C + R], tables int32 [B, W] -> the rows' caches [L, B, W * Y, C + R]."""
    view = pool[:, tables]  # [L, B, W, Y, C + R]
    return view.reshape(view.shape[:2] + (-1, view.shape[-1]))


def _scatter(pool, tables, view, positions):
    """Writes view's rows at positions int32 [B, T] (absolute) back into their pages."""
    b = jnp.broadcast_to(jnp.arange(positions.shape[0])[:, None], positions.shape)
    page_size = pool.shape[2]
    rows = view[:, b, positions]  # [L, B, T, C + R]
    pages = tables[b, positions // page_size]
    return pool.at[:, pages, positions % page_size].set(rows)


@functools.partial(jax.jit, static_argnames=("cfg", "vocab_limit"), donate_argnames="pool")
def _decode_rows(cfg: ModelConfig, vocab_limit: int, params, pool, tables, tokens, positions,
                 temperature, top_k, top_p, seed, step):
    """tokens, positions int32 [B], tables int32 [B, W] -> (the next token of every row int32
    [B], the pool)."""
    view = _gather(pool, tables)
    positions = positions[:, None]
    logits, _, view = _decode(cfg, params, tokens[:, None], positions, view)
    pool = _scatter(pool, tables, view, positions)
    picked = _pick(logits[:, 0], temperature, top_k, top_p, seed, step, vocab_limit)
    return picked, pool


@functools.partial(jax.jit, static_argnames=("cfg", "vocab_limit"),
                   donate_argnames=("pool", "hidden"))
def _prefill_row(cfg: ModelConfig, vocab_limit: int, params, pool, table, tokens, start, last,
                 temperature, top_k, top_p, seed, hidden=None, row=None):
    """tokens int32 [1, T] at positions start.. of the row whose page table is `table` int32
    [1, W] -> (the token after index `last` of the chunk, sampled as `_pick` step 0 would, int32
    []; the pool; hidden). Padding past the row's pages lands in page 0. With hidden [B, S, D]
    (speculative), the chunk's hidden states are kept there in batch row `row`, for the MTP
    module's pass over the prompt."""
    view = _gather(pool, table)
    positions = start + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]  # inside the view
    logits, h, view = _decode(cfg, params, tokens, positions, view)
    pool = _scatter(pool, table, view, positions)
    if hidden is not None:
        hidden = jax.lax.dynamic_update_slice(hidden, h.astype(hidden.dtype), (row, start, 0))
    picked = _pick(logits[:, last], temperature[None], top_k[None], top_p[None], seed[None],
                   jnp.zeros(1, jnp.int32), vocab_limit)
    return picked[0], pool, hidden


# ---- MTP speculation ----------------------------------------------------------------------------

def _accept(target_logits, draft, logq, temperature, top_k, top_p, seed, step, vocab_limit: int):
    """The acceptance rule for one draft token per row (infer/sampling.py's accept_draft, each
    row with its own sampling): greedy rows accept a draft equal to the argmax and else take
    the argmax; sampled rows accept with probability min(1, p/q) and else draw from
    max(p - q, 0). -> (accepted bool [B], the token at the draft's position int32 [B])."""
    logits = _limit(target_logits, vocab_limit)
    target = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sampled():
        logp = _log_dist(logits, temperature, top_k, top_p)
        pick = lambda t: jnp.take_along_axis(t, draft[:, None], axis=-1)[:, 0]
        u = jax.vmap(jax.random.uniform)(_keys(seed, step, 1))
        accepted = u < jnp.exp(pick(logp) - pick(logq))
        residual = jnp.maximum(jnp.exp(logp) - jnp.exp(logq), 0.0)
        has_mass = residual.sum(-1, keepdims=True) > 0  # p == q: rejection has probability 0
        residual = jnp.where(has_mass, residual, jnp.exp(logp))
        correction = jax.vmap(jax.random.categorical)(_keys(seed, step, 2), jnp.log(residual))
        return accepted, jnp.where(accepted, draft, correction.astype(jnp.int32))

    greedy = (draft == target, target)
    accepted, token = jax.lax.cond(jnp.any(temperature > 0), sampled, lambda: greedy)
    rows = temperature > 0
    return jnp.where(rows, accepted, greedy[0]), jnp.where(rows, token, greedy[1])


def _draft_of(logits, temperature, top_k, top_p, seed, step, vocab_limit: int):
    """The MTP draft per row (drawn as `_pick` stream 4) and, for sampled rows, the
    log-distribution it was drawn from [B, V] (zeros when every row is greedy)."""
    token = _pick(logits, temperature, top_k, top_p, seed, step, vocab_limit, stream=4)
    logq = jax.lax.cond(jnp.any(temperature > 0),
                        lambda: _log_dist(_limit(logits, vocab_limit), temperature, top_k, top_p),
                        lambda: jnp.zeros(logits.shape, jnp.float32))
    return token, logq


def _mtp(cfg, params, hidden, next_tokens, positions, cache):
    return DeepSeekV3(cfg).apply({"params": params}, hidden, next_tokens, positions, cache,
                                 method=DeepSeekV3.mtp_decode)


@functools.partial(jax.jit, static_argnames=("cfg", "vocab_limit"), donate_argnames="mtp_pool")
def _mtp_prefill_row(cfg: ModelConfig, vocab_limit: int, params, mtp_pool, hidden, row, table,
                     next_tokens, start, last, temperature, top_k, top_p, seed):
    """The MTP module over T prompt positions start.. of one row (hidden states from hidden
    [B, S, D], next_tokens int32 [1, T] the token after each) -> (the draft after index `last`,
    its log-distribution [V], the MTP pool)."""
    width = next_tokens.shape[1]
    h = jax.lax.dynamic_slice(hidden, (row, start, 0), (1, width, hidden.shape[2]))
    positions = start + jnp.arange(width, dtype=jnp.int32)[None]
    view = _gather(mtp_pool, table)[0]
    logits, view = _mtp(cfg, params, h, next_tokens, positions, view)
    mtp_pool = _scatter(mtp_pool, table, view[None], positions)
    draft, logq = _draft_of(logits[:, last], temperature[None], top_k[None], top_p[None],
                            seed[None], jnp.zeros(1, jnp.int32), vocab_limit)
    return draft[0], logq[0], mtp_pool


@functools.partial(jax.jit, static_argnames=("cfg", "vocab_limit"),
                   donate_argnames=("pool", "mtp_pool"))
def _speculative_rows(cfg: ModelConfig, vocab_limit: int, params, pool, mtp_pool, tables, last,
                      draft, logq, positions, temperature, top_k, top_p, seed, step):
    """One speculative step for every row (infer/generate.py's, per row): [last, draft] fed at
    [cur, cur + 1]; the draft accepted or corrected; when accepted the logits at cur + 1 give a
    bonus token; the MTP module at [cur, cur + 1] then drafts the token after the new last.
    -> (first, bonus, accepted, the new draft, its logq, pool, mtp_pool)."""
    pos2 = jnp.stack([positions, positions + 1], axis=1)
    view = _gather(pool, tables)
    logits, hidden, view = _decode(cfg, params, jnp.stack([last, draft], axis=1), pos2, view)
    pool = _scatter(pool, tables, view, pos2)
    sampling = (temperature, top_k, top_p, seed, step)
    accepted, first = _accept(logits[:, 0], draft, logq, *sampling, vocab_limit)
    bonus = _pick(logits[:, 1], *sampling, vocab_limit, stream=3)
    mview = _gather(mtp_pool, tables)[0]
    mlogits, mview = _mtp(cfg, params, hidden, jnp.stack([first, bonus], axis=1), pos2, mview)
    mtp_pool = _scatter(mtp_pool, tables, mview[None], pos2)
    chosen = mlogits[jnp.arange(mlogits.shape[0]), accepted.astype(jnp.int32)]
    new_draft, new_logq = _draft_of(chosen, *sampling, vocab_limit)
    return first, bonus, accepted, new_draft, new_logq, pool, mtp_pool


class Engine:
    """The scheduler (module docstring). `submit` is thread-safe; everything else runs on the
    engine's own thread once `start()`ed."""

    def __init__(self, cfg: ModelConfig, params, *, max_batch: int = 8,
                 max_seq_len: int | None = None, prefill_chunk: int = 256, queue_size: int = 64,
                 queue_timeout: float = 60.0, vocab_limit: int = 0, page_size: int = 16,
                 cache_tokens: int = 0, speculative: bool = False,
                 metrics: Metrics | None = None):
        """cache_tokens: the pool's size in positions, for all streams together (0: enough for
        max_batch streams of max_seq_len positions), rounded up to whole pages."""
        self.cfg, self.params = cfg, params
        self.max_seq_len = int(max_seq_len or cfg.max_seq_len)
        checks = (("max_batch", max_batch, 1), ("prefill_chunk", prefill_chunk, 1),
                  ("queue_size", queue_size, 0), ("max_seq_len", self.max_seq_len, 2),
                  ("page_size", page_size, 1), ("cache_tokens", cache_tokens, 0))
        for name, value, low in checks:
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name}={value!r} must be an integer >= {low}.")
        if self.max_seq_len > cfg.max_seq_len:
            raise ValueError(f"max_seq_len={self.max_seq_len} exceeds the model's max_seq_len="
                             f"{cfg.max_seq_len}; serve at most that many positions.")
        if not (isinstance(queue_timeout, (int, float)) and queue_timeout > 0):
            raise ValueError(f"queue_timeout={queue_timeout!r} must be a positive number of "
                             "seconds.")
        self.max_batch, self.prefill_chunk = max_batch, prefill_chunk
        self.queue_size, self.queue_timeout = queue_size, float(queue_timeout)
        self.vocab_limit = int(vocab_limit)
        self.metrics = metrics or Metrics()
        self.page_size = page_size
        self.pages_per_row = -(-self.max_seq_len // page_size)
        pages = -(-cache_tokens // page_size) if cache_tokens else max_batch * self.pages_per_row
        # [L, Z, Y, C + R]; page 0 takes the writes nobody reads (module docstring).
        self.pool = init_latent_cache(cfg, pages + 1, page_size)
        self.free_pages = list(range(1, pages + 1))
        if not isinstance(speculative, bool):
            raise ValueError(f"speculative={speculative!r} must be True or False.")
        if speculative and not cfg.mtp_depth:
            raise ValueError("speculative=True needs an MTP module, but this model has "
                             "mtp_depth=0; serve without speculation.")
        self.speculative = speculative
        self.hidden = None  # speculative: [B, S, D], the prompt's hidden states for the MTP pass
        if speculative:  # the first MTP module's pool [1, Z, Y, C + R], same page tables
            self.mtp_pool = init_mtp_cache(cfg, pages + 1, page_size)[None]
            self.hidden = jnp.zeros((max_batch, self.max_seq_len, cfg.dim), jnp.dtype(cfg.dtype))
            self.logq = jnp.zeros((max_batch, cfg.vocab_size), jnp.float32)
        self.tables = np.zeros((max_batch, self.pages_per_row), np.int32)
        self.rows: list[_Row | None] = [None] * max_batch
        self._queue: collections.deque[Request] = collections.deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._next_prefill = 0
        self._thread = threading.Thread(target=self._run, name="dsv3-serve-engine", daemon=True)
        self.error: BaseException | None = None  # what stopped the scheduler, if anything did

    # ---- the outside: submit, shutdown, state ------------------------------------------------
    def start(self) -> Engine:
        self._thread.start()
        return self

    def check(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """Refusal when a prompt of this length plus max_new_tokens cannot fit a row."""
        if prompt_tokens < 1:
            raise Refusal("the prompt is empty; give at least one token.")
        if prompt_tokens + max_new_tokens > self.max_seq_len:
            raise Refusal(
                f"This model's maximum context length is {self.max_seq_len} tokens. However, "
                f"you requested {prompt_tokens + max_new_tokens} tokens ({prompt_tokens} in the "
                f"prompt, {max_new_tokens} in the completion). Please reduce the prompt or "
                "max_tokens.")
        need = self._pages_for(prompt_tokens, max_new_tokens)
        if need > self.pool.shape[1] - 1:
            raise Refusal(f"the request needs {need * self.page_size} cache positions but the "
                          f"server's whole cache holds {(self.pool.shape[1] - 1) * self.page_size} "
                          "(--cache_tokens); reduce the prompt or max_tokens.")

    def _pages_for(self, prompt_tokens: int, max_new_tokens: int) -> int:
        return -(-(prompt_tokens + max_new_tokens) // self.page_size)

    def submit(self, request: Request) -> None:
        """Queues `request`; raises ShuttingDown, QueueFull or Refusal (it does not fit)."""
        self.check(len(request.prompt), request.max_new_tokens)
        bad = [t for t in request.prompt if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise Refusal(f"token id {bad[0]} is outside the vocabulary [0, "
                          f"{self.cfg.vocab_size}).")
        with self._wake:
            if self._stopping or self.error is not None:
                raise ShuttingDown("the server is shutting down; send the request elsewhere or "
                                   "retry later.")
            if len(self._queue) >= self.queue_size and self._free_row() is None:
                raise QueueFull(f"{len(self._queue)} requests are already waiting (--queue_size="
                                f"{self.queue_size}); retry later.")
            self._queue.append(request)
            self.metrics.set("queue_depth", len(self._queue))
            self._wake.notify()

    def shutdown(self, timeout: float | None = None, wait: bool = True) -> None:
        """Graceful: no new requests, queued ones refused, running streams finished; with
        `wait`, returns when the scheduler has stopped (or after `timeout` seconds)."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if wait and self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def running(self) -> int:
        return sum(row is not None for row in self.rows)

    @property
    def waiting(self) -> int:
        return len(self._queue)

    # ---- the scheduler thread ---------------------------------------------------------------
    def _free_row(self) -> int | None:
        return next((i for i, row in enumerate(self.rows) if row is None), None)

    def _run(self) -> None:
        try:
            while True:
                with self._wake:
                    while not self._queue and not self.running and not self._stopping:
                        self._wake.wait()
                    if self._stopping:
                        refused = list(self._queue)
                        self._queue.clear()
                    else:
                        refused = []
                    if self._stopping and not self.running:
                        break
                for request in refused:
                    self._fail(request, ShuttingDown("the server shut down before this request "
                                                     "started; retry elsewhere."))
                self._admit()
                self._drop_cancelled()
                self._prefill_chunk()
                self._decode_step()
                self.metrics.set("queue_depth", len(self._queue))
                self.metrics.set("running", self.running)
                self.metrics.set("batch_occupancy", self.running / self.max_batch)
                self.metrics.set("cache_occupancy",
                                 1 - len(self.free_pages) / (self.pool.shape[1] - 1))
        except BaseException as e:  # the device failed: every stream hears it
            self.error = e
            for i, row in enumerate(self.rows):
                if row is not None:
                    self._fail(row.request, Refusal(f"the engine stopped: {e}"), status=500)
                    self.rows[i] = None
            with self._wake:
                pending, self._queue = list(self._queue), collections.deque()
            for request in pending:
                self._fail(request, Refusal(f"the engine stopped: {e}"), status=500)

    def _fail(self, request: Request, refusal: Refusal, status: int | None = None) -> None:
        if status is not None:
            refusal.status = status
        self.metrics.inc("requests_total", status=refusal.code)
        request.on_event("error", refusal)

    def _admit(self) -> None:
        now = time.monotonic()
        while True:
            with self._wake:
                if not self._queue:
                    return
                request = self._queue[0]
                if request.cancelled.is_set():
                    self._queue.popleft()
                    self.metrics.inc("requests_total", status="cancelled")
                    request.on_event("done", "cancelled")
                    continue
                if now - request.submitted > self.queue_timeout:
                    self._queue.popleft()
                    self._fail(request, QueueTimeout(
                        f"no batch slot became free within {self.queue_timeout:g} s "
                        "(--queue_timeout); retry later."))
                    continue
                slot = self._free_row()
                need = self._pages_for(len(request.prompt), request.max_new_tokens)
                if slot is None or need > len(self.free_pages):
                    return  # first come, first served: the head waits for a slot and pages
                self._queue.popleft()
            pages, self.free_pages = self.free_pages[:need], self.free_pages[need:]
            self.tables[slot] = 0
            self.tables[slot, :need] = pages
            self.rows[slot] = _Row(request, pending=list(request.prompt), pages=pages)
            self.metrics.observe("queue_seconds", now - request.submitted)

    def _drop_cancelled(self) -> None:
        for i, row in enumerate(self.rows):
            if row is not None and row.request.cancelled.is_set():
                self._finish(i, "cancelled")

    def _finish(self, i: int, reason: str) -> None:
        row = self.rows[i]
        self.rows[i] = None
        self.free_pages += row.pages
        self.tables[i] = 0
        self.metrics.inc("requests_total", status=reason)
        row.request.on_event("done", reason)

    def _sampling(self, request: Request):
        return (np.float32(request.temperature), np.int32(request.top_k),
                np.float32(request.top_p), np.int32(request.seed))

    def _prefill_chunk(self) -> None:
        """One chunk of one prefilling row (round-robin over them)."""
        order = [(self._next_prefill + k) % self.max_batch for k in range(self.max_batch)]
        i = next((i for i in order if self.rows[i] is not None and not self.rows[i].decoding),
                 None)
        if i is None:
            return
        self._next_prefill = (i + 1) % self.max_batch
        row = self.rows[i]
        width = _width(len(row.pending), self.max_seq_len - row.cur, self.prefill_chunk)
        n = min(len(row.pending), width)
        tokens = np.zeros((1, width), np.int32)
        tokens[0, :n] = row.pending[:n]
        token, self.pool, self.hidden = _prefill_row(
            self.cfg, self.vocab_limit, self.params, self.pool, self.tables[i:i + 1], tokens,
            np.int32(row.cur), np.int32(n - 1), *self._sampling(row.request),
            hidden=self.hidden, row=np.int32(i) if self.speculative else None)
        row.pending, row.cur = row.pending[n:], row.cur + n
        self.metrics.inc("prompt_tokens_total", n)
        if self.speculative:
            self._mtp_prefill(i, int(token) if row.decoding else None)
        if row.decoding:
            self._emit(i, int(token))

    def _mtp_prefill(self, i: int, first: int | None) -> None:
        """The MTP module over the prompt positions whose next token is known: all fed ones but
        the last, or, once `first` is sampled, all of them (then the row's first draft)."""
        row = self.rows[i]
        prompt = row.request.prompt
        upto = row.cur if first is not None else row.cur - 1
        after = prompt[1:] + ([first] if first is not None else [])  # the token after each
        while row.mtp_done < upto:
            width = _width(upto - row.mtp_done, self.max_seq_len - row.mtp_done,
                           self.prefill_chunk)
            m = min(upto - row.mtp_done, width)
            tokens = np.zeros((1, width), np.int32)
            tokens[0, :m] = after[row.mtp_done:row.mtp_done + m]
            draft, logq, self.mtp_pool = _mtp_prefill_row(
                self.cfg, self.vocab_limit, self.params, self.mtp_pool, self.hidden, np.int32(i),
                self.tables[i:i + 1], tokens, np.int32(row.mtp_done), np.int32(m - 1),
                *self._sampling(row.request))
            row.mtp_done += m
        if first is not None:
            row.draft = int(draft)
            self.logq = self.logq.at[i].set(logq)

    def _emit(self, i: int, token: int) -> None:
        """Row i produced `token`: it is sent, and the row ends or goes on."""
        row, now = self.rows[i], time.monotonic()
        if row.first_token_at is None:
            row.first_token_at = now
            self.metrics.observe("time_to_first_token_seconds", now - row.request.submitted)
        else:
            self.metrics.observe("inter_token_latency_seconds", now - row.last_token_at)
        row.last_token_at = now
        row.generated += 1
        row.last = token
        self.metrics.inc("generation_tokens_total")
        row.request.on_event("tokens", [token])
        if token in row.request.stop_tokens:
            self._finish(i, "stop")
        elif row.generated >= row.request.max_new_tokens or row.cur >= self.max_seq_len:
            self._finish(i, "length")

    def _decode_step(self) -> None:
        decoding = [i for i, row in enumerate(self.rows) if row is not None and row.decoding]
        if not decoding:
            return
        b = self.max_batch
        tokens, positions = np.zeros(b, np.int32), np.zeros(b, np.int32)
        temperature, top_p = np.zeros(b, np.float32), np.ones(b, np.float32)
        top_k, seed, step = np.zeros(b, np.int32), np.zeros(b, np.int32), np.zeros(b, np.int32)
        for i, row in enumerate(self.rows):
            if row is None:
                continue
            positions[i] = min(row.cur, self.max_seq_len - 1)
            if row.decoding:
                r = row.request
                tokens[i] = row.last
                temperature[i], top_k[i], top_p[i], seed[i] = self._sampling(r)
                step[i] = row.generated
        self.metrics.inc("decode_steps_total")
        live = max(len(row.pages) for row in self.rows if row is not None)
        width = min(1 << (live - 1).bit_length(), self.pages_per_row)  # pages in the view
        if self.speculative:
            self._speculative_step(decoding, tokens, positions, self.tables[:, :width],
                                   (temperature, top_k, top_p, seed, step))
            return
        picked, self.pool = _decode_rows(self.cfg, self.vocab_limit, self.params, self.pool,
                                         self.tables[:, :width], tokens, positions, temperature,
                                         top_k, top_p, seed, step)
        picked = np.asarray(picked)
        for i in decoding:
            self.rows[i].cur += 1
            self._emit(i, int(picked[i]))

    def _speculative_step(self, decoding, last, positions, tables, sampling) -> None:
        drafts = np.zeros_like(last)
        for i in decoding:
            drafts[i] = self.rows[i].draft
        first, bonus, accepted, draft, logq, self.pool, self.mtp_pool = _speculative_rows(
            self.cfg, self.vocab_limit, self.params, self.pool, self.mtp_pool, tables, last,
            drafts, self.logq, positions, *sampling)
        mask = np.zeros(self.max_batch, bool)
        mask[decoding] = True
        self.logq = jnp.where(jnp.asarray(mask)[:, None], logq, self.logq)
        first, bonus, accepted, draft = (np.asarray(a) for a in (first, bonus, accepted, draft))
        for i in decoding:
            self.metrics.inc("draft_tokens_total")
            self.metrics.inc("accepted_draft_tokens_total", int(accepted[i]))
            self.rows[i].cur += 1
            self._emit(i, int(first[i]))  # may end the row (then an accepted bonus is dropped)
            if self.rows[i] is not None and accepted[i]:
                self.rows[i].cur += 1
                self._emit(i, int(bonus[i]))
            if self.rows[i] is not None:
                self.rows[i].draft = int(draft[i])
        drafted = self.metrics.value("draft_tokens_total")
        self.metrics.set("acceptance_rate",
                         self.metrics.value("accepted_draft_tokens_total") / max(drafted, 1))


__all__ = ["Engine", "QueueFull", "QueueTimeout", "Refusal", "Request", "ShuttingDown"]
