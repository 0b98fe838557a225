"""Token stores and the grain pipeline: what the training loop reads.

prepare_data(data_cfg, workdir, model_vocab_size) runs once per run (again, cheaply, on restart):

    1. the tokenizer: data.tokenizer if given, else <workdir>/tokenizer.model if present, else a
       sentencepiece BPE of the model's vocab_size trained on a deterministic sample (at most
       data.tokenizer_train_bytes) of the training split (tokenizer.py). A trained tokenizer is
       kept for the life of the workdir, even if the corpus changes (its ids are what the
       checkpoints learned); delete it to train a new one;
    2. each split tokenized once into a TokenStore under <workdir>/tokens/<split>/: one flat token
       stream with every document followed by eos, and the document offsets. A fingerprint of what
       the stream depends on (corpus files with sizes and mtimes, split rule, tokenizer hash, store
       format) is written next to it last; a store whose fingerprint matches is reused, any other
       is rebuilt.

train_iterator(data, data_cfg, seed, process_index, process_count) is an index-based grain pipeline:

    sequence i   = tokens[i*T : (i+1)*T] of the training stream (T = seq_len); the last partial
                   sequence is dropped. Documents are packed back to back, so a sequence holds
                   pieces of one or more documents: segment_ids number these pieces 1, 2, ... and
                   positions restart at 0 at each piece, so attention masked by segment never
                   crosses a document boundary. Sequences never need padding; segment id 0 (and
                   the pad id) would mark padding, and this pipeline produces none.
    .shuffle(seed)     a global permutation of the sequences, a different one each epoch;
    .repeat()          forever; epoch e is elements [e*num_sequences, (e+1)*num_sequences);
    [p::n_proc]        process p takes every n_proc-th element (n_proc = process_count), so
                       global batch k is elements [k*B, (k+1)*B) (B = batch_size) and the
                       processes' batches k split it disjointly;
    .batch(B // n_proc)  then prefetched on data.num_threads threads (data.prefetch batches).

The iterator's state is {"grain": {"next_index": k}, "data": <the settings it depends on>}: plain
JSON. set_state on a fresh iterator continues with batch k exactly, and refuses a state saved with
another seed, seq_len, batch_size, process_count or token stream.

Multi-host: every process calls prepare_data. Builds go to a private temporary directory and are
renamed into place, so processes sharing a workdir do not corrupt each other's stores, but each
does the work: let process 0 prepare first (then a barrier), or give processes their own workdir.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator

import grain
import numpy as np
import tensorstore as ts
from absl import logging

from dsv3_jax.data.corpus import SPLITS, Corpus, DataError, open_corpus
from dsv3_jax.data.tokenizer import (Tokenizer, check_fits, find_tokenizer, load_tokenizer,
                                     train_tokenizer)
from dsv3_jax.files import atomic_dir, writable_workdir

__all__ = ["TASKS", "Data", "DataError", "TokenStore", "batch_keys", "check_corpus", "eval_batches",
           "get_tokenizer", "prepare_data", "train_iterator"]

STORE_FORMAT = "dsv3_jax.token_store/1"
TOKENIZER_FILE = "tokenizer.model"
STORE_DIR = "tokens"
FINGERPRINT_FILE = "fingerprint.json"
_ENCODE_BATCH_CHARS = 8 << 20  # text handed to one multi-threaded sentencepiece call
# The token array is a zarr3 array of shards of 4M tokens, each holding 64K-token zstd chunks:
# few files even for billions of tokens, and a random read of one sequence decodes one small
# chunk. Decoded chunks are cached (64 MiB per store).
_SHARD_TOKENS = 1 << 22
_CHUNK_TOKENS = 1 << 16
_CACHE_BYTES = 64 << 20


@dataclasses.dataclass
class Data:
    """The tokenizer and both tokenized splits. Invariant: every token id < tokenizer.vocab_size
    <= the model's vocab_size, and the training split holds at least one document.

    A split is a TokenStore (pre-training) or a sft.ConversationStore (data.task = "sft"): both
    give num_sequences(seq_len), sequence(index, seq_len), num_tokens and tokens_sha1."""

    tokenizer: Tokenizer
    train: TokenStore
    validation: TokenStore


class TokenStore:
    """One tokenized split on disk (under `path`).

    tokens [num_tokens]: uint16 when the vocabulary allows, else int32; the split's documents
        concatenated in corpus order, each followed by eos.
    doc_offsets [num_documents + 1] int64: document d is tokens[doc_offsets[d] : doc_offsets[d+1]],
        whose last token is eos; doc_offsets[0] == 0 and doc_offsets[-1] == num_tokens.
    tokens_sha1: a hash of the token stream's content (independent of file times).

    Storage: tensorstore zarr3 arrays rather than ArrayRecord, because packing reads slices of one
    flat token stream at arbitrary offsets (sequence i is tokens[i*L:(i+1)*L], crossing document
    boundaries), which a chunked array serves directly and a record file, one record per document,
    does not.
    """

    def __init__(self, path: str):
        self.path = path
        self._tokens = ts.open(_array_spec(os.path.join(path, "tokens"), cache=True),
                               open=True, read=True).result()
        offsets = ts.open(_array_spec(os.path.join(path, "doc_offsets")), open=True,
                          read=True).result()
        self.doc_offsets: np.ndarray = offsets.read().result()
        self.num_tokens: int = int(self._tokens.shape[0])
        self.num_documents: int = len(self.doc_offsets) - 1
        self.dtype = np.dtype(self._tokens.dtype.numpy_dtype)
        with open(os.path.join(path, FINGERPRINT_FILE), encoding="utf-8") as f:
            self.tokens_sha1: str = json.load(f)["tokens_sha1"]

    def num_sequences(self, seq_len: int) -> int:  # the last partial sequence is dropped
        return self.num_tokens // seq_len

    def read(self, start: int, stop: int) -> np.ndarray:
        """tokens[start:stop] as int32 [stop - start]."""
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"token range [{start}, {stop}) outside [0, {self.num_tokens})")
        return self._tokens[start:stop].read().result().astype(np.int32)

    def document(self, d: int) -> np.ndarray:
        """Document d's tokens, int32, ending with eos."""
        return self.read(int(self.doc_offsets[d]), int(self.doc_offsets[d + 1]))

    def sequence(self, index: int, seq_len: int) -> dict[str, np.ndarray]:
        """Packed sequence `index` as the module docstring's sequence i: int32 [seq_len] arrays
        'tokens', 'segment_ids' and 'positions'."""
        if not 0 <= index < self.num_sequences(seq_len):
            raise IndexError(f"sequence {index} outside [0, {self.num_sequences(seq_len)})")
        start = index * seq_len
        tokens = self.read(start, start + seq_len)
        # Documents that start strictly inside the window begin a new segment.
        lo = np.searchsorted(self.doc_offsets, start, side="right")
        hi = np.searchsorted(self.doc_offsets, start + seq_len, side="left")
        is_start = np.zeros(seq_len, bool)
        is_start[0] = True
        is_start[self.doc_offsets[lo:hi] - start] = True
        segment_ids = np.cumsum(is_start, dtype=np.int32)
        return {"tokens": tokens, "segment_ids": segment_ids,
                "positions": segment_positions(segment_ids)}

    def __getstate__(self):  # picklable for grain worker processes: reopened from the path
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])

    def __repr__(self) -> str:
        return (f"TokenStore({self.path!r}, num_tokens={self.num_tokens}, "
                f"num_documents={self.num_documents})")


def segment_positions(segment_ids: np.ndarray) -> np.ndarray:
    """int32 [T]: positions restarting at 0 wherever the segment id changes (padding included)."""
    steps = np.arange(len(segment_ids), dtype=np.int32)
    is_start = np.ones(len(segment_ids), bool)
    is_start[1:] = segment_ids[1:] != segment_ids[:-1]
    return steps - np.maximum.accumulate(np.where(is_start, steps, 0))


class PackedSequences:
    """grain random-access source: element i is store.sequence(i, seq_len)."""

    def __init__(self, store: TokenStore, seq_len: int):
        self._store = store
        self._seq_len = seq_len
        self._len = store.num_sequences(seq_len)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index) -> dict[str, np.ndarray]:
        return self._store.sequence(int(index), self._seq_len)


# ---- prepare_data ------------------------------------------------------------------------------

TASKS = ("pretrain", "sft")  # config.data.task: what the documents are, what the loss counts
# config.data.sft_reasoning: what SFT does with the <think> reasoning of a conversation's last
# answer: "drop" it as the chat format does, or train on it ("last").
SFT_REASONING = ("drop", "last")


def batch_keys(data_cfg) -> tuple[str, ...]:
    """The int32 [B, T] arrays of each batch of data.task: 'tokens', 'segment_ids', 'positions'
    and, for supervised fine-tuning, 'loss_mask' (the targets the loss counts)."""
    base = ("tokens", "segment_ids", "positions")
    return base + ("loss_mask",) if data_cfg.get("task") == "sft" else base


def check_corpus(data_cfg) -> None:
    """Lists and checks the corpus files of data_cfg (of its task) without reading them: what a
    run checks before any slow work (reading weights, tokenizing)."""
    check_data_config(data_cfg)
    if data_cfg.get("task") == "sft":
        from dsv3_jax.data.sft import open_conversations
        open_conversations(data_cfg)
    else:
        open_corpus(data_cfg)


def prepare_data(data_cfg, workdir: str, *, model_vocab_size: int) -> Data:
    """Loads or trains the tokenizer and tokenizes both splits into token stores under `workdir`,
    reusing what is present and current. Logs the slow steps (absl.logging).

    data.task = "sft": conversations packed with a loss mask instead (dsv3_jax/data/sft.py)."""
    check_data_config(data_cfg)
    workdir = writable_workdir(workdir, error=DataError)
    if data_cfg.get("task") == "sft":
        from dsv3_jax.data.sft import prepare_sft_data
        return prepare_sft_data(data_cfg, workdir, model_vocab_size=model_vocab_size)
    corpus = open_corpus(data_cfg)
    logging.info("data: %s, validation_fraction=%s", corpus.describe(), corpus.validation_fraction)
    tokenizer = get_tokenizer(data_cfg, workdir, model_vocab_size,
                              lambda budget: _tokenizer_sample(corpus, budget))
    stores = {split: _get_store(corpus, tokenizer, split, os.path.join(workdir, STORE_DIR, split))
              for split in SPLITS}
    return Data(tokenizer, stores["train"], stores["validation"])


def get_tokenizer(data_cfg, workdir: str, model_vocab_size: int,
                  sample: Callable[[int], list[str]]) -> Tokenizer:
    """data.tokenizer, else the workdir's, else a sentencepiece BPE of the model's vocab_size
    trained into the workdir on sample(data.tokenizer_train_bytes) (texts of at most that many
    bytes); checked to fit the model's vocabulary."""
    if data_cfg.tokenizer:
        tokenizer = load_tokenizer(os.path.expanduser(data_cfg.tokenizer))
        logging.info("data: tokenizer %s (%d pieces)", tokenizer.path, tokenizer.vocab_size)
    elif (path := find_tokenizer(workdir)) is not None:
        tokenizer = load_tokenizer(path, setting="the workdir's tokenizer")
        logging.info("data: reusing tokenizer %s (%d pieces)", path, tokenizer.vocab_size)
    else:
        start = time.perf_counter()
        texts = sample(data_cfg.tokenizer_train_bytes)
        logging.info("data: training a %d-piece tokenizer on at most %d bytes of the training "
                     "split", model_vocab_size, data_cfg.tokenizer_train_bytes)
        path = os.path.join(workdir, TOKENIZER_FILE)
        tokenizer = train_tokenizer(texts, path, vocab_size=model_vocab_size)
        logging.info("data: tokenizer trained in %.1f s", time.perf_counter() - start)
    check_fits(tokenizer, model_vocab_size)
    return tokenizer


def _tokenizer_sample(corpus: Corpus, budget: int) -> list[str]:
    """At most `budget` UTF-8 bytes of training-split text: documents picked by a salted hash (a
    uniform, deterministic sample of about `budget` bytes), the last one cut to fit."""
    train_bytes = corpus.total_bytes() * (1.0 - corpus.validation_fraction)
    sample = min(1.0, 1.2 * budget / max(train_bytes, 1.0))
    for fraction in (sample, 1.0) if sample < 1.0 else (1.0,):
        texts, size = [], 0
        for text in corpus.documents("train", sample=fraction, salt="tokenizer:"):
            n = len(text.encode("utf-8"))
            if size + n > budget:
                texts.append(text.encode("utf-8")[: budget - size].decode("utf-8", "ignore"))
                break
            texts.append(text)
            size += n
        if texts:
            return texts
    raise _empty_split_error(corpus, "train")


def _get_store(corpus: Corpus, tokenizer: Tokenizer, split: str, path: str) -> TokenStore:
    dtype = "uint16" if tokenizer.vocab_size <= 1 << 16 else "int32"
    inputs = {"format": STORE_FORMAT, "split": split, "dtype": dtype,
              "tokenizer_sha256": tokenizer.sha256, **corpus.fingerprint()}
    inputs = json.loads(json.dumps(inputs))  # as it reads back (tuples as lists), to compare
    if read_fingerprint(path) == inputs:
        store = TokenStore(path)
        logging.info("data: reusing the %s token store %s (%d documents, %d tokens)", split, path,
                     store.num_documents, store.num_tokens)
        return store
    logging.info("data: tokenizing the %s split of %s into %s", split, corpus.describe(), path)
    start = time.perf_counter()
    _build_store(path, corpus, split, tokenizer, dtype, inputs)
    store = TokenStore(path)
    logging.info("data: %s split: %d documents, %d tokens in %.1f s", split, store.num_documents,
                 store.num_tokens, time.perf_counter() - start)
    return store


def _build_store(path: str, corpus: Corpus, split: str, tokenizer: Tokenizer, dtype: str,
                 inputs: dict) -> None:
    """Writes the token store of `split` to `path`, atomically: a crash (or a refusal) never
    leaves a store that looks current."""
    try:
        with atomic_dir(path, replace=True) as tmp:
            tokens = ts.open(_array_spec(os.path.join(tmp, "tokens"), dtype=dtype, sharded=True),
                             create=True).result()
            offsets, num_tokens, sha1 = [0], 0, hashlib.sha1()
            for batch in _batches(corpus.documents(split), _ENCODE_BATCH_CHARS):
                flat, lengths = _with_eos(tokenizer.encode_batch(batch), tokenizer.eos_id, dtype)
                tokens = tokens.resize(exclusive_max=[num_tokens + len(flat)]).result()
                tokens[num_tokens:].write(flat).result()
                sha1.update(flat.astype("<i4").tobytes())
                offsets.extend((num_tokens + np.cumsum(lengths)).tolist())
                num_tokens += len(flat)
                logging.info("data: ... %d documents, %d tokens", len(offsets) - 1, num_tokens)
            if num_tokens == 0:
                raise _empty_split_error(corpus, split)
            doc_offsets = ts.open(_array_spec(os.path.join(tmp, "doc_offsets"), dtype="int64",
                                              shape=len(offsets)), create=True).result()
            doc_offsets.write(np.asarray(offsets, np.int64)).result()
            with open(os.path.join(tmp, FINGERPRINT_FILE), "w", encoding="utf-8") as f:
                json.dump({"inputs": inputs, "tokens_sha1": sha1.hexdigest()}, f)
    except OSError:
        if read_fingerprint(path) != inputs:  # not just another process that finished first
            raise


def _batches(documents: Iterable[str], max_chars: int) -> Iterator[list[str]]:
    batch, size = [], 0
    for text in documents:
        batch.append(text)
        size += len(text)
        if size >= max_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _with_eos(ids: list[np.ndarray], eos_id: int, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """The documents' ids concatenated, each followed by eos; each one's length, eos included."""
    lengths = np.array([len(a) + 1 for a in ids], np.int64)
    flat = np.full(int(lengths.sum()), eos_id, dtype)
    for doc, end in zip(ids, np.cumsum(lengths)):
        flat[end - 1 - len(doc): end - 1] = doc
    return flat, lengths


def read_fingerprint(path: str) -> dict | None:
    """The inputs a store under `path` was built from (its fingerprint file), None if unreadable."""
    try:
        with open(os.path.join(path, FINGERPRINT_FILE), encoding="utf-8") as f:
            return json.load(f)["inputs"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _array_spec(path: str, *, dtype: str | None = None, shape: int = 0, sharded: bool = False,
                cache: bool = False) -> dict:
    """tensorstore spec of a 1-D zarr3 array at `path`: to create (dtype given) or to open."""
    spec: dict = {"driver": "zarr3", "kvstore": {"driver": "file", "path": path}}
    if cache:  # the stores are immutable once built: cache decoded chunks, never recheck
        spec["context"] = {"cache_pool": {"total_bytes_limit": _CACHE_BYTES}}
        spec["recheck_cached_data"] = False
    if dtype is None:
        return spec
    zstd = [{"name": "bytes", "configuration": {"endian": "little"}},
            {"name": "zstd", "configuration": {"level": 3}}]
    if sharded:
        grid, codecs = _SHARD_TOKENS, [{"name": "sharding_indexed", "configuration": {
            "chunk_shape": [_CHUNK_TOKENS], "codecs": zstd,
            "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                             {"name": "crc32c"}]}}]
    else:
        grid, codecs = max(shape, 1), zstd
    spec["metadata"] = {"shape": [shape], "data_type": dtype, "codecs": codecs, "chunk_grid": {
        "name": "regular", "configuration": {"chunk_shape": [grid]}}}
    return spec


def _empty_split_error(corpus: Corpus, split: str) -> DataError:
    """Why `split` has no documents: an empty corpus, or a split rule that left this split empty."""
    counts = {s: sum(1 for _ in corpus.documents(s)) for s in SPLITS}
    total = sum(counts.values())
    if total == 0:
        return DataError(f"{corpus.describe()} is empty: its files hold no non-empty documents; "
                         "give files with text (and for JSONL / JSON records, check "
                         "data.text_field).")
    return DataError(
        f"the {split} split of {corpus.describe()} is empty: of its {total} non-empty "
        f"document(s), validation_fraction={corpus.validation_fraction} puts "
        f"{counts['validation']} in validation and {counts['train']} in train; add more documents "
        "(the split is drawn per document: per file for text files, per line or record for JSONL "
        "and ArrayRecord) or choose another data.validation_fraction.")


INT32_MAX = 2**31 - 1  # counts and sizes meet int32 arithmetic on the device


def check_data_config(data_cfg) -> None:
    """Refuses pipeline settings (sizes, threads, the tokenizer path's type) no run can use; the
    corpus settings are `corpus.check_corpus_settings`'s."""
    def positive_int(name: str, minimum: int, why: str):
        value = getattr(data_cfg, name)
        if (not isinstance(value, int) or isinstance(value, bool)
                or not minimum <= value <= INT32_MAX):
            raise DataError(f"data.{name}={value!r} must be an int >= {minimum} and <= "
                            f"{INT32_MAX} ({why}).")

    if data_cfg.get("task", "pretrain") not in TASKS:
        raise DataError(f"data.task={data_cfg.task!r} is not one of {TASKS}: 'pretrain' trains on "
                        "every token of packed documents, 'sft' on the answers of conversations "
                        "(JSONL {\"messages\": [...]} records, or data.corpus='builtin').")
    if data_cfg.get("sft_reasoning", "drop") not in SFT_REASONING:
        raise DataError(f"data.sft_reasoning={data_cfg.sft_reasoning!r} is not one of "
                        f"{SFT_REASONING}: 'drop' trains on the answers only (the chat format "
                        "drops reasoning), 'last' also on the last answer's <think> reasoning.")
    if not isinstance(data_cfg.tokenizer, str):
        raise DataError(f"data.tokenizer={data_cfg.tokenizer!r} must be a string: the path of a "
                        "sentencepiece .model, or '' to train one on the corpus.")

    positive_int("seq_len", 2, "a sequence needs an input token and its next-token target")
    positive_int("batch_size", 1, "sequences per training step, over all processes")
    positive_int("num_threads", 0, "grain read threads; 0 reads in the calling thread")
    positive_int("prefetch", 0, "batches read ahead; 0 disables prefetching")
    positive_int("tokenizer_train_bytes", 1, "text fed to the tokenizer trainer")


# ---- iterators ---------------------------------------------------------------------------------

def train_iterator(data: Data, data_cfg, *, seed: int, process_index: int = 0,
                   process_count: int = 1) -> grain.DatasetIterator:
    """An infinite grain DatasetIterator over this process's share of the training batches.

    Each batch: int32 'tokens', 'segment_ids', 'positions' of shape [batch_size // process_count,
    seq_len]. Its state is the module docstring's.
    """
    check_data_config(data_cfg)
    seq_len, batch_size = data_cfg.seq_len, data_cfg.batch_size
    if not isinstance(process_count, int) or process_count < 1:
        raise DataError(f"process_count={process_count!r} must be an int >= 1.")
    if not isinstance(process_index, int) or not 0 <= process_index < process_count:
        raise DataError(f"process_index={process_index!r} must be in [0, {process_count}).")
    if batch_size % process_count:
        raise DataError(f"data.batch_size={batch_size} is not divisible by process_count="
                        f"{process_count}: each process takes an equal share of a batch; set "
                        f"data.batch_size to a multiple of {process_count}, e.g. "
                        f"{(batch_size // process_count + 1) * process_count}.")
    num_sequences = data.train.num_sequences(seq_len)
    if num_sequences == 0:
        raise DataError(f"the training split has {data.train.num_tokens} tokens, fewer than one "
                        f"sequence of data.seq_len={seq_len}; lower data.seq_len or add text.")
    dataset = (grain.MapDataset.source(PackedSequences(data.train, seq_len))
               .shuffle(seed=seed)
               .repeat()
               .slice(slice(process_index, None, process_count))
               .batch(batch_size // process_count, drop_remainder=True))
    read_options = grain.ReadOptions(num_threads=data_cfg.num_threads,
                                     prefetch_buffer_size=data_cfg.prefetch)
    settings = {"seed": seed, "seq_len": seq_len, "batch_size": batch_size,
                "process_count": process_count, "num_sequences": num_sequences,
                "tokens_sha1": data.train.tokens_sha1}
    return _CheckedIterator(iter(dataset.to_iter_dataset(read_options)), settings)


def eval_batches(data: Data, data_cfg, num_batches: int) -> list[dict[str, np.ndarray]]:
    """The first min(num_batches, num_sequences // batch_size) batches of the validation split in
    order: dicts of int32 [batch_size, seq_len] 'tokens', 'segment_ids', 'positions'."""
    check_data_config(data_cfg)
    seq_len, batch_size = data_cfg.seq_len, data_cfg.batch_size
    available = data.validation.num_sequences(seq_len) // batch_size
    if available == 0:
        raise DataError(
            f"the validation split has {data.validation.num_tokens} tokens: "
            f"{data.validation.num_sequences(seq_len)} sequence(s) of data.seq_len={seq_len}, "
            f"fewer than one batch of data.batch_size={batch_size}; raise "
            "data.validation_fraction, lower data.batch_size or data.seq_len, or add documents.")
    if not isinstance(num_batches, int) or num_batches < 0:
        raise DataError(f"num_batches={num_batches!r} must be an int >= 0.")
    def batch(b: int) -> dict[str, np.ndarray]:
        rows = [data.validation.sequence(b * batch_size + j, seq_len) for j in range(batch_size)]
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

    return [batch(b) for b in range(min(num_batches, available))]


class _CheckedIterator(grain.DatasetIterator):
    """The pipeline's iterator with the settings it depends on added to its state, so a restored
    state from another configuration fails loudly instead of silently giving other batches."""

    def __init__(self, parent: grain.DatasetIterator, settings: dict):
        super().__init__(parent)
        self._settings = settings

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._parent)

    def get_state(self) -> dict:
        return {"grain": self._parent.get_state(), "data": dict(self._settings)}

    def set_state(self, state: dict) -> None:
        saved = state.get("data", {}) if isinstance(state, dict) else {}
        changed = {k: (saved.get(k), v) for k, v in self._settings.items() if saved.get(k) != v}
        if changed or "grain" not in state:
            detail = ", ".join(f"{k}: saved {old!r}, now {new!r}" for k, (old, new) in
                               changed.items()) or f"not a state of this pipeline: {state!r}"
            raise DataError(f"cannot restore the training data iterator ({detail}); resume with "
                            "the data settings, seed and corpus the checkpoint was made with, or "
                            "start a new run in a fresh workdir.")
        self._parent.set_state(state["grain"])

    def start_prefetch(self) -> None:
        self._parent.start_prefetch()

    def __str__(self) -> str:
        return f"_CheckedIterator({self._settings})"
