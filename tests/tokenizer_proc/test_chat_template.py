"""Chat templates render exactly as transformers' apply_chat_template, and fail clearly."""

from __future__ import annotations

import pytest

from zeroserve.shared.messages import ChatMessage
from zeroserve.tokenizer_proc.chat_template import ChatTemplate
from zeroserve.tokenizer_proc.errors import ChatTemplateError
from zeroserve.tokenizer_proc.tokenizer import Tokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"}],
    [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hi 🎉, ça va? 日本語"},
        {"role": "assistant", "content": "Fine.\n\nAnd you?"},
        {"role": "user", "content": "  spaces  and\ttabs\n"},
    ],
    [{"role": "user", "content": ""}],
]

# Mistral-style: BOS in the template, strict alternation through raise_exception.
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

# Block tags on their own lines (trim_blocks / lstrip_blocks), tojson of non-ASCII, namespace,
# loop controls, a {% generation %} block, and extra variables (tools).
RICH = """{% set ns = namespace(system='') %}
{% for m in messages %}
    {% if m['role'] == 'system' %}
        {% set ns.system = m['content'] %}
        {% continue %}
    {% endif %}
{% endfor %}
<|im_start|>system
{{ ns.system or 'default system' }}
{% if tools %}
    {% for tool in tools %}
{{ tool | tojson }}
    {% endfor %}
{% endif %}
<|im_end|>
{% for m in messages if m['role'] != 'system' %}
<|im_start|>{{ m['role'] }}
{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}
{% if m.name is defined %} (from {{ m.name }}){% endif %}
<|im_end|>{{ '\\n' if not loop.last }}
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""

TOOLS = [{"type": "function", "function": {"name": "météo", "parameters": {"ville": "Zürich", "n": [1, 2]}}}]


def _reference(hf_tokenizer, messages, template=None, add_generation_prompt=True, **kwargs):
    return hf_tokenizer.apply_chat_template(
        messages,
        chat_template=template,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        **kwargs,
    )


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_model_template_matches_transformers(tokenizer, hf_tokenizer, messages, add_generation_prompt):
    expected = _reference(hf_tokenizer, messages, add_generation_prompt=add_generation_prompt)
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected
    # and the ids of the prompt are those transformers tokenizes the chat into
    ids = hf_tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt
    )
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert tokenizer.encode_chat(messages, add_generation_prompt=add_generation_prompt) == list(ids)


@pytest.mark.parametrize("template", [MISTRAL, RICH], ids=["mistral", "rich"])
def test_other_templates_match_transformers(tokenizer, hf_tokenizer, template):
    renderer = ChatTemplate(template)
    for messages in CONVERSATIONS[:1] + CONVERSATIONS[2:]:
        if template is MISTRAL:
            messages = [m for m in messages if m["role"] != "system"]
        # a template that ignores tools gets them written into the messages (test_tool_template.py)
        for extra in ({}, {"tools": TOOLS}) if renderer.reads_tools else ({},):
            expected = _reference(hf_tokenizer, messages, template, **extra)
            got = renderer.render(messages, True, {**tokenizer.special_tokens, **extra})
            assert got == expected


def test_chat_message_structs_render_like_dicts(tokenizer):
    structs = [
        ChatMessage(role="user", content="hi", name="ann"),
        ChatMessage(role="assistant", content="yo"),
    ]
    dicts = [{"role": "user", "content": "hi", "name": "ann"}, {"role": "assistant", "content": "yo"}]
    renderer = ChatTemplate(RICH)
    assert renderer.render(structs) == renderer.render(dicts)
    assert "(from ann)" in renderer.render(structs)
    # None fields are dropped, not rendered as "None"
    assert "None" not in renderer.render([ChatMessage(role="user", content="x")])
    assert tokenizer.apply_chat_template(structs) == tokenizer.apply_chat_template(dicts)


def test_raise_exception_surfaces_its_message(tokenizer):
    renderer = ChatTemplate(MISTRAL)
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ChatTemplateError, match="Conversation roles must alternate") as info:
        renderer.render(bad, True, tokenizer.special_tokens)
    assert info.value.param == "messages"
    with pytest.raises(ChatTemplateError, match="Only user and assistant roles"):
        renderer.render([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}], True, {})


def test_template_failures_are_chat_template_errors(tokenizer):
    # content missing -> str + undefined inside the model's own template
    with pytest.raises(ChatTemplateError, match="failed to render"):
        tokenizer.apply_chat_template([ChatMessage(role="user", content=None)])
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate("{% for m in messages %}{{ m['content'] }").render([{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="expected an object"):
        ChatTemplate("x").render(["just a string"])
    no_template = Tokenizer.__new__(Tokenizer)
    no_template.__dict__.update(tokenizer.__dict__, _template=None, source="/m/model.gguf")
    with pytest.raises(ChatTemplateError, match="no chat template"):
        no_template.apply_chat_template([{"role": "user", "content": "x"}])


def test_sandbox_blocks_python_internals():
    escape = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(ChatTemplateError):
        ChatTemplate(escape).render([])
    # lists passed in cannot be mutated by the template (immutable sandbox)
    with pytest.raises(ChatTemplateError):
        ChatTemplate("{{ messages.append(1) }}").render([{"role": "user", "content": "x"}])


def test_helpers_tojson_and_strftime():
    out = ChatTemplate(
        "{{ x | tojson }}|{{ x | tojson(indent=2) | length > 0 }}|{{ strftime_now('%Y') | length }}"
    )
    assert out.render([], variables={"x": {"é": "<b>&"}}) == '{"é": "<b>&"}|True|4'
