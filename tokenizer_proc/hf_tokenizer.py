"""Load the tokenizer of a Hugging Face model folder.

Files read (only tokenizer.json is required):

    tokenizer.json           the tokenizers pipeline, vocabulary and added tokens (the truth)
    tokenizer_config.json    bos/eos/unk/pad tokens, chat_template (add_bos_token/add_eos_token
                             are ignored, as transformers 5 does: the post-processor decides)
    special_tokens_map.json  legacy named special tokens (fills what tokenizer_config lacks)
    chat_template.jinja      the chat template (transformers >= 4.43 writes it here), or
    chat_template.json       {"chat_template": ...}
    generation_config.json   eos_token_id (int or list): extra ids that end a generation
    config.json              eos_token_id when there is no generation_config; context length

Unlike transformers 5, which rebuilds the pre-tokenizer and decoder of a model-specific
tokenizer class from the class's defaults, we use tokenizer.json as written.
"""

from __future__ import annotations

import json
import os

from tokenizers import AddedToken
from tokenizers import Tokenizer as BackendTokenizer

from .errors import TokenizerLoadError
from .tokenizer import TokenizerSpec, set_post_processor

_NAMED = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length")


def _read_json(folder: str, name: str) -> dict:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise TokenizerLoadError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise TokenizerLoadError(f"{path}: expected a JSON object")
    return data


def _content(value) -> str | None:
    """A special token as tokenizer_config writes it: a string or {"content": ..., ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _chat_template(folder: str, config: dict) -> str | None:
    jinja_path = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            return f.read()
    template = _read_json(folder, "chat_template.json").get("chat_template") or config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _ids(value) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int)]
    return []


def load_hf_tokenizer(folder: str) -> TokenizerSpec:
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        hint = (
            " (it has only a SentencePiece tokenizer.model: convert it once with transformers' "
            "AutoTokenizer.from_pretrained(...).save_pretrained(...))"
            if os.path.isfile(os.path.join(folder, "tokenizer.model"))
            else ""
        )
        raise TokenizerLoadError(f"{folder}: no tokenizer.json{hint}")
    try:
        backend = BackendTokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise TokenizerLoadError(f"cannot load {path}: {e}") from e
    backend.no_truncation()
    backend.no_padding()

    config = _read_json(folder, "tokenizer_config.json")
    legacy = _read_json(folder, "special_tokens_map.json")
    special = {}
    for name in _NAMED:
        token = _content(config.get(name)) or _content(legacy.get(name))
        if token is not None:
            special[name] = token

    # Named and extra special tokens missing from tokenizer.json are added, as transformers does.
    extra = []
    for key in ("additional_special_tokens", "extra_special_tokens"):
        tokens = config.get(key) or legacy.get(key)
        if isinstance(tokens, list):
            extra += [t for t in map(_content, tokens) if t]
    present = {t.content for t in backend.get_added_tokens_decoder().values()}
    missing = [t for t in dict.fromkeys([*special.values(), *extra]) if t not in present]
    if missing:
        backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in missing])

    # BOS/EOS come from tokenizer.json's post-processor alone: transformers 5 ignores the
    # add_bos_token/add_eos_token flags of tokenizer_config.json when tokenizer.json exists.
    if backend.post_processor is None:
        set_post_processor(backend, special.get("bos_token"), False, special.get("eos_token"), False)

    model_config = _read_json(folder, "config.json")
    generation = _read_json(folder, "generation_config.json")
    eos_ids = _ids(generation.get("eos_token_id")) if generation else _ids(model_config.get("eos_token_id"))
    text_config = model_config.get("text_config") if isinstance(model_config.get("text_config"), dict) else {}
    context = next(
        (c.get(k) for c in (model_config, text_config) for k in _CONTEXT_KEYS if isinstance(c.get(k), int)),
        None,
    )
    return TokenizerSpec(
        backend=backend,
        special_tokens=special,
        chat_template=_chat_template(folder, config),
        eos_token_ids=eos_ids,
        model_max_length=context,
        source=folder,
    )
