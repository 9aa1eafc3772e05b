"""Tools in a chat, for the chat template (chat_template.py).

``with_parsed_calls``: an assistant message's ``tool_calls`` arrive as JSON text (ChatMessage);
templates read them as transformers passes them, a list whose ``function.arguments`` is an
object (as vLLM does before rendering).

``describe_tools``: for a template that never reads ``tools``, the tools, the calls and the
results are written into the messages themselves, in the format the tool-call parser
(api_proc/tools.py) reads back, so that the model can call tools at all:

    hermes       a system block listing the functions in <tools></tools> and asking for
                 <tool_call>{"name": ..., "arguments": ...}</tool_call>; calls rendered so
    llama3_json  Llama 3.1's JSON prompt: respond {"name": ..., "parameters": ...}; calls
                 rendered so, separated by "; "

Either way a ``tool`` message becomes a user message ``<tool_response>\\n...\\n</tool_response>``
(consecutive results in one message, as Qwen2.5's template renders them): a template without
tools does not know the role ``tool`` and may refuse it.
"""

from __future__ import annotations

import json
from typing import Any

from .errors import ChatTemplateError

HERMES_INSTRUCTIONS = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)
LLAMA3_INSTRUCTIONS = (
    "Given the following functions, please respond with a JSON for a function call with its proper "
    "arguments that best answers the given prompt.\n\n"
    'Respond in the format {{"name": function name, "parameters": dictionary of argument name and its '
    "value}}. Do not use variables.\n\n{tools}"
)


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def with_parsed_calls(chat: list[dict]) -> list[dict]:
    """Messages whose tool_calls (JSON text) are a list, each call's arguments an object when
    they parse (else the text, as sent)."""
    out = []
    for i, message in enumerate(chat):
        calls = message.get("tool_calls")
        if isinstance(calls, str):
            try:
                calls = json.loads(calls)
            except ValueError:
                raise ChatTemplateError(f"messages[{i}].tool_calls is not valid JSON", "messages") from None
            for call in calls if isinstance(calls, list) else []:
                function = call.get("function") if isinstance(call, dict) else None
                if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                    try:
                        function["arguments"] = json.loads(function["arguments"] or "{}")
                    except ValueError:
                        pass
            message = {**message, "tool_calls": calls}
        out.append(message)
    return out


def _call_text(call: dict, tool_format: str) -> str:
    function = call.get("function") or {}
    name, arguments = function.get("name"), function.get("arguments", {})
    if tool_format == "llama3_json":
        return _dumps({"name": name, "parameters": arguments})
    return "<tool_call>\n" + _dumps({"name": name, "arguments": arguments}) + "\n</tool_call>"


def describe_tools(
    chat: list[dict], tools: list | None, tool_format: str, system_role: bool = True
) -> list[dict]:
    """The messages with tools, calls and results written in (see the module's docstring);
    unchanged when there are none of them. system_role: whether the template renders system
    messages; when not (it never names them), the tools go before the first user message's text."""
    has_calls = any(m.get("tool_calls") for m in chat)
    if not tools and not has_calls:
        return chat
    out: list[dict] = []
    after_result = False  # the last message in out holds tool results
    for message in chat:
        role, content = message.get("role"), message.get("content")
        if role == "tool":
            result = f"<tool_response>\n{content or ''}\n</tool_response>"
            if after_result:
                out[-1] = out[-1] | {"content": out[-1]["content"] + "\n" + result}
            else:
                out.append({"role": "user", "content": result})
            after_result = True
            continue
        after_result = False
        if role == "assistant" and message.get("tool_calls"):
            calls = [_call_text(c, tool_format) for c in message["tool_calls"] if isinstance(c, dict)]
            joined = ("; " if tool_format == "llama3_json" else "\n").join(calls)
            text = f"{content}\n{joined}" if content else joined
            message = {k: v for k, v in message.items() if k != "tool_calls"} | {"content": text}
        out.append(message)
    if tools:
        listing = "\n".join(_dumps(t) for t in tools)
        template = LLAMA3_INSTRUCTIONS if tool_format == "llama3_json" else HERMES_INSTRUCTIONS
        block = template.format(tools=listing)
        if out and out[0].get("role") == "system":
            first = out[0].get("content") or ""
            out[0] = out[0] | {"content": f"{first}\n\n{block}" if first else block}
        elif system_role:
            out.insert(0, {"role": "system", "content": block})
        else:
            k = next((j for j, m in enumerate(out) if m.get("role") == "user"), None)
            if k is None:
                out.insert(0, {"role": "user", "content": block})
            else:
                text = out[k].get("content") or ""
                out[k] = out[k] | {"content": f"{block}\n\n{text}" if text else block}
    return out


def tool_variables(tools: str | None) -> dict:
    """GenerateRequest.tools (JSON text) as the template variable ``tools``."""
    if not tools:
        return {}
    try:
        parsed = json.loads(tools)
    except ValueError:
        raise ChatTemplateError("tools is not valid JSON", "tools") from None
    if not isinstance(parsed, list):
        raise ChatTemplateError("tools must be a JSON list of tools", "tools")
    return {"tools": parsed}
