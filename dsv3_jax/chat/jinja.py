"""A checkpoint's own `chat_template` rendered the way transformers' `apply_chat_template` does.

  render_template(template, messages, add_generation_prompt=..., bos_token=..., eos_token=...)

The environment is transformers': jinja2's ImmutableSandboxedEnvironment with trim_blocks and
lstrip_blocks, the loopcontrols extension ({% break %}, {% continue %}) and a {% generation %}
tag; the globals raise_exception (here it raises ChatTemplateError) and strftime_now; a tojson
filter that is json.dumps with ensure_ascii=False (jinja's own tojson escapes <, >, & and ').
The template sees messages, add_generation_prompt, bos_token, eos_token, tools=None,
documents=None and whatever other variables the caller passes.

transformers uses {% generation %} ... {% endgeneration %} to record where assistant text lies;
here the tag only renders its body, so that templates using it still render (the built-in renderer
in template.py computes the assistant spans itself).

jinja2 is imported only when a template is rendered: the rest of dsv3_jax.chat runs without it.
"""

from __future__ import annotations

import datetime
import functools
import json
from typing import Any


class ChatTemplateError(ValueError):
    """A chat template that does not parse, refuses the conversation or fails while rendering."""


def _jinja2():
    try:
        import jinja2
        import jinja2.ext
        import jinja2.nodes
        import jinja2.sandbox
    except ImportError as e:
        raise ImportError("render_chat(template=...) renders the template with jinja2, which is "
                          "not installed; install it with pip install 'jinja2>=3.1', or leave "
                          "template=None for the built-in DeepSeek-V3 renderer") from e
    return jinja2


def _raise_exception(message: Any):
    raise ChatTemplateError(f"the chat template refused the conversation: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | str | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


@functools.lru_cache(maxsize=1)
def _environment():
    jinja2 = _jinja2()

    class GenerationTag(jinja2.ext.Extension):
        """{% generation %}body{% endgeneration %} renders as body."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            call = self.call_method("_render_body")
            return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

        def _render_body(self, caller) -> str:
            return caller()

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, GenerationTag])
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.filters["tojson"] = _tojson
    return env


@functools.lru_cache(maxsize=32)
def _compile(template: str):
    return _environment().from_string(template)


def render_template(template: str, messages: list, *, add_generation_prompt: bool,
                    bos_token: str, eos_token: str, **variables: Any) -> str:
    """The text `template` renders for `messages`; ChatTemplateError if it cannot.

    `messages` goes to the template as given (the template decides what it accepts);
    `variables` (tools=, documents=, enable_thinking=, ...) are passed next to the four named ones.
    """
    jinja2 = _jinja2()
    if not isinstance(template, str):
        raise ValueError(f"template={type(template).__name__} is not a str; pass the "
                         f"checkpoint's chat_template text (or None for the built-in renderer)")
    try:
        compiled = _compile(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template does not parse: {e.message} "
                                f"(template line {e.lineno})") from None
    variables = {"tools": None, "documents": None, **variables}
    try:
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=bos_token, eos_token=eos_token, **variables)
    except ChatTemplateError:
        raise
    except (jinja2.TemplateError, TypeError, AttributeError) as e:
        detail = " ".join(str(e).split())
        raise ChatTemplateError(f"the chat template failed on these messages: "
                                f"{type(e).__name__}: {detail}") from None
