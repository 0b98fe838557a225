"""The multi-turn chat behind `python -m dsv3_jax.chat`: a conversation, its rendering every turn,
and a latent cache that keeps what the turns share (dsv3_jax/infer/session.py).

  Chat(cfg, params, tokenizer, template=None, system="")   one conversation
    .reply(text, write) -> TurnStats   the user's turn, the answer streamed through write(str)
    .reset() / .set_system(text)       a new conversation / another system prompt
  ThinkFilter(show)                    hides (or shows) <think>...</think> in streamed text
  chat_template_of(tokenizer_path)     the chat_template a checkpoint's tokenizer_config.json
                                       ships, or None

Each turn the whole conversation is rendered (the checkpoint's jinja chat_template when it ships
one, else the built-in DeepSeek-V3 renderer) with the generation prompt. When that text extends
the text the cache already spells (the previous prompt + the answer as generated), the new ids
are the cache's ids + the extension encoded: only the new turn is fed, and the answer's tokens
stay as the model generated them. Otherwise (a new system prompt; an earlier answer's reasoning,
which the format drops; /reset) the text is encoded whole and the session keeps the longest
common prefix. The answer is kept in the history as the model wrote it, reasoning included, up
to its stop token.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable

from dsv3_jax.chat.template import BOS, EOS, THINK_BEGIN, THINK_END, render_chat
from dsv3_jax.data.conversations import check_chat_tokenizer
from dsv3_jax.infer.sampling import Sampling
from dsv3_jax.infer.session import ChatSession, ContextFullError, TurnStats


def chat_template_of(tokenizer_path: str | None) -> str | None:
    """The `chat_template` of the tokenizer_config.json beside `tokenizer_path` (a file or its
    folder), or None when there is none. A list of named templates gives the one named
    "default". ValueError for a config that is not JSON or a template that is not text."""
    if not tokenizer_path:
        return None
    folder = tokenizer_path if os.path.isdir(tokenizer_path) else os.path.dirname(tokenizer_path)
    path = os.path.join(folder, "tokenizer_config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            template = json.load(f).get("chat_template")
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"{path} cannot be read as a JSON object ({e}); fix or remove "
                         f"it.") from None
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise ValueError(f"{path}: chat_template is a {type(template).__name__}, not a template "
                         f"string; fix it or remove the key to use the built-in format.")
    return template


class ThinkFilter:
    """Streamed text in, the text to show out: with show=False, what lies between THINK_BEGIN
    and THINK_END (markers included) is dropped. A piece ending in what may be the start of a
    marker has that tail held back until the next piece says."""

    def __init__(self, show: bool, inside: bool = False):
        self.show = show
        self._held = ""
        self._inside = inside  # the prompt opened a <think> block (R1's later templates do)

    def __call__(self, piece: str) -> str:
        if self.show:
            return piece
        text, out = self._held + piece, []
        self._held = ""
        while text:
            marker = THINK_END if self._inside else THINK_BEGIN
            at = text.find(marker)
            if at >= 0:
                if not self._inside:
                    out.append(text[:at])
                text, self._inside = text[at + len(marker):], not self._inside
                continue
            # Hold back a tail that could be the start of a marker (either one).
            keep = max((k for m in (THINK_BEGIN, THINK_END) for k in range(1, len(m))
                        if text.endswith(m[:k])), default=0)
            visible, self._held = text[:len(text) - keep], text[len(text) - keep:]
            if not self._inside:
                out.append(visible)
            text = ""
        return "".join(out)

    def flush(self) -> str:
        """The text held back at the end (a partial marker that never completed)."""
        held, self._held = self._held, ""
        return "" if self._inside or self.show else held


class Chat:
    """One conversation with a model: its messages, system prompt and session (the cache)."""

    def __init__(self, cfg, params, tokenizer, *, template: str | None = None, system: str = "",
                 sampling: Sampling = Sampling(), seed: int = 0, max_new_tokens: int = 256,
                 show_thinking: bool = False):
        self.ids_of_markers = check_chat_tokenizer(tokenizer)  # DataError without the markers
        self.tokenizer, self.template = tokenizer, template
        self.session = ChatSession(cfg, params)
        # Only the tokenizer's pieces are drawn (a release pads the model's vocabulary).
        self.sampling = dataclasses.replace(sampling, vocab_limit=tokenizer.vocab_size)
        self.seed, self.max_new_tokens = seed, max_new_tokens
        self.show_thinking = show_thinking
        self.stop_tokens = tuple(sorted({tokenizer.eos_id, self.ids_of_markers[EOS]}))
        self.system, self.messages = system, []
        self.turns = 0
        self._cached_text: str | None = None  # the text the cache's ids spell, when known

    def reset(self) -> None:
        """Forgets the turns; the system prompt stays (and its tokens stay in the cache)."""
        self.messages = []

    def set_system(self, text: str) -> None:
        self.system = text

    def _render(self, messages: list[dict]) -> str:
        full = ([{"role": "system", "content": self.system}] if self.system else []) + messages
        if self.template is None:
            return render_chat(full)
        return render_chat(full, template=self.template, bos_token=BOS, eos_token=EOS)

    def reply(self, text: str, write: Callable[[str], None]) -> TurnStats:
        """The user's turn `text`: the answer streamed through `write` (reasoning hidden unless
        show_thinking), then kept in the history. ContextFullError, with the history unchanged,
        when the conversation no longer fits the context."""
        messages = self.messages + [{"role": "user", "content": text}]
        rendered = self._render(messages)
        if self._cached_text is not None and rendered.startswith(self._cached_text):
            # The history as the cache holds it, answers as generated: append the rest.
            wanted = self.session.ids + self.tokenizer.encode(rendered[len(self._cached_text):])
        else:  # history rewritten (a new system prompt, reasoning dropped): the common prefix
            wanted = self.tokenizer.encode(rendered)
        stats = self.session.prefill(wanted)  # ContextFullError: nothing changed
        shown = ThinkFilter(self.show_thinking,
                            inside=rendered.rfind(THINK_BEGIN) > rendered.rfind(THINK_END))
        new: list[int] = []
        printed = [""]

        def stream(token: int) -> None:
            if token in self.stop_tokens:
                return
            new.append(token)
            decoded = self.tokenizer.decode(new, keep_special=True)
            if decoded.startswith(printed[0]):  # a multi-byte character may still be partial
                write(shown(decoded[len(printed[0]):]))
                printed[0] = decoded

        ids, gen = self.session.generate(
            max_new_tokens=self.max_new_tokens, sampling=self.sampling,
            seed=self.seed + self.turns, stop_tokens=self.stop_tokens, on_token=stream)
        answer = self.tokenizer.decode(new, keep_special=True)
        if answer.startswith(printed[0]):
            write(shown(answer[len(printed[0]):]))
        write(shown.flush())
        self.messages = messages + [{"role": "assistant", "content": answer}]
        self.turns += 1
        fed = self.session.ids[len(wanted):]  # the answer's tokens now in the cache
        self._cached_text = rendered + self.tokenizer.decode(fed, keep_special=True)
        stats.new_tokens, stats.decode_seconds, stats.stopped = (
            gen.new_tokens, gen.decode_seconds, gen.stopped)
        return stats


__all__ = ["Chat", "ContextFullError", "ThinkFilter", "chat_template_of"]
