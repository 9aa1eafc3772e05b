"""Benchmark prompts, generated locally: random lengths, multi-turn chat, shared prefixes, or a
user's JSONL.

A `BenchRequest` is what one HTTP request will carry: a text prompt (completions) or a
message list (chat), the prompt length we believe it has, and the number of output tokens
to ask for. The prompt length is exact when the model's tokenizer is at hand and a
words-based estimate otherwise; the report uses the server's own `usage` counts whenever the
server sends them, so the estimate only steers generation, never the measured figures.
"""

from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass, field
from typing import Protocol

log = logging.getLogger("zeroserve.bench")

# Short, common English words: in every BPE vocabulary we know (Llama, GPT-2, SmolLM2, Qwen)
# " word" with its leading space is a single token, so N words are close to N tokens.
WORDS = (
    "the of and to in is was for on that with as by at from his her had are not this but "
    "they have were which one you all she there their has been when who will more if no out "
    "so said what up its about into than them can only other new some could time these two "
    "may then do first any like now my such make over our even most made after also did many "
    "before must through back years where much your way well down should because each just "
    "those people how too little state good very world still own see men work long here get "
    "both between life being under never day same another know while last might us great old "
    "year off come since against go came right used take three small house water city sea "
    "tree river stone light green blue paper music table window garden market story field "
    "horse winter summer morning evening bread apple train school doctor letter mountain"
).split()

Prompt = str | list[dict]


@dataclass
class BenchRequest:
    prompt: Prompt
    prompt_len: int
    output_len: int
    # The conversation a chat request belongs to, for datasets where that matters.
    conversation: int | None = None
    extra: dict = field(default_factory=dict)


class TokenCounter(Protocol):
    name: str

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class WordsCounter:
    """No tokenizer at hand: one word is taken as one token (see WORDS)."""

    name = "words"

    def encode(self, text: str) -> list[int]:
        return list(range(len(text.split())))  # only the count matters

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError("the words counter cannot decode")


class _Wrapped:
    """Any object with encode(text) / decode(ids); `tokenizers.Encoding` results unwrapped."""

    def __init__(self, tok, name: str):
        self._tok, self.name = tok, name

    def encode(self, text: str) -> list[int]:
        out = (
            self._tok.encode(text, add_special_tokens=False)
            if _takes_special(self._tok)
            else self._tok.encode(text)
        )
        return list(getattr(out, "ids", out))

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


def _takes_special(tok) -> bool:
    try:
        tok.encode("a", add_special_tokens=False)
        return True
    except TypeError:
        return False


def load_counter(spec: str | None, model_id: str | None = None) -> TokenCounter:
    """--tokenizer: a path (HF folder, tokenizer.json or GGUF), 'words', or None/'auto'.

    'auto' uses the served model's tokenizer when the model id names something local: a path
    (vLLM and zeroserve serve paths as ids) or zeroserve's default SmolLM2; else words.
    """
    if spec == "words":
        return WordsCounter()
    path = spec if spec not in (None, "", "auto") else _local_model_path(model_id)
    if path is None:
        return WordsCounter()
    counter = _load_tokenizer(path)
    if counter is None:
        log.warning("could not load a tokenizer from %s; prompt lengths are word counts (approximate)", path)
        return WordsCounter()
    return counter


def _local_model_path(model_id: str | None) -> str | None:
    if model_id and os.path.exists(os.path.expanduser(model_id)):
        return os.path.expanduser(model_id)
    try:
        from zeroserve.shared.model_files import DEFAULT_MODEL_NAME, default_model_path

        if model_id == DEFAULT_MODEL_NAME:
            return default_model_path()
    except Exception:  # the default model package is optional for a client
        pass
    return None


def _load_tokenizer(path: str) -> TokenCounter | None:
    """zeroserve's own loader first (handles GGUF), then the `tokenizers` library."""
    try:
        from zeroserve.tokenizer_proc.tokenizer import load_tokenizer

        return _Wrapped(load_tokenizer(path), f"zeroserve:{path}")
    except Exception as e:  # not written yet, or cannot read this path
        log.debug("zeroserve tokenizer loader failed on %s: %s", path, e)
    json_path = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if json_path.endswith(".json") and os.path.isfile(json_path):
        try:
            from tokenizers import Tokenizer

            return _Wrapped(Tokenizer.from_file(json_path), f"tokenizers:{json_path}")
        except Exception as e:
            log.debug("tokenizers failed on %s: %s", json_path, e)
    return None


def sample_lengths(mean: int, range_ratio: float, n: int, rng: random.Random) -> list[int]:
    """n lengths uniform in [mean*(1-r), mean*(1+r)], at least 1."""
    lo, hi = max(1, round(mean * (1 - range_ratio))), max(1, round(mean * (1 + range_ratio)))
    return [rng.randint(lo, hi) for _ in range(n)]


def text_of_length(
    n_tokens: int, counter: TokenCounter, rng: random.Random, prefix: str = ""
) -> tuple[str, int]:
    """`prefix` then random words, n_tokens in all: exactly for words; for a real tokenizer
    within a token or two when merges shift after decode/re-encode, usually exact.
    Returns the text and its counted length."""
    words = [prefix] if prefix else []
    text = " ".join(words + [rng.choice(WORDS) for _ in range(max(0, n_tokens - len(words)))])
    if isinstance(counter, WordsCounter):
        return text, len(text.split())
    ids = counter.encode(text)
    while len(ids) < n_tokens:  # a word of two tokens somewhere is fine; too few words is not
        text += " " + rng.choice(WORDS)
        ids = counter.encode(text)
    for _ in range(4):
        if len(ids) == n_tokens:
            break
        text = counter.decode(ids[:n_tokens]).strip()
        ids = counter.encode(text)
    return text, len(ids)


def random_dataset(
    num: int, input_len: int, output_len: int, counter: TokenCounter, seed: int = 0, range_ratio: float = 0.0
) -> list[BenchRequest]:
    """Independent prompts of random words; a distinct number leads each prompt so that no two
    share a first block (no accidental prefix-cache hits)."""
    rng = random.Random(seed)
    in_lens = sample_lengths(input_len, range_ratio, num, rng)
    out_lens = sample_lengths(output_len, range_ratio, num, rng)
    requests = []
    for n_in, n_out in zip(in_lens, out_lens):
        text, n = text_of_length(n_in, counter, rng, prefix=str(rng.randrange(10**6)))
        requests.append(BenchRequest(text, n, n_out))
    return requests


def chat_dataset(
    num: int,
    input_len: int,
    output_len: int,
    counter: TokenCounter,
    seed: int = 0,
    num_system_prompts: int = 4,
    system_prompt_len: int = 256,
    turns: int = 3,
) -> list[BenchRequest]:
    """Multi-turn conversations that share system prompts, to exercise prefix caching.

    Conversation c uses system prompt c % num_system_prompts; its turn t sends the system
    prompt, the t earlier user/assistant exchanges (assistant text synthetic, so the dataset
    does not depend on the server's answers) and a new user message of ~input_len tokens.
    Requests come out conversation after conversation, turns in order, so a later turn finds
    the earlier turn's prefix in the cache when the server keeps it.
    """
    rng = random.Random(seed)
    systems = [
        f"You are assistant number {k}. " + text_of_length(system_prompt_len, counter, rng)[0]
        for k in range(num_system_prompts)
    ]
    requests: list[BenchRequest] = []
    conv = 0
    while len(requests) < num:
        messages = [{"role": "system", "content": systems[conv % num_system_prompts]}]
        for _ in range(turns):
            if len(requests) == num:
                break
            user, _ = text_of_length(input_len, counter, rng)
            messages = messages + [{"role": "user", "content": user}]
            prompt_len = sum(len(counter.encode(m["content"])) for m in messages)
            requests.append(BenchRequest(list(messages), prompt_len, output_len, conversation=conv))
            reply, _ = text_of_length(output_len, counter, rng)
            messages = messages + [{"role": "assistant", "content": reply}]
        conv += 1
    return requests


def shared_prefix_dataset(
    num: int,
    input_len: int,
    output_len: int,
    counter: TokenCounter,
    seed: int = 0,
    num_groups: int = 4,
    prefix_len: int = 512,
) -> list[BenchRequest]:
    """``num_groups`` system prompts of ``prefix_len`` tokens, each shared by many questions of
    ``input_len`` tokens (vLLM's ``prefix_repetition``): the workload where routing by prefix
    affinity pays, since a replica that served a group holds its prefix in its KV cache.

    Request i belongs to a group drawn at random (seeded), so concurrent requests mix groups
    and a router cannot do well just by arrival order. Completions prompts are the prefix then
    the question; each word after the first is one " word" token, so the prefix tokenizes the
    same in every request of its group.
    """
    rng = random.Random(seed)
    prefixes = [
        text_of_length(prefix_len, counter, rng, prefix=f"System {seed}-{g}:")[0] for g in range(num_groups)
    ]
    requests = []
    for _ in range(num):
        group = rng.randrange(num_groups)
        question, n = text_of_length(input_len, counter, rng)
        prompt = f"{prefixes[group]} {question}"
        requests.append(BenchRequest(prompt, len(counter.encode(prompt)), output_len, conversation=group))
    return requests


def jsonl_dataset(path: str, num: int, output_len: int, counter: TokenCounter) -> list[BenchRequest]:
    """One request per line: {"prompt": str} or {"messages": [...]}, optionally with
    "max_tokens"/"output_len"; an OpenAI batch line ({"body": {...}}) or a bare JSON string
    also works. The file is cycled when it holds fewer than num lines."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not JSON ({e}); expected one object per line") from None
            rows.append(_row_to_request(obj, output_len, counter, f"{path}:{lineno}"))
    if not rows:
        raise ValueError(
            f"{path}: no prompts found; write one JSON object per line with a 'prompt' or 'messages'"
        )
    return [rows[i % len(rows)] for i in range(num)]


def _row_to_request(obj, output_len: int, counter: TokenCounter, where: str) -> BenchRequest:
    if isinstance(obj, str):
        obj = {"prompt": obj}
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected an object with 'prompt' or 'messages'")
    body = obj.get("body", obj)
    n_out = int(
        obj.get("output_len") or body.get("max_tokens") or body.get("max_completion_tokens") or output_len
    )
    if isinstance(body.get("messages"), list):
        msgs = body["messages"]
        n_in = sum(len(counter.encode(_content_text(m.get("content")))) for m in msgs)
        return BenchRequest(msgs, n_in, n_out)
    if isinstance(body.get("prompt"), str):
        return BenchRequest(body["prompt"], len(counter.encode(body["prompt"])), n_out)
    raise ValueError(f"{where}: expected a string 'prompt' or a list 'messages'")


def _content_text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def messages_to_text(messages: list[dict]) -> str:
    """A chat prompt for the completions endpoint: one 'Role: text' line per message."""
    lines = [f"{m.get('role', 'user').capitalize()}: {_content_text(m.get('content'))}" for m in messages]
    return "\n".join(lines) + "\nAssistant:"


def build_dataset(
    name: str, num: int, input_len: int, output_len: int, counter: TokenCounter, seed: int = 0, **kw
) -> list[BenchRequest]:
    """--dataset random | chat | shared-prefix | jsonl:PATH."""
    if name == "random":
        return random_dataset(num, input_len, output_len, counter, seed, kw.get("range_ratio", 0.0))
    if name == "chat":
        keys = ("num_system_prompts", "system_prompt_len", "turns")
        return chat_dataset(num, input_len, output_len, counter, seed, **{k: kw[k] for k in keys if k in kw})
    if name == "shared-prefix":
        keys = ("num_groups", "prefix_len")
        return shared_prefix_dataset(
            num, input_len, output_len, counter, seed, **{k: kw[k] for k in keys if k in kw}
        )
    if name.startswith("jsonl:"):
        return jsonl_dataset(name[len("jsonl:") :], num, output_len, counter)
    raise ValueError(f"unknown dataset {name!r}: use random, chat, shared-prefix or jsonl:PATH")
