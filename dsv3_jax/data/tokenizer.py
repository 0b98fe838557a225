"""Tokenizers: one interface (`Tokenizer`), two implementations, and the sentencepiece trainer.

    SentencePieceTokenizer (here)   a sentencepiece `.model`: the ones trained here, or a user's
    HFTokenizer (hf_tokenizer.py)   a Hugging Face `tokenizer.json`, as DeepSeek's releases ship
    load_tokenizer(path)            either, from the file or from a folder holding one
                                    (tokenizer.json preferred: find_tokenizer)

The contract both keep: encode adds neither bos nor eos (the pipeline appends eos_id after each
document; a chat template writes bos as text); every id is in [0, vocab_size); eos_id exists (a
tokenizer without one is refused); decode drops the special ids (sentencepiece's control pieces,
the tokenizer.json's tokens marked special: eos, pad, bos) unless keep_special, and writes every
other token as its text, the chat markers included.

Trained models use
    identity normalization, no dummy prefix, extra whitespace kept: source code keeps its
        indentation, blank lines and trailing spaces;
    byte fallback: a character outside the vocabulary becomes its UTF-8 bytes (256 byte pieces),
        so no text maps to unk and decode(encode(text)) == text for every str without U+2581
        (sentencepiece's own space mark, which decodes as ' ');
    whitespace-only pieces: a run of indentation spaces can be one token;
    ids pad 0, unk 1, eos 2 and no bos. A document is encoded and then followed by eos (2, the
        document separator; not DeepSeek's end-of-sentence text);
    DeepSeek-V3's chat markers (special_tokens.CHAT_SPECIAL_TOKENS) as user-defined symbols, ids
        3, 4, ...: each encodes as its one id wherever it appears in a text (also written with
        spaces for U+2581: '<｜tool sep｜>' is the marker too) and decodes to its exact text.

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
from typing import Protocol

import numpy as np
import sentencepiece as spm
from absl import logging
from sentencepiece import sentencepiece_model_pb2

from dsv3_jax.data.corpus import DataError
from dsv3_jax.data.special_tokens import CHAT_SPECIAL_TOKENS
from dsv3_jax.files import atomic_file

PAD_ID, UNK_ID, EOS_ID = 0, 1, 2
_SENTENCE_CHARS = 4096  # x 4 bytes per char at most <= max_sentence_length below
# The tokenizer files a folder may hold, in the order find_tokenizer prefers them.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


class Tokenizer(Protocol):
    """What the pipeline, generation and evaluation ask of a tokenizer (see the module docstring
    for the contract). `path` is the file read; `sha256` identifies its ids (the token stores
    are rebuilt when it changes); `special_tokens` maps the marker tokens' texts to their ids."""

    path: str
    vocab_size: int
    eos_id: int
    pad_id: int
    bos_id: int | None
    sha256: str
    special_tokens: dict[str, int]

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without bos or eos."""
        ...

    def encode_batch(self, texts: list[str], num_threads: int = -1) -> list[np.ndarray]:
        """Token ids of each text, int32 [len_i], without bos or eos."""
        ...

    def decode(self, ids, keep_special: bool = False) -> str:
        """The text of `ids` (a list or 1-D array); special ids give '' unless keep_special."""
        ...

    def token_to_id(self, text: str) -> int | None:
        """The id of the vocabulary entry spelled `text`, or None."""
        ...


class SentencePieceTokenizer:
    """A loaded sentencepiece model. Ids are in [0, vocab_size); eos_id >= 0; no bos is added.
    `special_tokens`: its control pieces (pad, eos, bos; never produced by encode) and its
    user-defined symbols (the chat markers; encode matches them in the text)."""

    def __init__(self, path: str, processor: spm.SentencePieceProcessor, model: bytes):
        self.path = path
        self._sp = processor
        self.vocab_size: int = processor.vocab_size()
        self.eos_id: int = processor.eos_id()
        self.bos_id: int | None = processor.bos_id() if processor.bos_id() >= 0 else None
        # Padding is marked by segment_ids == 0; the pad id only fills, so 0 serves for a model
        # without a pad piece.
        self.pad_id: int = max(processor.pad_id(), 0)
        self.sha256: str = hashlib.sha256(model).hexdigest()
        kind = sentencepiece_model_pb2.ModelProto.SentencePiece
        pieces = sentencepiece_model_pb2.ModelProto.FromString(model).pieces
        control = {p.piece: i for i, p in enumerate(pieces) if p.type == kind.CONTROL}
        symbols = {p.piece: i for i, p in enumerate(pieces) if p.type == kind.USER_DEFINED}
        self.special_tokens: dict[str, int] = {**control, **symbols}
        # Pieces sentencepiece's decode would not write as they are: control pieces (it writes
        # '') and symbols holding U+2581 (it writes ' ' for each).
        self._control_text = {i: t for t, i in control.items()}
        self._symbol_text = {i: t for t, i in symbols.items() if processor.decode([i]) != t}

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without eos."""
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str], num_threads: int = -1) -> list[np.ndarray]:
        """Token ids of each text, int32 [len_i], without eos; encoded on `num_threads` C++ threads
        (-1: all cores) with the GIL released."""
        return self._sp.encode(texts, return_type="numpy", num_threads=num_threads)

    def decode(self, ids, keep_special: bool = False) -> str:
        """The text of `ids` (a list or 1-D array); control pieces (eos, pad) decode to '' unless
        `keep_special` (then to their piece, e.g. '</s>'); user-defined symbols to their text."""
        ids = [int(i) for i in ids]
        verbatim = ({**self._symbol_text, **self._control_text} if keep_special
                    else self._symbol_text)
        if verbatim.keys().isdisjoint(ids):
            return self._sp.decode(ids)
        # Runs between the verbatim pieces decode alone: exact without a dummy prefix (trained
        # models; with one, a run's leading space would be dropped as at the start of a text).
        parts, start = [], 0
        for k, i in enumerate(ids):
            if i in verbatim:
                parts += [self._sp.decode(ids[start:k]), verbatim[i]]
                start = k + 1
        return "".join(parts) + self._sp.decode(ids[start:])

    def token_to_id(self, text: str) -> int | None:
        """The id of the piece spelled `text` in sentencepiece's alphabet (a space is U+2581),
        or None when there is none."""
        i = self._sp.piece_to_id(text)
        return i if self._sp.id_to_piece(i) == text else None

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.path!r}, vocab_size={self.vocab_size})"


def find_tokenizer(folder: str) -> str | None:
    """The tokenizer file in `folder`: its tokenizer.json (a Hugging Face release's) before its
    tokenizer.model; None when it holds neither."""
    for name in TOKENIZER_FILES:
        if os.path.isfile(path := os.path.join(folder, name)):
            return path
    return None


def copy_tokenizer(path: str, folder: str) -> str:
    """Copies the tokenizer file at `path` into `folder` under the name find_tokenizer looks for
    (a .json as tokenizer.json, with the tokenizer_config.json beside it that holds its special
    ids; anything else as tokenizer.model), each file atomically. Returns the copy's path."""
    import shutil

    from dsv3_jax.data.hf_tokenizer import CONFIG_FILE

    is_json = path.endswith(".json")
    copies = [(path, TOKENIZER_FILES[0] if is_json else TOKENIZER_FILES[1])]
    if is_json and os.path.isfile(config := os.path.join(os.path.dirname(path), CONFIG_FILE)):
        copies.append((config, CONFIG_FILE))
    for source, name in reversed(copies):  # the config first: a tokenizer.json never lacks it
        with atomic_file(os.path.join(folder, name), "wb") as out, open(source, "rb") as src:
            shutil.copyfileobj(src, out)
    return os.path.join(folder, copies[0][1])


def load_tokenizer(path: str, *, setting: str = "data.tokenizer") -> Tokenizer:
    """The tokenizer at `path`: a sentencepiece model file, a Hugging Face tokenizer.json (any
    name ending .json), or a folder holding tokenizer.json or tokenizer.model (find_tokenizer).
    DataError if it is missing, unreadable, or has no eos. `setting` names where the path came
    from in the messages (a config key or a flag)."""
    fix = ", or '' to train one on the corpus" if setting == "data.tokenizer" else ""
    wanted = "a sentencepiece .model file, a tokenizer.json or a folder holding one"
    if os.path.isdir(path):
        if (found := find_tokenizer(path)) is None:
            raise DataError(f"{setting}={path!r} is a folder without {' or '.join(TOKENIZER_FILES)}"
                            f"; give {wanted}{fix}.")
        path = found
    elif not os.path.isfile(path):
        raise DataError(f"{setting}={path!r} does not exist; give {wanted}{fix}.")
    if path.endswith(".json"):
        try:
            from dsv3_jax.data.hf_tokenizer import load_hf_tokenizer
        except ModuleNotFoundError as e:
            if e.name != "tokenizers":
                raise
            raise DataError(f"{setting}={path!r} is a Hugging Face tokenizer, which needs the "
                            "tokenizers package; pip install tokenizers.") from None
        return load_hf_tokenizer(path, f"{setting}={path!r}", fix)
    return _load_sentencepiece(path, setting, fix)


def _load_sentencepiece(path: str, setting: str, fix: str) -> SentencePieceTokenizer:
    processor, model = spm.SentencePieceProcessor(), b""
    try:
        with open(path, "rb") as f:
            model = f.read()
        processor.LoadFromSerializedProto(model)
    except (RuntimeError, OSError) as e:
        hint = "; a tokenizer.json must be named *.json" if model.lstrip()[:1] == b"{" else ""
        raise DataError(f"{setting}={path!r} is not a sentencepiece model ({e}{hint}); give a "
                        f".model file written by sentencepiece, a tokenizer.json or a folder "
                        f"holding one{fix}.") from None
    if processor.eos_id() < 0:
        raise DataError(f"{setting}={path!r} has no eos piece, which ends every document "
                        f"in the token stream; retrain it with --eos_id{fix}.")
    return SentencePieceTokenizer(path, processor, model)


def train_tokenizer(texts: Iterable[str], path: str, *, vocab_size: int,
                    num_threads: int | None = None) -> SentencePieceTokenizer:
    """Trains a BPE model of at most `vocab_size` pieces on `texts` and writes it to `path`
    (atomically: a crash leaves no partial model). CHAT_SPECIAL_TOKENS are reserved as
    user-defined symbols (ids 3, 4, ... in their order)."""
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_sentences(texts), model_writer=model,
            model_type="bpe", vocab_size=vocab_size, hard_vocab_limit=False,
            normalization_rule_name="identity", add_dummy_prefix=False,
            remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
            byte_fallback=True, split_digits=True,
            pad_id=PAD_ID, unk_id=UNK_ID, eos_id=EOS_ID, bos_id=-1,
            user_defined_symbols=list(CHAT_SPECIAL_TOKENS),
            max_sentence_length=4 * _SENTENCE_CHARS, input_sentence_size=0,
            num_threads=num_threads or os.cpu_count() or 1, minloglevel=2)
    except RuntimeError as e:
        raise _training_error(e, vocab_size) from None
    with atomic_file(path) as f:
        f.write(model.getvalue())
    tokenizer = _load_sentencepiece(path, "data.tokenizer", "")
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
