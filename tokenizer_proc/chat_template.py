"""Render a model's chat template (jinja2) the way transformers' apply_chat_template does.

Templates come with the model, i.e. from strangers: they run in jinja2's
ImmutableSandboxedEnvironment (no attribute starting with "_", no mutation of lists/dicts),
with the helpers templates expect from transformers: ``raise_exception``, ``strftime_now``,
a ``tojson`` that does not HTML-escape, ``trim_blocks``/``lstrip_blocks``, loop controls and
the ``{% generation %}`` tag (rendered as its body).

Tools (OpenAI's ``tools``, an assistant's ``tool_calls``, ``tool`` messages) go to the template
as transformers gives them: ``tools`` a list, each call's arguments an object. A template that
never reads ``tools`` (SmolLM2's plain chatml, for one) would drop them silently, so for it the
tools are written into the messages instead (tool_messages.py), in the format the server's
``--tool-call-parser`` reads back (docs/tools.md).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import msgspec
from jinja2 import meta, nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import ChatTemplateError
from .tool_messages import describe_tools, with_parsed_calls


class TemplateRaised(jinja2.TemplateError):
    """The template called raise_exception(message): its message is meant for the user."""


class _GenerationTag(Extension):
    """``{% generation %}...{% endgeneration %}`` marks assistant text for training masks; here it
    only renders its body (templates that use it would not compile without it)."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message: str):
    raise TemplateRaised(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _plain(value: Any) -> Any:
    """Messages as plain JSON data: structs become dicts, None-valued keys are dropped (many
    templates test `'key' in message` and would render "None")."""
    if isinstance(value, msgspec.Struct):
        value = msgspec.to_builtins(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


class ChatTemplate:
    """One compiled template. A template that does not compile is reported when used, so a
    model with a broken chat template can still serve plain completions."""

    def __init__(self, source: str):
        self.source = source
        self._compiled = None
        self._compile_error: str | None = None
        self.reads_tools = False  # whether the template renders `tools` itself
        try:
            env = _environment()
            self._compiled = env.from_string(source)
            self.reads_tools = "tools" in meta.find_undeclared_variables(env.parse(source))
        except jinja2.TemplateSyntaxError as e:
            self._compile_error = f"the model's chat template does not compile (line {e.lineno}: {e.message})"

    def render(
        self,
        messages: Sequence,
        add_generation_prompt: bool = True,
        variables: Mapping[str, Any] | None = None,
        tool_format: str = "hermes",
    ) -> str:
        """The prompt text for messages. variables: bos_token, eos_token, tools, ... .
        tool_format: how tools are written into the messages when the template ignores them."""
        if self._compiled is None:
            raise ChatTemplateError(self._compile_error or "no chat template")
        chat = _plain(list(messages))
        for i, message in enumerate(chat):
            if not isinstance(message, dict):
                raise ChatTemplateError(f"messages[{i}] is a {type(message).__name__}, expected an object")
        context = {"tools": None, "documents": None, **_plain(dict(variables or {}))}
        chat = with_parsed_calls(chat)
        if not self.reads_tools:
            chat = describe_tools(chat, context["tools"], tool_format, system_role="system" in self.source)
        try:
            return self._compiled.render(
                messages=chat, add_generation_prompt=add_generation_prompt, **context
            )
        except TemplateRaised as e:
            raise ChatTemplateError(f"the chat template rejected the messages: {e.message}") from e
        except jinja2.TemplateError as e:  # undefined values, sandbox violations, ...
            raise ChatTemplateError(f"the chat template failed to render the messages: {e}") from e
        except Exception as e:  # a template error of another type: str + None, bad index, ...
            raise ChatTemplateError(
                f"the chat template failed to render the messages ({type(e).__name__}: {e})"
            ) from e
