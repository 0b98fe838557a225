"""Data pipeline tests: tokenizer round trip, packing, exact resumption, shuffling and sharding,
splits, store reuse, corpus formats and every refused input.

Expected values are computed here from the source texts with sentencepiece itself and the split
rule written out below (sha1 of the document key), never read back from the pipeline alone.
Corpora are generated into tmp_path; one tokenizer (vocab 512) is trained per module.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import shutil

import ml_collections
import numpy as np
import pytest
import sentencepiece as spm
from array_record.python.array_record_module import ArrayRecordWriter

from dsv3_jax.data import corpus as corpus_lib
from dsv3_jax.data import pipeline
from dsv3_jax.data.pipeline import DataError, eval_batches, prepare_data, train_iterator

VOCAB = 512
FRACTION = 0.2
EOS = 2
WORDS = ["alpha", "beta", "gamma", "delta", "kappa", "sigma", "omega", "lambda", "theta", "zeta"]


def data_config(**overrides) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict(dict(
        corpus="builtin", format="auto", text_field="text", validation_fraction=FRACTION,
        tokenizer="", tokenizer_train_bytes=1_000_000, seq_len=64, batch_size=4, num_threads=2,
        prefetch=4))
    cfg.update(overrides)
    return cfg


def in_validation(key: str, fraction: float) -> bool:
    """The split rule, written out: sha1(key)'s first 8 bytes as a fraction of 2**64."""
    return int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big") / 2**64 < fraction


def make_document(rng: np.random.Generator, i: int) -> str:
    """Unique code-like text: indentation, tabs, blank lines, trailing spaces, non-ASCII; from one
    line to a few hundred tokens, so documents both share sequences and span several."""
    lines = [f"# module {i}: ünïcödé ✓ 中文 {rng.choice(WORDS)}"]
    for f in range(int(rng.integers(0, 7))):
        lines += [f"def {rng.choice(WORDS)}_{i}_{f}(x, y={rng.integers(1000)}):",
                  f'    """Return the {rng.choice(WORDS)} of x."""',
                  f"\tif x > {rng.integers(10**6)}:   ",
                  f"        return x * {rng.integers(100)} + y  ",
                  "", ""]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    """48 text files; returns (directory, {file name: text})."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    docs = {f"doc_{i:03d}.py": make_document(rng, i) for i in range(48)}
    for name, text in docs.items():
        (root / name).write_text(text, encoding="utf-8")
    return root, docs


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, corpus_dir):
    """(config, Data, workdir) for the generated corpus, with a tokenizer trained into workdir."""
    root, _ = corpus_dir
    workdir = tmp_path_factory.mktemp("workdir")
    cfg = data_config(corpus=str(root / "*.py"))
    return cfg, prepare_data(cfg, str(workdir), model_vocab_size=VOCAB), workdir


def split_texts(docs: dict[str, str], split: str, fraction: float = FRACTION) -> list[str]:
    """The split's non-empty documents in corpus (file name) order, by the written-out rule."""
    return [docs[k] for k in sorted(docs)
            if docs[k] and in_validation(k, fraction) == (split == "validation")]


def flat_stream(model_file: str, texts: list[str]) -> tuple[np.ndarray, list[int]]:
    """Documents encoded by sentencepiece itself, each followed by eos; and each one's start."""
    sp = spm.SentencePieceProcessor(model_file=model_file)
    ids, starts = [], []
    for text in texts:
        starts.append(len(ids))
        ids += sp.encode(text) + [EOS]
    return np.array(ids), starts


def expect_data_error(fn, *fragments: str) -> str:
    with pytest.raises(DataError) as info:
        fn()
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in: {message}"
    return message


# ---- tokenizer ---------------------------------------------------------------------------------

ROUND_TRIP = [
    "",
    "def f(x):\n\tif x:\n        return 'é中'  \n\n\n    pass\n",
    "  leading spaces and trailing ones   \n\n",
    "\t\ttabs\tinside\t\n\r\nwindows line end\r\n",
    "class A:\n    def m(self):  # ✓ ünïcödé 中文 🐍 Ωμέγα привет\n        return None\n",
    "no newline at end    ",
    "\n\n\n",
    "e\u0301 combining; zero\u200bwidth; \U0001F600\U0001F680",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_tokenizer_round_trips_exactly(prepared, text):
    tokenizer = prepared[1].tokenizer
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert EOS not in ids  # eos is added by the pipeline, never by encode
    assert tokenizer.decode(ids + [EOS]) == text


def test_trained_tokenizer_settings(prepared, corpus_dir):
    cfg, data, workdir = prepared
    path = str(workdir / "tokenizer.model")
    assert data.tokenizer.path == path and os.path.isfile(path)
    sp = spm.SentencePieceProcessor(model_file=path)
    assert (sp.pad_id(), sp.unk_id(), sp.eos_id(), sp.bos_id()) == (0, 1, 2, -1)
    assert (data.tokenizer.pad_id, data.tokenizer.eos_id) == (0, 2)
    assert data.tokenizer.vocab_size == sp.vocab_size() <= VOCAB
    for text in corpus_dir[1].values():
        assert sp.decode(sp.encode(text)) == text


def test_tokenizer_training_text_is_capped(corpus_dir, tmp_path, monkeypatch):
    seen = []
    real_train = pipeline.train_tokenizer

    def spy(texts, path, **kwargs):
        seen.extend(texts)
        return real_train(texts, path, **kwargs)

    monkeypatch.setattr(pipeline, "train_tokenizer", spy)
    cfg = data_config(corpus=str(corpus_dir[0] / "*.py"), tokenizer_train_bytes=5000)
    prepare_data(cfg, str(tmp_path), model_vocab_size=VOCAB)
    size = sum(len(t.encode()) for t in seen)
    assert 0 < size <= 5000
    validation = set(split_texts(corpus_dir[1], "validation"))
    assert not validation & set(seen)  # only training-split text


def test_trained_tokenizer_is_reused(prepared, monkeypatch):
    cfg, data, workdir = prepared
    path = workdir / "tokenizer.model"
    mtime = path.stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("the tokenizer was trained again")

    monkeypatch.setattr(spm.SentencePieceTrainer, "train", no_training)
    again = prepare_data(cfg, str(workdir), model_vocab_size=VOCAB)
    assert again.tokenizer.sha256 == data.tokenizer.sha256
    assert path.stat().st_mtime_ns == mtime


def test_user_tokenizer_is_accepted(prepared, tmp_path):
    cfg, data, workdir = prepared
    user_model = tmp_path / "user.model"
    shutil.copy(workdir / "tokenizer.model", user_model)
    other = tmp_path / "work"
    got = prepare_data(data_config(corpus=cfg.corpus, tokenizer=str(user_model)), str(other),
                       model_vocab_size=VOCAB)
    assert got.tokenizer.path == str(user_model)
    assert not (other / "tokenizer.model").exists()
    assert got.train.tokens_sha1 == data.train.tokens_sha1


# ---- token stores and packing ------------------------------------------------------------------

def test_token_stream_is_documents_each_followed_by_eos(prepared, corpus_dir):
    cfg, data, workdir = prepared
    for split, store in (("train", data.train), ("validation", data.validation)):
        texts = split_texts(corpus_dir[1], split)
        expected, starts = flat_stream(str(workdir / "tokenizer.model"), texts)
        assert store.num_documents == len(texts)
        assert store.num_tokens == len(expected)
        np.testing.assert_array_equal(store.read(0, store.num_tokens), expected)
        np.testing.assert_array_equal(store.doc_offsets, starts + [len(expected)])
        assert store.dtype == np.uint16


def expected_packing(starts: list[int], index: int, seq_len: int) -> tuple[list, list]:
    """segment_ids and positions of sequence `index`, worked out token by token."""
    segments, positions = [], []
    first = bisect.bisect_right(starts, index * seq_len) - 1
    for t in range(seq_len):
        g = index * seq_len + t
        d = bisect.bisect_right(starts, g) - 1
        segments.append(d - first + 1)
        positions.append(g - max(starts[d], index * seq_len))
    return segments, positions


def test_packing_follows_document_boundaries(prepared, corpus_dir):
    cfg, data, workdir = prepared
    seq_len = cfg.seq_len
    texts = split_texts(corpus_dir[1], "train")
    expected, starts = flat_stream(str(workdir / "tokenizer.model"), texts)
    n = data.train.num_sequences(seq_len)
    assert n == len(expected) // seq_len
    sp = spm.SentencePieceProcessor(model_file=str(workdir / "tokenizer.model"))

    rebuilt, current, multi_segment = [], [], 0
    for i in range(n):
        seq = data.train.sequence(i, seq_len)
        assert {k: (v.dtype, v.shape) for k, v in seq.items()} == {
            k: (np.dtype(np.int32), (seq_len,)) for k in ("tokens", "segment_ids", "positions")}
        np.testing.assert_array_equal(seq["tokens"], expected[i * seq_len:(i + 1) * seq_len])
        segments, positions = expected_packing(starts, i, seq_len)
        np.testing.assert_array_equal(seq["segment_ids"], segments)
        np.testing.assert_array_equal(seq["positions"], positions)
        assert seq["segment_ids"].min() == 1  # nothing to pad: segment 0 never appears
        multi_segment += seq["segment_ids"].max() > 1
        # Each segment is one document piece: eos only as its last token, and a piece that is
        # not cut by the window's end ends with eos.
        for s in range(1, seq["segment_ids"].max() + 1):
            piece = seq["tokens"][seq["segment_ids"] == s]
            assert EOS not in piece[:-1]
            if s < seq["segment_ids"].max():
                assert piece[-1] == EOS
            current += piece.tolist()
            if piece[-1] == EOS:
                rebuilt.append(sp.decode(current[:-1]))
                current = []
    assert multi_segment > 0 and len(rebuilt) < len(texts)  # some packing, some documents cut
    assert rebuilt == texts[:len(rebuilt)]  # the pieces put back together are the documents
    end = n * seq_len  # the partial sequence after it is dropped
    assert current == expected[end - len(current):end].tolist()


def test_eval_batches_are_the_first_validation_sequences(prepared, corpus_dir):
    cfg, data, workdir = prepared
    expected, _ = flat_stream(str(workdir / "tokenizer.model"),
                              split_texts(corpus_dir[1], "validation"))
    batches = eval_batches(data, cfg, 2)
    assert len(batches) == 2
    rows = np.concatenate([b["tokens"] for b in batches])
    assert rows.shape == (2 * cfg.batch_size, cfg.seq_len) and rows.dtype == np.int32
    np.testing.assert_array_equal(rows.reshape(-1), expected[:rows.size])
    available = (len(expected) // cfg.seq_len) // cfg.batch_size
    assert len(eval_batches(data, cfg, 10_000)) == available
    too_big = data_config(corpus=cfg.corpus, batch_size=len(expected) // cfg.seq_len + 1)
    expect_data_error(lambda: eval_batches(data, too_big, 1), "validation split",
                      "fewer than one batch", "validation_fraction")


# ---- iterator: resumption, shuffling, sharding --------------------------------------------------

def take(iterator, n: int) -> list[dict]:
    return [next(iterator) for _ in range(n)]


def test_iterator_resumes_on_the_exact_next_batch(prepared):
    cfg, data, _ = prepared
    per_epoch = data.train.num_sequences(cfg.seq_len) // cfg.batch_size
    reference = take(train_iterator(data, cfg, seed=3), per_epoch + 8)
    # Resume early, and just before the first epoch ends (the rest crosses the boundary).
    for k in (2, per_epoch - 3):
        it = train_iterator(data, cfg, seed=3)
        take(it, k)
        state = json.loads(json.dumps(it.get_state()))
        it.close()
        resumed = train_iterator(data, cfg, seed=3)
        resumed.set_state(state)
        for want, got in zip(reference[k:], take(resumed, len(reference) - k)):
            for key in want:
                np.testing.assert_array_equal(got[key], want[key])


def test_iterator_refuses_a_state_from_other_settings(prepared):
    cfg, data, _ = prepared
    it = train_iterator(data, cfg, seed=3)
    take(it, 1)
    state = json.loads(json.dumps(it.get_state()))
    expect_data_error(lambda: train_iterator(data, cfg, seed=4).set_state(state), "seed",
                      "saved 3, now 4")


def sequence_index(prepared, corpus_dir) -> dict[bytes, int]:
    cfg, data, workdir = prepared
    expected, _ = flat_stream(str(workdir / "tokenizer.model"), split_texts(corpus_dir[1], "train"))
    n = len(expected) // cfg.seq_len
    index = {expected[i * cfg.seq_len:(i + 1) * cfg.seq_len].astype(np.int32).tobytes(): i
             for i in range(n)}
    assert len(index) == n  # generated documents are unique, so are sequences
    return index


def rows_of(batches: list[dict], index: dict[bytes, int]) -> list[int]:
    return [index[row.tobytes()] for b in batches for row in b["tokens"]]


def test_each_epoch_is_a_new_permutation_of_all_sequences(prepared, corpus_dir):
    cfg, data, _ = prepared
    index = sequence_index(prepared, corpus_dir)
    n = len(index)
    batches = take(train_iterator(data, cfg, seed=0), -(-2 * n // cfg.batch_size))
    for b in batches:
        assert set(b) == {"tokens", "segment_ids", "positions"}
        assert all(v.dtype == np.int32 and v.shape == (cfg.batch_size, cfg.seq_len)
                   for v in b.values())
    order = rows_of(batches, index)
    first, second = order[:n], order[n:2 * n]
    assert sorted(first) == list(range(n)) and sorted(second) == list(range(n))
    assert first != second and first != list(range(n))
    other_seed = rows_of(take(train_iterator(data, cfg, seed=1), 3), index)
    assert other_seed != first[:len(other_seed)]
    assert rows_of(take(train_iterator(data, cfg, seed=0), 3), index) == first[:len(other_seed)]


def test_process_shards_split_each_global_batch(prepared, corpus_dir):
    cfg, data, _ = prepared
    index = sequence_index(prepared, corpus_dir)
    steps = 6
    whole = take(train_iterator(data, cfg, seed=5), steps)
    shards = [take(train_iterator(data, cfg, seed=5, process_index=p, process_count=2), steps)
              for p in range(2)]
    for k in range(steps):
        parts = [rows_of([shard[k]], index) for shard in shards]
        assert all(shard[k]["tokens"].shape == (cfg.batch_size // 2, cfg.seq_len)
                   for shard in shards)
        assert not set(parts[0]) & set(parts[1])
        assert sorted(parts[0] + parts[1]) == sorted(rows_of([whole[k]], index))


# ---- corpora -----------------------------------------------------------------------------------

def test_builtin_corpus_split_is_deterministic_and_disjoint():
    cfg = data_config(validation_fraction=0.05)
    first, second = corpus_lib.open_corpus(cfg), corpus_lib.open_corpus(cfg)
    assert first.files == second.files
    keys = [f.key for f in first.files]
    assert len(keys) > 500 and len(set(keys)) == len(keys)
    assert all(k.endswith(".py") and "site-packages" not in k.split("/") for k in keys)
    assert any(k == "os.py" for k in keys)
    validation = {k for k in keys if first.in_split(k, "validation")}
    train = {k for k in keys if first.in_split(k, "train")}
    assert not validation & train and validation | train == set(keys)
    assert validation == {k for k in keys if in_validation(k, 0.05)}
    assert 0.02 < len(validation) / len(keys) < 0.1


def write_jsonl(path, texts: list[str]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"id": i, "text": text}) + "\n")


def write_arrayrecord(path, records: list[bytes]) -> None:
    writer = ArrayRecordWriter(str(path), "group_size:1")
    for record in records:
        writer.write(record)
    writer.close()


def test_jsonl_and_arrayrecord_corpora(prepared, tmp_path):
    _, data, workdir = prepared
    rng = np.random.default_rng(1)
    texts = [make_document(rng, 1000 + i) for i in range(30)]
    jsonl, plain, records = texts[:10], texts[10:20], texts[20:]
    root = tmp_path / "corpus"
    root.mkdir()
    write_jsonl(root / "docs.jsonl", jsonl[:5])
    with open(root / "docs.jsonl", "a", encoding="utf-8") as f:  # a blank line keeps its index
        f.write("\n")
        f.writelines(json.dumps({"text": t}) + "\n" for t in jsonl[5:])
    write_arrayrecord(root / "plain.array_record", [t.encode() for t in plain])
    write_arrayrecord(root / "records.arrayrecord",
                      [json.dumps({"text": t, "n": i}).encode() for i, t in enumerate(records)])
    keyed = ([(f"docs.jsonl:{i}", t) for i, t in enumerate(jsonl[:5])]
             + [(f"docs.jsonl:{i + 6}", t) for i, t in enumerate(jsonl[5:])]
             + [(f"plain.array_record:{i}", t) for i, t in enumerate(plain)]
             + [(f"records.arrayrecord:{i}", t) for i, t in enumerate(records)])
    cfg = data_config(corpus=str(root / "*"), validation_fraction=0.3,
                      tokenizer=str(workdir / "tokenizer.model"))
    got = prepare_data(cfg, str(tmp_path / "work"), model_vocab_size=VOCAB)
    for split, store in (("train", got.train), ("validation", got.validation)):
        want = [t for k, t in keyed if in_validation(k, 0.3) == (split == "validation")]
        decoded = [got.tokenizer.decode(store.document(d)[:-1]) for d in range(store.num_documents)]
        assert decoded == want


def test_token_store_is_reused_when_current_and_rebuilt_when_not(prepared, corpus_dir, tmp_path,
                                                                  monkeypatch):
    _, data, workdir = prepared
    root = tmp_path / "corpus"
    shutil.copytree(corpus_dir[0], root)
    cfg = data_config(corpus=str(root / "*.py"), tokenizer=str(workdir / "tokenizer.model"))
    work = tmp_path / "work"
    first = prepare_data(cfg, str(work), model_vocab_size=VOCAB)
    assert first.train.tokens_sha1 == data.train.tokens_sha1

    builds = []
    real_build = pipeline._build_store
    monkeypatch.setattr(pipeline, "_build_store",
                        lambda path, *a, **k: (builds.append(path), real_build(path, *a, **k)))
    fingerprint = work / "tokens" / "train" / "fingerprint.json"
    mtime = fingerprint.stat().st_mtime_ns
    again = prepare_data(cfg, str(work), model_vocab_size=VOCAB)
    assert builds == [] and fingerprint.stat().st_mtime_ns == mtime
    assert again.train.tokens_sha1 == first.train.tokens_sha1

    name = next(k for k in sorted(corpus_dir[1]) if not in_validation(k, FRACTION))
    changed = corpus_dir[1][name] + "x = 'appended'\n"
    (root / name).write_text(changed, encoding="utf-8")
    rebuilt = prepare_data(cfg, str(work), model_vocab_size=VOCAB)
    assert str(work / "tokens" / "train") in builds
    assert rebuilt.train.tokens_sha1 != first.train.tokens_sha1
    decoded = {rebuilt.tokenizer.decode(rebuilt.train.document(d)[:-1])
               for d in range(rebuilt.train.num_documents)}
    assert changed in decoded and corpus_dir[1][name] not in decoded

    # Another tokenizer: both stores are rebuilt with its ids.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_dir[1].values()), model_prefix=str(tmp_path / "other"),
        model_type="bpe", vocab_size=420, hard_vocab_limit=False, byte_fallback=True,
        pad_id=0, unk_id=1, eos_id=2, bos_id=-1, minloglevel=2)
    builds.clear()
    cfg.tokenizer = str(tmp_path / "other.model")
    other = prepare_data(cfg, str(work), model_vocab_size=VOCAB)
    assert sorted(builds) == [str(work / "tokens" / s) for s in ("train", "validation")]
    sp = spm.SentencePieceProcessor(model_file=cfg.tokenizer)
    np.testing.assert_array_equal(other.train.document(0)[:-1], sp.encode(changed))


# ---- refused inputs ----------------------------------------------------------------------------

def name_in(split: str, fraction: float, stem: str = "only") -> str:
    """A file name whose document falls in `split`."""
    return next(n for i in range(1000) if in_validation(n := f"{stem}_{i}.txt", fraction)
                == (split == "validation"))


@pytest.fixture
def tok(prepared):
    return str(prepared[2] / "tokenizer.model")


def run(tmp_path, **overrides):
    return lambda: prepare_data(data_config(**overrides), str(tmp_path / "work"),
                                model_vocab_size=VOCAB)


def test_refuses_a_glob_or_path_that_matches_nothing(tmp_path, tok):
    expect_data_error(run(tmp_path, corpus=str(tmp_path / "nothing" / "*.txt"), tokenizer=tok),
                      "matches no files", "*.txt")
    expect_data_error(run(tmp_path, corpus=str(tmp_path / "missing.txt"), tokenizer=tok),
                      "missing.txt", "does not exist")


def test_refuses_an_empty_corpus(tmp_path):
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text("")
    write_jsonl(tmp_path / "c.jsonl", ["", ""])
    expect_data_error(run(tmp_path, corpus=str(tmp_path / "*.*")), "is empty",
                      "no non-empty documents")


def test_refuses_a_split_that_ends_up_empty(tmp_path, tok):
    (tmp_path / name_in("train", 0.05)).write_text("print('the only document')\n")
    expect_data_error(run(tmp_path, corpus=str(tmp_path / "*.txt"), tokenizer=tok,
                          validation_fraction=0.05),
                      "validation split", "is empty", "1 non-empty document",
                      "add more documents", "validation_fraction")
    (tmp_path / "work").mkdir(exist_ok=True)
    only_validation = tmp_path / "v"
    only_validation.mkdir()
    (only_validation / name_in("validation", 0.5)).write_text("x = 1\n")
    expect_data_error(run(tmp_path, corpus=str(only_validation / "*.txt"), validation_fraction=0.5),
                      "train split", "is empty")


def test_refuses_malformed_jsonl(tmp_path, tok):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": oops}\n')
    expect_data_error(run(tmp_path, corpus=str(path), tokenizer=tok, validation_fraction=0.01),
                      str(path), "line 3", "not valid JSON")
    path.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    expect_data_error(run(tmp_path, corpus=str(path), tokenizer=tok, validation_fraction=0.01),
                      str(path), "line 2", "'text'", "body", "data.text_field")


def test_refuses_a_file_that_is_not_utf8(tmp_path, tok):
    (tmp_path / "good.txt").write_text("fine\n")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\u00e9\n".encode("latin-1"))
    expect_data_error(run(tmp_path, corpus=str(tmp_path / "*.txt"), tokenizer=tok,
                          validation_fraction=0.01), str(bad), "not valid UTF-8")


def test_refuses_a_broken_arrayrecord_file(tmp_path, tok):
    bad = tmp_path / "junk.arrayrecord"
    bad.write_bytes(b"not an array record" * 10)
    expect_data_error(run(tmp_path, corpus=str(bad), tokenizer=tok), str(bad),
                      "not a readable ArrayRecord file")


def test_refuses_a_directory_or_a_broken_symlink(tmp_path, tok):
    (tmp_path / "dir").mkdir()
    expect_data_error(run(tmp_path, corpus=str(tmp_path / "dir"), tokenizer=tok),
                      "is a directory", "glob")
    link = tmp_path / "link.txt"
    link.symlink_to(tmp_path / "gone.txt")
    expect_data_error(run(tmp_path, corpus=str(link), tokenizer=tok), str(link),
                      "broken symbolic link")


def test_refuses_an_unknown_format(tmp_path, corpus_dir, tok):
    expect_data_error(run(tmp_path, corpus=str(corpus_dir[0] / "*.py"), format="parquet",
                          tokenizer=tok), "data.format='parquet'", "auto", "jsonl", "arrayrecord")


def test_refuses_a_bad_user_tokenizer(tmp_path, corpus_dir):
    corpus = str(corpus_dir[0] / "*.py")
    expect_data_error(run(tmp_path, corpus=corpus, tokenizer=str(tmp_path / "no.model")),
                      "no.model", "does not exist")
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"this is not a model")
    expect_data_error(run(tmp_path, corpus=corpus, tokenizer=str(junk)), str(junk),
                      "not a sentencepiece model")


def test_refuses_a_tokenizer_larger_than_the_model_vocab(prepared, tmp_path, tok):
    n = prepared[1].tokenizer.vocab_size
    expect_data_error(
        lambda: prepare_data(data_config(corpus=prepared[0].corpus, tokenizer=tok),
                             str(tmp_path / "work"), model_vocab_size=n - 1),
        f"{n} pieces", f"vocab_size is {n - 1}", f"config.model.vocab_size >= {n}",
        "another tokenizer")


def test_refuses_a_vocab_too_small_to_train_on_the_corpus(tmp_path, corpus_dir):
    expect_data_error(
        lambda: prepare_data(data_config(corpus=str(corpus_dir[0] / "*.py")),
                             str(tmp_path / "work"), model_vocab_size=280),
        "vocab_size 280 is too small", "config.model.vocab_size >=")


def test_refuses_batch_size_not_divisible_by_process_count(prepared):
    cfg, data, _ = prepared
    odd = data_config(corpus=cfg.corpus, batch_size=5)
    expect_data_error(lambda: train_iterator(data, odd, seed=0, process_count=2),
                      "data.batch_size=5", "process_count=2", "multiple of 2")


def test_refuses_seq_len_below_two(prepared, tmp_path, tok):
    cfg, data, _ = prepared
    short = data_config(corpus=cfg.corpus, seq_len=1)
    expect_data_error(lambda: train_iterator(data, short, seed=0), "data.seq_len=1", ">= 2")
    expect_data_error(run(tmp_path, corpus=cfg.corpus, tokenizer=tok, seq_len=1), "data.seq_len=1")


def test_refuses_an_unwritable_workdir(tmp_path, corpus_dir, tok):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cfg = data_config(corpus=str(corpus_dir[0] / "*.py"), tokenizer=tok)
    expect_data_error(lambda: prepare_data(cfg, str(blocker / "work"), model_vocab_size=VOCAB),
                      str(blocker / "work"), "not a writable directory")
