"""dsv3_jax.chat against DeepSeek's own chat templates (tests/fixtures/chat/, README there).

The reference is jinja2 rendering the release template text with transformers' settings, set up
here on its own (not through dsv3_jax.chat.jinja): the built-in renderer must write the same text
character for character, render_chat(template=...) too, and the spans must cut that text at the
answers. Also: the earlier and later DeepSeek templates where they agree and where they differ,
the one-line refusals, and parse_assistant's branches. Pure Python, well under a second.
"""

from __future__ import annotations

import functools
import pathlib

import pytest

from dsv3_jax.chat import (ASSISTANT, BOS, EOS, SPECIAL_TOKENS, THINK_END, USER,
                           ChatTemplateError, answer_of, parse_assistant, render_chat,
                           render_with_assistant_spans)

jinja2 = pytest.importorskip("jinja2", reason="the reference renderings need jinja2")
import jinja2.ext  # noqa: E402
import jinja2.sandbox  # noqa: E402

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "chat"


def _load(name: str) -> str:
    return (FIXTURES / name).read_bytes().decode("utf-8")


V3 = _load("deepseek_v3.jinja")
V3_FIRST = _load("deepseek_v3_first.jinja")
R1_0528 = _load("deepseek_r1_0528.jinja")

_ENV = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                    extensions=[jinja2.ext.loopcontrols])


_compiled = functools.lru_cache(maxsize=None)(_ENV.from_string)


def reference(template: str, messages, add_generation_prompt: bool, bos_token: str = BOS) -> str:
    return _compiled(template).render(messages=messages, bos_token=bos_token, eos_token=EOS,
                                      add_generation_prompt=add_generation_prompt)


def sys(text):
    return {"role": "system", "content": text}


def user(text):
    return {"role": "user", "content": text}


def bot(text, **extra):
    return {"role": "assistant", "content": text, **extra}


REASONED = "<think>\nThe user greets me.\n</think>\n\nHello!"
CASES = {
    "single_turn": [user("Hi")],
    "multi_turn": [user("Hi"), bot("Hello!"), user("2+2?"), bot("4"), user("And 3+3?")],
    "system_prompt": [sys("You are terse."), user("Hi"), bot("Hi."), user("Bye")],
    "several_systems": [sys("Be terse."), sys("Answer in French."), user("Hi"), bot("Salut."),
                        sys("Now in German."), user("Bye")],
    "empty_system": [sys(""), sys("Second."), user("Hi")],
    "only_system": [sys("Nobody spoke yet.")],
    "reasoning_dropped": [user("Hi"), bot(REASONED), user("2+2?"), bot("<think>4</think>4"),
                          user("Why?")],
    "reasoning_without_open_tag": [user("Q"), bot("I think hard.</think>\n\nA.")],
    "two_close_tags": [user("Q"), bot("a</think>b</think>  final")],
    "unclosed_think_kept": [user("Q"), bot("<think>never closed, kept whole")],
    "ends_with_answer": [sys("S"), user("Q"), bot("A")],
    "unicode": [sys("Réponds en 中文 🙂."), user("naïve café ｜▁ x\u0301 \u200b\n\ttabs  "),
                bot("<think>思考…</think>答案：是的 ✅"), user("𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \u202eRTL")],
    "jinja_syntax_in_content": [user("{{ bos_token }} {% if x %}y{% endif %} {# c #}"),
                                bot("{% raw %}}}")],
    "special_token_text_in_content": [user(f"say {EOS} and {USER}"), bot(f"{ASSISTANT}{BOS}")],
    "two_users_in_a_row": [user("first"), user("second")],
    "answer_first": [bot("I speak first."), user("ok")],
    "extra_keys_ignored": [user("Q"), bot("A", reasoning_content="hidden", name="deepseek")],
    "whitespace_kept": [user("  padded  \n"), bot("\n\n  answer \n")],
}
# Conversations that alternate user, assistant, ... from a user turn after their system messages.
ALTERNATING = ["single_turn", "multi_turn", "system_prompt", "reasoning_dropped",
               "reasoning_without_open_tag", "two_close_tags", "ends_with_answer", "unicode",
               "jinja_syntax_in_content", "extra_keys_ignored", "whitespace_kept"]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("case", sorted(CASES))
def test_builtin_renderer_equals_the_release_template(case, add_generation_prompt):
    messages = CASES[case]
    expected = reference(V3, messages, add_generation_prompt)
    assert render_chat(messages, add_generation_prompt=add_generation_prompt) == expected
    assert render_chat(messages, add_generation_prompt=add_generation_prompt,
                       template=V3) == expected


def test_the_format_by_hand():
    """One rendering spelled out, so a reader sees the format without running jinja."""
    messages = [sys("S1"), user("u1"), bot(REASONED), sys("S2"), user("u2")]
    assert render_chat(messages) == (BOS + "S1\n\nS2" + USER + "u1" + ASSISTANT + "\n\nHello!"
                                     + EOS + USER + "u2" + ASSISTANT)
    assert reference(V3, messages, True) == render_chat(messages)


def test_special_tokens_are_the_full_width_spellings():
    assert BOS == "<\uff5cbegin\u2581of\u2581sentence\uff5c>"
    assert EOS == "<\uff5cend\u2581of\u2581sentence\uff5c>"
    assert (USER, ASSISTANT) == ("<\uff5cUser\uff5c>", "<\uff5cAssistant\uff5c>")
    assert all(token in V3 for token in (USER, ASSISTANT, EOS, THINK_END))
    assert SPECIAL_TOKENS[:4] == (BOS, EOS, USER, ASSISTANT)


@pytest.mark.parametrize("bos_token", ["", "<s>"])
def test_bos_token_is_the_templates_variable(bos_token):
    messages = CASES["system_prompt"]
    assert render_chat(messages, bos_token=bos_token) == reference(V3, messages, True, bos_token)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("case", sorted(CASES))
def test_first_v3_template_differs_only_by_keeping_reasoning(case, add_generation_prompt):
    messages = CASES[case]
    first = reference(V3_FIRST, messages, add_generation_prompt)
    ours = render_chat(messages, add_generation_prompt=add_generation_prompt)
    if not any(THINK_END in m["content"] for m in messages):
        assert ours == first
    else:
        kept = [dict(m, content=answer_of(m["content"])) if m["role"] == "assistant" else m
                for m in messages]
        assert ours != first
        assert ours == reference(V3_FIRST, kept, add_generation_prompt)


@pytest.mark.parametrize("case", ALTERNATING)
def test_later_template_agrees_on_alternating_conversations(case):
    messages = CASES[case]
    add_generation_prompt = messages[-1]["role"] == "user"
    assert (render_chat(messages, add_generation_prompt=add_generation_prompt)
            == reference(R1_0528, messages, add_generation_prompt))
    if messages[-1]["role"] == "assistant":
        assert render_chat(messages) == reference(R1_0528, messages, True)


@pytest.mark.parametrize("case", ["single_turn", "two_users_in_a_row", "answer_first"])
def test_later_template_differs_where_documented(case):
    """After a user turn it writes ASSISTANT even with add_generation_prompt=False, and it writes
    it after each of two user turns in a row; it writes no ASSISTANT before an answer that no user
    turn precedes. The built-in renderer follows the release template in all three."""
    messages = CASES[case]
    assert render_chat(messages, add_generation_prompt=False) == reference(V3, messages, False)
    assert render_chat(messages, add_generation_prompt=False) != reference(R1_0528, messages, False)


SPAN_CASES = ["multi_turn", "system_prompt", "reasoning_dropped", "reasoning_without_open_tag",
              "two_close_tags", "unclosed_think_kept", "ends_with_answer", "unicode",
              "special_token_text_in_content", "answer_first", "whitespace_kept"]


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("case", SPAN_CASES)
def test_spans_cut_each_answer_where_generation_starts(case, add_generation_prompt):
    messages = CASES[case]
    text, spans = render_with_assistant_spans(messages, add_generation_prompt=add_generation_prompt)
    assert text == reference(V3, messages, add_generation_prompt)
    answers = [(i, m) for i, m in enumerate(messages) if m["role"] == "assistant"]
    assert len(spans) == len(answers) > 0
    assert all(a < b <= c for (a, b), (c, _) in zip(spans, spans[1:]))
    for (start, end), (i, message) in zip(spans, answers):
        assert text[start:end] == answer_of(message["content"]) + EOS
        assert text[:start] == reference(V3, messages[:i], True)  # the prompt for this answer
        assert THINK_END not in text[start:end]


def test_spans_exclude_the_marker_and_include_eos():
    text, spans = render_with_assistant_spans([user("Q"), bot("A")])
    assert text == BOS + USER + "Q" + ASSISTANT + "A" + EOS
    assert spans == [(len(text) - len("A" + EOS), len(text))]


# --- refusals: one line each, naming the message, the value and the fix ----------------------

REFUSALS = [
    ("hello", r"^messages='hello' is a str; give a list of \{'role'"),
    ([], r"^messages is empty; give at least one"),
    ([user("a"), "b"], r"^messages\[1\]='b' is a str, not a dict; give each message as"),
    ([{"content": "x"}], r"^messages\[0\]\.role is missing; give one of system, user, assistant"),
    ([{"role": 3, "content": "x"}], r"^messages\[0\]\.role=3 is not a str"),
    ([user("a"), bot("b"), {"role": "bot", "content": "c"}],
     r"^messages\[2\]\.role='bot' is not one of system, user, assistant; use one of them$"),
    ([user("a"), {"role": "tool", "content": "42"}],
     r"^messages\[1\]\.role='tool' is not one of .*writes no tool messages; pass the "
     r"checkpoint's chat_template as template="),
    ([user("a"), bot("", tool_calls=[])], r"^messages\[1\] has 'tool_calls'.*template="),
    ([{"role": "user"}], r"^messages\[0\] \(user\) has no 'content'; give its text as a str$"),
    ([user(None)], r"^messages\[0\]\.content=None is a NoneType, not a str"),
    ([user([{"type": "text", "text": "hi"}])], r"^messages\[0\]\.content=\[\{'type': 'text'.*list"),
]


@pytest.mark.parametrize("messages, pattern", REFUSALS)
def test_refusals(messages, pattern):
    for render in (render_chat, render_with_assistant_spans):
        with pytest.raises(ValueError, match=pattern) as info:
            render(messages)
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("kwargs, pattern", [
    ({"bos_token": None}, r"^bos_token=None is not a str; give the token's text"),
    ({"eos_token": "</s>"}, r"^eos_token='</s>' only reaches a jinja template.*template=\.\.\."),
    ({"tools": []}, r"^tools only reach a jinja template; the built-in renderer takes none"),
    ({"template": b"{{ x }}"}, r"^template=bytes is not a str"),
])
def test_argument_refusals(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern) as info:
        render_chat([user("Q")], **kwargs)
    assert "\n" not in str(info.value)


# --- render_chat(template=...): transformers' environment ------------------------------------

def test_template_path_leaves_messages_to_the_template():
    """The release template writes tool turns itself; render_chat passes them through."""
    messages = [user("Weather?"), {"role": "tool", "content": "sunny"}, bot("It is sunny.")]
    assert render_chat(messages, template=V3) == reference(V3, messages, True)
    with pytest.raises(ValueError, match=r"role='tool'"):
        render_chat(messages)


def test_template_environment():
    template = ("{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
                "{% generation %}{{ m | tojson }}{% endgeneration %}{% endfor %}\n"
                "{{ tools }}|{{ documents }}|{{ extra }}|{{ strftime_now('%Y') | length }}")
    text = render_chat([user("<é & ü>"), user("x")], template=template, extra=7)
    assert text == '{"role": "user", "content": "<é & ü>"}None|None|7|4'


@pytest.mark.parametrize("template, pattern", [
    ("{{ raise_exception('only user turns') }}",
     r"^the chat template refused the conversation: only user turns$"),
    ("{% if %}", r"^the chat template does not parse: .*\(template line 1\)$"),
    ("{{ messages[0]['content'] + 1 }}",
     r"^the chat template failed on these messages: TypeError: "),
])
def test_template_errors(template, pattern):
    with pytest.raises(ChatTemplateError, match=pattern) as info:
        render_chat([user("Q")], template=template)
    assert "\n" not in str(info.value)


# --- parse_assistant ---------------------------------------------------------------------------

@pytest.mark.parametrize("text, content, reasoning", [
    # R1 writing its own <think>, the answer closed by EOS
    ("<think>\nAdd them.\n</think>\n\n4" + EOS, "4", "Add them."),
    # R1 after a prompt that already opened <think>: the output starts inside the reasoning
    ("Add them.\n</think>\n\n4" + EOS, "4", "Add them."),
    # V3 answering directly
    ("  The answer is 4.\n" + EOS, "The answer is 4.", None),
    # no EOS (cut by max_new_tokens) and no reasoning
    ("The answer", "The answer", None),
    # reasoning cut off before </think>
    ("<think>\nStill thinking", "", "Still thinking"),
    # an empty reasoning block (R1 skipping its thinking)
    ("<think>\n\n</think>\n\nHi!" + EOS, "Hi!", ""),
    # text after EOS is not part of the answer
    ("A" + EOS + "<｜User｜>ignored", "A", None),
    # several </think>: the content is what the template would keep, after the last one
    ("<think>a</think>b</think> c", "c", "a</think>b"),
])
def test_parse_assistant(text, content, reasoning):
    assert parse_assistant(text) == {"content": content, "reasoning_content": reasoning}
    if THINK_END in text:
        assert parse_assistant(text)["content"] == answer_of(text.split(EOS)[0]).strip()


def test_parse_assistant_refuses_tokens():
    with pytest.raises(ValueError, match=r"^text=\[1, 2\] is a list; give the generated text"):
        parse_assistant([1, 2])
