"""Chat: the DeepSeek-V3 conversation format (template.py) and checkpoints' own jinja chat
templates rendered as transformers renders them (jinja.py).

  render_chat(messages, add_generation_prompt=True, template=None)  -> prompt text
  render_with_assistant_spans(messages)  -> (text, [(start, end), ...]) of each answer + EOS
  parse_assistant(text)                  -> {"content": ..., "reasoning_content": ...}
  BOS, EOS, USER, ASSISTANT, THINK_BEGIN, THINK_END, SPECIAL_TOKENS
"""

from dsv3_jax.chat.jinja import ChatTemplateError, render_template
from dsv3_jax.chat.template import (ASSISTANT, BOS, EOS, ROLES, SPECIAL_TOKENS, THINK_END,
                                    THINK_BEGIN, USER, MessageError, answer_of, check_messages,
                                    parse_assistant, render_chat, render_with_assistant_spans)

__all__ = [
    "ASSISTANT",
    "BOS",
    "ChatTemplateError",
    "EOS",
    "MessageError",
    "ROLES",
    "SPECIAL_TOKENS",
    "THINK_END",
    "THINK_BEGIN",
    "USER",
    "answer_of",
    "check_messages",
    "parse_assistant",
    "render_chat",
    "render_template",
    "render_with_assistant_spans",
]
