"""Hugging Face folder tokenizers: a folder saved by transformers, loaded by both."""

from __future__ import annotations

import json
import shutil

import pytest
from tokenizer_testdata import TEXTS

from zeroserve.tokenizer_proc.errors import TokenizerLoadError
from zeroserve.tokenizer_proc.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def hf_folder(hf_tokenizer, tmp_path_factory):
    """tokenizer.json + tokenizer_config.json + chat_template.jinja, as transformers saves them."""
    folder = tmp_path_factory.mktemp("smollm2_tokenizer")
    hf_tokenizer.save_pretrained(str(folder))
    assert (folder / "tokenizer.json").exists() and (folder / "chat_template.jinja").exists()
    return folder


def _variant(hf_folder, tmp_path, config_update=None, files=None, drop=()):
    """A copy of the saved folder with tokenizer_config.json changed and files added/removed."""
    folder = tmp_path / "variant"
    shutil.copytree(hf_folder, folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.update(config_update or {})
    config_path.write_text(json.dumps(config))
    for name, content in (files or {}).items():
        (folder / name).write_text(content if isinstance(content, str) else json.dumps(content))
    for name in drop:
        (folder / name).unlink()
    return folder


def _reference(folder):
    """transformers' tokenizer for the folder. Its tokenizer_config names TokenizersBackend, which
    is what AutoTokenizer would pick; calling it directly skips AutoConfig (seconds here)."""
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    assert (
        json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"] == "TokenizersBackend"
    )
    return TokenizersBackend.from_pretrained(str(folder))


def test_saved_folder_matches_transformers(hf_folder, tokenizer):
    ours, ref = load_tokenizer(str(hf_folder)), _reference(hf_folder)
    for text in TEXTS:
        assert ours.encode(text) == ref.encode(text) == tokenizer.encode(text), text
    ids = ours.encode(TEXTS[13] + TEXTS[9])
    assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids)
    assert ours.vocab_size == len(ref)
    assert (ours.bos_token_id, ours.eos_token_ids, ours.pad_token_id) == (1, [2], 2)
    assert ours.special_token_ids == tokenizer.special_token_ids
    assert ours.chat_template == ref.chat_template == tokenizer.chat_template
    messages = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(messages) == ref.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )


def test_bos_eos_from_post_processor_and_generation_config(hf_folder, tmp_path):
    """tokenizer.json's post-processor adds BOS/EOS; tokenizer_config's add_bos_token flag is
    ignored when tokenizer.json exists (transformers 5)."""
    folder = _variant(
        hf_folder,
        tmp_path,
        {"add_bos_token": False, "add_eos_token": False},
        files={
            "generation_config.json": {"eos_token_id": [2, 0]},
            "config.json": {"model_type": "llama", "max_position_embeddings": 2048, "eos_token_id": 7},
        },
    )
    tokenizer_json = json.loads((folder / "tokenizer.json").read_text())
    tokenizer_json["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [
            {"SpecialToken": {"id": "<|im_start|>", "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
            {"SpecialToken": {"id": "<|im_end|>", "type_id": 0}},
        ],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {
            "<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]},
            "<|im_end|>": {"id": "<|im_end|>", "ids": [2], "tokens": ["<|im_end|>"]},
        },
    }
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    ours, ref = load_tokenizer(str(folder)), _reference(folder)
    assert ours.add_bos
    for text in TEXTS[:6]:
        assert ours.encode(text) == ref.encode(text)
        assert ours.encode(text)[0] == 1 and ours.encode(text)[-1] == 2
        assert ours.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)
    # generation_config wins over config.json; the tokenizer's eos comes first
    assert ours.eos_token_ids == [2, 0]
    assert ours.model_max_length == 2048
    # A chat prompt is encoded without an added BOS: the template writes its own.
    chat_ids = ours.encode_chat([{"role": "user", "content": "x"}])
    assert chat_ids[0] == 1 and chat_ids[1] != 1


def test_config_only_eos_and_legacy_files(hf_folder, tmp_path):
    """Template inside tokenizer_config (named list form), eos from config.json, special tokens
    from the legacy special_tokens_map.json."""
    template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{{ eos_token }}{% endfor %}"
    folder = _variant(
        hf_folder,
        tmp_path,
        {
            "chat_template": [
                {"name": "tool_use", "template": "x"},
                {"name": "default", "template": template},
            ],
            "eos_token": None,
            "additional_special_tokens": ["<my_special>"],
        },
        files={
            "config.json": {"eos_token_id": 0},
            "special_tokens_map.json": {"eos_token": {"content": "<|endoftext|>"}},
        },
        drop=["chat_template.jinja"],
    )
    ours = load_tokenizer(str(folder))
    assert ours.eos_token_id == 0 and ours.eos_token_ids == [0]
    assert ours.apply_chat_template([{"role": "user", "content": "hi"}]) == "[user]hi<|endoftext|>"
    # a named special token missing from tokenizer.json is added, whole and special
    new_id = ours.token_to_id("<my_special>")
    assert new_id == ours.vocab_size - 1 and new_id in ours.special_token_ids
    assert ours.encode("a<my_special>b", add_special_tokens=False)[1] == new_id


def test_folder_errors(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"\0")
    with pytest.raises(TokenizerLoadError, match="no tokenizer.json.*SentencePiece"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerLoadError, match="cannot load"):
        load_tokenizer(str(tmp_path))


def test_folder_bad_config(hf_folder, tmp_path):
    folder = _variant(hf_folder, tmp_path)
    (folder / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(TokenizerLoadError, match="expected a JSON object"):
        load_tokenizer(str(folder))
