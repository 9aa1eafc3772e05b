"""The model's tokenizer: one ``Tokenizer`` over a ``tokenizers.Tokenizer``, from a GGUF file
or a Hugging Face folder.

    tok = load_tokenizer(path)                        # .gguf file or folder with tokenizer.json
    ids = tok.encode("Hello")                         # BOS added when the model wants it
    prompt = tok.apply_chat_template(messages)        # the model's jinja template, sandboxed
    ids = tok.encode(prompt, add_special_tokens=False)    # the template wrote BOS itself
    text = tok.decode(ids)                            # special tokens skipped by default

The loaders (``gguf_tokenizer.py``, ``hf_tokenizer.py``) hand over a ``TokenizerSpec``; this
class only answers questions about it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import processors

from .chat_template import ChatTemplate
from .errors import ChatTemplateError, TokenizerLoadError


@dataclass
class TokenizerSpec:
    """What a loader found. special_tokens: the template variables and their strings
    ({"bos_token": "<s>", "eos_token": "</s>", ...}); eos_token_ids: every id that ends a
    generation (tokenizer eos first, then generation_config / GGUF eot)."""

    backend: BackendTokenizer
    special_tokens: dict[str, str]
    chat_template: str | None
    eos_token_ids: list[int]
    model_max_length: int | None = None
    source: str = ""


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used to spell byte-level BPE tokens.

    Printable Latin-1 bytes stand for themselves; the other 68 (controls, space, ...) are
    shifted to U+0100.. so that no token holds whitespace or control characters.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def set_post_processor(
    backend: BackendTokenizer, bos: str | None, add_bos: bool, eos: str | None, add_eos: bool
) -> None:
    """Make ``encode(add_special_tokens=True)`` add BOS / EOS as the model's config says."""
    add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
    single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
    pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
    special = [(tok, backend.token_to_id(tok)) for tok, on in ((bos, add_bos), (eos, add_eos)) if on]
    if any(token_id is None for _, token_id in special):
        raise TokenizerLoadError(
            f"special token {[t for t, i in special if i is None]} is not in the vocabulary"
        )
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


class Tokenizer:
    """Encode, decode and render chat prompts for one model. Not changed after construction
    (the per-token text/bytes caches aside)."""

    def __init__(self, spec: TokenizerSpec):
        self.backend = spec.backend
        self.source = spec.source
        self.special_tokens = dict(spec.special_tokens)
        self.model_max_length = spec.model_max_length
        self.vocab_size: int = self.backend.get_vocab_size(with_added_tokens=True)

        added = self.backend.get_added_tokens_decoder()
        self.special_token_ids: frozenset[int] = frozenset(i for i, t in added.items() if t.special)
        self.bos_token: str | None = self.special_tokens.get("bos_token")
        self.eos_token: str | None = self.special_tokens.get("eos_token")
        self.bos_token_id = self._id_of(self.bos_token)
        self.eos_token_id = self._id_of(self.eos_token)
        self.pad_token_id = self._id_of(self.special_tokens.get("pad_token"))
        eos_ids = ([self.eos_token_id] if self.eos_token_id is not None else []) + list(spec.eos_token_ids)
        self.eos_token_ids: list[int] = list(dict.fromkeys(eos_ids))
        # Whether encode(add_special_tokens=True) puts BOS first: ask the post-processor itself.
        probe = self.backend.encode("", add_special_tokens=True).ids
        self.add_bos: bool = bool(probe) and probe[0] == self.bos_token_id

        self.chat_template: str | None = spec.chat_template
        self._template = ChatTemplate(spec.chat_template) if spec.chat_template else None
        # --tool-call-parser: the format tools are written in for a template that ignores them
        self.tool_format = "hermes"
        self._byte_decoder = _byte_decoder(self.backend)
        # byte-level BPE: every token spells raw bytes, so token_bytes is exact
        self.is_byte_level: bool = self._byte_decoder is not None
        self._token_text: dict[int, str] = {}
        self._token_bytes: dict[int, bytes] = {}

    def __repr__(self) -> str:
        return (
            f"Tokenizer({self.source!r}, vocab_size={self.vocab_size}, bos={self.bos_token_id}, "
            f"eos={self.eos_token_ids}, add_bos={self.add_bos})"
        )

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    # ------------------------------------------------------------------ encode / decode

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of text. add_special_tokens adds BOS/EOS as the model's config says; special
        tokens written in the text (e.g. "<|im_start|>") are matched whole either way.

        Through encode_batch: it lets go of the GIL while it works (encode holds it, for
        seconds on a multi-megabyte prompt), so tokenizer_proc's event loop keeps running
        while its worker thread tokenizes."""
        return self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ids. Ids outside the vocabulary are dropped: validate with check_token_ids."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry as stored (byte-level spelling, e.g. "Ġhello")."""
        return self.backend.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def token_text(self, token_id: int) -> str:
        """The token decoded on its own, special tokens included (OpenAI logprobs "token").

        A token holding part of a UTF-8 character decodes to "\\ufffd"; token_bytes has its
        real bytes.
        """
        text = self._token_text.get(token_id)
        if text is None:
            text = self.backend.decode([token_id], skip_special_tokens=False)
            self._token_text[token_id] = text
        return text

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes a token stands for (OpenAI logprobs "bytes"): exact for byte-level and
        byte-fallback ("<0xE2>") tokens, the UTF-8 of token_text otherwise."""
        raw = self._token_bytes.get(token_id)
        if raw is None:
            raw = self._raw_bytes(token_id)
            self._token_bytes[token_id] = raw
        return raw

    def _raw_bytes(self, token_id: int) -> bytes:
        piece = self.backend.id_to_token(token_id)
        if piece is not None and token_id not in self.special_token_ids:
            if self._byte_decoder is not None and all(c in self._byte_decoder for c in piece):
                return bytes(self._byte_decoder[c] for c in piece)
            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                try:
                    return bytes([int(piece[3:5], 16)])
                except ValueError:
                    pass
        return self.token_text(token_id).encode("utf-8")

    # ------------------------------------------------------------------ chat

    def apply_chat_template(self, messages: Sequence, add_generation_prompt: bool = True, **kwargs) -> str:
        """Render messages (dicts or shared.messages.ChatMessage) with the model's chat template.

        kwargs become template variables (tools=..., enable_thinking=...). Raises
        ChatTemplateError when the model has no template or the template fails.
        """
        if self._template is None:
            raise ChatTemplateError(
                f"the model {os.path.basename(self.source) or self.source!r} has no chat template; "
                "send a plain prompt to /v1/completions instead"
            )
        return self._template.render(
            messages,
            add_generation_prompt=add_generation_prompt,
            variables={**self.special_tokens, **kwargs},
            tool_format=self.tool_format,
        )

    def encode_chat(self, messages: Sequence, add_generation_prompt: bool = True, **kwargs) -> list[int]:
        """Token ids of the rendered chat. No BOS is added: the template writes it when wanted."""
        return self.encode(
            self.apply_chat_template(messages, add_generation_prompt, **kwargs), add_special_tokens=False
        )


def _byte_decoder(backend: BackendTokenizer) -> dict[str, int] | None:
    """char -> byte for byte-level BPE vocabularies (decoder ByteLevel), else None."""
    decoder = backend.decoder
    if decoder is not None and '"ByteLevel"' in decoder.__getstate__().decode("utf-8", "replace"):
        return {c: b for b, c in bytes_to_unicode().items()}
    return None


def load_tokenizer(model_path: str) -> Tokenizer:
    """The tokenizer of a model: a .gguf file, or a Hugging Face folder with tokenizer.json."""
    path = os.path.expanduser(model_path)
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise TokenizerLoadError(f"{model_path}: not a .gguf file nor a Hugging Face model folder")
        from .gguf_tokenizer import load_gguf_tokenizer

        return Tokenizer(load_gguf_tokenizer(path))
    if os.path.isdir(path):
        from .hf_tokenizer import load_hf_tokenizer

        return Tokenizer(load_hf_tokenizer(path))
    raise TokenizerLoadError(f"tokenizer not found: {model_path} is neither a .gguf file nor a folder")
