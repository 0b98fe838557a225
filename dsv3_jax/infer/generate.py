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


def check_prompts(cfg: ModelConfig, prompts, max_new_tokens: int) -> list[list[int]]:
    """Validated prompts as lists of ints; refuses what generation cannot serve."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError("prompts must be a non-empty list of token-id lists (one per prompt); "
                         "encode text with the tokenizer first.")
    if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive integer.")
    out = []
    for i, prompt in enumerate(prompts):
        ids = np.asarray(prompt)
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError(f"prompt {i} is empty or not a flat list of token ids; every prompt "
                             "needs at least one token.")
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"prompt {i} holds {ids.dtype} values; token ids are integers.")
        bad = ids[(ids < 0) | (ids >= cfg.vocab_size)]
        if bad.size:
            raise ValueError(f"prompt {i} holds token id {int(bad[0])}, outside the vocabulary "
                             f"[0, {cfg.vocab_size}); was it encoded with this model's tokenizer?")
        if ids.size + max_new_tokens > cfg.max_seq_len:
            raise ValueError(f"prompt {i} has {ids.size} tokens; with max_new_tokens="
                             f"{max_new_tokens} that exceeds the model's context (max_seq_len="
                             f"{cfg.max_seq_len}). Shorten the prompt or ask for fewer tokens.")
        out.append([int(t) for t in ids])
    return out


def generate_tokens(cfg: ModelConfig, params, prompts, *, max_new_tokens: int,
                    sampling: Sampling = Sampling(), speculative: bool = False, seed: int = 0,
                    stop_tokens: Sequence[int] = (), chunk: int = 16,
                    on_tokens: Callable[[int, list[int]], None] | None = None) -> GenerationResult:
    """Generates for a batch of prompts; see `generate`. The device runs `chunk` steps between host
    visits; `on_tokens(row, new_tokens)` is called after each (for streaming)."""
    prompts = check_prompts(cfg, prompts, max_new_tokens)
    if speculative and not cfg.mtp_depth:
        raise ValueError("speculative=True needs an MTP module, but this model has mtp_depth=0; "
                         "generate without speculation or use a checkpoint trained with MTP.")
    prefill, run_chunk = _programs(cfg, sampling, speculative, chunk)
    b = len(prompts)
    lengths = np.array([len(p) for p in prompts], np.int32)
    padded_len = _bucket(int(lengths.max()), cfg.max_seq_len)
    slots = max(padded_len, _bucket(int(lengths.max()) + max_new_tokens + 1, cfg.max_seq_len))
    tokens = np.zeros((b, padded_len), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    stop = np.array(sorted(set(int(t) for t in stop_tokens)) or [-1], np.int32)
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
    """Continues each prompt (a list of token ids) by up to `max_new_tokens` tokens.

    Greedy when temperature is 0, else sampled (temperature, then top_k, then top_p), seeded by
    `seed`. Generation of a prompt stops after a token in `stop_tokens` (which is kept). With
    `speculative`, the MTP module drafts a token per step that the main model verifies; the output
    is distributed exactly as without it (identical tokens when greedy).
    Returns prompt + generated tokens for every prompt.
    """
    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p)
    return generate_tokens(cfg, params, prompts, max_new_tokens=max_new_tokens, sampling=sampling,
                           speculative=speculative, seed=seed, stop_tokens=stop_tokens).tokens
