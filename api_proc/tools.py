"""Tool calls (OpenAI's `tools` / `tool_choice`), as vLLM serves them: checked here, rendered by
the chat template (tokenizer_proc/chat_template.py), and read back from the model's text.

tool_choice    what the model is asked for              how the output is read
none           text (tools still rendered)              not parsed: all content
auto           text or calls in the parser's format     --tool-call-parser (hermes, llama3_json)
required       >= 1 call, decoding constrained to the   the JSON array [{"name", "arguments"}, ...]
               JSON array below (xgrammar)
named {f}      f's arguments, constrained to f's        the whole output is f's arguments
               parameter schema

Streaming: ``ToolStream.feed(text)`` returns the content to send and OpenAI's tool-call deltas
(the first of a call carries index, id, type, function.name and arguments ""; later ones carry
arguments pieces). Text inside a call never reaches content, and a tag or key split across
deltas is held back until it is whole. Arguments stream as the model writes them (raw JSON
text); a whole response carries them re-encoded. See docs/tools.md.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

import msgspec

from zeroserve.api_proc.errors import bad_request
from zeroserve.api_proc.protocol import ChatCompletionRequest, NamedToolChoice, ToolCallIn
from zeroserve.shared.messages import StructuredOutput

MAX_TOOLS = 128  # OpenAI's limit
_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_EMPTY_PARAMETERS = {"type": "object", "properties": {}}
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"  # Llama 3.1's marker before a call (dropped with special tokens)


@dataclass(frozen=True)
class ToolPlan:
    """A chat request's tools, checked. mode: none | auto | required | named."""

    tools: list[dict]  # OpenAI's tools, as plain JSON data
    mode: str
    parser: str
    named: str | None = None  # the forced function (mode "named")
    parallel: bool = True

    @property
    def tools_json(self) -> str:
        return json.dumps(self.tools, ensure_ascii=False)

    def structured(self) -> StructuredOutput | None:
        """The constraint that makes `required` / a named function always parse."""
        if self.mode == "named":
            return StructuredOutput(kind="json", spec=json.dumps(self._parameters(self.named)))
        if self.mode != "required":
            return None
        items = [
            {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "enum": [t["function"]["name"]]},
                    "arguments": self._parameters(t["function"]["name"]),
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for t in self.tools
        ]
        schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
        if not self.parallel:
            schema["maxItems"] = 1
        return StructuredOutput(kind="json", spec=json.dumps(schema))

    def _parameters(self, name: str | None) -> dict:
        for t in self.tools:
            if t["function"]["name"] == name:
                return t["function"].get("parameters") or _EMPTY_PARAMETERS
        raise KeyError(name)

    def stream(self) -> ToolStream:
        return ToolStream(self)


# --------------------------------------------------------------------------- checks


def _check_schema(schema: Any, param: str) -> None:
    import jsonschema  # only requests with tools pay for the import

    if not isinstance(schema, dict):
        raise bad_request("A function's parameters must be a JSON schema object.", param)
    try:
        jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(
            schema
        )
    except jsonschema.SchemaError as e:
        path = "/".join(str(p) for p in e.path) or "(root)"
        raise bad_request(
            f"The function's parameters are not a valid JSON schema at {path}: {e.message[:200]}", param
        ) from None


def tool_plan(body: ChatCompletionRequest, parser: str) -> ToolPlan | None:
    """The request's tools and tool_choice checked (a 400 naming the field), or None without tools."""
    choice = body.tool_choice
    tools = body.tools or []
    if not tools:
        if choice is not None and choice != "none":
            raise bad_request(
                "tool_choice needs tools: send the functions the model may call.", "tool_choice"
            )
        if body.tools is not None:
            raise bad_request("tools must hold at least one tool, or be left out.", "tools")
        return None
    if len(tools) > MAX_TOOLS:
        raise bad_request(f"At most {MAX_TOOLS} tools are allowed, got {len(tools)}.", "tools")
    names: set[str] = set()
    for i, tool in enumerate(tools):
        if tool.type != "function":
            raise bad_request(
                f'Unknown tool type `{tool.type[:64]}` in tools[{i}]; only "function" tools are served.',
                f"tools[{i}].type",
            )
        name = tool.function.name
        if not _NAME.fullmatch(name):
            raise bad_request(
                f"Function names must be 1 to 64 letters, digits, '_', '.' or '-'; got {name[:80]!r}.",
                f"tools[{i}].function.name",
            )
        if name in names:
            raise bad_request(
                f"The function name `{name}` appears twice in tools.", f"tools[{i}].function.name"
            )
        names.add(name)
        if tool.function.parameters is not None:
            _check_schema(tool.function.parameters, f"tools[{i}].function.parameters")
    named = None
    if isinstance(choice, NamedToolChoice):
        if choice.type != "function":
            raise bad_request(
                f'Unknown tool_choice type `{choice.type[:64]}`; use "function".', "tool_choice.type"
            )
        named = choice.function.name
        if named not in names:
            raise bad_request(
                f"tool_choice names the function `{named[:64]}`, which is not in tools.", "tool_choice"
            )
        mode = "named"
    elif choice is None:
        mode = "auto"
    elif choice in ("none", "auto", "required"):
        mode = choice
    else:
        raise bad_request(
            f'tool_choice must be "none", "auto", "required" or {{"type": "function", "function": '
            f'{{"name": ...}}}}, got {choice[:64]!r}.',
            "tool_choice",
        )
    formatted = body.response_format is not None and body.response_format.type != "text"
    if mode in ("named", "required") and (formatted or body.structured_outputs is not None):
        other = "response_format" if formatted else "structured_outputs"
        raise bad_request(
            f"tool_choice {mode!r} constrains the output to function calls; it cannot be combined with {other}.",
            "tool_choice",
        )
    return ToolPlan(
        tools=msgspec.to_builtins(tools),
        mode=mode,
        parser=parser,
        named=named,
        parallel=body.parallel_tool_calls is not False,
    )


def calls_json(calls: list[ToolCallIn] | None, param: str) -> str | None:
    """An assistant message's tool_calls as the JSON text ChatMessage carries."""
    if not calls:
        return None
    for j, call in enumerate(calls):
        if call.type != "function":
            raise bad_request(
                f'Unknown tool call type `{call.type[:64]}`; only "function" calls are served.',
                f"{param}[{j}].type",
            )
    return json.dumps(msgspec.to_builtins(calls), ensure_ascii=False)


# --------------------------------------------------------------------------- reading JSON as it arrives


class _Malformed(Exception):
    pass


_WS = " \t\r\n"


def _skip_ws(s: str, i: int) -> int:
    while i < len(s) and s[i] in _WS:
        i += 1
    return i


def _string_end(s: str, i: int) -> int | None:
    """s[i] is '"': the index after its closing quote, None when s ends first."""
    i += 1
    while i < len(s):
        c = s[i]
        if c == "\\":
            i += 2
        elif c == '"':
            return i + 1
        else:
            i += 1
    return None


def _value_end(s: str, i: int) -> int | None:
    """The end of the JSON value starting at s[i], None when s ends first. Only nesting and
    strings are followed; json.loads validates the whole once it is complete."""
    depth = 0
    while i < len(s):
        c = s[i]
        if c == '"':
            end = _string_end(s, i)
            if end is None:
                return None
            if depth == 0:
                return end
            i = end
            continue
        if c in "{[":
            depth += 1
        elif c in "}]":
            if depth == 0:
                return i  # the end of a scalar, at its parent's closer
            depth -= 1
            if depth == 0:
                return i + 1
        elif depth == 0 and (c == "," or c in _WS):
            return i
        i += 1
    return None


def _members(s: str, i: int) -> tuple[dict[str, tuple[int, int | None]], int | None]:
    """The members of the JSON object at s[i] ('{') read so far: key -> (value start, value end
    or None while it is incomplete), and the object's end (None while incomplete)."""
    members: dict[str, tuple[int, int | None]] = {}
    i += 1
    while True:
        i = _skip_ws(s, i)
        if i >= len(s):
            return members, None
        if s[i] == "}":
            return members, i + 1
        if s[i] == ",":
            i += 1
            continue
        if s[i] != '"':
            raise _Malformed
        end = _string_end(s, i)
        if end is None:
            return members, None
        key = json.loads(s[i:end])
        i = _skip_ws(s, end)
        if i >= len(s):
            return members, None
        if s[i] != ":":
            raise _Malformed
        i = _skip_ws(s, i + 1)
        if i >= len(s):
            return members, None
        end = _value_end(s, i)
        members[key] = (i, end)
        if end is None:
            return members, None
        i = end


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _call(name: str, arguments: Any) -> dict:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": new_call_id(), "type": "function", "function": {"name": name, "arguments": text}}


def _call_fields(obj: Any) -> tuple[str, Any] | None:
    """(name, arguments) of a decoded call object, None when it is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return (obj["name"], args) if isinstance(args, dict) else None


# --------------------------------------------------------------------------- whole responses


def parse_output(plan: ToolPlan, text: str) -> tuple[str | None, list[dict]]:
    """A whole response's (content, tool_calls). Text that does not parse as a call stays content."""
    if plan.mode == "none":
        return text, []
    if plan.mode == "named":
        return None, [_call(plan.named or "", text.strip())]
    if plan.mode == "required":
        try:
            items = json.loads(text)
        except ValueError:
            return text, []
        fields = [_call_fields(x) for x in items] if isinstance(items, list) else [None]
        if not fields or any(f is None for f in fields):
            return text, []
        return None, [_call(*f) for f in fields]  # type: ignore[misc]
    content, calls = (_parse_hermes if plan.parser == "hermes" else _parse_llama3)(text)
    if not plan.parallel:
        calls = calls[:1]
    return content, calls


def _parse_hermes(text: str) -> tuple[str | None, list[dict]]:
    calls: list[dict] = []
    outside: list[str] = []
    pos = 0
    while True:
        start = text.find(CALL_OPEN, pos)
        if start < 0:
            outside.append(text[pos:])
            break
        close = text.find(CALL_CLOSE, start)
        body_end = len(text) if close < 0 else close
        after = len(text) if close < 0 else close + len(CALL_CLOSE)
        try:
            fields = _call_fields(json.loads(text[start + len(CALL_OPEN) : body_end]))
        except ValueError:
            fields = None
        outside.append(text[pos:start])
        if fields is None:
            outside.append(text[start:after])  # not a call: it stays what the model wrote
        else:
            calls.append(_call(*fields))
        pos = after
    content = "".join(outside)
    return (content.strip() or None) if calls else content, calls


def _parse_llama3(text: str) -> tuple[str | None, list[dict]]:
    """One or more call objects ({"name", "parameters"}) separated by ';' (Llama 3.x), optionally
    after <|python_tag|>; anything else is plain content, as vLLM's llama3_json parser reads it,
    save what follows the calls, which is content beside them (a stream has sent the calls by then)."""
    s = text.strip()
    if s.startswith(PYTHON_TAG):
        s = s[len(PYTHON_TAG) :].lstrip()
    if not s.startswith("{"):
        return text, []
    decoder = json.JSONDecoder()
    calls, i = [], 0
    try:
        while i < len(s):
            obj, end = decoder.raw_decode(s, i)
            fields = _call_fields(obj)
            if fields is None:
                raise ValueError("not a call")
            calls.append(_call(*fields))
            i = _skip_ws(s, end)
            if i < len(s) and s[i] in ";,":
                i = _skip_ws(s, i + 1)
    except ValueError:
        if not calls:
            return text, []
        # what follows the calls (text, or an object that is not a call) is the model's own, as a
        # stream sends it (the calls were already out)
        return s[i:].strip() or None, calls
    return None, calls


# --------------------------------------------------------------------------- streaming


@dataclass
class _OpenCall:
    index: int
    start: int  # where its object begins in the buffer
    name: str | None = None
    sent_args: int = 0  # characters of raw arguments sent
    header_sent: bool = False


@dataclass
class ToolStream:
    """One choice's stream: feed(text) -> (content, tool-call deltas); finish() at its end."""

    plan: ToolPlan
    buffer: str = ""  # text not yet settled (a possible tag, or the calls being read)
    num_calls: int = 0
    held_ws: str = ""  # whitespace-only content, sent only when more content follows
    _state: str = "start"  # start | text | call | json | named | done
    _call: _OpenCall | None = None
    _pos: int = 0  # json/required: where reading resumes in the buffer
    _ws_before: str = ""  # hermes: the whitespace before the open call
    _deltas: list[dict] = field(default_factory=list)

    @property
    def called(self) -> bool:
        return self.num_calls > 0

    def feed(self, text: str) -> tuple[str, list[dict]]:
        self._deltas = []
        self.buffer += text
        content = self._advance(final=False)
        return self._content(content, final=False), self._deltas

    def finish(self) -> tuple[str, list[dict]]:
        self._deltas = []
        content = self._advance(final=True)
        return self._content(content, final=True), self._deltas

    def _content(self, text: str, final: bool) -> str:
        """Whitespace between calls (or before the first) is not worth a content delta: it is held
        until text follows, and dropped at the end when calls were made."""
        text = self.held_ws + text
        if text and not text.strip() and not final:
            self.held_ws = text
            return ""
        self.held_ws = ""
        return "" if (final and self.called and not text.strip()) else text

    # -- one step over the buffer, per mode
    def _advance(self, final: bool) -> str:
        mode = self.plan.mode
        if mode == "none":
            out, self.buffer = self.buffer, ""
            return out
        if mode == "named":
            return self._advance_named()
        if mode == "required":
            if self._state != "done":
                try:
                    self._advance_json(array=True)
                except (_Malformed, ValueError):
                    self._state = "done"  # constrained decoding makes this rare: the rest is dropped
            return ""
        if self.plan.parser == "llama3_json":
            return self._advance_llama3(final)
        return self._advance_hermes(final)

    def _header(self, call: _OpenCall) -> None:
        call.header_sent = True
        self._deltas.append(
            {
                "index": call.index,
                "id": new_call_id(),
                "type": "function",
                "function": {"name": call.name, "arguments": ""},
            }
        )

    def _arguments(self, call: _OpenCall, piece: str) -> None:
        if piece:
            call.sent_args += len(piece)
            self._deltas.append({"index": call.index, "function": {"arguments": piece}})

    def _advance_named(self) -> str:
        if self._call is None:
            self._call = _OpenCall(index=0, start=0, name=self.plan.named)
            self.num_calls = 1
            self._header(self._call)
        piece = self.buffer if self._call.sent_args else self.buffer.lstrip()
        self.buffer = ""
        self._arguments(self._call, piece)
        return ""

    def _read_object(self, s: str, start: int) -> int | None:
        """Reads the call object at s[start] ('{'), sending its header and arguments as they
        arrive; returns the object's end once it is complete. Raises _Malformed (or ValueError)."""
        call = self._call
        if call is None or call.start != start:
            call = self._call = _OpenCall(index=self.num_calls, start=start)
        members, end = _members(s, start)
        if call.name is None and "name" in members and members["name"][1] is not None:
            a, b = members["name"]
            name = json.loads(s[a:b])
            if not isinstance(name, str):
                raise _Malformed
            call.name = name
        if end is not None and call.name is None:
            raise _Malformed  # a whole object without a name: not a call
        args = members.get("arguments", members.get("parameters"))
        if args is not None and s[args[0]] != "{":
            raise _Malformed  # arguments that are not an object: not a call, as a whole response reads it
        if call.name is not None and (args is not None or end is not None):
            if not call.header_sent:
                if not self.plan.parallel and self.num_calls >= 1:
                    return end  # read past it: one call only
                self.num_calls += 1
                self._header(call)
            if args is not None:
                a, b = args
                raw = s[a : len(s) if b is None else b]
                self._arguments(call, raw[call.sent_args :])
            elif end is not None and not call.sent_args:
                self._arguments(call, "{}")
        return end

    def _advance_json(self, array: bool) -> None:
        """Call objects one after another (llama3_json: separated by ';'; required: a JSON array)."""
        s = self.buffer
        while True:
            i = _skip_ws(s, self._pos)
            if i < len(s) and s[i] in "[,;" and (array or s[i] != "["):
                self._pos = i + 1
                continue
            if i >= len(s) or s[i] != "{":
                self._pos = i
                return
            end = self._read_object(s, i)
            if end is None:
                return
            self._pos = end
            self._call = None

    def _advance_llama3(self, final: bool) -> str:
        if self._state == "start":
            s = self.buffer.lstrip()
            tagged = s.startswith(PYTHON_TAG)
            if tagged:
                s = s[len(PYTHON_TAG) :].lstrip()
            if not final and (not s or (not tagged and PYTHON_TAG.startswith(s))):
                return ""  # not yet known whether this is a call
            if s.startswith("{"):
                self._state, self.buffer = "json", s
            else:
                self._state = "text"
        if self._state == "json":
            try:
                self._advance_json(array=False)
            except (_Malformed, ValueError):
                if self._call is not None and self._call.header_sent:
                    self._state = "done"  # a call already announced: what is left of it is not content
                else:  # not a call: all of it is text, or, after calls, the rest from this object on
                    self._state = "text"
                    self.buffer = self.buffer[self._pos :].lstrip() if self.num_calls else self.buffer
                self._pos = 0
            if final and self._state == "json":
                # what follows the calls (or an object that never became one) is the model's text
                rest = self.buffer if self.num_calls == 0 else self.buffer[self._pos :]
                self.buffer, self._state = "", "done"
                return rest
        if self._state == "text":
            out, self.buffer = self.buffer, ""
            return out
        if self._state == "done":
            self.buffer = ""
        return ""

    def _advance_hermes(self, final: bool) -> str:
        out: list[str] = []
        while True:
            if self._state in ("start", "text"):
                self._state = "text"
                k = self.buffer.find(CALL_OPEN)
                if k < 0:
                    keep = 0 if final else _partial_suffix(self.buffer, CALL_OPEN)
                    if not final:  # and the whitespace before it: not content if a call follows
                        rest = self.buffer[: len(self.buffer) - keep]
                        keep += len(rest) - len(rest.rstrip())
                    out.append(self.buffer[: len(self.buffer) - keep])
                    self.buffer = self.buffer[len(self.buffer) - keep :]
                    return "".join(out)
                # whitespace just before a call is not content, unless the call turns out not to be one
                before = self.buffer[:k]
                out.append(before.rstrip())
                self._ws_before = before[len(before.rstrip()) :]
                if not "".join(out).strip():
                    self._ws_before = self.held_ws + "".join(out) + self._ws_before
                    out.clear()
                    self.held_ws = ""
                self.buffer = self.buffer[k + len(CALL_OPEN) :]
                self._state, self._call = "call", None
                continue
            # inside <tool_call>: the buffer is the call's text so far
            k = self.buffer.find(CALL_CLOSE)
            closed = k >= 0 or final
            body = self.buffer[:k] if k >= 0 else self.buffer
            out.append(self._hermes_call(body, closed, k >= 0))
            if not closed:
                return "".join(out)
            self.buffer = self.buffer[k + len(CALL_CLOSE) :] if k >= 0 else ""
            self._state = "text"
            if not self.buffer:
                return "".join(out)

    def _hermes_call(self, body: str, closed: bool, tagged: bool) -> str:
        """Sends what can be sent of one <tool_call>; at its close, a body that was not a call is
        returned as content (with its tags), as a whole response would keep it."""
        start = _skip_ws(body, 0)
        if start < len(body) and body[start] == "{":
            try:
                self._read_object(body, start)
            except (_Malformed, ValueError):
                pass  # decided at the close, from the whole body
        if not closed:
            return ""
        call, self._call = self._call, None
        if call is not None and call.header_sent:
            return ""
        try:
            fields = _call_fields(json.loads(body))
        except ValueError:
            fields = None
        if fields is None:
            return self._ws_before + CALL_OPEN + body + (CALL_CLOSE if tagged else "")
        if not self.plan.parallel and self.num_calls >= 1:
            return ""
        done = _OpenCall(index=self.num_calls, start=0, name=fields[0])
        self.num_calls += 1
        self._header(done)
        self._arguments(done, json.dumps(fields[1], ensure_ascii=False))
        return ""


def _partial_suffix(text: str, tag: str) -> int:
    """The length of text's longest suffix that is a proper prefix of tag (a tag split across deltas)."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


# --------------------------------------------------------------------------- into responses


def finish_reason(reason: str | None, called: bool) -> str | None:
    """OpenAI's: a choice that ended by itself after calling tools finished with "tool_calls"."""
    return "tool_calls" if called and reason == "stop" else reason


def chat_message(plan: ToolPlan | None, text: str, reason: str | None) -> tuple[dict, str | None]:
    """A whole response's message and finish_reason."""
    if plan is None or plan.mode == "none":
        return {"role": "assistant", "content": text}, reason
    content, calls = parse_output(plan, text)
    message: dict = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = calls
    return message, finish_reason(reason, bool(calls))


def stream_step(stream: ToolStream, text: str, reason: str | None) -> tuple[str, list[dict], str | None]:
    """One streamed delta: its content, tool-call deltas and finish_reason (the stream is
    finished with the choice's last delta)."""
    content, calls = stream.feed(text)
    if reason is not None:
        more, last = stream.finish()
        content, calls = content + more, calls + last
    return content, calls, finish_reason(reason, stream.called)
