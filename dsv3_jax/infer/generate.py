"""Generation over the latent KV cache, with optional MTP speculative decoding.

Legend: B batch (prompts), P padded prompt length, S cache slots, L layers, V vocabulary.

The cache is preallocated: per layer [B, S, kv_lora_rank + qk_rope_head_dim] (576 values per token
at DeepSeek-V3 size) in the compute dtype, and slot s always holds the token at position s. Prompts
of different lengths are right-padded: row b's prompt sits at positions 0..len_b-1, padding slots
are overwritten by that row's own generated tokens before any query can see them (a query at
position p sees slots 0..p, and each step writes before it attends). The same property makes
"rolling back" a rejected draft free: the next step writes the corrected token into its slot.

Plain decoding: prefill the prompts (one jitted call), then one jitted step per token.
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


@functools.lru_cache(maxsize=32)
def _programs(cfg: ModelConfig, s: Sampling):
    """The jitted prefill and step functions for one model config and sampling setting."""
    model = DeepSeekV3(cfg)

    def main(params, tokens, positions, cache):
        return model.apply({"params": params}, tokens, positions, cache, method=DeepSeekV3.decode)

    def mtp(params, hidden, next_tokens, positions, cache):
        return model.apply({"params": params}, hidden, next_tokens, positions, cache,
                           method=DeepSeekV3.mtp_decode)

    def draft_from(mtp_logits, key):
        logq = None if s.greedy else sampling_lib.log_probs(mtp_logits, s)
        return sampling_lib.sample(mtp_logits, key, s), logq

    def prefill(params, tokens, lengths, cache, key):
        """tokens [B, P] (right-padded), lengths [B] -> (first new token [B], hidden, cache)."""
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        logits, hidden, cache = main(params, tokens, positions, cache)
        rows = jnp.arange(tokens.shape[0])
        first = sampling_lib.sample(logits[rows, lengths - 1], key, s)
        return first, hidden, cache

    def prefill_speculative(params, tokens, lengths, cache, mtp_cache, key):
        """Also fills the MTP cache over the prompt and drafts the token after the first one."""
        k1, k2 = jax.random.split(key)
        first, hidden, cache = prefill(params, tokens, lengths, cache, k1)
        rows = jnp.arange(tokens.shape[0])
        next_tokens = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1))).at[rows, lengths - 1].set(first)
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        mtp_logits, mtp_cache = mtp(params, hidden, next_tokens, positions, mtp_cache)
        draft, logq = draft_from(mtp_logits[rows, lengths - 1], k2)
        return first, draft, logq, cache, mtp_cache

    def step(params, last, cur, cache, key):
        """last [B] at positions cur [B] -> (next token [B], cache)."""
        logits, _, cache = main(params, last[:, None], cur[:, None], cache)
        return sampling_lib.sample(logits[:, 0], key, s), cache

    def step_speculative(params, last, draft, logq, cur, done, cache, mtp_cache, key):
        k_accept, k_bonus, k_draft = jax.random.split(key, 3)
        positions = jnp.stack([cur, cur + 1], axis=1)
        logits, hidden, cache = main(params, jnp.stack([last, draft], axis=1), positions, cache)
        accepted, first = sampling_lib.accept_draft(logits[:, 0], draft, logq, k_accept, s)
        bonus = sampling_lib.sample(logits[:, 1], k_bonus, s)
        mtp_logits, mtp_cache = mtp(params, hidden, jnp.stack([first, bonus], axis=1), positions,
                                    mtp_cache)
        rows = jnp.arange(last.shape[0])
        new_draft, new_logq = draft_from(mtp_logits[rows, accepted.astype(jnp.int32)], k_draft)
        new_last = jnp.where(accepted, bonus, first)
        new_cur = jnp.where(done, cur, cur + 1 + accepted.astype(jnp.int32))
        keep = lambda new, old: jnp.where(done.reshape(done.shape + (1,) * (new.ndim - 1)), old, new)
        new_logq = None if s.greedy else keep(new_logq, logq)
        return (first, bonus, accepted, keep(new_last, last), keep(new_draft, draft), new_logq,
                new_cur, cache, mtp_cache)

    return dict(prefill=jax.jit(prefill, donate_argnums=3),
                prefill_speculative=jax.jit(prefill_speculative, donate_argnums=(3, 4)),
                step=jax.jit(step, donate_argnums=3),
                step_speculative=jax.jit(step_speculative, donate_argnums=(6, 7)))


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
                    stop_tokens: Sequence[int] = (),
                    on_tokens: Callable[[int, list[int]], None] | None = None) -> GenerationResult:
    """Generates for a batch of prompts; see `generate`. `on_tokens(row, new_tokens)` is called as
    tokens are produced (for streaming)."""
    prompts = check_prompts(cfg, prompts, max_new_tokens)
    if speculative and not cfg.mtp_depth:
        raise ValueError("speculative=True needs an MTP module, but this model has mtp_depth=0; "
                         "generate without speculation or use a checkpoint trained with MTP.")
    programs = _programs(cfg, sampling)
    stop = set(int(t) for t in stop_tokens)
    b = len(prompts)
    lengths = np.array([len(p) for p in prompts], np.int32)
    padded_len = _bucket(int(lengths.max()), cfg.max_seq_len)
    slots = _bucket(int(lengths.max()) + max_new_tokens + 1, cfg.max_seq_len)
    slots = max(slots, padded_len)
    tokens = np.zeros((b, padded_len), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    cache = init_latent_cache(cfg, b, slots)
    key = jax.random.key(seed)
    out = [list(p) for p in prompts]
    done = np.zeros(b, bool)
    n_new = np.zeros(b, np.int64)

    def emit(row: int, new: list[int]) -> None:
        kept = []
        for t in new:
            if done[row]:
                break
            kept.append(t)
            n_new[row] += 1
            done[row] = t in stop or n_new[row] >= max_new_tokens
        out[row].extend(kept)
        if kept and on_tokens is not None:
            on_tokens(row, kept)

    t0 = time.perf_counter()
    if speculative:
        mtp_cache = init_mtp_cache(cfg, b, slots)
        last, draft, logq, cache, mtp_cache = programs["prefill_speculative"](
            params, jnp.asarray(tokens), jnp.asarray(lengths), cache, mtp_cache,
            jax.random.fold_in(key, 0))
    else:
        last, _, cache = programs["prefill"](params, jnp.asarray(tokens), jnp.asarray(lengths),
                                             cache, jax.random.fold_in(key, 0))
    last_host = np.asarray(last)
    t1 = time.perf_counter()
    for row in range(b):
        emit(row, [int(last_host[row])])
    cur = jnp.asarray(lengths)  # position of `last`
    steps, drafted, accepted_total = 0, 0, 0
    while not done.all():
        steps += 1
        step_key = jax.random.fold_in(key, steps)
        if speculative:
            active = ~done
            first, bonus, accepted, last, draft, logq, cur, cache, mtp_cache = programs[
                "step_speculative"](params, last, draft, logq, cur, jnp.asarray(done), cache,
                                    mtp_cache, step_key)
            first, bonus, accepted = map(np.asarray, (first, bonus, accepted))
            drafted += int(active.sum())
            accepted_total += int((accepted & active).sum())
            for row in np.flatnonzero(active):
                emit(row, [int(first[row]), int(bonus[row])] if accepted[row] else [int(first[row])])
        else:
            last, cache = programs["step"](params, last, cur, cache, step_key)
            cur = cur + 1
            last_host = np.asarray(last)
            for row in np.flatnonzero(~done):
                emit(row, [int(last_host[row])])
    t2 = time.perf_counter()
    new_tokens = int(n_new.sum())
    stats = {"prefill_seconds": t1 - t0, "decode_seconds": t2 - t1, "new_tokens": new_tokens,
             "steps": steps, "ms_per_step": 1e3 * (t2 - t1) / max(steps, 1),
             "tokens_per_sec": (new_tokens - b) / (t2 - t1) if steps else 0.0}
    if speculative:
        stats["acceptance_rate"] = accepted_total / max(drafted, 1)
    return GenerationResult(tokens=out, stats=stats)


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
