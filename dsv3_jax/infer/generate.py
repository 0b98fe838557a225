"""Generation over the latent KV cache, with optional MTP speculative decoding.

Legend (the package's, `dsv3_jax.model`): B batch (prompts), T positions (the right-padded prompts,
or a step's tokens), S cache slots, L layers, D model dim, V vocabulary, C + R a latent-cache row.

The cache is preallocated, [L, B, S, C + R] (576 values per token at DeepSeek-V3 size) in the
compute dtype, and slot s always holds the token at position s. Prompts of different lengths are
right-padded: row b's prompt sits at positions 0..len_b-1, padding slots are overwritten by that
row's own generated tokens before any query can see them (a query at position t sees slots 0..t,
and each step writes before it attends). The same property makes "rolling back" a rejected draft
free: the next step writes the corrected token into its slot.

Plain decoding: `prefill` the prompts (one jitted call), then one step per token, run on the device
in chunks (`decode_chunk`, a `lax.while_loop` over a `DecodeState`); the host streams in between.
Speculative decoding (the first MTP module drafts one token, for position cur+1):
  step: feed [last, draft] at [cur, cur+1] through the main model -> accept or correct the draft
  (`sampling.accept_draft`); when accepted, the logits at cur+1 give one more token for free.
  Then the MTP module runs at [cur, cur+1] (hidden states + the tokens that follow them) to
  refresh its own cache and draft the token after the new `last`. Each step emits 1 or 2 tokens.
Greedy speculative decoding emits exactly the tokens of greedy decoding (tests check it).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from dsv3_jax.config import ModelConfig
from dsv3_jax.infer import sampling as sampling_lib
from dsv3_jax.infer.sampling import Sampling
from dsv3_jax.model.transformer import DeepSeekV3, init_latent_cache, init_mtp_cache


@dataclasses.dataclass
class GenerationResult:
    tokens: list[list[int]]  # prompt + generated tokens, per prompt
    stats: dict  # prefill_seconds, decode_seconds, new_tokens, tokens_per_sec, ms_per_step,
    #              steps, acceptance_rate (speculative only)


def bucket_length(n: int, cap: int) -> int:
    """n rounded up to a power of two (at least 16), at most cap: bounds the number of compiles."""
    return min(cap, max(16, 1 << (n - 1).bit_length()))


@struct.dataclass
class DecodeState:
    """The decode loop's carry, all on the device (prefill makes it, decode_chunk advances it)."""

    last: jax.Array  # int32 [B]: each row's newest token, not yet fed to the model
    cur: jax.Array  # int32 [B]: its position; cache slots 0..cur-1 hold the tokens before it
    done: jax.Array  # bool [B]: the row has stopped (a stop token, or max_new_tokens tokens)
    n_new: jax.Array  # int32 [B]: tokens generated so far
    out: jax.Array  # int32 [B, max_new_tokens]: the generated tokens
    stop: jax.Array  # int32 [n_stop]: the stop tokens, padded with -1
    key: jax.Array  # PRNG key; draws use fold_in(key, i): i = 0 in the prefill, i in decode step i
    steps: jax.Array  # int32 []: decode steps run
    drafted: jax.Array  # int32 []: drafts verified (speculative)
    accepted: jax.Array  # int32 []: drafts accepted (speculative)
    cache: jax.Array  # [L, B, S, C + R]: the main model's latent cache
    mtp_cache: jax.Array | None = None  # [B, S, C + R]: the first MTP module's (speculative)
    draft: jax.Array | None = None  # int32 [B]: the MTP draft for position cur + 1 (speculative)
    logq: jax.Array | None = None  # float32 [B, V]: the draft's log-distribution (sampled only)

    def emit(self, tokens: jax.Array, write: jax.Array) -> DecodeState:
        """Appends tokens [B] to the rows where `write` (unless done); updates done and n_new."""
        write = write & ~self.done
        rows = jnp.arange(tokens.shape[0])
        slot = jnp.minimum(self.n_new, self.out.shape[1] - 1)
        out = self.out.at[rows, slot].set(jnp.where(write, tokens, self.out[rows, slot]))
        n_new = self.n_new + write.astype(jnp.int32)
        is_stop = jnp.any(tokens[:, None] == self.stop[None, :], axis=-1)
        finished = write & (is_stop | (n_new >= self.out.shape[1]))
        return self.replace(out=out, n_new=n_new, done=self.done | finished)


def _decode(cfg: ModelConfig, params, tokens, positions, cache):
    """`DeepSeekV3.decode`: (logits [B, T, V], hidden [B, T, D], the cache [L, B, S, C + R])."""
    return DeepSeekV3(cfg).apply({"params": params}, tokens, positions, cache,
                                 method=DeepSeekV3.decode)


def _draft(cfg: ModelConfig, s: Sampling, params, hidden, next_tokens, positions, cache, at, key):
    """The MTP module over hidden [B, T, D] and the next tokens [B, T], drafting from position at[b]
    of row b: (draft int32 [B], its log-distribution [B, V] or None when greedy, the MTP cache)."""
    logits, cache = DeepSeekV3(cfg).apply({"params": params}, hidden, next_tokens, positions, cache,
                                          method=DeepSeekV3.mtp_decode)
    logits = logits[jnp.arange(at.shape[0]), at]
    logq = None if s.greedy else sampling_lib.log_probs(logits, s)
    return sampling_lib.sample(logits, key, s), logq, cache


@functools.partial(jax.jit, static_argnames=("cfg", "s", "speculative", "max_new_tokens"),
                   donate_argnames=("cache", "mtp_cache"))
def prefill(cfg: ModelConfig, s: Sampling, speculative: bool, max_new_tokens: int, params, tokens,
            lengths, cache, mtp_cache, stop, key) -> DecodeState:
    """tokens [B, T] right-padded (row b's prompt is its first lengths[b]) and the empty caches ->
    the state after the first generated token (and, when speculative, the first draft)."""
    k_first, k_draft = jax.random.split(jax.random.fold_in(key, 0))
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    logits, hidden, cache = _decode(cfg, params, tokens, positions, cache)
    b, zero = tokens.shape[0], jnp.zeros([], jnp.int32)
    rows = jnp.arange(b)
    first = sampling_lib.sample(logits[rows, lengths - 1], k_first, s)
    state = DecodeState(
        last=first, cur=lengths, done=jnp.zeros(b, bool), n_new=jnp.zeros(b, jnp.int32),
        out=jnp.zeros((b, max_new_tokens), jnp.int32), stop=stop, key=key, steps=zero,
        drafted=zero, accepted=zero, cache=cache).emit(first, jnp.ones(b, bool))
    if speculative:  # the MTP cache over the prompt, and the first draft
        next_tokens = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1))).at[rows, lengths - 1].set(first)
        draft, logq, mtp_cache = _draft(cfg, s, params, hidden, next_tokens, positions, mtp_cache,
                                        lengths - 1, k_draft)
        state = state.replace(mtp_cache=mtp_cache, draft=draft, logq=logq)
    return state


def _plain_step(cfg: ModelConfig, s: Sampling, params, state: DecodeState) -> DecodeState:
    """Feeds `last` at `cur` [B, T=1] and samples the next token of every unfinished row."""
    key = jax.random.fold_in(state.key, state.steps + 1)
    logits, _, cache = _decode(cfg, params, state.last[:, None], state.cur[:, None], state.cache)
    token = sampling_lib.sample(logits[:, 0], key, s)
    active = ~state.done
    return state.replace(cache=cache).emit(token, active).replace(
        last=jnp.where(active, token, state.last), cur=state.cur + active.astype(jnp.int32))


def _speculative_step(cfg: ModelConfig, s: Sampling, params, state: DecodeState) -> DecodeState:
    """One speculative step as the module docstring describes: [last, draft] fed as [B, T=2]."""
    k_accept, k_bonus, k_draft = jax.random.split(jax.random.fold_in(state.key, state.steps + 1), 3)
    active, cur = ~state.done, state.cur
    positions = jnp.stack([cur, cur + 1], axis=1)
    logits, hidden, cache = _decode(cfg, params, jnp.stack([state.last, state.draft], axis=1),
                                    positions, state.cache)
    accepted, first = sampling_lib.accept_draft(logits[:, 0], state.draft, state.logq, k_accept, s)
    bonus = sampling_lib.sample(logits[:, 1], k_bonus, s)
    draft, logq, mtp_cache = _draft(cfg, s, params, hidden, jnp.stack([first, bonus], axis=1),
                                    positions, state.mtp_cache, accepted.astype(jnp.int32), k_draft)
    keep = lambda fresh, old: jnp.where(jnp.expand_dims(active, range(1, fresh.ndim)), fresh, old)
    last, draft, logq = jax.tree.map(keep, (jnp.where(accepted, bonus, first), draft, logq),
                                     (state.last, state.draft, state.logq))
    emitted = state.emit(first, active).emit(bonus, active & accepted)
    return emitted.replace(
        cache=cache, mtp_cache=mtp_cache, last=last, draft=draft, logq=logq,
        cur=cur + active.astype(jnp.int32) * (1 + accepted.astype(jnp.int32)),
        drafted=state.drafted + active.sum(dtype=jnp.int32),
        accepted=state.accepted + (active & accepted).sum(dtype=jnp.int32))


@functools.partial(jax.jit, static_argnames=("cfg", "s", "speculative", "chunk"),
                   donate_argnames="state")
def decode_chunk(cfg: ModelConfig, s: Sampling, speculative: bool, chunk: int, params,
                 state: DecodeState) -> DecodeState:
    """Advances every unfinished row by up to `chunk` decode steps in one device loop."""
    step = _speculative_step if speculative else _plain_step

    def body(carry):
        i, state = carry
        state = step(cfg, s, params, state)
        return i + 1, state.replace(steps=state.steps + 1)

    cond = lambda carry: (carry[0] < chunk) & ~jnp.all(carry[1].done)
    return jax.lax.while_loop(cond, body, (jnp.zeros([], jnp.int32), state))[1]


_PROMPTS_FIX = "pass a list of token-id lists (one per prompt) or a [B, T] integer array"
_ARRAY = (np.ndarray, jax.Array)


def _show(value, limit: int = 60) -> str:
    """repr of a user's value, cut to `limit` characters for an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _check_ids_dtype(what: str, dtype, vocab_size: int) -> None:
    if not np.issubdtype(dtype, np.integer):
        hint = " (ids held as floats: .astype(np.int32))" if np.issubdtype(dtype, np.floating) else ""
        raise ValueError(f"{what} is a {dtype} array; token ids are integers in [0, {vocab_size}): "
                         f"{_PROMPTS_FIX}{hint}.")


def _row_ids(i: int, prompt, vocab_size: int) -> list[int]:
    """Prompt i (a list/tuple of ints or a 1-D integer array) as a list of Python ints."""
    if isinstance(prompt, (str, bytes)):
        raise ValueError(f"prompt {i} is the string {_show(prompt)}; prompts are token ids: encode "
                         f"the text with the model's tokenizer first and {_PROMPTS_FIX}.")
    if sampling_lib.as_int(prompt) is not None:
        raise ValueError(f"prompt {i} is the single token id {_show(prompt)}, not a list of ids; "
                         f"{_PROMPTS_FIX} (one prompt: [ids]).")
    if isinstance(prompt, _ARRAY):
        ids = np.asarray(prompt)
        if ids.ndim != 1:
            raise ValueError(f"prompt {i} is an array of shape {ids.shape}; each prompt is a flat "
                             f"(1-D) sequence of token ids: {_PROMPTS_FIX}.")
        _check_ids_dtype(f"prompt {i}", ids.dtype, vocab_size)
        return ids.tolist()
    if not isinstance(prompt, Sequence):
        raise ValueError(f"prompt {i} has type {type(prompt).__name__} ({_show(prompt)}); each "
                         f"prompt is a list of token ids: {_PROMPTS_FIX}.")
    ids = [sampling_lib.as_int(token) for token in prompt]
    if None in ids:  # the first token that is not an integer
        j = ids.index(None)
        token = prompt[j]
        if (isinstance(token, Sequence) and not isinstance(token, (str, bytes))) or \
                (isinstance(token, _ARRAY) and token.ndim > 0):
            raise ValueError(f"prompt {i} holds a sequence at position {j} ({_show(token)}): "
                             "prompts nest two levels deep, a batch of flat token-id lists; "
                             f"{_PROMPTS_FIX}.")
        raise ValueError(f"prompt {i} holds {_show(token)} ({type(token).__name__}) at position "
                         f"{j}; token ids are integers in [0, {vocab_size}): {_PROMPTS_FIX}.")
    return ids


def _prompt_rows(prompts, vocab_size: int) -> list[list[int]]:
    """The prompts as lists of Python ints, before any check of their values."""
    if isinstance(prompts, (str, bytes)):
        raise ValueError(f"prompts is the string {_show(prompts)}; encode the text with the "
                         f"model's tokenizer first and {_PROMPTS_FIX}.")
    if isinstance(prompts, _ARRAY):
        ids = np.asarray(prompts)
        if ids.ndim == 1:
            raise ValueError(f"prompts is a 1-D array of shape {ids.shape}: one prompt or a "
                             f"batch? Give the batch axis: {_PROMPTS_FIX} (one prompt: "
                             "prompts[None]).")
        if ids.ndim != 2:
            raise ValueError(f"prompts is a {ids.ndim}-D array of shape {ids.shape}; "
                             f"{_PROMPTS_FIX}.")
        _check_ids_dtype(f"prompts (shape {ids.shape})", ids.dtype, vocab_size)
        if ids.shape[0] == 0:
            raise ValueError(f"prompts has shape {ids.shape}: no prompts to continue; "
                             f"{_PROMPTS_FIX} with at least one prompt.")
        if ids.shape[1] == 0:
            raise ValueError(f"prompts has shape {ids.shape}: every prompt is empty; each needs "
                             "at least one token (e.g. BOS).")
        return ids.tolist()
    if not isinstance(prompts, Sequence):
        raise ValueError(f"prompts has type {type(prompts).__name__} ({_show(prompts)}); "
                         f"{_PROMPTS_FIX}.")
    if not prompts:
        raise ValueError(f"prompts is empty: no prompts to continue; {_PROMPTS_FIX} with at least "
                         "one prompt.")
    if all(sampling_lib.as_int(p) is not None for p in prompts):
        raise ValueError(f"prompts is a flat list of {len(prompts)} token ids ({_show(prompts)}), "
                         f"not a batch; {_PROMPTS_FIX} (one prompt: [ids]).")
    return [_row_ids(i, p, vocab_size) for i, p in enumerate(prompts)]


def check_max_new_tokens(max_new_tokens) -> int:
    value = sampling_lib.as_int(max_new_tokens)
    if value is None or value < 1:
        raise ValueError(f"max_new_tokens={_show(max_new_tokens)} must be a positive integer "
                         "(how many tokens to generate per prompt).")
    return value


def check_prompts(cfg: ModelConfig, prompts, max_new_tokens: int) -> list[list[int]]:
    """The prompts (as `generate` takes them) as lists of ints, refusing what generation cannot
    serve: every prompt needs at least one token, ids lie in [0, vocab_size), and each prompt's
    length + max_new_tokens fits in cfg.max_seq_len."""
    max_new_tokens = check_max_new_tokens(max_new_tokens)
    context = cfg.max_seq_len
    if max_new_tokens >= context:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the "
                         f"model's context (max_seq_len={context}); ask for at most {context - 1}.")
    rows = _prompt_rows(prompts, cfg.vocab_size)
    for i, ids in enumerate(rows):
        if not ids:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token (e.g. "
                             "BOS), or leave the empty one out.")
        if not 0 <= min(ids) <= max(ids) < cfg.vocab_size:
            j, token = next((j, t) for j, t in enumerate(ids) if not 0 <= t < cfg.vocab_size)
            raise ValueError(f"prompt {i} holds token id {token} at position {j}, outside the "
                             f"vocabulary [0, {cfg.vocab_size}); was it encoded with this model's "
                             "tokenizer?")
        if len(ids) + max_new_tokens > context:
            room = context - len(ids)
            fewer = f" or ask for at most {room} new tokens" if room >= 1 else ""
            raise ValueError(
                f"prompt {i} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} that needs "
                f"{len(ids) + max_new_tokens} positions, which exceeds the model's context "
                f"(max_seq_len={context}). Shorten the prompt to at most {context - max_new_tokens} "
                f"tokens{fewer}.")
    return rows


def check_stop_tokens(cfg: ModelConfig, stop_tokens) -> list[int]:
    """stop_tokens (a list/tuple/set of ints or a 1-D integer array; None = none) as sorted ints."""
    if stop_tokens is None:
        return []
    fix = "pass a list of token ids, e.g. stop_tokens=[tokenizer.eos_id]"
    if sampling_lib.as_int(stop_tokens) is not None:
        raise ValueError(f"stop_tokens={_show(stop_tokens)} is a single id; {fix} "
                         f"([{int(stop_tokens)}] for this one).")
    if isinstance(stop_tokens, (str, bytes)):
        raise ValueError(f"stop_tokens={_show(stop_tokens)} is a string; {fix}.")
    if isinstance(stop_tokens, _ARRAY):
        if np.ndim(stop_tokens) != 1:
            raise ValueError(f"stop_tokens is an array of shape {np.shape(stop_tokens)}; {fix}.")
        stop_tokens = list(np.asarray(stop_tokens))
    elif not isinstance(stop_tokens, (Sequence, set, frozenset)):
        raise ValueError(f"stop_tokens={_show(stop_tokens)} has type "
                         f"{type(stop_tokens).__name__}; {fix}.")
    for token in stop_tokens:
        value = sampling_lib.as_int(token)
        if value is None or not 0 <= value < cfg.vocab_size:
            raise ValueError(f"stop_tokens holds {_show(token)}; stop tokens are token ids in "
                             f"[0, {cfg.vocab_size}): {fix}.")
    return sorted({sampling_lib.as_int(token) for token in stop_tokens})


def check_seed(seed) -> int:
    value = sampling_lib.as_int(seed)
    if value is None or not -2**63 <= value < 2**63:
        raise ValueError(f"seed={_show(seed)} must be an integer in [-2**63, 2**63) (it seeds "
                         "jax.random.key; the same seed gives the same samples).")
    return value


def generate_tokens(cfg: ModelConfig, params, prompts, *, max_new_tokens: int,
                    sampling: Sampling = Sampling(), speculative: bool = False, seed: int = 0,
                    stop_tokens: Sequence[int] = (), chunk: int = 16,
                    on_tokens: Callable[[int, list[int]], bool | None] | None = None
                    ) -> GenerationResult:
    """Generates for a batch of prompts; see `generate`. The device runs `chunk` steps between host
    visits; `on_tokens(row, new_tokens)` is called after each with the row's tokens since the last
    call (for streaming). When it returns True, that row stops there, as at a stop token (what a
    caller matching stop strings in the text needs): its tokens so far are kept, the other rows go
    on."""
    prompts = check_prompts(cfg, prompts, max_new_tokens)
    max_new_tokens = int(max_new_tokens)  # check_prompts checked it
    if not isinstance(sampling, Sampling):
        raise ValueError(f"sampling={_show(sampling)} must be a Sampling(temperature=..., "
                         "top_k=..., top_p=...) from dsv3_jax.infer.sampling.")
    if not isinstance(speculative, (bool, np.bool_)):
        raise ValueError(f"speculative={_show(speculative)} must be True or False.")
    speculative = bool(speculative)
    seed = check_seed(seed)
    stop = check_stop_tokens(cfg, stop_tokens)
    chunk_steps = sampling_lib.as_int(chunk)
    if chunk_steps is None or chunk_steps < 1:
        raise ValueError(f"chunk={_show(chunk)} must be a positive integer (decode steps between "
                         "host visits).")
    if on_tokens is not None and not callable(on_tokens):
        raise ValueError(f"on_tokens={_show(on_tokens)} must be a function (row, new_tokens) or "
                         "None.")
    if speculative and not cfg.mtp_depth:
        raise ValueError("speculative=True needs an MTP module, but this model has mtp_depth=0; "
                         "generate without speculation or use a checkpoint trained with MTP.")
    b = len(prompts)
    lengths = np.array([len(p) for p in prompts], np.int32)
    padded_len = bucket_length(int(lengths.max()), cfg.max_seq_len)
    slots = max(padded_len, bucket_length(int(lengths.max()) + max_new_tokens + 1, cfg.max_seq_len))
    tokens = np.zeros((b, padded_len), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    stop = np.array(stop or [-1], np.int32)
    mtp_cache = init_mtp_cache(cfg, b, slots) if speculative else None

    t0 = time.perf_counter()
    state = prefill(cfg, sampling, speculative, max_new_tokens, params, jnp.asarray(tokens),
                    jnp.asarray(lengths), init_latent_cache(cfg, b, slots), mtp_cache,
                    jnp.asarray(stop), jax.random.key(seed))
    streamed = np.zeros(b, np.int64)

    def stream(state: DecodeState) -> tuple[DecodeState, bool]:
        out, n_new, done = jax.device_get((state.out, state.n_new, state.done))
        ended = np.zeros(b, bool)
        if on_tokens is not None:
            for row in range(b):
                if n_new[row] > streamed[row]:
                    ended[row] = bool(on_tokens(row, out[row, streamed[row]:n_new[row]].tolist()))
        streamed[:] = n_new
        ended &= ~done
        if ended.any():
            state = state.replace(done=state.done | jnp.asarray(ended))
        return state, bool((done | ended).all())

    state, finished = stream(state)
    t1 = time.perf_counter()
    while not finished:
        state = decode_chunk(cfg, sampling, speculative, chunk_steps, params, state)
        state, finished = stream(state)
    t2 = time.perf_counter()
    out, n_new, steps, drafted, accepted = jax.device_get(
        (state.out, state.n_new, state.steps, state.drafted, state.accepted))
    result = [list(p) + out[i, :n_new[i]].tolist() for i, p in enumerate(prompts)]
    new_tokens = int(n_new.sum())
    stats = {"prefill_seconds": t1 - t0, "decode_seconds": t2 - t1, "new_tokens": new_tokens,
             "steps": int(steps), "ms_per_step": 1e3 * (t2 - t1) / max(int(steps), 1),
             "tokens_per_sec": (new_tokens - b) / (t2 - t1) if steps else 0.0}
    if speculative:
        stats["acceptance_rate"] = int(accepted) / max(int(drafted), 1)
    return GenerationResult(tokens=result, stats=stats)


def generate(cfg: ModelConfig, params, prompts, *, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, speculative: bool = False, seed: int = 0,
             stop_tokens: Sequence[int] = ()) -> list[list[int]]:
    """Continues each prompt by up to `max_new_tokens` tokens.

    `prompts` is a list (or tuple) of prompts, each a list of token ids or a 1-D integer array
    (lengths may differ), or a [B, T] integer array (numpy or jax) of B prompts of T tokens.
    Invalid arguments raise ValueError.

    Greedy when temperature is 0, else sampled (temperature, then top_k, then top_p), seeded by
    `seed`. Generation of a prompt stops after a token in `stop_tokens` (which is kept). With
    `speculative`, the MTP module drafts a token per step that the main model verifies; the output
    is distributed exactly as without it (identical tokens when greedy).
    Returns prompt + generated tokens for every prompt.
    """
    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p)
    return generate_tokens(cfg, params, prompts, max_new_tokens=max_new_tokens, sampling=sampling,
                           speculative=speculative, seed=seed, stop_tokens=stop_tokens).tokens
