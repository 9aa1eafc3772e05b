"""Build a ``tokenizers.Tokenizer`` from the metadata of a GGUF file.

A GGUF carries no tokenizer.json: llama.cpp stores the vocabulary, merges, token types and
special ids under ``tokenizer.ggml.*``. We rebuild the tokenizer the way transformers does
for ``AutoTokenizer.from_pretrained(dir, gguf_file=...)`` so that both give identical ids
(the reference the model tests compare against):

- ``tokenizer.ggml.model == "gpt2"``: byte-level BPE. Tokens not spelled in the byte alphabet
  are respelled from their UTF-8 bytes; the pre-tokenizer is GPT-2's unless
  ``tokenizer.ggml.pre`` names a split regex we know (llama3, qwen2, ...).
- ``"llama"``: SentencePiece-style BPE with byte fallback and a "▁" metaspace; merges come from
  the file or are recovered from the vocabulary and its scores.

Then CONTROL tokens (type 3) and the named bos/eos/unk/pad tokens become special added tokens
(matched whole, never split, dropped by ``skip_special_tokens``), USER_DEFINED ones (type 4)
plain added tokens.

Known difference from llama.cpp (and from SmolLM2's own tokenizer.json): for
``pre == "smollm"`` transformers (and so we) use GPT-2's regex without splitting digits first,
so e.g. ``"  1"`` encodes as ``Ġ Ġ 1`` here but ``ĠĠ 1`` there.
"""

from __future__ import annotations

from tokenizers import AddedToken, Regex, decoders, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers.models import BPE

from .errors import TokenizerLoadError
from .gguf_metadata import read_gguf_metadata
from .tokenizer import TokenizerSpec, bytes_to_unicode, set_post_processor

# llama.cpp token types
_CONTROL, _USER_DEFINED = 3, 4

# tokenizer.ggml.pre -> the split regex the vocabulary's merges were learned with.
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(
        [
            "llama3",
            "llama-v3",
            "llama-bpe",
            "falcon3",
            "falcon-h1",
            "pixtral",
            "midm-2.0",
            "lfm2",
            "jina-v5-nano",
            "dbrx",
            "smaug-bpe",
        ],
        _LLAMA3,
    ),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"], _QWEN2),
    "qwen35": _QWEN35,
    "tekken": _TEKKEN,
    **dict.fromkeys(["gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"], _GPT4O),
}

_NAMED_SPECIAL = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}
# end-of-generation ids a GGUF may name besides eos (llama.cpp stops on all of them)
_EOS_KEYS = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")


def load_gguf_tokenizer(path: str) -> TokenizerSpec:
    """The tokenizer, special tokens and chat template a GGUF file describes."""
    meta = read_gguf_metadata(path)
    model = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise TokenizerLoadError(f"{path}: the GGUF file has no tokenizer (no tokenizer.ggml.tokens)")
    arch = meta.get("general.architecture", "")
    if model == "gpt2":
        backend = _byte_level_bpe(meta)
        add_bos_default = False
    elif model == "llama" and arch not in ("gemma", "gemma2", "gemma3", "phi3"):
        backend = _sentencepiece_bpe(meta)
        add_bos_default = True  # llama.cpp adds BOS to a SentencePiece vocabulary that does not say
    else:
        raise TokenizerLoadError(
            f"{path}: GGUF tokenizer model {model!r} (architecture {arch!r}) is not supported; "
            "supported: 'gpt2' (byte-level BPE) and 'llama' (SentencePiece BPE). "
            "Use the model's Hugging Face folder (tokenizer.json) instead."
        )

    special = {
        name: tokens[meta[key]]
        for name, key in _NAMED_SPECIAL.items()
        if isinstance(meta.get(key), int) and 0 <= meta[key] < len(tokens)
    }
    _add_gguf_special_tokens(backend, meta, special, byte_level=model == "gpt2")

    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    set_post_processor(backend, special.get("bos_token"), add_bos, special.get("eos_token"), add_eos)

    eos_ids: list[int] = []
    for key in _EOS_KEYS:
        token_id = meta.get(key)
        if isinstance(token_id, int) and token_id not in eos_ids:
            eos_ids.append(token_id)
    context = meta.get(f"{arch}.context_length")
    return TokenizerSpec(
        backend=backend,
        special_tokens=special,
        chat_template=meta.get("tokenizer.chat_template"),
        eos_token_ids=eos_ids,
        model_max_length=int(context) if isinstance(context, int) else None,
        source=path,
    )


def _merges(
    meta: dict, vocab: dict[str, int], scores: dict[str, float] | None = None
) -> list[tuple[str, str]]:
    """The file's merges ("a b" strings), or the ones its vocabulary and scores imply."""
    merges = meta.get("tokenizer.ggml.merges")
    if merges is not None:
        pairs = []
        for merge in merges:
            left, _, right = merge.partition(" ")
            if " " in right:  # a piece holds a literal space: cut where both halves are pieces
                for i in (i for i, c in enumerate(merge) if c == " "):
                    if merge[:i] in vocab and merge[i + 1 :] in vocab:
                        left, right = merge[:i], merge[i + 1 :]
                        break
            pairs.append((left, right))
        return pairs
    if scores is None:
        raise TokenizerLoadError("the GGUF file has neither tokenizer.ggml.merges nor tokenizer.ggml.scores")
    return merges_from_scores(vocab, scores)


def merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """SentencePiece keeps no merges: every split of a piece into two known pieces is a merge,
    ranked best score first (ties: longer left, then longer right piece), as transformers does."""
    ranked = []
    for piece, score in scores.items():
        local = [
            (piece[:i], piece[i:], score)
            for i in range(1, len(piece))
            if piece[:i] in vocab and piece[i:] in vocab
        ]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        ranked.extend(local)
    ranked.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in ranked]


def _byte_level_bpe(meta: dict) -> BackendTokenizer:
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {
        tok if set(tok) <= alphabet else "".join(spelling[b] for b in tok.encode("utf-8")): i
        for i, tok in enumerate(meta["tokenizer.ggml.tokens"])
    }
    bpe = BPE(
        vocab=vocab,
        merges=_merges(meta, vocab),
        dropout=None,
        continuing_subword_prefix="",
        end_of_word_suffix="",
        fuse_unk=False,
    )
    backend = BackendTokenizer(bpe)
    split = PRE_TOKENIZER_SPLITS.get(meta.get("tokenizer.ggml.pre"))
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(meta: dict) -> BackendTokenizer:
    tokens = meta["tokenizer.ggml.tokens"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    raw_scores = meta.get("tokenizer.ggml.scores")
    scores = dict(zip(tokens, raw_scores)) if raw_scores is not None else None
    bpe = BPE(
        vocab=vocab, merges=_merges(meta, vocab, scores), fuse_unk=True, byte_fallback=True, dropout=None
    )
    backend = BackendTokenizer(bpe)
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first", split=False
    )
    backend.decoder = decoders.Sequence(
        [
            decoders.Replace("\u2581", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    return backend


def _add_gguf_special_tokens(
    backend: BackendTokenizer, meta: dict, named: dict[str, str], byte_level: bool
) -> None:
    """Control tokens and the named specials -> special added tokens; user-defined -> added tokens.

    In a byte-level vocabulary every real token is spelled in the byte alphabet, so a "control"
    token using other characters is a llama.cpp mislabel and is skipped (as transformers does).
    """
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or []
    alphabet = set(bytes_to_unicode().values()) if byte_level else None
    control = [
        AddedToken(tok, normalized=False, special=True)
        for tok, kind in zip(tokens, types)
        if kind == _CONTROL and (alphabet is None or set(tok) <= alphabet)
    ]
    if control:
        backend.add_special_tokens(control)
    vocab = backend.get_vocab()
    user = [
        AddedToken(tok, normalized=False, special=False)
        for tok, kind in zip(tokens, types)
        if kind == _USER_DEFINED and tok in vocab
    ]
    if user:
        backend.add_tokens(user)
    added = {t.content for t in backend.get_added_tokens_decoder().values()}
    missing = [
        AddedToken(tok, normalized=False, special=True)
        for tok in dict.fromkeys(named.values())
        if tok not in added
    ]
    if missing:
        backend.add_special_tokens(missing)
