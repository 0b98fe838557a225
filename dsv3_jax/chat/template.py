"""The DeepSeek-V3 chat format: conversations to prompt text, answers' spans in it, outputs back.

  render_chat(messages)                  the prompt text: the built-in renderer, or a checkpoint's
                                         chat_template through jinja (render_chat(template=...))
  render_with_assistant_spans(messages)  (text, [(start, end), ...]): where each answer lies, for
                                         loss masking in SFT
  parse_assistant(text)                  {"content": ..., "reasoning_content": ...} from generated
                                         text
  check_messages(messages)               the refusals the built-in renderer makes, on their own

The format is that of DeepSeek-V3's release template (tests/fixtures/chat/deepseek_v3.jinja, the
same text as DeepSeek-R1's first release); the built-in renderer writes exactly what that template
writes for every conversation it accepts (the tests compare the two):

  BOS + s_1 + "\\n\\n" + s_2 + ...
      + USER + u_1 + ASSISTANT + a_1 + EOS + USER + u_2 + ... [+ ASSISTANT]

- Every system message, wherever it stands, is moved to the front, right after BOS; several are
  joined with a blank line. Nothing else separates the turns: no newlines, no role names.
- An assistant message is written as ASSISTANT + its answer + EOS, where the answer is its content
  after the last THINK_END: R1-style reasoning (<think>...</think>) is dropped from every
  assistant message given, the whitespace after </think> kept. A model sees the answers of earlier
  turns, never their reasoning. To train on reasoning, render_with_assistant_spans'
  keep_last_reasoning=True writes the last assistant message whole, its reasoning included (the
  turn being generated: what an R1-style model writes after the generation prompt).
- The generation prompt is ASSISTANT alone, written after whatever came last. It opens no <think>
  block: V3 answers directly and an R1-style model opens its own. (R1's later template revision
  appends "<think>\\n" to force reasoning; a caller who wants that appends THINK_BEGIN + "\\n".)
- Tool messages and tool calls are refused here; the release template has its own tool format,
  which render_chat(template=...) renders.

Later DeepSeek templates (the R1-0528 era, tests/fixtures/chat/deepseek_r1_0528.jinja)
write ASSISTANT after every user turn instead of as a generation prompt: they agree with this
format on conversations (after the system messages) that alternate user, assistant, ..., from a
user turn, and end with a user turn plus a generation prompt or with an assistant turn; they
differ after a user turn without a generation prompt, between two user turns in a row, and on an
assistant turn with no user turn before it.
"""

from __future__ import annotations

from typing import Any, Sequence

from dsv3_jax.chat.jinja import ChatTemplateError, render_template
# The markers (U+FF5C FULLWIDTH VERTICAL LINE and U+2581 LOWER ONE EIGHTH BLOCK, which look like |
# and _ but are not) have one owner, the module the tokenizers reserve them from.
from dsv3_jax.data.special_tokens import ASSISTANT, BOS, EOS, THINK_BEGIN, THINK_END, USER

SPECIAL_TOKENS = (BOS, EOS, USER, ASSISTANT, THINK_BEGIN, THINK_END)  # what this format writes

ROLES = ("system", "user", "assistant")
_TO_TEMPLATE = "pass the checkpoint's chat_template as template=... to render it"

Span = tuple[int, int]


class MessageError(ValueError):
    """check_messages' refusal; `reason` says which rule failed: no_messages (not a non-empty
    list), bad_message (not a dict), bad_role, tool_calls, bad_content."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def _show(value: Any, limit: int = 60) -> str:
    """repr(value) cut to one short line, for error messages."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _check_list(messages: Any) -> None:
    if not isinstance(messages, (list, tuple)):
        raise MessageError(f"messages={_show(messages)} is a {type(messages).__name__}; give a "
                           f"list of {{'role': ..., 'content': ...}} dicts", "no_messages")
    if not messages:
        raise MessageError("messages is empty; give at least one {'role': 'user', 'content': ...}",
                           "no_messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise MessageError(f"messages[{i}]={_show(message)} is a {type(message).__name__}, "
                               f"not a dict; give each message as {{'role': ..., 'content': ...}}",
                               "bad_message")
        if not isinstance(message.get("role"), str):
            got = f"={_show(message['role'])} is not a str" if "role" in message else " is missing"
            raise MessageError(f"messages[{i}].role{got}; give one of {', '.join(ROLES)}",
                               "bad_role")


def check_messages(messages: Any) -> None:
    """Refuses, with a one-line MessageError naming the message, anything the built-in renderer
    does not write: a non-list, an empty list, a non-dict message, a role other than system, user
    or assistant, a 'tool_calls' key, or content that is not a str. Other keys are ignored (as the
    release template ignores them), 'reasoning_content' and 'name' among them."""
    _check_list(messages)
    for i, message in enumerate(messages):
        role = message["role"]
        if role not in ROLES:
            fix = (f"the built-in renderer writes no tool messages; {_TO_TEMPLATE}"
                   if role == "tool" else "use one of them")
            raise MessageError(f"messages[{i}].role={role!r} is not one of {', '.join(ROLES)}; "
                               f"{fix}", "bad_role")
        if "tool_calls" in message:
            raise MessageError(f"messages[{i}] has 'tool_calls', which the built-in renderer does "
                               f"not write; drop the key, or {_TO_TEMPLATE}", "tool_calls")
        if "content" not in message:
            raise MessageError(f"messages[{i}] ({role}) has no 'content'; give its text as a str",
                               "bad_content")
        content = message["content"]
        if not isinstance(content, str):
            raise MessageError(f"messages[{i}].content={_show(content)} is a "
                               f"{type(content).__name__}, not a str; give the text as one str",
                               "bad_content")


def _check_token(name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise ValueError(f"{name}={_show(value)} is not a str; give the token's text "
                         f"(\"\" to leave it out)")


def answer_of(content: str) -> str:
    """The part of an assistant message that the format keeps: what follows its last </think>
    (all of it when there is none), whitespace included."""
    return content.rsplit(THINK_END, 1)[-1]


def _render(messages: Sequence[dict], add_generation_prompt: bool, bos_token: str,
            keep_last_reasoning: bool = False) -> tuple[str, list[Span]]:
    """The text and the [start, end) character span of each assistant answer + EOS in it (the
    last assistant message's whole content + EOS with keep_last_reasoning)."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    pieces, spans = [bos_token, system], []
    end = len(bos_token) + len(system)
    for i, message in enumerate(messages):
        if message["role"] == "user":
            pieces += [USER, message["content"]]
            end += len(USER) + len(message["content"])
        elif message["role"] == "assistant":
            kept = keep_last_reasoning and i == last
            answer = (message["content"] if kept else answer_of(message["content"])) + EOS
            pieces += [ASSISTANT, answer]
            start = end + len(ASSISTANT)
            end = start + len(answer)
            spans.append((start, end))
    if add_generation_prompt:
        pieces.append(ASSISTANT)
    return "".join(pieces), spans


def render_chat(messages: Sequence[dict], *, add_generation_prompt: bool = True,
                template: str | None = None, bos_token: str = BOS, eos_token: str = EOS,
                **template_variables: Any) -> str:
    """The prompt text for `messages` ([{'role': 'system'|'user'|'assistant', 'content': str}]).

    template=None: the built-in DeepSeek-V3 renderer (the format in this module's docstring);
    messages are checked by check_messages. bos_token="" leaves BOS out (for a tokenizer that adds
    it itself); the built-in renderer always closes an answer with EOS, as the release template
    does, so eos_token and template_variables are refused there.

    template=<a checkpoint's chat_template>: rendered with jinja as transformers does (jinja.py),
    with messages, add_generation_prompt, bos_token, eos_token, tools=None, documents=None and
    template_variables; messages need only be dicts with a str 'role', the template decides the
    rest. ChatTemplateError when the template refuses or fails.
    """
    _check_token("bos_token", bos_token)
    _check_token("eos_token", eos_token)
    if template is not None:
        _check_list(messages)
        return render_template(template, messages, add_generation_prompt=add_generation_prompt,
                               bos_token=bos_token, eos_token=eos_token, **template_variables)
    if eos_token != EOS:
        raise ValueError(f"eos_token={eos_token!r} only reaches a jinja template: the built-in "
                         f"renderer ends each answer with {EOS}; leave eos_token, or pass "
                         f"template=...")
    if template_variables:
        raise ValueError(f"{', '.join(sorted(template_variables))} only reach a jinja template; "
                         f"the built-in renderer takes none: leave them out, or pass template=...")
    check_messages(messages)
    return _render(messages, add_generation_prompt, bos_token)[0]


def render_with_assistant_spans(messages: Sequence[dict], *, add_generation_prompt: bool = False,
                                bos_token: str = BOS, keep_last_reasoning: bool = False
                                ) -> tuple[str, list[Span]]:
    """(text, spans): render_chat's text (built-in renderer) and, for each assistant message in
    order, the [start, end) character range of what a model is trained to produce there: its
    answer (answer_of: reasoning dropped) followed by EOS; the ASSISTANT marker before it is not
    part of it. text[:start] is the prompt a model would generate that answer from (for
    conversations whose system messages all come first).

    keep_last_reasoning: the last assistant message is written whole, its <think>...</think>
    reasoning included, and that is its span (SFT of a reasoning format: data.sft_reasoning
    "last"); earlier ones still drop theirs, as the format does."""
    _check_token("bos_token", bos_token)
    check_messages(messages)
    return _render(messages, add_generation_prompt, bos_token, keep_last_reasoning)


def parse_assistant(text: str) -> dict[str, str | None]:
    """{'content': answer, 'reasoning_content': reasoning or None} from an assistant's generated
    text (what follows the generation prompt).

    The text ends at the first EOS (the token and anything after it are dropped). With a
    </think>, the reasoning is what precedes the last one, less a leading <think> (R1 writes it
    itself, or finds it in its prompt), and the content is what follows it. Without one, text that
    opens with <think> is unfinished reasoning (content ""), and any other text is all content
    (reasoning None). Both parts are stripped of surrounding whitespace.
    """
    if not isinstance(text, str):
        raise ValueError(f"text={_show(text)} is a {type(text).__name__}; give the generated text "
                         f"as a str (decode the tokens first)")
    body = text.split(EOS, 1)[0]
    if THINK_END in body:
        reasoning, content = body.rsplit(THINK_END, 1)
        reasoning = reasoning.strip()
        reasoning = reasoning[len(THINK_BEGIN):] if reasoning.startswith(THINK_BEGIN) else reasoning
        return {"content": content.strip(), "reasoning_content": reasoning.strip()}
    body = body.strip()
    if body.startswith(THINK_BEGIN):
        return {"content": "", "reasoning_content": body[len(THINK_BEGIN):].strip()}
    return {"content": body, "reasoning_content": None}


__all__ = ["ASSISTANT", "BOS", "ChatTemplateError", "EOS", "MessageError", "ROLES",
           "SPECIAL_TOKENS", "THINK_END", "THINK_BEGIN", "USER", "answer_of", "check_messages",
           "parse_assistant", "render_chat", "render_with_assistant_spans"]
