"""A StructuredOutput as an xgrammar Grammar: one definition for the tokenizer (which checks
it at admission) and the worker (which compiles it against the vocabulary).

xgrammar is imported on first use, so a process that never sees a constrained request never
loads it. JSON is generated without free whitespace (separators ", " and ": "): a small model
left free to add whitespace may emit it until max_tokens, which is never valid JSON.
"""

from __future__ import annotations

import hashlib
import json
import re

from zeroserve.shared.messages import StructuredOutput

__all__ = ["KINDS", "GrammarSpecError", "build_grammar", "grammar_key", "param_of"]

KINDS = ("json", "json_object", "regex", "choice", "grammar", "structural_tag")

# "[21:54:03] /project/cpp/regex_converter.cc:94: " and "Check failed: (error.empty()) is false: "
_CPP_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: .*? is false: )?")


class GrammarSpecError(ValueError):
    """The spec is malformed or uses something xgrammar does not support; the message says what."""


def param_of(kind: str) -> str:
    """The request field a 400 about this kind names (the engine sees only the kind)."""
    return "response_format" if kind in ("json", "json_object") else f"structured_outputs.{kind}"


def grammar_key(so: StructuredOutput) -> bytes:
    """The cache key of a constraint: a hash of (kind, spec)."""
    return hashlib.blake2b(f"{so.kind}\0{so.spec}".encode(), digest_size=16).digest()


def _choice_ebnf(spec: str) -> str:
    try:
        choices = json.loads(spec)
    except ValueError:
        raise GrammarSpecError("choice must be a JSON array of strings") from None
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
        raise GrammarSpecError("choice must be a non-empty list of strings")
    # a JSON string literal is an EBNF string literal (xgrammar reads \", \\, \n and \uXXXX)
    return "root ::= " + " | ".join(json.dumps(c) for c in choices)


def build_grammar(so: StructuredOutput):
    """The xgrammar.Grammar of ``so``. Raises GrammarSpecError with a message for the client."""
    try:
        import xgrammar as xgr
    except ImportError:
        raise GrammarSpecError(
            "structured output needs the xgrammar package, which is not installed"
        ) from None

    kind, spec = so.kind, so.spec
    try:
        if kind == "json":
            return xgr.Grammar.from_json_schema(spec, any_whitespace=False)
        if kind == "json_object":
            return xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
        if kind == "regex":
            return xgr.Grammar.from_regex(spec)
        if kind == "choice":
            return xgr.Grammar.from_ebnf(_choice_ebnf(spec))
        if kind == "grammar":
            return xgr.Grammar.from_ebnf(spec)
        if kind == "structural_tag":
            return xgr.Grammar.from_structural_tag(spec)
    except GrammarSpecError:
        raise
    except Exception as e:  # xgrammar raises RuntimeError (and its own errors) with the reason
        raise GrammarSpecError(_reason(e)) from None
    raise GrammarSpecError(f"unknown structured output kind {kind!r}; use one of {', '.join(KINDS)}")


def _reason(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    text = _CPP_PREFIX.sub("", text)
    # the JSON parser quotes the whole input after "The JSON string is:": keep the reason only
    return text.split(". The JSON string is:")[0][:500]
