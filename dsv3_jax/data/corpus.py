"""Corpora: which files hold the documents, how each file is read, and which split a document is in.

A corpus is an ordered list of files, each read in one of three formats:

    text         the whole file is one document (UTF-8)
    jsonl        each non-blank line is one document: a JSON object whose `text_field` is a string
    arrayrecord  each record is one document: UTF-8 text, or a JSON object with `text_field`
                 (decided per file by its first record)

The built-in corpus is the `.py` sources of the running interpreter's standard library
(`sysconfig.get_paths()["stdlib"]`, recursively, without site-packages / dist-packages): about
1700 files / 32 MB for CPython 3.12, so a default training run needs no download. Its three
deliberately non-UTF-8 test fixtures are skipped.

Split. Every document has a key, a string that names it the same way on every machine:

    text file            its path relative to the corpus root
    jsonl / arrayrecord  "<relative path>:<0-based line or record index>"

The corpus root is the stdlib directory for the built-in corpus and the deepest directory holding
all files of a user corpus. A document is in the validation split iff unit_hash(key) <
validation_fraction, where unit_hash is the first 8 bytes of sha1(key) read as a fraction of 2**64;
so the split depends on nothing but the files' relative layout (and for the built-in corpus, on the
Python version), and adding a document never moves another one. Empty documents are skipped: alone
they would be a bare eos.

Errors in the input (missing files, directories, broken symlinks, bad JSON, non-UTF-8 text, ...)
raise DataError naming the file (and line or record), the cause and the fix.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import pathlib
import re
import sysconfig
from collections.abc import Callable, Iterator

from absl import logging

BUILTIN = "builtin"
FORMATS = ("auto", "text", "jsonl", "arrayrecord")
SPLITS = ("train", "validation")
# Directories of installed packages that can sit inside a stdlib tree (Debian uses dist-packages).
_NOT_STDLIB = frozenset({"site-packages", "dist-packages", "__pycache__"})
_ARRAYRECORD_NAME = re.compile(r"\.array_?record(-\d+-of-\d+)?$", re.IGNORECASE)
_RECORDS_PER_READ = 1024


class DataError(ValueError):
    """The data configuration or the corpus cannot be used; the message names cause and fix."""


@dataclasses.dataclass(frozen=True)
class CorpusFile:
    """One file of a corpus."""

    path: str  # what is opened
    key: str  # its path relative to the corpus root, '/'-separated (the module docstring's key)
    format: str  # text, jsonl or arrayrecord


@dataclasses.dataclass(frozen=True)
class Corpus:
    """An ordered, de-duplicated list of files and the rule that splits their documents.

    Invariant: `files` is non-empty; 0 < validation_fraction < 1.
    """

    name: str  # "builtin" or the corpus string as configured
    root: str  # the directory that file keys are relative to
    files: tuple[CorpusFile, ...]
    validation_fraction: float
    text_field: str
    builtin: bool = False  # built-in corpus: non-UTF-8 files are skipped instead of refused

    def describe(self) -> str:
        if self.builtin:
            return f"the built-in corpus ({len(self.files)} .py files under {self.root})"
        return f"corpus {self.name!r} ({len(self.files)} file(s))"

    def in_split(self, key: str, split: str) -> bool:
        return (unit_hash(key) < self.validation_fraction) == (split == "validation")

    def documents(self, split: str, *, sample: float = 1.0, salt: str = "") -> Iterator[str]:
        """The non-empty documents of `split`, in file order then line / record order.

        With sample < 1, only documents with unit_hash(salt + key) < sample (a deterministic
        subsample, decided before the document is read or parsed).
        """
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")

        keep = lambda key: (self.in_split(key, split)
                            and (sample >= 1.0 or unit_hash(salt + key) < sample))
        for file in self.files:
            yield from filter(None, _READERS[file.format](file, keep, self))  # drops empty texts

    def fingerprint(self) -> dict:
        """What the documents of either split depend on: the split rule and each file's path,
        format, size and modification time (the files are not read)."""
        files = []
        for file in self.files:
            try:
                stat = os.stat(file.path)
            except OSError as e:
                raise DataError(f"corpus file {file.path} cannot be read ({e.strerror}); it was "
                                "listed a moment ago: restore it or remove it from data.corpus.")
            files.append([os.path.abspath(file.path), file.format, stat.st_size, stat.st_mtime_ns])
        return {"corpus": self.name, "text_field": self.text_field,
                "validation_fraction": self.validation_fraction, "files": files}

    def total_bytes(self) -> int:
        return sum(size for _, _, size, _ in self.fingerprint()["files"])


def unit_hash(key: str) -> float:
    """A deterministic, platform-independent hash of `key` in [0, 1)."""
    return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") / 2.0**64


def check_corpus_settings(data_cfg) -> None:
    """Refuses corpus settings no corpus can be opened with (`corpus`, `format`, `text_field`,
    `validation_fraction`), without touching any file."""
    spec, fmt = data_cfg.corpus, data_cfg.format
    if fmt not in FORMATS:
        raise DataError(f"data.format={fmt!r} is not a known format; use one of {FORMATS} "
                        "('auto' picks by extension: .jsonl/.json -> jsonl, "
                        ".arrayrecord/.array_record -> arrayrecord, anything else -> text).")
    fraction = data_cfg.validation_fraction
    if not isinstance(fraction, (int, float)) or not 0.0 < fraction < 1.0:
        raise DataError(f"data.validation_fraction={fraction!r} must be a number strictly between "
                        "0 and 1 (the share of documents held out for validation), e.g. 0.05.")
    if not isinstance(data_cfg.text_field, str) or not data_cfg.text_field:
        raise DataError(f"data.text_field={data_cfg.text_field!r} must be a non-empty string: the "
                        "JSON field that holds each document's text, e.g. 'text'.")
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"data.corpus={spec!r} must be 'builtin' or a path, glob or "
                        "comma-separated list of paths and globs.")


def open_corpus(data_cfg) -> Corpus:
    """The corpus `data_cfg` names: lists and checks the files (existence, type, format), reads
    none of them."""
    check_corpus_settings(data_cfg)
    spec, fmt, fraction = data_cfg.corpus, data_cfg.format, data_cfg.validation_fraction
    if spec.strip() == BUILTIN:
        if fmt not in ("auto", "text"):
            raise DataError(f"data.format={fmt!r} does not apply to the built-in corpus (its files "
                            "are Python sources, read as text); use format 'auto'.")
        return Corpus(BUILTIN, sysconfig.get_paths()["stdlib"], builtin_files(), float(fraction),
                      data_cfg.text_field, builtin=True)
    paths = _resolve(spec)
    root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
    files = tuple(
        CorpusFile(p, pathlib.Path(os.path.relpath(os.path.abspath(p), root)).as_posix(),
                   _format_of(p, fmt))
        for p in paths)
    return Corpus(spec, root, files, float(fraction), data_cfg.text_field)


def builtin_files() -> tuple[CorpusFile, ...]:
    """The .py files of the interpreter's standard library, sorted by path relative to its root."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _NOT_STDLIB)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if name.endswith(".py") and os.path.isfile(path):
                key = pathlib.Path(os.path.relpath(path, root)).as_posix()
                files.append(CorpusFile(path, key, "text"))
    if not files:
        raise DataError(f"the built-in corpus is empty: no .py files under the standard library "
                        f"directory {root} (a Python without its sources?); set data.corpus to "
                        "your own text files.")
    return tuple(sorted(files, key=lambda f: f.key))


def _resolve(spec: str) -> list[str]:
    """The files named by a comma-separated list of paths and globs, in order, without repeats."""
    paths: list[str] = []
    for entry in (e.strip() for e in spec.split(",") if e.strip()):
        pattern = os.path.expanduser(entry)
        if glob.has_magic(pattern):
            found = [m for m in sorted(glob.glob(pattern, recursive=True)) if not os.path.isdir(m)]
            if not found:
                raise DataError(f"data.corpus: the glob {entry!r} matches no files; check the "
                                "pattern (relative patterns start at the current directory "
                                f"{os.getcwd()}; use ** for subdirectories, e.g. 'data/**/*.txt').")
        else:
            found = [pattern]
        for path in found:
            _check_file(path, entry)
        paths += found
    if not paths:
        raise DataError(f"data.corpus={spec!r} names no files; give 'builtin' or paths / globs.")
    first = {}  # real path -> the first path naming it
    for path in paths:
        first.setdefault(os.path.realpath(path), path)
    return list(first.values())


def _check_file(path: str, entry: str) -> None:
    if os.path.islink(path) and not os.path.exists(path):
        raise DataError(f"data.corpus: {path} is a broken symbolic link (to "
                        f"{os.readlink(path)!r}); fix the link or leave it out of data.corpus "
                        f"({entry!r}).")
    if not os.path.exists(path):
        raise DataError(f"data.corpus: {path} does not exist (current directory {os.getcwd()}); "
                        "fix the path, or give 'builtin' for the built-in corpus.")
    if os.path.isdir(path):
        raise DataError(f"data.corpus: {path} is a directory; name its files with a glob, e.g. "
                        f"'{os.path.join(path, '**', '*.txt')}'.")
    if not os.access(path, os.R_OK):
        raise DataError(f"data.corpus: {path} is not readable (permissions); make it readable.")


def _format_of(path: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    name = os.path.basename(path).lower()
    if name.endswith((".jsonl", ".json")):
        return "jsonl"
    if _ARRAYRECORD_NAME.search(name):
        return "arrayrecord"
    return "text"


# ---- readers: each yields the texts of the documents whose key passes `keep` -------------------

def _read_text(file: CorpusFile, keep: Callable[[str], bool], corpus: Corpus) -> Iterator[str]:
    if not keep(file.key):
        return
    try:
        with open(file.path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise _unreadable(file.path, e) from None
    try:
        yield data.decode("utf-8")
    except UnicodeDecodeError as e:
        if corpus.builtin:
            logging.debug("built-in corpus: skipping %s (not UTF-8)", file.path)
            return
        raise DataError(f"corpus file {file.path} is not valid UTF-8 text ({e.reason} at byte "
                        f"{e.start}); convert it to UTF-8 (e.g. iconv -t UTF-8) or leave it out "
                        "of data.corpus.") from None


def _read_jsonl(file: CorpusFile, keep: Callable[[str], bool], corpus: Corpus) -> Iterator[str]:
    try:
        with open(file.path, "rb") as f:
            for index, raw in enumerate(f):
                if not keep(f"{file.key}:{index}") or not raw.strip():
                    continue
                where = f"{file.path}, line {index + 1}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start} of "
                                    "the line); JSONL corpora must be UTF-8.") from None
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: not valid JSON ({e.msg}, column {e.colno}); a "
                                    "JSONL corpus needs one JSON object per line (set "
                                    "data.format='text' to read the file as one plain-text "
                                    "document).") from None
                yield _text_of(obj, corpus.text_field, where)
    except OSError as e:
        raise _unreadable(file.path, e) from None


def _read_arrayrecord(file: CorpusFile, keep: Callable[[str], bool],
                      corpus: Corpus) -> Iterator[str]:
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top

    try:
        reader = array_record_module.ArrayRecordReader(file.path)
        problem = None if reader.ok() else "the reader cannot parse it"
    except Exception as e:  # pylint: disable=broad-except  (riegeli's status, as RuntimeError etc.)
        problem = str(e)
    if problem:
        raise DataError(f"corpus file {file.path} is not a readable ArrayRecord file ({problem}); "
                        "check the file, or set data.format to how it is really stored.")
    try:
        count = reader.num_records()
        is_json = count > 0 and _is_json_object(reader.read([0])[0])
        for begin in range(0, count, _RECORDS_PER_READ):
            indices = [i for i in range(begin, min(begin + _RECORDS_PER_READ, count))
                       if keep(f"{file.key}:{i}")]
            for index, record in zip(indices, reader.read(indices)):
                where = f"{file.path}, record {index}"
                try:
                    text = record.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start}); "
                                    "records must be UTF-8 text or UTF-8 JSON objects "
                                    "(serialized protos such as tf.train.Example are not "
                                    "supported).") from None
                if is_json:
                    try:
                        text = _text_of(json.loads(text), corpus.text_field, where)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{where}: not valid JSON ({e.msg}) although the file's "
                                        "first record is a JSON object; make every record a JSON "
                                        "object, or every record plain text.") from None
                yield text
    except RuntimeError as e:
        raise DataError(f"corpus file {file.path}: ArrayRecord read failed ({e}); the file may "
                        "be truncated or corrupt: rewrite it or leave it out of data.corpus."
                        ) from None
    finally:
        reader.close()


def _is_json_object(record: bytes) -> bool:
    if not record.lstrip().startswith(b"{"):
        return False
    try:
        return isinstance(json.loads(record.decode("utf-8")), dict)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False


def _text_of(obj, field: str, where: str) -> str:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: a JSON {type(obj).__name__}, not an object; each document must "
                        f"be a JSON object with the text in field {field!r}.")
    if field not in obj:
        raise DataError(f"{where}: no field {field!r} (fields: {sorted(obj)[:10]}); set "
                        "data.text_field to the field that holds the text.")
    text = obj[field]
    if not isinstance(text, str):
        raise DataError(f"{where}: field {field!r} holds a {type(text).__name__}, not a string; "
                        "set data.text_field to the field that holds the text.")
    return text


def _unreadable(path: str, e: OSError) -> DataError:
    return DataError(f"corpus file {path} cannot be read ({e.strerror or e}); check that it "
                     "exists and is a readable regular file, or leave it out of data.corpus.")


_READERS = {"text": _read_text, "jsonl": _read_jsonl, "arrayrecord": _read_arrayrecord}
