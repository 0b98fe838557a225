"""Continuous batching: one scheduler thread owns the device and the latent cache of every stream.

Legend (the package's, `dsv3_jax.model`): B batch slots (max_batch), S cache slots per stream
(max_seq_len), L layers, C + R a latent-cache row, V vocabulary.

The latent cache is paged: one pool [L, N, P, C + R] of N pages of P = page_size positions,
shared by all streams. A stream is given the pages for its prompt + max_new_tokens when it is
admitted (so it can never run out mid-answer) and gives them back when it ends; its page table
maps position s to slot s % P of page table[s // P]. Page 0 is never given out: unused table
entries point at it, and what is written there is never read. So the memory is the pool's, shared
by whatever runs, not max_batch x max_seq_len. Attention reads through the table by gathering
first: each model call gathers the running rows' pages into a contiguous [L, B, S', C + R] view
(S' = the longest live allocation, rounded up to a power of two pages), runs the ordinary cached
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
Not yet here: MTP speculation.
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
from dsv3_jax.model.transformer import init_latent_cache
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


def _pick(logits, temperature, top_k, top_p, seed, step, vocab_limit: int):
    """One token per row of logits [B, V] (float32): the argmax where temperature is 0, else a
    draw (temperature, then top-k, then top-p, as infer/sampling.py's log_probs) keyed by the
    row's (seed, step). Ids at or past vocab_limit (when > 0) are never picked."""
    v = logits.shape[-1]
    if vocab_limit and vocab_limit < v:
        logits = jnp.where(jnp.arange(v) < vocab_limit, logits, -jnp.inf)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw(row, t, k, p, s, i):
        scaled = row / jnp.maximum(t, 1e-6)
        ordered = -jnp.sort(-scaled)
        kth = jnp.where(k > 0, ordered[jnp.clip(k - 1, 0, v - 1)], -jnp.inf)
        scaled = jnp.where(scaled >= kth, scaled, -jnp.inf)
        ordered = jnp.where(ordered >= kth, ordered, -jnp.inf)
        probs = jax.nn.softmax(ordered)
        before = jnp.cumsum(probs) - probs  # mass of the strictly likelier tokens
        kept = jnp.sum(before < p)  # always the most likely token
        cutoff = ordered[jnp.clip(kept - 1, 0, v - 1)]
        scaled = jnp.where(scaled >= cutoff, scaled, -jnp.inf)
        key = jax.random.fold_in(jax.random.key(s), i)
        return jax.random.categorical(key, scaled).astype(jnp.int32)

    sample = lambda: jax.vmap(draw)(logits, temperature, top_k, top_p, seed, step)
    drawn = jax.lax.cond(jnp.any(temperature > 0), sample, lambda: greedy)
    return jnp.where(temperature > 0, drawn, greedy)


def _gather(pool, tables):
    """pool [L, N, P, W], tables int32 [B, Q] -> the rows' caches [L, B, Q * P, W]."""
    view = pool[:, tables]  # [L, B, Q, P, W]
    return view.reshape(view.shape[:2] + (-1, view.shape[-1]))


def _scatter(pool, tables, view, positions):
    """Writes view's rows at positions int32 [B, T] (absolute) back into their pages."""
    b = jnp.broadcast_to(jnp.arange(positions.shape[0])[:, None], positions.shape)
    page_size = pool.shape[2]
    rows = view[:, b, positions]  # [L, B, T, W]
    pages = tables[b, positions // page_size]
    return pool.at[:, pages, positions % page_size].set(rows)


@functools.partial(jax.jit, static_argnames=("cfg", "vocab_limit"), donate_argnames="pool")
def _decode_rows(cfg: ModelConfig, vocab_limit: int, params, pool, tables, tokens, positions,
                 temperature, top_k, top_p, seed, step):
    """tokens, positions int32 [B], tables int32 [B, Q] -> (the next token of every row int32
    [B], the pool)."""
    view = _gather(pool, tables)
    positions = positions[:, None]
    logits, _, view = _decode(cfg, params, tokens[:, None], positions, view)
    pool = _scatter(pool, tables, view, positions)
    picked = _pick(logits[:, 0].astype(jnp.float32), temperature, top_k, top_p, seed, step,
                   vocab_limit)
    return picked, pool


@functools.partial(jax.jit, static_argnames=("cfg", "vocab_limit"), donate_argnames="pool")
def _prefill_row(cfg: ModelConfig, vocab_limit: int, params, pool, table, tokens, start, last,
                 temperature, top_k, top_p, seed):
    """tokens int32 [1, W] at positions start.. of the row whose page table is `table` int32
    [1, Q] -> (the token after index `last` of the chunk, sampled as `_pick` step 0 would, int32
    []; the pool). Padding past the row's pages lands in page 0."""
    view = _gather(pool, table)
    positions = start + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]  # inside the view
    logits, _, view = _decode(cfg, params, tokens, positions, view)
    pool = _scatter(pool, table, view, positions)
    picked = _pick(logits[:, last].astype(jnp.float32), temperature[None], top_k[None],
                   top_p[None], seed[None], jnp.zeros(1, jnp.int32), vocab_limit)
    return picked[0], pool


class Engine:
    """The scheduler (module docstring). `submit` is thread-safe; everything else runs on the
    engine's own thread once `start()`ed."""

    def __init__(self, cfg: ModelConfig, params, *, max_batch: int = 8,
                 max_seq_len: int | None = None, prefill_chunk: int = 256, queue_size: int = 64,
                 queue_timeout: float = 60.0, vocab_limit: int = 0, page_size: int = 16,
                 cache_tokens: int = 0, metrics: Metrics | None = None):
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
        # [L, N, P, C + R]; page 0 takes the writes nobody reads (module docstring).
        self.pool = init_latent_cache(cfg, pages + 1, page_size)
        self.free_pages = list(range(1, pages + 1))
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
        token, self.pool = _prefill_row(
            self.cfg, self.vocab_limit, self.params, self.pool, self.tables[i:i + 1], tokens,
            np.int32(row.cur), np.int32(n - 1), *self._sampling(row.request))
        row.pending, row.cur = row.pending[n:], row.cur + n
        self.metrics.inc("prompt_tokens_total", n)
        if row.decoding:
            self._emit(i, int(token))

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
        live = max(len(row.pages) for row in self.rows if row is not None)
        width = min(1 << (live - 1).bit_length(), self.pages_per_row)  # pages in the view
        picked, self.pool = _decode_rows(self.cfg, self.vocab_limit, self.params, self.pool,
                                         self.tables[:, :width], tokens, positions, temperature,
                                         top_k, top_p, seed, step)
        picked = np.asarray(picked)
        for i in decoding:
            self.rows[i].cur += 1
            self._emit(i, int(picked[i]))


__all__ = ["Engine", "QueueFull", "QueueTimeout", "Refusal", "Request", "ShuttingDown"]
