"""The chat: a session whose latent cache lives across turns, the multi-turn Chat, the reasoning
filter, and `python -m dsv3_jax.chat` driven through stdin in a subprocess.

References: the session's logits after appended turns are compared with a cache-free forward
pass over the whole conversation and with a fresh session fed it at once (float32, tolerance
RTOL); a chat's second answer is compared with one-shot greedy generation (infer/generate.py,
another decode path) from the whole rendered two-turn conversation, so it provably saw the first.
"""

from __future__ import annotations

import itertools
import json
import os
import pathlib
import re
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import COMPILATION_CACHE, TINY32, init_params, jitted_forward, stdlib_corpus
from test_conversations import plain_sentencepiece, stdlib_texts

from dsv3_jax.chat.repl import Chat, ThinkFilter, chat_template_of
from dsv3_jax.chat.template import ASSISTANT, EOS, USER, render_chat
from dsv3_jax.data.corpus import DataError
from dsv3_jax.data.tokenizer import train_tokenizer
from dsv3_jax.infer.generate import generate_tokens
from dsv3_jax.infer.session import ChatSession, ContextFullError

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "chat"
# float32 model: the cached decode path and the full forward differ only in the order of sums.
RTOL = 2e-5


@pytest.fixture(scope="module")
def params():
    return init_params(TINY32)


def _ids(n, seed):
    return np.random.default_rng(seed).integers(3, TINY32.vocab_size, n).tolist()


def _close(a, b, what):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    err = np.max(np.abs(a - b))
    assert err <= RTOL * np.max(np.abs(b)), f"{what}: {err:.3g}"


def test_appended_turns_equal_the_whole_conversation_at_once(params):
    session = ChatSession(TINY32, params, max_len=128)
    first = _ids(21, 0)
    stats = session.prefill(first)
    assert (stats.reused, stats.fed) == (0, 21)
    new, gen = session.generate(max_new_tokens=6)
    assert len(new) == 6 and gen.stopped == "max_new_tokens"
    assert session.ids == first + new  # every generated token is in the cache
    second = first + new + _ids(9, 1)
    stats = session.prefill(second)
    assert (stats.reused, stats.fed) == (27, 9)  # only the new turn is fed
    fresh = ChatSession(TINY32, params, max_len=128)
    fresh.prefill(second)
    _close(session.logits, fresh.logits, "appended vs fresh")
    full = jitted_forward(TINY32)(params, jnp.asarray(second)[None]).logits[0, -1]
    _close(session.logits, full, "appended vs cache-free forward")


def test_a_changed_history_rolls_back_to_the_common_prefix(params):
    session = ChatSession(TINY32, params, max_len=128)
    session.prefill(_ids(40, 2))
    edited = _ids(40, 2)[:17] + _ids(12, 3)
    stats = session.prefill(edited)
    assert (stats.reused, stats.fed) == (17, 12)
    fresh = ChatSession(TINY32, params, max_len=128)
    fresh.prefill(edited)
    _close(session.logits, fresh.logits, "rolled back vs fresh")
    # A prefix of what is cached: nothing new to feed but the last token (for its logits).
    stats = session.prefill(edited[:10])
    assert (stats.reused, stats.fed) == (9, 1)
    full = jitted_forward(TINY32)(params, jnp.asarray(edited[:10])[None]).logits[0, -1]
    _close(session.logits, full, "prefix vs cache-free forward")


def test_session_greedy_equals_one_shot_greedy_and_stops(params):
    prompt = _ids(13, 4)
    reference = generate_tokens(TINY32, params, [prompt], max_new_tokens=10).tokens[0][13:]
    session = ChatSession(TINY32, params, max_len=64)
    session.prefill(prompt)
    assert session.generate(max_new_tokens=10)[0] == reference
    session.prefill(prompt)
    stop = reference[4]
    got, stats = session.generate(max_new_tokens=10, stop_tokens=(stop,))
    assert got == reference[:reference.index(stop) + 1] and stats.stopped == "stop"
    assert session.ids == prompt + got[:-1]  # the stop token is not fed


def test_the_context_limit(params):
    session = ChatSession(TINY32, params, max_len=16)
    with pytest.raises(ContextFullError, match="more than the context of 16"):
        session.prefill(_ids(17, 5))
    session.prefill(_ids(12, 5))
    new, stats = session.generate(max_new_tokens=50)
    assert stats.stopped == "context" and len(session.ids) == 16 and len(new) == 5
    with pytest.raises(ValueError, match="outside the vocabulary"):
        session.prefill([TINY32.vocab_size])
    with pytest.raises(ValueError, match="max_len"):
        ChatSession(TINY32, params, max_len=TINY32.max_seq_len + 1)


@pytest.mark.parametrize("show", [False, True])
def test_think_filter_on_every_split_of_the_stream(show):
    text = "Sure.<think>step one</think>\n\nThe answer <think> is 4</think>!<thi"
    hidden = "Sure.\n\nThe answer !<thi"
    for cuts in itertools.combinations(range(1, len(text)), 2):
        pieces = [text[:cuts[0]], text[cuts[0]:cuts[1]], text[cuts[1]:]]
        f = ThinkFilter(show)
        out = "".join(f(p) for p in pieces) + f.flush()
        assert out == (text if show else hidden), pieces
    # Char by char, too.
    f = ThinkFilter(show)
    assert "".join(f(c) for c in text) + f.flush() == (text if show else hidden)


def test_think_filter_starting_inside_reasoning():
    f = ThinkFilter(False, inside=True)
    assert "".join(f(c) for c in "weighing</think>\n42") + f.flush() == "\n42"


def test_feed_widths_are_powers_of_two_inside_the_context():
    from dsv3_jax.infer.session import MAX_FEED, _width

    for room in list(range(1, 70)) + [MAX_FEED - 1, MAX_FEED, 5 * MAX_FEED]:
        for n in list(range(1, 70)) + [MAX_FEED + 3]:
            w = _width(n, room)
            assert w & (w - 1) == 0 and w <= min(room, MAX_FEED), (n, room, w)
            assert w >= min(n, room) or w * 2 > min(room, MAX_FEED), (n, room, w)
    assert _width(1, 1000) == 1  # a decode step is one token wide


# ---- the Chat: multi-turn, with a tokenizer holding the chat markers ---------------------------

CHAT32 = TINY32.replace(vocab_size=512)  # the tokenizer's pieces


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat_tok")
    return train_tokenizer(stdlib_texts("json", "email"), str(folder / "tokenizer.model"),
                           vocab_size=512, num_threads=1)


def test_the_second_answer_sees_the_first(tokenizer):
    params = init_params(CHAT32)
    chat = Chat(CHAT32, params, tokenizer, system="Be brief.", max_new_tokens=8)
    out = []
    chat.reply("hello there", out.append)
    first = chat.messages[-1]["content"]
    assert first and "".join(out) == first
    first_ids = list(chat.session.ids)  # the first prompt and the answer as generated
    stats = chat.reply("what did I say?", [].append)
    # Nothing of the first turn is fed again: only EOS + the new user turn + ASSISTANT.
    new_turn = tokenizer.encode(render_chat([{"role": "assistant", "content": "x"},
                                             {"role": "user", "content": "what did I say?"}],
                                            bos_token="").split("x", 1)[1])
    assert (stats.reused, stats.fed) == (len(first_ids), len(new_turn))
    prompt = first_ids + new_turn
    assert chat.session.ids[:len(prompt)] == prompt
    # One-shot greedy generation (no cache kept, another decode loop) from the whole two-turn
    # conversation gives the same answer.
    reference = generate_tokens(CHAT32, params, [prompt], max_new_tokens=8,
                                stop_tokens=chat.stop_tokens).tokens[0][len(prompt):]
    reference = [t for t in reference if t not in chat.stop_tokens]
    assert chat.messages[-1]["content"] == tokenizer.decode(reference, keep_special=True)
    # Without the first turn the answer differs: it was conditioned on it.
    alone = tokenizer.encode(render_chat([{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "what did I say?"}]))
    other = generate_tokens(CHAT32, params, [alone], max_new_tokens=8).tokens[0][len(alone):]
    assert other[:len(reference)] != reference
    # /reset keeps the system prompt: its tokens (and the USER marker after them) are reused,
    # nothing of the turns.
    chat.reset()
    stats = chat.reply("again", [].append)
    shared = tokenizer.encode(render_chat([{"role": "system", "content": "Be brief."}],
                                          add_generation_prompt=False) + USER)
    assert stats.reused == len(shared)


def test_the_release_template_renders_as_the_built_in_format(params, tokenizer):
    """On a model with more ids than the tokenizer has pieces: only pieces are sampled."""
    template = (FIXTURES / "deepseek_v3.jinja").read_text(encoding="utf-8")
    built_in = Chat(TINY32, params, tokenizer, max_new_tokens=5)
    jinja = Chat(TINY32, params, tokenizer, template=template, max_new_tokens=5)
    for chat in (built_in, jinja):
        chat.reply("hi", [].append)
        chat.reply("and then?", [].append)
    assert jinja.messages == built_in.messages
    assert jinja.session.ids == built_in.session.ids
    assert max(built_in.session.ids) < tokenizer.vocab_size < TINY32.vocab_size


def test_reasoning_opened_by_the_prompt_is_hidden(params, tokenizer):
    """A template whose generation prompt opens <think> (R1's later ones): the answer starts
    inside the reasoning, so nothing is shown until a </think> (this random model writes none),
    while the history keeps what was generated."""
    template = ("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
                "{% if add_generation_prompt %}" + ASSISTANT + "<think>\n{% endif %}")
    chat = Chat(TINY32, params, tokenizer, template=template, max_new_tokens=6)
    shown = []
    chat.reply("hi", shown.append)
    assert "".join(shown) == "" and chat.messages[-1]["content"]
    chat = Chat(TINY32, params, tokenizer, template=template, max_new_tokens=6,
                show_thinking=True)
    shown = []
    chat.reply("hi", shown.append)
    assert "".join(shown) == chat.messages[-1]["content"]


def test_chat_template_of_a_checkpoint_folder(tmp_path):
    assert chat_template_of(None) is None and chat_template_of(str(tmp_path)) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ x }}"}))
    assert chat_template_of(str(tmp_path / "tokenizer.json")) == "{{ x }}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}))
    assert chat_template_of(str(tmp_path)) == "D"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": 3}))
    with pytest.raises(ValueError, match="not a template string"):
        chat_template_of(str(tmp_path))
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot be read as a JSON object"):
        chat_template_of(str(tmp_path))


def test_a_tokenizer_without_the_markers_is_refused(params, tmp_path):
    from dsv3_jax.data.tokenizer import load_tokenizer

    with pytest.raises(DataError, match="predates the chat markers"):
        Chat(TINY32, params, load_tokenizer(plain_sentencepiece(tmp_path)))


# ---- python -m dsv3_jax.chat ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny model trained for 2 steps (its tokenizer, trained by the run, has the markers)."""
    from dsv3_jax.train.loop import train_and_evaluate
    from dsv3_jax.train.run_config import base_config

    root = tmp_path_factory.mktemp("chat_run")
    (root / "corpus").mkdir()
    c = base_config("tiny")
    c.model.vocab_size, c.model.max_seq_len = 512, 128
    c.data.corpus, c.data.seq_len, c.data.batch_size = stdlib_corpus(root / "corpus"), 32, 4
    c.data.validation_fraction = 0.2
    c.train.steps, c.train.warmup_steps, c.train.lr = 2, 1, 1e-3
    c.train.eval_batches, c.train.log_every, c.train.checkpoint_every = 0, 1, 2
    c.train.async_checkpoint = False
    train_and_evaluate(c, str(root / "run"))
    return str(root / "run")


def _chat(args, stdin):
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(COMPILATION_CACHE), JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "dsv3_jax.chat", *args], input=stdin, cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)


STATS = re.compile(r"\[(\d+) new tokens, (\d+) reused from the cache, (\d+) fed")


def test_cli_two_turns_the_second_reuses_the_first(workdir):
    out = _chat([f"--checkpoint={workdir}", "--max_new_tokens=6"],
                "hel\\\nlo\n\nwhat did I say?\n/bogus\n/reset\nagain\n")  # hel\ lo: one turn
    assert out.returncode == 0, out.stderr[-2000:]
    turns = [tuple(map(int, m)) for m in STATS.findall(out.stderr)]
    assert len(turns) == 3, out.stderr
    (new1, reused1, fed1), (_, reused2, fed2), (_, reused3, _) = turns
    assert reused1 == 0 and new1 >= 1
    # The first prompt and answer (less a stop token, never fed) are reused from the cache; only
    # the new turn is fed.
    assert reused2 in (fed1 + new1, fed1 + new1 - 1), out.stderr
    from dsv3_jax.data.tokenizer import find_tokenizer, load_tokenizer
    tokenizer = load_tokenizer(find_tokenizer(workdir))
    assert fed2 == len(tokenizer.encode(EOS + USER + "what did I say?" + ASSISTANT))
    assert reused3 == 2  # after /reset only BOS and the USER marker are shared
    assert "unknown command /bogus" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stdout.splitlines()) == 3  # one line per answer


@pytest.mark.parametrize("args, fragment, status", [
    (["--checkpoint=/nonexistent/run"], "/nonexistent/run", 1),
    (["--temperature=-1"], "temperature", 2),
    (["--max_new_tokens=0"], "max_new_tokens", 2),
    (["stray"], "unexpected arguments", 2),
])
def test_cli_refusals(workdir, args, fragment, status):
    args = args if args[0].startswith("--checkpoint") else [f"--checkpoint={workdir}", *args]
    out = _chat(args, "hi\n")
    assert out.returncode == status, out.stderr[-2000:]
    assert fragment in out.stderr and "Traceback" not in out.stderr
    assert len([line for line in out.stderr.splitlines() if line.startswith("error")]) == 1


def test_cli_refuses_a_tokenizer_without_the_markers(workdir, tmp_path):
    out = _chat([f"--checkpoint={workdir}", f"--tokenizer={plain_sentencepiece(tmp_path)}"],
                "hi\n")
    assert out.returncode != 0 and "predates the chat markers" in out.stderr
    assert "Traceback" not in out.stderr


def test_cli_chats_with_a_hugging_face_folder_and_its_chat_template(workdir, tmp_path):
    """The workdir exported as a Hugging Face folder (its tokenizer copied), with a
    tokenizer_config.json holding the release's chat_template: the chat renders with it."""
    from dsv3_jax.convert.__main__ import orbax_to_hf

    hf = tmp_path / "hf"
    orbax_to_hf(workdir, str(hf), progress=False)
    template = (FIXTURES / "deepseek_v3.jinja").read_text(encoding="utf-8")
    (hf / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    out = _chat([f"--checkpoint={hf}", "--max_new_tokens=4"], "hello\nagain\n")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "its own chat_template" in out.stderr
    turns = [tuple(map(int, m)) for m in STATS.findall(out.stderr)]
    assert len(turns) == 2 and turns[1][1] >= turns[0][2]  # the second turn reuses the first
