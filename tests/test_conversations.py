"""SFT conversation data: records read and counted, encoding with the answers' loss mask, the
markers' one-id check, the length filter, and the built-in corpus of standard-library functions.

References are independent of the code under test: the rendered pieces are spelled out here with
the markers' Unicode names (not taken from the template); masked and unmasked tokens are decoded
back and compared with those texts; an answer's ids are compared with the answer encoded alone;
a built-in conversation's texts are compared with inspect.getsource's text, and the function they
rebuild is run; the validation split's files are recomputed here from SHA-1. Two tokenizers: a
sentencepiece one trained by train_tokenizer, and a byte-level BPE tokenizer.json built here.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import io
import itertools
import json
import json.decoder
import pathlib
import sysconfig
import textwrap

import numpy as np
import pytest
import sentencepiece as spm
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from dsv3_jax.data import conversations as cv
from dsv3_jax.data.corpus import DataError, builtin_files
from dsv3_jax.data.special_tokens import CHAT_SPECIAL_TOKENS
from dsv3_jax.data.tokenizer import load_tokenizer, train_tokenizer
from dsv3_jax.train.run_config import base_config

BAR, SEP = "\N{FULLWIDTH VERTICAL LINE}", "\N{LOWER ONE EIGHTH BLOCK}"
BOS = f"<{BAR}begin{SEP}of{SEP}sentence{BAR}>"
EOS = f"<{BAR}end{SEP}of{SEP}sentence{BAR}>"
USER, ASSISTANT = f"<{BAR}User{BAR}>", f"<{BAR}Assistant{BAR}>"
WRITTEN_MARKERS = [BOS, EOS, USER, ASSISTANT, "<think>", "</think>"]

# system, two exchanges (the second answer with reasoning, which the format drops), and the runs
# of text its tokens must decode to: (in the loss mask?, text).
CONVERSATION = [
    {"role": "system", "content": "You write Python."},
    {"role": "user", "content": "Sum of a list?"},
    {"role": "assistant", "content": "def total(xs):\n    return sum(xs)\n"},
    {"role": "user", "content": "  and its length?  "},
    {"role": "assistant", "content": "<think>len is a builtin</think>\n\nUse `len(xs)`. é中"},
]
RUNS = [
    (False, BOS + "You write Python." + USER + "Sum of a list?" + ASSISTANT),
    (True, "def total(xs):\n    return sum(xs)\n" + EOS),
    (False, USER + "  and its length?  " + ASSISTANT),
    (True, "\n\nUse `len(xs)`. é中" + EOS),
]


def stdlib_texts(*packages: str) -> list[str]:
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    return [p.read_text(encoding="utf-8") for package in packages
            for p in sorted((root / package).glob("*.py"))]


def save_bpe_json(folder: pathlib.Path, *, markers: bool) -> str:
    """A byte-level BPE tokenizer.json (as DeepSeek's) trained on stdlib text, and its
    tokenizer_config.json. markers: bos and eos are DeepSeek's, special; the other chat markers
    added tokens. Otherwise its only special token is '</s>' (its eos)."""
    folder.mkdir(parents=True, exist_ok=True)
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    special = [BOS, EOS] if markers else ["</s>"]
    tk.train_from_iterator(stdlib_texts("json"), trainers.BpeTrainer(
        vocab_size=512, special_tokens=special, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if markers:
        tk.add_tokens([AddedToken(t, special=False, normalized=False)
                       for t in CHAT_SPECIAL_TOKENS if t not in special])
    tk.save(str(folder / "tokenizer.json"))
    config = {"eos_token": special[-1], **({"bos_token": BOS} if markers else {})}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return str(folder / "tokenizer.json")


@pytest.fixture(scope="module", params=["sentencepiece", "tokenizer.json"])
def tok(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    if request.param == "sentencepiece":
        return train_tokenizer(stdlib_texts("json", "email"), str(folder / "tokenizer.model"),
                               vocab_size=512, num_threads=1)
    return load_tokenizer(save_bpe_json(folder, markers=True))


def runs(ids: np.ndarray, mask: np.ndarray) -> list[tuple[bool, list[int]]]:
    """The maximal runs of equal mask values: [(value, ids of the run), ...]."""
    out = []
    for i, m in zip(ids.tolist(), mask.tolist()):
        if out and out[-1][0] == m:
            out[-1][1].append(i)
        else:
            out.append((m, [i]))
    return out


def one_line(excinfo, *fragments: str) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in: {message}"
    return message


# ---- encoding and the loss mask --------------------------------------------------------------

def test_each_marker_is_one_id(tok):
    ids = cv.check_chat_tokenizer(tok)
    assert list(ids) == WRITTEN_MARKERS
    assert ids == {m: tok.token_to_id(m) for m in WRITTEN_MARKERS}
    assert len(set(ids.values())) == len(ids)
    tokens, _ = cv.encode_conversation(CONVERSATION, tok)
    text = "".join(t for _, t in RUNS)
    for marker in (BOS, EOS, USER, ASSISTANT):
        assert tokens.tolist().count(ids[marker]) == text.count(marker), marker
    assert tokens[0] == ids[BOS]


def test_mask_covers_exactly_the_answers_and_their_eos(tok):
    ids, mask = cv.encode_conversation(CONVERSATION, tok)
    assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == mask.shape
    decoded = [(m, tok.decode(run, keep_special=True)) for m, run in runs(ids, mask)]
    assert decoded == RUNS
    # The pieces' ids are the whole text's: the markers cut the text for these tokenizers.
    assert ids.tolist() == list(tok.encode("".join(t for _, t in RUNS)))


REASONING_CONVERSATION = [
    {"role": "user", "content": "What is 3 plus 5?"},
    {"role": "assistant", "content": "<think>\n3 + 5 = 8\n</think>\n\n8"},
    {"role": "user", "content": "And 8 minus 2?"},
    {"role": "assistant", "content": "<think>\n8 - 2 = 6\n</think>\n\n6"},
]


@pytest.mark.parametrize("keep", [False, True])
def test_keep_last_reasoning_masks_the_last_answers_reasoning_only(tok, keep):
    ids, mask = cv.encode_conversation(REASONING_CONVERSATION, tok, keep_last_reasoning=keep)
    masked = [tok.decode(run, keep_special=True) for m, run in runs(ids, mask) if m]
    last = "<think>\n8 - 2 = 6\n</think>\n\n6" if keep else "\n\n6"
    # The earlier answer always drops its reasoning (the format does); the last keeps it only
    # with keep_last_reasoning (data.sft_reasoning="last").
    assert masked == ["\n\n8" + EOS, last + EOS]
    text = tok.decode(ids, keep_special=True)
    assert ("8 - 2 = 6" in text) == keep and "3 + 5 = 8" not in text


def test_masked_ids_do_not_depend_on_the_user_text(tok):
    """Each answer's ids are those of the answer + EOS encoded alone, whatever surrounds it."""
    garbage = ["", "x", "  \t\n", "ü中🐍 \x00 end with spaces   ", "<|Assistant|> def f(x):",
               "<think>not mine</think>", "▁▁▁" + "a" * 300]
    answers = ["def total(xs):\n    return sum(xs)\n" + EOS, "\n\nUse `len(xs)`. é中" + EOS]
    expected = [tok.encode(a) for a in answers]
    for junk in garbage:
        messages = [dict(m) for m in CONVERSATION]
        messages[1]["content"] = junk
        messages[3]["content"] = junk[::-1]
        messages[0]["content"] = junk + junk
        ids, mask = cv.encode_conversation(messages, tok)
        assert [r for m, r in runs(ids, mask) if m] == expected, junk


def test_target_mask_shifts_to_the_predicted_token(tok):
    ids, mask = cv.encode_conversation(CONVERSATION, tok)
    targets = cv.target_mask(mask)
    assert targets.shape == (len(ids) - 1,) and not mask[0]
    assert ids[1:][targets].tolist() == ids[mask].tolist()  # every answer token is a target
    assistant = cv.check_chat_tokenizer(tok)[ASSISTANT]
    at_marker = np.flatnonzero(ids[:-1] == assistant)
    assert targets[at_marker].all()  # the marker's position predicts the answer's first token
    assert cv.target_mask(np.stack([mask, mask])).shape == (2, len(ids) - 1)
    with pytest.raises(ValueError, match="bool array"):
        cv.target_mask(mask.astype(np.int32))


def plain_sentencepiece(folder: pathlib.Path) -> str:
    """A sentencepiece model trained without the chat markers (as before they were reserved)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(stdlib_texts("json")), model_writer=model, model_type="bpe",
        vocab_size=512, hard_vocab_limit=False, byte_fallback=True, pad_id=0, unk_id=1, eos_id=2,
        bos_id=-1, num_threads=1, minloglevel=2)
    (folder / "old.model").write_bytes(model.getvalue())
    return str(folder / "old.model")


@pytest.mark.parametrize("kind", ["sentencepiece", "tokenizer.json"])
def test_a_tokenizer_without_the_markers_is_refused(tmp_path, kind):
    path = (plain_sentencepiece(tmp_path) if kind == "sentencepiece"
            else save_bpe_json(tmp_path, markers=False))
    old = load_tokenizer(path)
    with pytest.raises(DataError) as excinfo:
        cv.check_chat_tokenizer(old)
    one_line(excinfo, path, "predates the chat markers", BOS, "retrain", "tokenizer.json")
    with pytest.raises(DataError, match="predates"):
        cv.encode_conversation(CONVERSATION, old)
    with pytest.raises(DataError, match="predates"):
        cv.encode_conversations([CONVERSATION], old, 1000)


def test_too_long_conversations_are_skipped_and_counted(tok):
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    sizes = [len(cv.encode_conversation(c, tok)[0]) for c in (short, CONVERSATION)]
    assert sizes[0] < sizes[1]
    examples, counts = cv.encode_conversations([CONVERSATION, short, CONVERSATION, short], tok,
                                               max_tokens=sizes[1] - 1, num_threads=1)
    assert counts == {"kept": 2, "too_long": 2}
    single = cv.encode_conversation(short, tok)
    for ids, mask in examples:  # never cut: each is what encode_conversation gives
        assert ids.tolist() == single[0].tolist() and mask.tolist() == single[1].tolist()
    _, counts = cv.encode_conversations([CONVERSATION, short], tok, max_tokens=sizes[1])
    assert counts == {"kept": 2, "too_long": 0}  # exactly max_tokens fits


def test_encode_conversations_refusals(tok):
    for bad in (0, 1, 2.5, True, "256"):
        with pytest.raises(DataError) as excinfo:
            cv.encode_conversations([CONVERSATION], tok, bad)
        one_line(excinfo, f"max_tokens={bad!r}", "seq_len")
    tool = [{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}]
    with pytest.raises(DataError) as excinfo:
        cv.encode_conversations([CONVERSATION, tool], tok, 100)
    one_line(excinfo, "conversations[1]", "'tool'")


# ---- reading JSONL records -------------------------------------------------------------------

GOOD = {"messages": [{"role": "user", "content": "2+2?"},
                     {"role": "assistant", "content": "4", "name": "bot"}], "id": 7}
GOOD_2 = {"messages": [{"role": "system", "content": "Be brief."},
                       {"role": "assistant", "content": "<think>r</think>Hello."},
                       {"role": "user", "content": "Bye"}]}
ONE_PER_REASON = {
    "not_json": '{"messages": [}',
    "not_object": "[1, 2]",
    "no_messages": [{"conversations": [{"from": "human", "value": "hi"}]}, {"messages": []},
                    {"messages": "hi"}],
    "bad_message": {"messages": [{"role": "user", "content": "a"}, "assistant: b"]},
    "bad_role": [{"messages": [{"role": "tool", "content": "x"}]},
                 {"messages": [{"content": "x"}, {"role": "assistant", "content": "y"}]}],
    "tool_calls": {"messages": [{"role": "user", "content": "x"},
                                {"role": "assistant", "content": "y", "tool_calls": []}]},
    "bad_content": [{"messages": [{"role": "user", "content": ["x"]}]},
                    {"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]}],
    "empty_content": {"messages": [{"role": "user", "content": " \n"},
                                   {"role": "assistant", "content": "y"}]},
    "marker_in_content": {"messages": [{"role": "user", "content": f"x{ASSISTANT}fake"},
                                       {"role": "assistant", "content": "y"}]},
    "no_assistant_turn": {"messages": [{"role": "system", "content": "s"},
                                       {"role": "user", "content": "u"}]},
    "empty_answer": {"messages": [{"role": "user", "content": "u"},
                                  {"role": "assistant", "content": "<think>only</think>  "}]},
}


def jsonl_lines() -> list[str]:
    lines = [json.dumps(GOOD), ""]
    for reason, records in ONE_PER_REASON.items():
        for record in records if isinstance(records, list) else [records]:
            lines.append(record if isinstance(record, str) else json.dumps(record))
    return lines + ["   ", json.dumps(GOOD_2, ensure_ascii=False)]


def expected_counts() -> dict[str, int]:
    counts = {r: len(v) if isinstance(v, list) else 1 for r, v in ONE_PER_REASON.items()}
    return {"kept": 3, **counts}


def test_each_malformed_record_is_skipped_and_counted_by_reason(tmp_path):
    assert set(ONE_PER_REASON) == set(cv.REASONS)
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text("\n".join(jsonl_lines()) + "\n", encoding="utf-8")
    second.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode())  # a BOM, no final newline
    conversations, counts = cv.read_conversations([first, str(second)])
    assert counts == expected_counts()
    clean = lambda record: [{"role": m["role"], "content": m["content"]}
                            for m in record["messages"]]
    assert conversations == [clean(GOOD), clean(GOOD_2), clean(GOOD)]
    assert cv.read_conversations(str(first))[1] == {**expected_counts(), "kept": 2}


def test_strict_mode_names_file_line_and_reason(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(jsonl_lines()), encoding="utf-8")
    with pytest.raises(DataError) as excinfo:
        cv.read_conversations(path, strict=True)
    one_line(excinfo, f"{path}, line 3: not_json", "strict=True")
    path.write_text("\n".join([json.dumps(GOOD), json.dumps(ONE_PER_REASON["tool_calls"])]))
    with pytest.raises(DataError) as excinfo:
        cv.read_conversations(path, strict=True)
    one_line(excinfo, f"{path}, line 2: tool_calls", "messages[1]")
    path.write_text(json.dumps(GOOD))
    assert cv.read_conversations(path, strict=True)[1]["kept"] == 1


def test_missing_or_non_utf8_files_are_refused(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError) as excinfo:
        cv.read_conversations([missing])
    one_line(excinfo, str(missing), "does not exist")
    with pytest.raises(DataError) as excinfo:
        cv.read_conversations(tmp_path)
    one_line(excinfo, str(tmp_path), "is a directory")
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(json.dumps(GOOD).encode() + b"\n" + '{"x": "café"}'.encode("latin-1"))
    with pytest.raises(DataError) as excinfo:
        cv.read_conversations(latin)
    one_line(excinfo, str(latin), "not UTF-8", "line 2")
    with pytest.raises(DataError, match="no paths"):
        cv.read_conversations([])


# ---- the built-in corpus ---------------------------------------------------------------------

def expected_parts(function) -> tuple[str, str]:
    """(signature + docstring, body after it) of `function` from inspect.getsource, dedented."""
    source = textwrap.dedent(inspect.getsource(function))
    opening = source.index('"""')
    closing = source.index('"""', opening + 3) + 3
    return source[:closing], source[closing:].lstrip("\n").rstrip("\n")


@pytest.mark.parametrize("module, qualname, function", [
    (json, "dumps", json.dumps), (json.decoder, "JSONDecoder.decode", json.JSONDecoder.decode)])
def test_a_known_function_gives_its_real_body(module, qualname, function):
    found = dict(cv.function_conversations(inspect.getsource(module)))
    user, assistant = found[qualname]
    head, body = expected_parts(function)
    assert user == {"role": "user", "content": cv.PROMPT + head}
    assert assistant == {"role": "assistant", "content": body}
    if function is json.dumps:  # the rebuilt function behaves as the real one
        namespace = dict(vars(json))
        exec(head + "\n" + body, namespace)  # pylint: disable=exec-used
        value = {"b": [1, 2.5, None], "a": "é"}
        assert namespace["dumps"](value, sort_keys=True) == json.dumps(value, sort_keys=True)
        assert namespace["dumps"](value) == json.dumps(value)


def test_function_conversations_keep_and_skip():
    source = textwrap.dedent('''\
        import functools

        def plain(x):
            """Doubles."""
            # a comment before the first statement is body
            return 2 * x

        def stub():
            """Nothing."""
            ...

        def passes():
            """Nothing."""
            pass

        def abstract(self):
            """Subclasses."""
            raise NotImplementedError("later")

        def undocumented(x):
            return x

        def same_line(x):
            """Doc."""; return x

        def long_one(x):
            """Long."""
            return x + ''' + " + ".join(["1"] * 700) + '''

        def marker(x):
            """Writes a marker."""
            return "<think>"

        class Box:
            """A box."""

            @functools.cache
            async def size(
                    self, n):
                """How big.

        (a docstring line at column 0)
                """
                def nested():
                    """Not collected: only module-level functions and methods."""
                    return 1
                return n + nested()
        ''')
    found = dict(cv.function_conversations(source))
    assert list(found) == ["plain", "Box.size"]
    assert found["plain"][1]["content"] == (
        "    # a comment before the first statement is body\n    return 2 * x")
    user, answer = found["Box.size"][0]["content"], found["Box.size"][1]["content"]
    assert user == cv.PROMPT + ('@functools.cache\nasync def size(\n        self, n):\n'
                                '    """How big.\n\n(a docstring line at column 0)\n    """')
    assert answer.startswith("    def nested():\n") and answer.endswith("\n    return n + nested()")
    assert list(dict(cv.function_conversations(source, max_body_chars=10**5))) == [
        "plain", "long_one", "Box.size"]
    with pytest.raises(SyntaxError):
        cv.function_conversations("def broken(:\n")


@pytest.fixture(scope="module")
def validation_examples():
    return list(cv.iter_builtin_conversations("validation"))


def validation_keys() -> set[str]:
    """The built-in corpus's validation files, by the corpus rule recomputed here: the first 8
    bytes of SHA-1 of the file's key, as a fraction of 2**64, below data.validation_fraction."""
    fraction = base_config().data.validation_fraction
    hashed = lambda key: int(hashlib.sha1(key.encode()).hexdigest()[:16], 16) / 2**64
    return {f.key for f in builtin_files() if hashed(f.key) < fraction}


def test_builtin_conversations_are_split_by_file_as_pretraining(validation_examples):
    held_out = validation_keys()
    assert validation_examples and {k for k, _, _ in validation_examples} <= held_out
    train = [k for k, _, _ in itertools.islice(cv.iter_builtin_conversations("train"), 400)]
    assert len(train) == 400 and not set(train) & held_out
    assert cv.builtin_conversations("validation") == [c for _, _, c in validation_examples]


def test_builtin_conversations_are_deterministic_functions(validation_examples):
    first = cv.builtin_conversations("train", limit=50)
    assert len(first) == 50 and first == cv.builtin_conversations("train", limit=50)
    assert cv.builtin_conversations("train", limit=0) == []
    for key, qualname, (user, assistant) in validation_examples:
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert user["content"].startswith(cv.PROMPT) and assistant["content"].strip()
        assert len(assistant["content"]) <= cv.MAX_BODY_CHARS
        # The prompt's code and the answer rebuild one documented function of that name.
        tree = ast.parse(user["content"][len(cv.PROMPT):] + "\n" + assistant["content"])
        assert len(tree.body) == 1, (key, qualname)
        function = tree.body[0]
        assert function.name == qualname.split(".")[-1] and ast.get_docstring(function)
        assert len(function.body) >= 2, (key, qualname)


def test_builtin_conversations_refusals():
    with pytest.raises(ValueError, match="split='test'"):
        cv.builtin_conversations("test")
    with pytest.raises(ValueError, match="limit=-1"):
        cv.builtin_conversations(limit=-1)
    with pytest.raises(ValueError, match="validation_fraction=1.5"):
        cv.builtin_conversations(validation_fraction=1.5)
