"""Supervised fine-tuning data (config.data.task = "sft"): conversations, packed into sequences.

prepare_sft_data(data_cfg, workdir, model_vocab_size) runs once per run (again, cheaply, on
restart) and returns the pipeline's Data, each split a ConversationStore:

    1. the tokenizer, found as pre-training finds it (data.tokenizer, else the workdir's: a run
       started from weights copies its source's there, else one trained on the training
       conversations' text), and checked to hold every chat marker as one id;
    2. the conversations of each split: data.corpus = "builtin" gives the standard library's
       documented functions ("write the body of this function" -> its real body,
       conversations.iter_builtin_conversations; a file is in the split pre-training's built-in
       corpus puts it in); any other corpus is JSONL files of {"messages": [...]} records, a
       record in validation iff corpus.unit_hash("<file key>:<0-based line>") <
       data.validation_fraction (the pre-training rule for JSONL documents). Bad records are
       skipped and counted by reason (conversations.REASONS), never trained on;
    3. each conversation encoded with its loss mask (conversations.encode_conversation: True on
       each answer and the EOS closing it); conversations longer than data.seq_len are skipped
       and counted ("too_long"), never cut;
    4. packed: conversations (longest first, each into the fullest sequence it still fits,
       best-fit decreasing) into sequences of data.seq_len tokens, padded at the end:

           tokens       the conversations' ids back to back, then the pad (eos) id
           segment_ids  1, 2, ... per conversation, 0 on padding: attention masked by segment
                        never crosses conversations, and the loss never predicts across them
           positions    restarting at 0 with each conversation
           loss_mask    1 on the tokens the loss predicts (the answers), 0 elsewhere

    The packed arrays of a split are written once under <workdir>/sft/<split>/ with a fingerprint
    of what they depend on (corpus files with sizes and mtimes, split rule, tokenizer hash,
    seq_len, the encoding's version) and the counts; a store whose fingerprint matches is reused.

The iterator over the training split is the pre-training pipeline's (train_iterator: a shuffle
of the packed sequences per epoch, resumable), so the loop, its metrics and its checkpoints are
the same; batches carry 'loss_mask' besides 'tokens', 'segment_ids' and 'positions'.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import time
from collections.abc import Iterator

import numpy as np
from absl import logging

from dsv3_jax.data import conversations as conv
from dsv3_jax.data import pipeline
from dsv3_jax.data.pipeline import FINGERPRINT_FILE, segment_positions
from dsv3_jax.data.corpus import SPLITS, Corpus, DataError, open_corpus
from dsv3_jax.data.tokenizer import Tokenizer
from dsv3_jax.files import atomic_dir

STORE_FORMAT = "dsv3_jax.sft_store/1"
# The conversations' encoding: bump when the template, the built-in conversations or the loss
# mask change, so stores built before are rebuilt.
ENCODING_VERSION = 1
STORE_DIR = "sft"
_ARRAYS = ("tokens", "segment_ids", "loss_mask")


class ConversationStore:
    """One packed split on disk (under `path`): int arrays [num_sequences, seq_len] tokens,
    segment_ids (0 = padding) and loss_mask (0/1), memory-mapped; `counts` says what went in
    (conversations kept, skipped by reason, too long) and `seq_len` the length it was packed for.
    The interface the pipeline reads is TokenStore's: num_sequences, sequence, tokens_sha1."""

    def __init__(self, path: str):
        self.path = path
        with open(os.path.join(path, FINGERPRINT_FILE), encoding="utf-8") as f:
            info = json.load(f)
        self.tokens_sha1: str = info["tokens_sha1"]
        self.counts: dict = info["counts"]
        self.seq_len: int = info["inputs"]["seq_len"]
        self._arrays = {k: np.load(os.path.join(path, f"{k}.npy"), mmap_mode="r")
                        for k in _ARRAYS}
        self.num_documents: int = int(self.counts["kept"])  # conversations
        self.num_tokens: int = int(info["num_tokens"])  # conversation tokens, padding excluded
        self.num_loss_tokens: int = int(info["num_loss_tokens"])

    def num_sequences(self, seq_len: int) -> int:
        if seq_len != self.seq_len:
            raise DataError(f"the conversation store {self.path} was packed for data.seq_len="
                            f"{self.seq_len}, not {seq_len}; prepare the data again.")
        return int(self._arrays["tokens"].shape[0])

    def sequence(self, index: int, seq_len: int) -> dict[str, np.ndarray]:
        """Packed sequence `index`: int32 [seq_len] 'tokens', 'segment_ids', 'positions' and
        'loss_mask' (the module docstring's)."""
        n = self.num_sequences(seq_len)
        if not 0 <= index < n:
            raise IndexError(f"sequence {index} outside [0, {n})")
        row = {k: np.asarray(a[index], np.int32) for k, a in self._arrays.items()}
        row["positions"] = segment_positions(row["segment_ids"])
        return row

    def __getstate__(self):  # picklable for grain worker processes: reopened from the path
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])

    def __repr__(self) -> str:
        return (f"ConversationStore({self.path!r}, seq_len={self.seq_len}, "
                f"num_documents={self.num_documents}, num_tokens={self.num_tokens})")


def pack(examples: list[tuple[np.ndarray, np.ndarray]], seq_len: int,
         pad_id: int) -> dict[str, np.ndarray]:
    """Best-fit decreasing packing of (ids [T_i], loss_mask [T_i]) examples (each T_i <= seq_len)
    into rows of seq_len: {'tokens', 'segment_ids', 'loss_mask'} int32 [N, seq_len] (the module
    docstring's layout). Deterministic: ties keep the examples' order."""
    if any(len(ids) > seq_len or len(ids) == 0 for ids, _ in examples):
        raise ValueError(f"every example must hold 1 to seq_len={seq_len} tokens.")
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i][0]))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row), sorted: the fullest row that fits first
    for i in order:
        need = len(examples[i][0])
        at = bisect.bisect_left(free, (need, -1))
        if at < len(free):
            room, row = free.pop(at)
        else:
            room, row = seq_len, len(rows)
            rows.append([])
        rows[row].append(i)
        if room - need:
            bisect.insort(free, (room - need, row))
    tokens = np.full((len(rows), seq_len), pad_id, np.int32)
    segment_ids = np.zeros((len(rows), seq_len), np.int32)
    loss_mask = np.zeros((len(rows), seq_len), np.int32)
    for r, members in enumerate(rows):
        start = 0
        for segment, i in enumerate(members, 1):
            ids, mask = examples[i]
            stop = start + len(ids)
            tokens[r, start:stop], loss_mask[r, start:stop] = ids, mask
            segment_ids[r, start:stop] = segment
            start = stop
    return {"tokens": tokens, "segment_ids": segment_ids, "loss_mask": loss_mask}


# ---- prepare_sft_data --------------------------------------------------------------------------

def open_conversations(data_cfg) -> Corpus:
    """The corpus of data_cfg, checked to be conversations: the built-in ones or JSONL files
    (listed, none read). DataError naming a file read in another format."""
    corpus = open_corpus(data_cfg)
    if not corpus.builtin and (bad := [f for f in corpus.files if f.format != "jsonl"]):
        raise DataError(f"data.task='sft' reads JSONL conversations ({{\"messages\": [{{\"role\":"
                        f" ..., \"content\": ...}}, ...]}} per line), but {bad[0].path} is read as "
                        f"{bad[0].format}; give .jsonl files (or data.format='jsonl'), or "
                        f"data.corpus='builtin' for the built-in conversations.")
    return corpus


def prepare_sft_data(data_cfg, workdir: str, *, model_vocab_size: int):
    """The pipeline's Data for supervised fine-tuning: the tokenizer and both splits as
    ConversationStores under `workdir`, built or reused (the module docstring). DataError for a
    tokenizer without the chat markers, a corpus that is not JSONL conversations, or a training
    split left with no conversation."""
    corpus = open_conversations(data_cfg)
    logging.info("data: conversations of %s, validation_fraction=%s", corpus.describe(),
                 corpus.validation_fraction)
    tokenizer = pipeline.get_tokenizer(
        data_cfg, workdir, model_vocab_size,
        lambda budget: _tokenizer_sample(corpus, budget))
    try:
        conv.check_chat_tokenizer(tokenizer)
    except DataError as e:
        # A retrained tokenizer would not match the weights: the model must be pre-trained again.
        raise DataError(f"supervised fine-tuning needs the chat markers as single tokens: {e} "
                        f"For a run started from weights (config.train.init_from), the weights "
                        f"belong to that tokenizer: pre-train them again with a tokenizer trained "
                        f"by this version (it reserves the markers).") from None
    reasoning = data_cfg.get("sft_reasoning", "drop")
    stores = {split: _get_store(corpus, tokenizer, split, data_cfg.seq_len,
                                os.path.join(workdir, STORE_DIR, split), reasoning)
              for split in SPLITS}
    if stores["train"].num_documents == 0:
        raise DataError(f"no training conversation is left from {corpus.describe()}: "
                        f"{_describe_counts(stores['train'].counts, data_cfg.seq_len)}; fix the "
                        f"records, or raise data.seq_len.")
    return pipeline.Data(tokenizer, stores["train"], stores["validation"])


def conversations_of(corpus: Corpus, split: str) -> tuple[Iterator[conv.Conversation], dict]:
    """(the conversations of `split`, lazily; a dict counting the skipped JSONL records by reason,
    conversations.REASONS, filled as they are read)."""
    counts = dict.fromkeys(conv.REASONS, 0)

    def records():
        if corpus.builtin:
            for _, _, conversation in conv.iter_builtin_conversations(
                    split, validation_fraction=corpus.validation_fraction):
                yield conversation
            return
        for file in corpus.files:
            for line_number, messages, reason in conv.iter_records(file.path):
                if not corpus.in_split(f"{file.key}:{line_number - 1}", split):
                    continue
                if reason is None:
                    yield messages
                else:
                    counts[reason] += 1

    return records(), counts


def _tokenizer_sample(corpus: Corpus, budget: int) -> list[str]:
    """At most `budget` bytes of the training conversations' rendered text (for a tokenizer
    trained on them; the chat markers are reserved by the trainer whatever the text)."""
    from dsv3_jax.chat.template import render_chat

    texts, size = [], 0
    for conversation in conversations_of(corpus, "train")[0]:
        text = render_chat(conversation, add_generation_prompt=False)
        size += len(text.encode("utf-8"))
        if size > budget:
            break
        texts.append(text)
    if not texts:
        raise DataError(f"{corpus.describe()} holds no usable training conversation to train a "
                        f"tokenizer on; fix the records or give data.tokenizer.")
    return texts


def _get_store(corpus: Corpus, tokenizer: Tokenizer, split: str, seq_len: int,
               path: str, reasoning: str = "drop") -> ConversationStore:
    """The split's packed store at `path`, reused when its fingerprint matches. `reasoning`:
    data.sft_reasoning ("last" trains on the last answer's reasoning; it joins the fingerprint
    only then, so the stores of "drop" runs keep theirs)."""
    inputs = {"format": STORE_FORMAT, "encoding": ENCODING_VERSION, "split": split,
              "seq_len": seq_len, "tokenizer_sha256": tokenizer.sha256, **corpus.fingerprint()}
    if reasoning != "drop":
        inputs["reasoning"] = reasoning
    inputs = json.loads(json.dumps(inputs))  # as it reads back (tuples as lists), to compare
    if pipeline.read_fingerprint(path) == inputs:
        store = ConversationStore(path)
        logging.info("data: reusing the %s conversation store %s (%s)", split, path,
                     _describe_counts(store.counts, seq_len))
        return store
    logging.info("data: encoding the %s conversations of %s into %s", split, corpus.describe(),
                 path)
    start = time.perf_counter()
    conversations, counts = conversations_of(corpus, split)
    examples, encoded = conv.encode_conversations(conversations, tokenizer, seq_len,
                                                  keep_last_reasoning=reasoning == "last")
    counts.update(encoded)
    packed = pack(examples, seq_len, tokenizer.eos_id)
    _write_store(path, packed, inputs, counts)
    store = ConversationStore(path)
    n = store.num_sequences(seq_len)
    logging.info("data: %s split: %s; %d sequences of %d, %.0f%% filled, %.0f%% of the tokens "
                 "trained on; %.1f s", split, _describe_counts(counts, seq_len), n, seq_len,
                 100 * store.num_tokens / max(n * seq_len, 1),
                 100 * store.num_loss_tokens / max(store.num_tokens, 1),
                 time.perf_counter() - start)
    skipped = sum(counts.values()) - counts["kept"]
    if skipped:
        logging.warning("data: %d %s conversation(s) skipped: %s", skipped, split,
                        _describe_counts(counts, seq_len))
    return store


def _describe_counts(counts: dict, seq_len: int) -> str:
    """'812 kept, 40 too long for data.seq_len=256, 3 bad_role' (the non-zero counts)."""
    parts = [f"{counts.get('kept', 0)} kept"]
    if counts.get("too_long"):
        parts.append(f"{counts['too_long']} too long for data.seq_len={seq_len}")
    parts += [f"{n} {reason}" for reason, n in counts.items()
              if reason not in ("kept", "too_long") and n]
    return ", ".join(parts)


def _write_store(path: str, packed: dict[str, np.ndarray], inputs: dict, counts: dict) -> None:
    """The split's arrays and its fingerprint, atomically (a crash never leaves a store that
    looks current). The smallest integer dtypes that hold the values are stored."""
    sha1 = hashlib.sha1()
    for key in _ARRAYS:
        sha1.update(packed[key].astype("<i4").tobytes())
    real = packed["segment_ids"] != 0
    info = {"inputs": inputs, "tokens_sha1": sha1.hexdigest(), "counts": counts,
            "num_tokens": int(real.sum()), "num_loss_tokens": int(packed["loss_mask"].sum())}
    try:
        with atomic_dir(path, replace=True) as tmp:
            for key in _ARRAYS:
                values = packed[key]
                dtype = next(d for d in (np.uint8, np.uint16, np.int32)
                             if values.size == 0 or values.max() <= np.iinfo(d).max)
                np.save(os.path.join(tmp, f"{key}.npy"), values.astype(dtype))
            with open(os.path.join(tmp, FINGERPRINT_FILE), "w", encoding="utf-8") as f:
                json.dump(info, f)
    except OSError:
        if pipeline.read_fingerprint(path) != inputs:  # not another process that finished first
            raise


__all__ = ["ConversationStore", "conversations_of", "open_conversations", "pack",
           "prepare_sft_data"]
