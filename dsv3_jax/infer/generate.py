"""Generation over the latent KV cache, with optional MTP speculative decoding.

Legend: B batch (prompts), P padded prompt length, S cache slots, L layers, V vocabulary.

The cache is preallocated: per layer [B, S, kv_lora_rank + qk_rope_head_dim] (576 values per token
at DeepSeek-V3 size) in the compute dtype, and slot s always holds the token at position s. Prompts
of different lengths are right-padded: row b's prompt sits at positions 0..len_b-1, padding slots
are overwritten by that row's own generated tokens before any query can see them (a query at
position p sees slots 0..p, and each step writes before it attends). The same property makes
"rolling back" a rejected draft free: the next step writes the corrected token into its slot.

Plain decoding: prefill the prompts (one jitted call), then one step per token, run on the device
in chunks of steps (`lax.while_loop`) between which the host streams what was produced.
Speculative decoding (the first MTP module drafts one token):
  state per row: `last` (the newest token, not yet fed, at position cur) and a draft for cur+1.
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

from dsv3_jax.config import ModelConfig
from dsv3_jax.infer import sampling as sampling_lib
from dsv3_jax.infer.sampling import Sampling
from dsv3_jax.model.transformer import DeepSeekV3, init_latent_cache, init_mtp_cache


@dataclasses.dataclass
class GenerationResult:
    tokens: list[list[int]]  # prompt + generated tokens, per prompt
    stats: dict  # prefill_seconds, decode_seconds, new_tokens, tokens_per_sec, ms_per_step,
    #              steps, acceptance_rate (speculative only)


def _bucket(n: int, cap: int) -> int:
    """n rounded up to a power of two (at least 16), at most cap: bounds the number of compiles."""
    return min(cap, max(16, 1 << (n - 1).bit_length()))


def _is_stop(tokens: jax.Array, stop: jax.Array) -> jax.Array:
    """bool [B]: tokens [B] that are in `stop` [n] (padded with -1)."""
    return jnp.any(tokens[:, None] == stop[None, :], axis=-1)


def _emit(loop: dict, tokens: jax.Array, write: jax.Array) -> dict:
    """Appends tokens [B] to rows where `write` (and the row is not done); updates done/n_new."""
    write = write & ~loop["done"]
    rows = jnp.arange(tokens.shape[0])
    slot = jnp.minimum(loop["n_new"], loop["out"].shape[1] - 1)
    out = loop["out"].at[rows, slot].set(jnp.where(write, tokens, loop["out"][rows, slot]))
    n_new = loop["n_new"] + write.astype(jnp.int32)
    finished = write & (_is_stop(tokens, loop["stop"]) | (n_new >= loop["max_new"]))
    return dict(loop, out=out, n_new=n_new, done=loop["done"] | finished)


@functools.lru_cache(maxsize=32)
def _programs(cfg: ModelConfig, s: Sampling, speculative: bool, chunk: int):
    """Jitted prefill and decode-chunk functions for one config, sampling setting and mode.

    The loop state is a dict of device arrays: `last` [B] (newest token, not yet fed, at position
    `cur` [B]), `done` [B], `n_new` [B], `out` [B, max_new_tokens] (generated tokens), `stop` [n],
    `max_new` [], `key`, counters `steps`, `drafted`, `accepted`, the latent `cache` and, when
    speculative, `mtp_cache`, `draft` [B] and its distribution `logq` [B, V] (sampling only).
    `run_chunk` advances every unfinished row by up to `chunk` steps in one device loop.
    """
    model = DeepSeekV3(cfg)

    def main(params, tokens, positions, cache):
        return model.apply({"params": params}, tokens, positions, cache, method=DeepSeekV3.decode)

    def mtp(params, hidden, next_tokens, positions, cache):
        return model.apply({"params": params}, hidden, next_tokens, positions, cache,
                           method=DeepSeekV3.mtp_decode)

    def draft_from(mtp_logits, key):
        logq = None if s.greedy else sampling_lib.log_probs(mtp_logits, s)
        return sampling_lib.sample(mtp_logits, key, s), logq

    def prefill(params, tokens, lengths, cache, mtp_cache, out, stop, max_new, key):
        """tokens [B, P] right-padded to P, lengths [B] -> the loop state after the first token."""
        k_first, k_draft = jax.random.split(jax.random.fold_in(key, 0))
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        logits, hidden, cache = main(params, tokens, positions, cache)
        rows = jnp.arange(tokens.shape[0])
        first = sampling_lib.sample(logits[rows, lengths - 1], k_first, s)
        zero = jnp.zeros([], jnp.int32)
        loop = dict(last=first, cur=lengths, done=jnp.zeros(first.shape, bool),
                    n_new=jnp.zeros(first.shape, jnp.int32), out=out, stop=stop, max_new=max_new,
                    key=key, steps=zero, drafted=zero, accepted=zero, cache=cache)
        loop = _emit(loop, first, jnp.ones(first.shape, bool))
        if speculative:  # the MTP cache over the prompt, and the first draft
            next_tokens = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1))).at[rows, lengths - 1].set(first)
            mtp_logits, mtp_cache = mtp(params, hidden, next_tokens, positions, mtp_cache)
            loop["draft"], loop["logq"] = draft_from(mtp_logits[rows, lengths - 1], k_draft)
            loop["mtp_cache"] = mtp_cache
        return loop

    def plain_step(params, loop):
        key = jax.random.fold_in(loop["key"], loop["steps"] + 1)
        logits, _, cache = main(params, loop["last"][:, None], loop["cur"][:, None], loop["cache"])
        token = sampling_lib.sample(logits[:, 0], key, s)
        active = ~loop["done"]
        loop = _emit(dict(loop, cache=cache), token, active)
        return dict(loop, last=jnp.where(active, token, loop["last"]),
                    cur=loop["cur"] + active.astype(jnp.int32))

    def speculative_step(params, loop):
        k_accept, k_bonus, k_draft = jax.random.split(jax.random.fold_in(loop["key"], loop["steps"] + 1), 3)
        last, draft, cur = loop["last"], loop["draft"], loop["cur"]
        active = ~loop["done"]
        positions = jnp.stack([cur, cur + 1], axis=1)
        logits, hidden, cache = main(params, jnp.stack([last, draft], axis=1), positions, loop["cache"])
        accepted, first = sampling_lib.accept_draft(logits[:, 0], draft, loop["logq"], k_accept, s)
        bonus = sampling_lib.sample(logits[:, 1], k_bonus, s)
        mtp_logits, mtp_cache = mtp(params, hidden, jnp.stack([first, bonus], axis=1), positions,
                                    loop["mtp_cache"])
        rows = jnp.arange(last.shape[0])
        new_draft, new_logq = draft_from(mtp_logits[rows, accepted.astype(jnp.int32)], k_draft)
        counted = active & accepted
        loop = dict(loop, cache=cache, mtp_cache=mtp_cache,
                    drafted=loop["drafted"] + active.sum(dtype=jnp.int32),
                    accepted=loop["accepted"] + counted.sum(dtype=jnp.int32))
        loop = _emit(loop, first, active)
        loop = _emit(loop, bonus, active & accepted)
        keep = lambda new, old: jnp.where(active.reshape(active.shape + (1,) * (new.ndim - 1)), new, old)
        return dict(loop, last=keep(jnp.where(accepted, bonus, first), last),
                    draft=keep(new_draft, draft),
                    logq=None if s.greedy else keep(new_logq, loop["logq"]),
                    cur=cur + active.astype(jnp.int32) * (1 + accepted.astype(jnp.int32)))

    step = speculative_step if speculative else plain_step

    def run_chunk(params, loop):
        def body(carry):
            i, loop = carry
            loop = step(params, loop)
            return i + 1, dict(loop, steps=loop["steps"] + 1)

        cond = lambda carry: (carry[0] < chunk) & ~jnp.all(carry[1]["done"])
        return jax.lax.while_loop(cond, body, (jnp.zeros([], jnp.int32), loop))[1]

    return (jax.jit(prefill, donate_argnums=(3, 4)), jax.jit(run_chunk, donate_argnums=1))


_PROMPTS_FIX = "pass a list of token-id lists (one per prompt) or a [B, T] integer array"


def _show(value, limit: int = 60) -> str:
    """repr of a user's value, cut to `limit` characters for an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _is_array(value) -> bool:
    return isinstance(value, (np.ndarray, jax.Array))


def _check_ids_dtype(what: str, dtype, vocab_size: int) -> None:
    """Refuses arrays whose dtype is not an integer type (floats, bools, objects, strings)."""
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
    if _is_array(prompt):
        ids = np.asarray(prompt)
        if ids.ndim != 1:
            raise ValueError(f"prompt {i} is an array of shape {ids.shape}; each prompt is a flat "
                             f"(1-D) sequence of token ids: {_PROMPTS_FIX}.")
        _check_ids_dtype(f"prompt {i}", ids.dtype, vocab_size)
        return ids.tolist()
    if not isinstance(prompt, Sequence):
        raise ValueError(f"prompt {i} has type {type(prompt).__name__} ({_show(prompt)}); each "
                         f"prompt is a list of token ids: {_PROMPTS_FIX}.")
    ids = []
    for j, token in enumerate(prompt):
        as_integer = sampling_lib.as_int(token)
        if as_integer is not None:
            ids.append(as_integer)
        elif (isinstance(token, Sequence) and not isinstance(token, (str, bytes))) or \
                (_is_array(token) and token.ndim > 0):
            raise ValueError(f"prompt {i} holds a sequence at position {j} ({_show(token)}): "
                             "prompts nest two levels deep, a batch of flat token-id lists; "
                             f"{_PROMPTS_FIX}.")
        else:
            raise ValueError(f"prompt {i} holds {_show(token)} ({type(token).__name__}) at position "
                             f"{j}; token ids are integers in [0, {vocab_size}): {_PROMPTS_FIX}.")
    return ids


def _prompt_rows(prompts, vocab_size: int) -> list[list[int]]:
    """The prompts as lists of Python ints, before any check of their values."""
    if isinstance(prompts, (str, bytes)):
        raise ValueError(f"prompts is the string {_show(prompts)}; encode the text with the "
                         f"model's tokenizer first and {_PROMPTS_FIX}.")
    if _is_array(prompts):
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
    """Validated prompts as lists of ints; refuses what generation cannot serve.

    prompts: a list (or tuple) of prompts, each a list/tuple of ints or a 1-D integer array, or a
    [B, T] integer array (numpy or jax). Every prompt needs at least one token, ids lie in
    [0, vocab_size), and each prompt's length + max_new_tokens fits in cfg.max_seq_len.
    """
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
    if _is_array(stop_tokens):
        if np.ndim(stop_tokens) != 1:
            raise ValueError(f"stop_tokens is an array of shape {np.shape(stop_tokens)}; {fix}.")
        stop_tokens = list(np.asarray(stop_tokens))
    elif not isinstance(stop_tokens, (Sequence, set, frozenset)):
        raise ValueError(f"stop_tokens={_show(stop_tokens)} has type "
                         f"{type(stop_tokens).__name__}; {fix}.")
    out = set()
    for token in stop_tokens:
        value = sampling_lib.as_int(token)
        if value is None or not 0 <= value < cfg.vocab_size:
            raise ValueError(f"stop_tokens holds {_show(token)}; stop tokens are token ids in "
                             f"[0, {cfg.vocab_size}): {fix}.")
        out.add(value)
    return sorted(out)


def check_seed(seed) -> int:
    value = sampling_lib.as_int(seed)
    if value is None or not -2**63 <= value < 2**63:
        raise ValueError(f"seed={_show(seed)} must be an integer in [-2**63, 2**63) (it seeds "
                         "jax.random.key; the same seed gives the same samples).")
    return value


def generate_tokens(cfg: ModelConfig, params, prompts, *, max_new_tokens: int,
                    sampling: Sampling = Sampling(), speculative: bool = False, seed: int = 0,
                    stop_tokens: Sequence[int] = (), chunk: int = 16,
                    on_tokens: Callable[[int, list[int]], None] | None = None) -> GenerationResult:
    """Generates for a batch of prompts; see `generate`. The device runs `chunk` steps between host
    visits; `on_tokens(row, new_tokens)` is called after each (for streaming)."""
    prompts = check_prompts(cfg, prompts, max_new_tokens)
    max_new_tokens = check_max_new_tokens(max_new_tokens)
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
    prefill, run_chunk = _programs(cfg, sampling, speculative, chunk_steps)
    b = len(prompts)
    lengths = np.array([len(p) for p in prompts], np.int32)
    padded_len = _bucket(int(lengths.max()), cfg.max_seq_len)
    slots = max(padded_len, _bucket(int(lengths.max()) + max_new_tokens + 1, cfg.max_seq_len))
    tokens = np.zeros((b, padded_len), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    stop = np.array(stop or [-1], np.int32)
    mtp_cache = init_mtp_cache(cfg, b, slots) if speculative else None

    t0 = time.perf_counter()
    loop = prefill(params, jnp.asarray(tokens), jnp.asarray(lengths), init_latent_cache(cfg, b, slots),
                   mtp_cache, jnp.zeros((b, max_new_tokens), jnp.int32), jnp.asarray(stop),
                   jnp.asarray(max_new_tokens, jnp.int32), jax.random.key(seed))
    streamed = np.zeros(b, np.int64)

    def stream(loop) -> bool:
        out, n_new, done = jax.device_get((loop["out"], loop["n_new"], loop["done"]))
        if on_tokens is not None:
            for row in range(b):
                if n_new[row] > streamed[row]:
                    on_tokens(row, out[row, streamed[row]:n_new[row]].tolist())
        streamed[:] = n_new
        return bool(done.all())

    finished = stream(loop)
    t1 = time.perf_counter()
    while not finished:
        loop = run_chunk(params, loop)
        finished = stream(loop)
    t2 = time.perf_counter()
    out, n_new, steps, drafted, accepted = jax.device_get(
        (loop["out"], loop["n_new"], loop["steps"], loop["drafted"], loop["accepted"]))
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

    `prompts` is a list of prompts, each a list of token ids (lengths may differ), or a [B, T]
    integer array (numpy or jax) of B prompts of T tokens. Invalid arguments raise ValueError.

    Greedy when temperature is 0, else sampled (temperature, then top_k, then top_p), seeded by
    `seed`. Generation of a prompt stops after a token in `stop_tokens` (which is kept). With
    `speculative`, the MTP module drafts a token per step that the main model verifies; the output
    is distributed exactly as without it (identical tokens when greedy).
    Returns prompt + generated tokens for every prompt.
    """
    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p)
    return generate_tokens(cfg, params, prompts, max_new_tokens=max_new_tokens, sampling=sampling,
                           speculative=speculative, seed=seed, stop_tokens=stop_tokens).tokens
