"""Tools in the chat template: passed to a template that reads them (as transformers does),
written into the messages for one that ignores them (the packaged SmolLM2's chatml)."""

from __future__ import annotations

import copy
import json

import msgspec

from zeroserve.shared.messages import ChatMessage, GenerateRequest, SamplingParams
from zeroserve.tokenizer_proc.chat_template import ChatTemplate
from zeroserve.tokenizer_proc.validation import PromptCache, build_prompt

# Qwen2.5's way, shortened: tools in the system turn, calls as <tool_call> with arguments | tojson,
# results as <tool_response> inside a user turn
QWEN_LIKE = """{%- if tools %}<|im_start|>system
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == "assistant" and message.tool_calls is defined %}<|im_start|>assistant
{% for tc in message.tool_calls %}<tool_call>{"name": "{{ tc.function.name }}", "arguments": {{ tc.function.arguments | tojson }}}</tool_call>{% endfor %}<|im_end|>
{% elif message.role == "tool" %}<|im_start|>user
<tool_response>{{ message.content }}</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
CALLS = [
    {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Zürich"}'},
    }
]
EXCHANGE = [
    ChatMessage(role="user", content="Weather in Zürich?"),
    ChatMessage(role="assistant", tool_calls=json.dumps(CALLS)),
    ChatMessage(role="tool", tool_call_id="call_1", content="22 degrees, sunny"),
    ChatMessage(role="tool", tool_call_id="call_2", content="no rain"),
]


def _hf_messages() -> list[dict]:
    """The exchange as transformers takes it: arguments an object."""
    calls = copy.deepcopy(CALLS)
    calls[0]["function"]["arguments"] = json.loads(calls[0]["function"]["arguments"])
    return [
        {"role": "user", "content": "Weather in Zürich?"},
        {"role": "assistant", "tool_calls": calls},
        {"role": "tool", "tool_call_id": "call_1", "content": "22 degrees, sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": "no rain"},
    ]


def test_a_template_that_reads_tools_gets_them_as_transformers_gives_them(hf_tokenizer):
    renderer = ChatTemplate(QWEN_LIKE)
    assert renderer.reads_tools
    got = renderer.render(EXCHANGE, True, {"tools": TOOLS})
    expected = hf_tokenizer.apply_chat_template(
        _hf_messages(), chat_template=QWEN_LIKE, tools=TOOLS, tokenize=False, add_generation_prompt=True
    )
    assert got == expected
    assert '"arguments": {"city": "Zürich"}' in got  # an object, not JSON text in a string


def test_chatml_without_tools_gets_them_written_in_hermes_format(tokenizer):
    assert not tokenizer._template.reads_tools  # SmolLM2's template: the case this exists for
    prompt = tokenizer.apply_chat_template(EXCHANGE, tools=TOOLS)
    system, user, assistant, results, gen = prompt.split("<|im_start|>")[1:]
    assert system.startswith("system\n# Tools") and json.dumps(TOOLS[0], ensure_ascii=False) in system
    assert "<tool_call>" in system  # the format the hermes parser reads back
    assert "You are a helpful AI assistant" not in prompt  # our system turn replaced the default one
    assert assistant == (
        'assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call><|im_end|>\n'
    )
    # the results, one user turn (chatml would render a "tool" role no model was trained on)
    assert results == (
        "user\n<tool_response>\n22 degrees, sunny\n</tool_response>\n"
        "<tool_response>\nno rain\n</tool_response><|im_end|>\n"
    )
    assert gen == "assistant\n"


def test_llama3_json_format_and_an_existing_system_message(tokenizer):
    renderer = ChatTemplate(tokenizer.chat_template)
    messages = [ChatMessage(role="system", content="Be brief."), *EXCHANGE]
    prompt = renderer.render(messages, True, {"tools": TOOLS}, tool_format="llama3_json")
    system = prompt.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\nBe brief.\n\nGiven the following functions")
    assert '{"name": "get_weather", "parameters": {"city": "Zürich"}}<|im_end|>' in prompt


def test_a_template_without_system_turns_gets_tools_in_the_first_user_message():
    alternating = (
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('roles must alternate') }}{% endif %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    )
    prompt = ChatTemplate(alternating).render(
        [ChatMessage(role="user", content="hi")], True, {"tools": TOOLS}
    )
    assert prompt.startswith("[user] # Tools") and prompt.endswith("\n\nhi\n")


def test_without_tools_nothing_changes(tokenizer, hf_tokenizer):
    plain = [{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}]
    assert tokenizer.apply_chat_template(plain) == hf_tokenizer.apply_chat_template(
        plain, tokenize=False, add_generation_prompt=True
    )


def test_prompt_cache_tells_requests_with_tools_apart(tokenizer):
    cache = PromptCache()
    base = GenerateRequest(request_id="a", params=SamplingParams(max_tokens=4), messages=EXCHANGE[:1])
    with_tools = msgspec.structs.replace(base, request_id="b", tools=json.dumps(TOOLS))
    plain_ids, _ = build_prompt(tokenizer, base, 2048, 0, cache)
    tool_ids, _ = build_prompt(tokenizer, with_tools, 2048, 0, cache)
    assert len(tool_ids) > len(plain_ids) + 50
    assert "get_weather" in tokenizer.decode(tool_ids)
