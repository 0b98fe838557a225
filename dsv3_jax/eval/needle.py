"""Needle in a haystack: does the model find one fact planted anywhere in a long context?

The test of the DeepSeek-V3 report's Figure 8, at the token level. One case, for a context length
`length` (tokens) and a depth d in [0, 1]:

    prompt = filler[:k] + needle + filler[k:n] + question,
    n = length - len(needle) - len(question),   k = round(d * n)  (halves up)

so the prompt is exactly `length` tokens and the needle starts at token k: d = 0 puts it first,
d = 1 right before the question. The model then has to produce the answer.

Needle. The default models are trained on Python source, so the needle is code-shaped and a small
model can retrieve it by copying: `"\\n{key} = {value}\\n"`, key `needle_` + 5 random lowercase
letters, value a random 6-digit number; the question is `"\\n{key} = "` and the answer `"{value}"`
(with split_digits, one token per digit). Every (length, depth, trial) cell draws its own key and
value from (seed, length, depth, trial), so a cell's needle does not depend on the rest of the grid.

Haystack. The documents of the corpus's validation split (text the model did not train on), each
encoded and followed by eos as the training stream has them, make one filler stream of
trials * max(lengths) tokens (reading stops there). Trial t takes its haystacks from block t of the
stream, tokens [t * M, (t + 1) * M) with M = max(lengths), starting at an offset within the block
drawn from (seed, length, trial): the trials never share text, and every depth of one
(length, trial) has the same haystack, so depths differ only in where the needle is.

Scores, per cell:
  exact        1.0 when greedy generation (over the latent KV cache) of len(answer) + 1 tokens,
               decoded and stripped of leading whitespace, starts with the value (`is_retrieved`);
  logprob      sum_j log p(answer_j | prompt, answer_<j) under teacher forcing (`answer_logprob`);
  answer_prob  exp(logprob / len(answer)), the per-token geometric mean in [0, 1]: the smooth
               score, informative where a small model is not yet exact.
A prompt of `length` tokens needs length + len(answer) + 1 <= ModelConfig.max_seq_len positions.

Legend (the package's, `dsv3_jax/NOTATION.md`): B batch (cases), T positions, D model dim,
V vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import string
import sys
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import ModelConfig
from dsv3_jax.data.corpus import Corpus
from dsv3_jax.model.transformer import DeepSeekV3

SPLIT = "validation"
KEY_PREFIX, KEY_LETTERS, VALUE_DIGITS = "needle_", 5, 6
EXTRA_NEW_TOKENS = 1  # generated beyond the answer's length (room for a leading space)
_CELL, _OFFSET = 0, 1  # the streams of random draws: a cell's needle, a (length, trial)'s offset


class NeedleError(ValueError):
    """An evaluation that cannot be run as asked; the message names the value and the fix.
    `setting` names the argument at fault (lengths, depths, trials, batch_size, seed) or is
    None (the corpus, the tokenizer)."""

    def __init__(self, message: str, setting: str | None = None):
        super().__init__(message)
        self.setting = setting


@dataclasses.dataclass(frozen=True)
class Needle:
    """One planted fact, as text and as the token ids the prompt is built from."""

    key: str
    value: str
    needle_ids: tuple[int, ...]  # "\n{key} = {value}\n"
    question_ids: tuple[int, ...]  # "\n{key} = "
    answer_ids: tuple[int, ...]  # "{value}", as it is tokenized after the question


def _rng(seed: int, *words: int) -> np.random.Generator:
    """A generator that depends only on `seed` (any int) and `words`."""
    return np.random.default_rng([seed % 2**64, *words])


def _depth_word(depth: float) -> int:
    return int(round(depth * 1e9))


def draw_needle(tokenizer, rng: np.random.Generator) -> Needle:
    """A random key and value (see the module docstring), tokenized with `tokenizer`.

    The answer's ids are the tail of encode(question + value) when that starts with the
    question's own ids (true when the tokenizer splits digits), else encode(value)."""
    key = KEY_PREFIX + "".join(rng.choice(list(string.ascii_lowercase), KEY_LETTERS))
    value = str(int(rng.integers(10 ** (VALUE_DIGITS - 1), 10**VALUE_DIGITS)))
    question = list(tokenizer.encode(f"\n{key} = "))
    joint = list(tokenizer.encode(f"\n{key} = {value}"))
    answer = joint[len(question):] if joint[:len(question)] == question else None
    return Needle(key, value, tuple(tokenizer.encode(f"\n{key} = {value}\n")), tuple(question),
                  tuple(answer or tokenizer.encode(value)))


def build_case(filler_ids: Sequence[int], needle_ids: Sequence[int],
               question_ids: Sequence[int], length: int, depth: float) -> tuple[list[int], int]:
    """(prompt_ids, needle_start): the needle at `depth` of filler_ids[:n], then the question.

    n = length - len(needle_ids) - len(question_ids) filler tokens are used, so
    len(prompt_ids) == length; the needle starts at k = round(depth * n) (halves up), after
    filler[:k] and before filler[k:n]. Raises NeedleError for a depth outside [0, 1], a length
    that leaves no filler token, or a filler shorter than n."""
    check_depths([depth])
    n = length - len(needle_ids) - len(question_ids)
    if n < 1:
        raise NeedleError(
            f"length={length} leaves no room for a haystack: the needle and the question take "
            f"{len(needle_ids) + len(question_ids)} tokens; use a length of at least "
            f"{len(needle_ids) + len(question_ids) + 1}.")
    if len(filler_ids) < n:
        raise NeedleError(f"the filler has {len(filler_ids)} tokens but length={length} needs "
                          f"{n}; pass a longer filler.")
    k = math.floor(depth * n + 0.5)
    filler = list(filler_ids[:n])
    return filler[:k] + list(needle_ids) + filler[k:] + list(question_ids), k


def is_retrieved(generated_text: str, value: str) -> bool:
    """The exact-retrieval rule: the generated text, less leading whitespace, starts with value."""
    return bool(value) and generated_text.lstrip().startswith(value)


def answer_logprob(logits, answer_ids, first: int) -> jax.Array:
    """log p(answer_ids[j]) under logits[first + j], per answer token, float32.

    logits [T, V] with answer_ids [n] -> [n], or [B, T, V] with answer_ids [B, n] -> [B, n]; the
    row at position first + j holds the scores of the token after position first + j, so for a
    prompt of `length` tokens followed by the answer, first = length - 1. A numpy or jax array
    (also inside jit); log-softmax in float32."""
    logits = jnp.asarray(logits)
    ids = jnp.asarray(answer_ids, jnp.int32)
    if logits.ndim - 1 != ids.ndim or logits.shape[:-2] != ids.shape[:-1]:
        raise ValueError(f"logits of shape {logits.shape} and answer_ids of shape {ids.shape} do "
                         "not go together: give logits [T, V] with ids [n], or [B, T, V] with "
                         "ids [B, n].")
    n = ids.shape[-1]
    if not 0 <= first or first + n > logits.shape[-2]:
        raise ValueError(f"first={first} with {n} answer tokens reaches position {first + n - 1}, "
                         f"outside the logits' {logits.shape[-2]} positions; the logits must "
                         "cover the answer.")
    rows = jax.nn.log_softmax(logits[..., first:first + n, :].astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(rows, ids[..., None], axis=-1)[..., 0]


# ------------------------------------------------------------------------- checking the grid

def check_lengths(lengths: Iterable) -> list[int]:
    lengths = list(lengths)
    if not lengths:
        raise NeedleError("lengths is empty; give one or more context lengths in tokens, "
                          "e.g. 256,512,1024.", "lengths")
    for value in lengths:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise NeedleError(f"lengths: {value!r} is not a positive integer (a context length in "
                              "tokens); e.g. 256,512,1024.", "lengths")
    _check_unique("lengths", lengths)
    return [int(v) for v in lengths]


def check_depths(depths: Iterable) -> list[float]:
    depths = list(depths)
    if not depths:
        raise NeedleError("depths is empty; give one or more fractions in [0, 1], "
                          "e.g. 0,0.25,0.5,0.75,1.", "depths")
    for value in depths:
        number = isinstance(value, (int, float, np.integer, np.floating))
        if isinstance(value, bool) or not number or not 0.0 <= value <= 1.0:
            raise NeedleError(f"depths: {value!r} is not a fraction in [0, 1] (0 puts the needle "
                              "at the start of the context, 1 right before the question); "
                              "e.g. 0,0.25,0.5,0.75,1.", "depths")
    _check_unique("depths", depths)
    return [float(v) for v in depths]


def _check_unique(name: str, values: list) -> None:
    for i, value in enumerate(values):
        if value in values[:i]:
            raise NeedleError(f"{name}: {value!r} is given twice; give each once.", name)


def _check_count(name: str, value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise NeedleError(f"{name}={value!r} must be an integer >= 1 ({what}).", name)
    return int(value)


def check_settings(*, lengths, depths, trials, batch_size, seed):
    """(lengths, depths, trials, batch_size, seed) as ints and floats, or the NeedleError naming
    the first one that cannot be used (what can be checked without a model or a tokenizer)."""
    trials = _check_count("trials", trials, "haystacks per length and depth")
    batch_size = _check_count("batch_size", batch_size, "cases per model call")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise NeedleError(f"seed={seed!r} must be an integer (it draws the needles and the "
                          "haystack offsets).", "seed")
    return check_lengths(lengths), check_depths(depths), trials, batch_size, int(seed)


def check_fits(cfg: ModelConfig, lengths: Sequence[int], needles: dict) -> None:
    """Refuses a length too short for its needles and question, or too long for the model."""
    for length in dict.fromkeys(lengths):
        cells = [nd for (l, _, _), nd in needles.items() if l == length]
        overhead = max(len(nd.needle_ids) + len(nd.question_ids) for nd in cells)
        if length <= overhead:
            raise NeedleError(
                f"lengths: {length} is too short to hold the needle and the question (up to "
                f"{overhead} tokens with this tokenizer) and a haystack; use lengths of at least "
                f"{overhead + 1}, e.g. {max(64, 1 << overhead.bit_length())}.", "lengths")
        need = length + max(len(nd.answer_ids) for nd in cells) + EXTRA_NEW_TOKENS
        if need > cfg.max_seq_len:
            raise NeedleError(
                f"lengths: {length} needs {need} positions (the prompt, the answer and "
                f"{EXTRA_NEW_TOKENS} more generated token), more than the model's "
                f"max_seq_len={cfg.max_seq_len}; use lengths <= "
                f"{cfg.max_seq_len - need + length}, or raise max_seq_len with a context "
                "extension run (YaRN) first (the CLI's --max_seq_len evaluates past it).",
                "lengths")


# ------------------------------------------------------------------------------ the haystack

def filler_stream(corpus: Corpus, tokenizer, n_tokens: int) -> np.ndarray:
    """The first n_tokens int32 tokens of the corpus's validation documents, each encoded and
    followed by eos; reading stops once there are enough. NeedleError when the split holds
    fewer."""
    pieces, have = [], 0
    for text in corpus.documents(SPLIT):
        ids = list(tokenizer.encode(text)) + [tokenizer.eos_id]
        pieces.append(np.asarray(ids, np.int32))
        have += len(ids)
        if have >= n_tokens:
            return np.concatenate(pieces)[:n_tokens]
    raise NeedleError(
        f"the validation split of {corpus.describe()} holds only {have} tokens, but the "
        f"haystacks need {n_tokens} (trials x the longest length); use fewer trials or shorter "
        "lengths, or a corpus with more text.")


def haystack_offsets(seed: int, lengths: Sequence[int], trials: int) -> dict:
    """(length, trial) -> where its haystack starts in the filler stream (module docstring)."""
    block = max(lengths)
    jitter = lambda length, t: int(_rng(seed, _OFFSET, length, t).integers(block - length + 1))
    return {(length, t): t * block + jitter(length, t) for length in lengths for t in range(trials)}


def draw_needles(tokenizer, lengths: Sequence[int], depths: Sequence[float], trials: int,
                 seed: int) -> dict[tuple[int, float, int], Needle]:
    """(length, depth, trial) -> its needle, drawn from (seed, length, depth, trial) alone."""
    return {(l, d, t): draw_needle(tokenizer, _rng(seed, _CELL, l, _depth_word(d), t))
            for l in lengths for d in depths for t in range(trials)}


def plan_cases(needles: dict[tuple[int, float, int], Needle], filler: Sequence[int],
               seed: int) -> dict[tuple[int, float, int], dict]:
    """(length, depth, trial) -> the case: its cell, needle_start, key, value, prompt_ids and
    answer_ids, with the haystacks laid out as the module docstring says. `filler` needs
    trials * max(lengths) tokens."""
    lengths = list(dict.fromkeys(l for l, _, _ in needles))
    trials = 1 + max(t for _, _, t in needles)
    if len(filler) < trials * max(lengths):
        raise NeedleError(f"filler has {len(filler)} tokens; the haystacks need "
                          f"{trials * max(lengths)} (trials x the longest length): pass a longer "
                          "one.")
    filler = np.asarray(filler, np.int32)
    offsets = haystack_offsets(seed, lengths, trials)
    cases = {}
    for (length, depth, trial), nd in needles.items():
        prompt, start = build_case(filler[offsets[length, trial]:], nd.needle_ids,
                                   nd.question_ids, length, depth)
        cases[length, depth, trial] = dict(
            length=length, depth=depth, trial=trial, needle_start=start, key=nd.key,
            value=nd.value, prompt_ids=[int(i) for i in prompt], answer_ids=list(nd.answer_ids))
    return cases


# ------------------------------------------------------------------------------ scoring

@functools.partial(jax.jit, static_argnames="cfg")
def score_answers(cfg: ModelConfig, params, tokens, answer_ids):
    """log p of each answer token under teacher forcing, float32 [B, n].

    tokens int [B, T] are each prompt followed by its answer less the last token (padded at the
    end to a common answer length n), answer_ids int [B, n]; answer token j is scored by the
    logits at position T - n + j. The head runs at those n positions only: no [B, T, V] logits."""
    model = DeepSeekV3(cfg)
    out = model.apply({"params": params}, tokens, with_mtp=False, with_logits=False,
                      method=DeepSeekV3.forward)
    first = tokens.shape[1] - answer_ids.shape[1]
    logits = model.apply({"params": params}, out.head_input[:, first:],
                         method=lambda m, h: m.head(h))  # [B, n, V] float32
    return answer_logprob(logits, answer_ids, 0)


def _batches(items: list, batch_size: int):
    """items in chunks of batch_size (at most len(items)); the last is padded with copies of its
    last item, so every chunk has one shape. Yields (chunk, how many are real)."""
    size = min(batch_size, len(items))
    for i in range(0, len(items), size):
        chunk = items[i:i + size]
        yield chunk + [chunk[-1]] * (size - len(chunk)), len(chunk)


def _score_length(cfg, params, tokenizer, cases: list[dict], batch_size: int, bar) -> None:
    """Fills in generated / exact / logprob / answer_prob of the cases of one length."""
    from dsv3_jax.infer.generate import generate_tokens

    n_answer = max(len(c["answer_ids"]) for c in cases)
    for chunk, real in _batches(cases, batch_size):
        prompts = [c["prompt_ids"] for c in chunk]
        result = generate_tokens(cfg, params, prompts, max_new_tokens=n_answer + EXTRA_NEW_TOKENS,
                                 stop_tokens=(tokenizer.eos_id,))
        answers = np.zeros((len(chunk), n_answer), np.int32)
        mask = np.zeros((len(chunk), n_answer), bool)
        for i, c in enumerate(chunk):
            answers[i, :len(c["answer_ids"])] = c["answer_ids"]
            mask[i, :len(c["answer_ids"])] = True
        tokens = np.concatenate([np.asarray(prompts, np.int32), answers[:, :-1]], axis=1)
        logp = np.asarray(score_answers(cfg, params, jnp.asarray(tokens), jnp.asarray(answers)),
                          np.float64)
        for i, c in enumerate(chunk[:real]):
            text = tokenizer.decode(result.tokens[i][len(prompts[i]):])
            total = float(logp[i][mask[i]].sum())
            c.update(generated=text, exact=float(is_retrieved(text, c["value"])), logprob=total,
                     answer_prob=math.exp(total / int(mask[i].sum())))
        bar.update(real)


# ------------------------------------------------------------------------------ the run

def run_needle(cfg: ModelConfig, params, tokenizer, *, lengths: Sequence[int],
               depths: Sequence[float], trials: int = 4, corpus: Corpus | None = None,
               filler: Sequence[int] | None = None, seed: int = 0, batch_size: int = 8,
               checkpoint: str | None = None, progress: bool = True) -> dict:
    """The needle evaluation over lengths x depths x trials; returns the results (needle.json).

    The haystack comes from `corpus`'s validation split, or from `filler` (token ids, at least
    trials * max(lengths) of them) when given; exactly one of the two. `tokenizer` encodes the
    needles and decodes the generations (encode, decode, eos_id, path). `checkpoint` is only
    recorded. Everything checkable is checked before the corpus is read or anything compiles.

    Returns {checkpoint, tokenizer, corpus, split, seed, lengths, depths, trials, model:
    {max_seq_len, original_seq_len, rope_factor, use_yarn}, exact, answer_prob, logprob
    (each [len(lengths)][len(depths)], the mean over trials), cells: [{length, depth, trial,
    needle_start, key, value, generated, exact, logprob, answer_prob}]}.
    """
    from tqdm import tqdm

    lengths, depths, trials, batch_size, seed = check_settings(
        lengths=lengths, depths=depths, trials=trials, batch_size=batch_size, seed=seed)
    if (corpus is None) == (filler is None):
        raise NeedleError("give the haystack as exactly one of corpus= (a Corpus, whose "
                          "validation split is read) or filler= (token ids).")
    if tokenizer.vocab_size > cfg.vocab_size:
        raise NeedleError(f"the tokenizer {tokenizer.path} has {tokenizer.vocab_size} pieces but "
                          f"the model only {cfg.vocab_size}; use the tokenizer the model was "
                          "trained with.")
    needles = draw_needles(tokenizer, lengths, depths, trials, seed)
    check_fits(cfg, lengths, needles)
    if corpus is not None:
        filler = filler_stream(corpus, tokenizer, trials * max(lengths))
    cases = plan_cases(needles, filler, seed)

    interactive = sys.stderr.isatty()  # a log file gets a line every 30 s, not every 0.1 s
    with tqdm(total=len(cases), desc="needle", unit="case", disable=not progress,
              mininterval=0.1 if interactive else 30.0) as bar:
        for length in dict.fromkeys(lengths):
            _score_length(cfg, params, tokenizer, [c for c in cases.values()
                                                   if c["length"] == length], batch_size, bar)

    def matrix(score: str) -> list[list[float]]:
        return [[float(np.mean([cases[l, d, t][score] for t in range(trials)])) for d in depths]
                for l in lengths]

    cells = [{k: v for k, v in c.items() if k not in ("prompt_ids", "answer_ids")}
             for c in cases.values()]
    return {
        "checkpoint": checkpoint, "tokenizer": getattr(tokenizer, "path", None),
        "corpus": corpus.name if corpus is not None else None, "split": SPLIT, "seed": seed,
        "lengths": lengths, "depths": depths, "trials": trials,
        "model": {"max_seq_len": cfg.max_seq_len, "original_seq_len": cfg.original_seq_len,
                  "rope_factor": cfg.rope_factor, "use_yarn": cfg.use_yarn},
        "exact": matrix("exact"), "answer_prob": matrix("answer_prob"),
        "logprob": matrix("logprob"), "cells": cells,
    }
