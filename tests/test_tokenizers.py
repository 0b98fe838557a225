"""Tokenizer tests: the Hugging Face tokenizer.json implementation, DeepSeek's chat markers in the
trained sentencepiece ones, load_tokenizer's inputs and refusals, and where inference finds a
folder's tokenizer.

References are independent of the code under test: texts round-trip to themselves; ids are read
from the saved tokenizer.json's own JSON (its added_tokens and model vocab) or from the
sentencepiece processor; the chat markers are spelled out here with their Unicode names. All
comparisons are exact.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import sysconfig

import ml_collections
import numpy as np
import pytest
import sentencepiece as spm
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from tokenizers import trainers

from dsv3_jax.data import special_tokens as st
from dsv3_jax.data.corpus import DataError
from dsv3_jax.data.hf_tokenizer import HFTokenizer
from dsv3_jax.data.special_tokens import CHAT_SPECIAL_TOKENS
from dsv3_jax.data.tokenizer import (SentencePieceTokenizer, check_fits, find_tokenizer,
                                     load_tokenizer, train_tokenizer)

BAR, SEP = "\N{FULLWIDTH VERTICAL LINE}", "\N{LOWER ONE EIGHTH BLOCK}"
BOS_TEXT = f"<{BAR}begin{SEP}of{SEP}sentence{BAR}>"
EOS_TEXT = f"<{BAR}end{SEP}of{SEP}sentence{BAR}>"
PAD_TEXT = f"<{BAR}{SEP}pad{SEP}{BAR}>"
# DeepSeek-V3/R1's chat template markers, as its tokenizer_config.json spells them.
EXPECTED_CHAT = [
    "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>",
    "<think>", "</think>", "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>",
    "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>", "<｜tool▁outputs▁begin｜>",
    "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>",
]

ROUND_TRIP = [
    "",
    "plain ASCII, punctuation: (a+b)*c != d; 42 // 7.",
    "ünïcödé ✓ 中文 🐍 Ωμέγα привет e\u0301 zero\u200bwidth \U0001F600 and U+2581 ▁ itself",
    "def f(x):\n\tif x:\n        return 'é中'  \n\n\n    pass\n",
    "  leading spaces and trailing ones   \n\n\t\ttabs\tinside\t\n\r\nwindows line end\r\n",
]


def stdlib_texts(package: str = "json") -> list[str]:
    """A few KB of real Python: this interpreter's `package` sources."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"]) / package
    return [p.read_text(encoding="utf-8") for p in sorted(root.glob("*.py"))]


def one_line_message(excinfo, *fragments: str) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in: {message}"
    return message


# ---- a tokenizer.json built here with the tokenizers library ----------------------------------

def save_hf_tokenizer(folder: pathlib.Path, config: dict | None) -> pathlib.Path:
    """A byte-level BPE (as DeepSeek's) trained on stdlib text into `folder`/tokenizer.json:
    bos, eos and pad as special tokens (ids 0, 1, 2), the other chat markers as added non-special
    tokens, and a post-processor that adds bos (as DeepSeek's does; encode must not). With
    `config`, writes it as tokenizer_config.json beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[BOS_TEXT, EOS_TEXT, PAD_TEXT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tk.train_from_iterator(stdlib_texts(), trainer)
    tk.add_tokens([AddedToken(t, special=False, normalized=False)
                   for t in CHAT_SPECIAL_TOKENS if t not in (BOS_TEXT, EOS_TEXT)])
    tk.post_processor = processors.TemplateProcessing(single=f"{BOS_TEXT} $A",
                                                      special_tokens=[(BOS_TEXT, 0)])
    tk.save(str(folder / "tokenizer.json"))
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder / "tokenizer.json"


def saved_ids(path: pathlib.Path) -> tuple[dict[str, int], set[str], int]:
    """From the tokenizer.json's JSON: (every added token's id, the special ones' texts, one past
    the largest id of its vocab and added tokens)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    added = {t["content"]: t["id"] for t in data["added_tokens"]}
    special = {t["content"] for t in data["added_tokens"] if t["special"]}
    return added, special, max([*data["model"]["vocab"].values(), *added.values()]) + 1


STRING_CONFIG = {"bos_token": BOS_TEXT, "eos_token": EOS_TEXT, "pad_token": PAD_TEXT}
DICT_CONFIG = {  # as DeepSeek's tokenizer_config.json writes them; no pad_token
    "bos_token": {"__type": "AddedToken", "content": BOS_TEXT, "lstrip": False},
    "eos_token": {"__type": "AddedToken", "content": EOS_TEXT, "lstrip": False},
    "add_bos_token": True, "chat_template": "{{ bos_token }}"}


@pytest.fixture(scope="module", params=["strings", "dicts"])
def hf(request, tmp_path_factory):
    """(HFTokenizer loaded from the folder, its tokenizer.json, the config written beside it)."""
    config = STRING_CONFIG if request.param == "strings" else DICT_CONFIG
    path = save_hf_tokenizer(tmp_path_factory.mktemp("hf"), config)
    return load_tokenizer(str(path.parent)), path, config


def test_hf_tokenizer_ids_come_from_the_files(hf):
    tok, path, config = hf
    added, special, size = saved_ids(path)
    assert isinstance(tok, HFTokenizer) and tok.path == str(path)
    assert tok.vocab_size == size
    assert (tok.bos_id, tok.eos_id) == (added[BOS_TEXT], added[EOS_TEXT]) == (0, 1)
    assert tok.pad_id == (added[PAD_TEXT] if "pad_token" in config else 0)
    assert tok.special_tokens == added
    assert tok.token_to_id(EOS_TEXT) == 1 and tok.token_to_id("no such token") is None
    check_fits(tok, tok.vocab_size)
    with pytest.raises(DataError):
        check_fits(tok, tok.vocab_size - 1)


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_hf_tokenizer_round_trips_exactly(hf, text):
    tok = hf[0]
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.bos_id not in ids and tok.eos_id not in ids  # the post-processor's bos not added
    assert tok.decode(np.asarray(ids + [tok.eos_id])) == text  # special ids decode to ''
    batch = tok.encode_batch([text, text + "x"])
    assert [b.dtype for b in batch] == [np.int32, np.int32]
    assert batch[0].tolist() == ids and batch[1].tolist() == tok.encode(text + "x")
    assert [b.tolist() for b in tok.encode_batch([text], num_threads=1)] == [ids]


@pytest.mark.parametrize("marker", EXPECTED_CHAT)
def test_hf_chat_markers_encode_as_their_one_id(hf, marker):
    tok, path, _ = hf
    added, special, _ = saved_ids(path)
    ids = tok.encode(f"x = 1\n{marker}hello {marker} world")
    assert ids.count(added[marker]) == 2
    assert tok.decode([added[marker]], keep_special=True) == marker
    # Special tokens (bos, eos) decode to '' by default, the other markers to their text.
    assert tok.decode([added[marker]]) == ("" if marker in special else marker)


def test_hf_sha256_covers_the_config(tmp_path):
    first = load_tokenizer(str(save_hf_tokenizer(tmp_path / "a", STRING_CONFIG)))
    other = load_tokenizer(str(save_hf_tokenizer(tmp_path / "b", dict(STRING_CONFIG,
                                                                       pad_token=EOS_TEXT))))
    assert (first.pad_id, other.pad_id) == (2, 1) and first.sha256 != other.sha256


def test_prepare_data_with_an_hf_tokenizer_folder(hf, tmp_path):
    """The pipeline reads a corpus with a tokenizer.json folder: each stored document is the
    text's ids followed by the config's eos."""
    from dsv3_jax.data.pipeline import prepare_data

    tok, path, _ = hf
    texts = {f"doc_{i}.py": f"def f{i}(x):\n\treturn x * {i}  # ✓ {EOS_TEXT}\n" for i in range(8)}
    for name, text in texts.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    cfg = ml_collections.ConfigDict(dict(
        corpus=str(tmp_path / "*.py"), format="auto", text_field="text", validation_fraction=0.3,
        tokenizer=str(path.parent), tokenizer_train_bytes=1000, seq_len=16, batch_size=2,
        num_threads=1, prefetch=2))
    data = prepare_data(cfg, str(tmp_path / "work"), model_vocab_size=tok.vocab_size)
    assert data.tokenizer.sha256 == tok.sha256
    stored = sorted(store.document(d).tolist() for store in (data.train, data.validation)
                    for d in range(store.num_documents))
    assert stored == sorted(tok.encode(t) + [tok.eos_id] for t in texts.values())


def test_an_init_from_source_hands_its_tokenizer_json_and_config_to_the_new_workdir(hf, tmp_path):
    """init_from copies a tokenizer.json with the tokenizer_config.json that holds its ids, and
    the workdir's tokenizer is then found (as prepare_data looks) and tokenizes as the source's."""
    from dsv3_jax.train.init_from import InitSource, adopt_tokenizer

    tok, path, _ = hf
    source = InitSource(cfg=None, params={}, tokenizer=str(path),
                        origin={"path": str(path.parent), "kind": "hf", "step": None})
    workdir = tmp_path / "run"
    workdir.mkdir()
    adopt_tokenizer(source, ml_collections.ConfigDict(dict(tokenizer="")), str(workdir))
    assert (workdir / "tokenizer.json").read_bytes() == path.read_bytes()
    assert ((workdir / "tokenizer_config.json").read_bytes()
            == (path.parent / "tokenizer_config.json").read_bytes())
    adopted = load_tokenizer(find_tokenizer(str(workdir)))
    assert (adopted.sha256, adopted.eos_id, adopted.bos_id) == (tok.sha256, tok.eos_id, tok.bos_id)


# ---- load_tokenizer: inputs and refusals -------------------------------------------------------

def test_a_folder_prefers_tokenizer_json(tmp_path, sp_tokenizer):
    folder = tmp_path / "both"
    save_hf_tokenizer(folder, STRING_CONFIG)
    assert find_tokenizer(str(folder)) == str(folder / "tokenizer.json")
    shutil.copy(sp_tokenizer.path, folder / "tokenizer.model")
    assert isinstance(load_tokenizer(str(folder)), HFTokenizer)
    (folder / "tokenizer.json").unlink()
    assert find_tokenizer(str(folder)) == str(folder / "tokenizer.model")
    tok = load_tokenizer(str(folder))
    assert isinstance(tok, SentencePieceTokenizer) and tok.path == str(folder / "tokenizer.model")
    (folder / "tokenizer.model").unlink()
    assert find_tokenizer(str(folder)) is None


def test_refuses_missing_paths_and_bare_folders(tmp_path):
    with pytest.raises(DataError) as e:
        load_tokenizer(str(tmp_path / "nothing.json"))
    one_line_message(e, "data.tokenizer=", "nothing.json", "does not exist", "tokenizer.json",
                     "or '' to train one")
    with pytest.raises(DataError) as e:
        load_tokenizer(str(tmp_path), setting="--tokenizer")
    message = one_line_message(e, f"--tokenizer={str(tmp_path)!r}", "is a folder without",
                               "tokenizer.json or tokenizer.model")
    assert "train one" not in message


@pytest.mark.parametrize("content", ["{not json", "{}", "[1, 2]", "\udcff"])
def test_refuses_a_broken_tokenizer_json(tmp_path, content):
    path = tmp_path / "tokenizer.json"
    path.write_bytes(content.encode("utf-8", "surrogateescape"))
    with pytest.raises(DataError) as e:
        load_tokenizer(str(tmp_path))
    one_line_message(e, str(path), "is not a Hugging Face tokenizer.json")


@pytest.mark.parametrize("config, fragments", [
    (None, ["has no eos token", "no tokenizer_config.json beside it", '"eos_token"']),
    ({"bos_token": BOS_TEXT}, ["has no eos token", "sets no eos_token"]),
    ({"eos_token": "</s>"}, ["eos_token '</s>' is not in the tokenizer's vocabulary", EOS_TEXT]),
    ({"eos_token": {"content": "<eos>"}}, ["eos_token '<eos>' is not in"]),
    ({"eos_token": EOS_TEXT, "bos_token": 7}, ["bos_token=7 is not a token"]),
    ({"eos_token": EOS_TEXT, "pad_token": "<pad>"}, ["pad_token '<pad>' is not in"]),
    ("not json {", ["tokenizer_config.json is not JSON"]),
    ([EOS_TEXT], ["holds a list, not a JSON object"]),
], ids=["no config", "no eos", "eos not in vocab", "dict eos not in vocab", "bos not text",
        "pad not in vocab", "config not json", "config a list"])
def test_refuses_a_config_it_cannot_use(tmp_path, config, fragments):
    path = save_hf_tokenizer(tmp_path, None)
    if isinstance(config, str):
        (tmp_path / "tokenizer_config.json").write_text(config)
    elif config is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(DataError) as e:
        load_tokenizer(str(path))
    one_line_message(e, *fragments)


def test_refuses_a_file_that_is_not_a_model(tmp_path, hf):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"this is not a model")
    with pytest.raises(DataError) as e:
        load_tokenizer(str(junk))
    one_line_message(e, str(junk), "is not a sentencepiece model", "tokenizer.json")
    misnamed = tmp_path / "tokenizer.model"  # a tokenizer.json under a .model name
    shutil.copy(hf[1], misnamed)
    with pytest.raises(DataError) as e:
        load_tokenizer(str(misnamed))
    one_line_message(e, "is not a sentencepiece model", "a tokenizer.json must be named *.json")


# ---- the chat markers in trained sentencepiece tokenizers -------------------------------------

@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory) -> SentencePieceTokenizer:
    path = tmp_path_factory.mktemp("sp") / "tokenizer.model"
    return train_tokenizer(stdlib_texts("json") + stdlib_texts("email"), str(path),
                           vocab_size=400, num_threads=1)


def test_chat_special_tokens_are_deepseeks():
    assert list(CHAT_SPECIAL_TOKENS) == EXPECTED_CHAT
    assert (st.BOS, st.EOS, st.TOOL_SEP) == (BOS_TEXT, EOS_TEXT, f"<{BAR}tool{SEP}sep{BAR}>")


@pytest.mark.parametrize("index", range(len(EXPECTED_CHAT)))
def test_sentencepiece_chat_markers_encode_as_their_one_id(sp_tokenizer, index):
    marker, tok = EXPECTED_CHAT[index], sp_tokenizer
    sp = spm.SentencePieceProcessor(model_file=tok.path)
    marker_id = 3 + index  # after pad 0, unk 1, eos 2, in CHAT_SPECIAL_TOKENS' order
    assert sp.id_to_piece(marker_id) == marker and tok.token_to_id(marker) == marker_id
    assert tok.special_tokens[marker] == marker_id
    for text in [marker, f"x = 1\n{marker}hello {marker} world", f"é{marker}{marker}\n\t  "]:
        ids = tok.encode(text)
        assert ids.count(marker_id) == text.count(marker)
        assert tok.decode(ids) == text  # exact: U+2581 inside a marker stays U+2581
        assert tok.encode_batch([text])[0].tolist() == ids


def test_sentencepiece_special_ids(sp_tokenizer):
    tok = sp_tokenizer
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 2, None)
    assert {t: tok.special_tokens[t] for t in ("<pad>", "</s>")} == {"<pad>": 0, "</s>": 2}
    assert set(tok.special_tokens) == {"<pad>", "</s>", *EXPECTED_CHAT}
    assert tok.token_to_id("no such piece") is None and tok.token_to_id("<unk>") == 1
    ids = tok.encode("a b") + [2] + tok.encode(st.TOOL_SEP) + [0]
    assert tok.decode(ids) == "a b" + st.TOOL_SEP
    assert tok.decode(ids, keep_special=True) == "a b</s>" + st.TOOL_SEP + "<pad>"


@pytest.mark.parametrize("text", ROUND_TRIP[:-1] + [ROUND_TRIP[-1] + st.THINK_BEGIN])
def test_sentencepiece_still_round_trips(sp_tokenizer, text):
    text = text.replace(SEP, "_")  # sentencepiece's own space mark decodes as ' ' (documented)
    ids = sp_tokenizer.encode(text)
    assert sp_tokenizer.decode(ids) == text and 2 not in ids


# ---- where inference finds a folder's tokenizer -----------------------------------------------

@pytest.mark.parametrize("kind", ["hf", "orbax"])
def test_load_weights_finds_a_tokenizer_json(tmp_path, monkeypatch, kind):
    """load_weights returns the folder's tokenizer.json, before its tokenizer.model (the weights
    readers are stubbed: only the path-finding is under test)."""
    import dsv3_jax.convert
    from dsv3_jax.infer import load

    monkeypatch.setattr(dsv3_jax.convert, "load_hf_checkpoint", lambda path, mesh: ("cfg", {}))
    monkeypatch.setattr(load, "read_params", lambda path, mesh: ("cfg", {}, {}))
    if kind == "hf":
        (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer.model").write_bytes(b"model")
    assert load.load_weights(str(tmp_path))[2] == str(tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer.json").write_text("{}")
    cfg, params, tokenizer, source = load.load_weights(str(tmp_path))
    assert tokenizer == str(tmp_path / "tokenizer.json") and source["kind"] == kind
