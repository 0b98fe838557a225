"""Tokenizer: a sentencepiece BPE model that round-trips any text exactly.

Trained models use
    identity normalization, no dummy prefix, extra whitespace kept: source code keeps its
        indentation, blank lines and trailing spaces;
    byte fallback: a character outside the vocabulary becomes its UTF-8 bytes (256 byte pieces),
        so no text maps to unk and decode(encode(text)) == text for every str;
    whitespace-only pieces: a run of indentation spaces can be one token;
    ids pad 0, unk 1, eos 2 and no bos. A document is encoded and then followed by eos.

Training text is a deterministic sample of the training split (pipeline.py picks it), cut at line
ends into sentences of at most _SENTENCE_CHARS characters, since sentencepiece drops longer
sentences. `hard_vocab_limit=False` lets a small corpus give a smaller vocabulary than asked for;
the vocabulary must not exceed the model's (check_fits).

A user's `.model` file is accepted as it is; it only needs an eos piece. Its round trip is as exact
as its own normalization settings allow.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from collections.abc import Iterable, Iterator

import numpy as np
import sentencepiece as spm
from absl import logging

from dsv3_jax.data.corpus import DataError
from dsv3_jax.files import atomic_file

PAD_ID, UNK_ID, EOS_ID = 0, 1, 2
_SENTENCE_CHARS = 4096  # x 4 bytes per char at most <= max_sentence_length below


class Tokenizer:
    """A loaded sentencepiece model. Ids are in [0, vocab_size); eos_id >= 0; no bos is added."""

    def __init__(self, path: str, processor: spm.SentencePieceProcessor):
        self.path = path
        self._sp = processor
        self.vocab_size: int = processor.vocab_size()
        self.eos_id: int = processor.eos_id()
        # Padding is marked by segment_ids == 0; the pad id only fills, so 0 serves for a model
        # without a pad piece.
        self.pad_id: int = max(processor.pad_id(), 0)
        with open(path, "rb") as f:
            self.sha256: str = hashlib.sha256(f.read()).hexdigest()

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without eos."""
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str], num_threads: int = -1) -> list[np.ndarray]:
        """Token ids of each text, int32 [len_i], without eos; encoded on `num_threads` C++ threads
        (-1: all cores) with the GIL released."""
        return self._sp.encode(texts, return_type="numpy", num_threads=num_threads)

    def decode(self, ids) -> str:
        """The text of `ids` (a list or 1-D array); control pieces (eos, pad) decode to ''."""
        return self._sp.decode([int(i) for i in ids])

    def __repr__(self) -> str:
        return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size})"


def load_tokenizer(path: str, *, setting: str = "data.tokenizer") -> Tokenizer:
    """The sentencepiece model at `path`; DataError if it is missing, not a model, or has no eos.
    `setting` names where the path came from in the messages (a config key or a flag)."""
    train_one = ", or '' to train one on the corpus" if setting == "data.tokenizer" else ""
    if not os.path.isfile(path):
        what = "is a directory" if os.path.isdir(path) else "does not exist"
        raise DataError(f"{setting}={path!r} {what}; give the path of a sentencepiece .model "
                        f"file{train_one}.")
    processor = spm.SentencePieceProcessor()
    try:
        processor.LoadFromFile(path)
    except (RuntimeError, OSError) as e:
        raise DataError(f"{setting}={path!r} is not a sentencepiece model ({e}); give a "
                        f".model file written by sentencepiece{train_one}.") from None
    if processor.eos_id() < 0:
        raise DataError(f"{setting}={path!r} has no eos piece, which ends every document "
                        f"in the token stream; retrain it with --eos_id{train_one}.")
    return Tokenizer(path, processor)


def train_tokenizer(texts: Iterable[str], path: str, *, vocab_size: int,
                    num_threads: int | None = None) -> Tokenizer:
    """Trains a BPE model of at most `vocab_size` pieces on `texts` and writes it to `path`
    (atomically: a crash leaves no partial model)."""
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_sentences(texts), model_writer=model,
            model_type="bpe", vocab_size=vocab_size, hard_vocab_limit=False,
            normalization_rule_name="identity", add_dummy_prefix=False,
            remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
            byte_fallback=True, split_digits=True,
            pad_id=PAD_ID, unk_id=UNK_ID, eos_id=EOS_ID, bos_id=-1,
            max_sentence_length=4 * _SENTENCE_CHARS, input_sentence_size=0,
            num_threads=num_threads or os.cpu_count() or 1, minloglevel=2)
    except RuntimeError as e:
        raise _training_error(e, vocab_size) from None
    with atomic_file(path) as f:
        f.write(model.getvalue())
    tokenizer = load_tokenizer(path)
    logging.info("trained tokenizer %s: %d pieces (asked for %d)", path, tokenizer.vocab_size,
                 vocab_size)
    return tokenizer


def check_fits(tokenizer: Tokenizer, model_vocab_size: int) -> None:
    """DataError unless every token id is a valid row of the model's embedding."""
    if tokenizer.vocab_size > model_vocab_size:
        raise DataError(
            f"the tokenizer {tokenizer.path} has {tokenizer.vocab_size} pieces but the model's "
            f"vocab_size is {model_vocab_size}; set config.model.vocab_size >= "
            f"{tokenizer.vocab_size}, or give another tokenizer (data.tokenizer; for a trained "
            f"one, delete {tokenizer.path} to train a new one of the model's size).")


def _sentences(texts: Iterable[str]) -> Iterator[str]:
    """Each text cut at line ends into pieces of at most _SENTENCE_CHARS characters (a longer line
    is cut inside); concatenating the pieces gives the text back."""
    for text in texts:
        buf, size = [], 0
        for line in text.splitlines(keepends=True):
            if size + len(line) > _SENTENCE_CHARS and buf:
                yield "".join(buf)
                buf, size = [], 0
            while len(line) > _SENTENCE_CHARS:
                yield line[:_SENTENCE_CHARS]
                line = line[_SENTENCE_CHARS:]
            buf.append(line)
            size += len(line)
        if buf:
            yield "".join(buf)


def _training_error(e: RuntimeError, vocab_size: int) -> DataError:
    if needed := re.search(r"smaller than required_chars\. (\d+) vs (\d+)", str(e)):
        minimum = needed.group(2)
        return DataError(
            f"the model's vocab_size {vocab_size} is too small to train a tokenizer on this "
            f"corpus: its characters and the special and byte pieces need at least {minimum}; "
            f"set config.model.vocab_size >= {minimum}, or give a tokenizer (data.tokenizer).")
    return DataError(f"sentencepiece could not train a tokenizer of vocab_size {vocab_size} on "
                     f"the training split ({e}); add text to the corpus or give a tokenizer "
                     "(data.tokenizer).")
