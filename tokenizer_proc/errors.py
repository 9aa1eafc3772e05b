"""Errors of the tokenizer library, shaped so tokenizer_proc can answer with an ErrorInfo.

``TokenizerLoadError`` is a startup failure (the process cannot serve). The others are a
request's fault and map to HTTP 400: ``param`` names the request field that was wrong.
"""

from __future__ import annotations


class TokenizerError(Exception):
    """Base class. ``param``: the OpenAI request field at fault, when there is one."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class TokenizerLoadError(TokenizerError):
    """The model's tokenizer files are missing, unreadable or of an unsupported kind."""


class ChatTemplateError(TokenizerError):
    """The chat template could not render these messages (its own raise_exception included)."""

    def __init__(self, message: str, param: str | None = "messages"):
        super().__init__(message, param)


class InvalidTokenIdError(TokenizerError):
    """A token id outside the vocabulary."""


class PromptTooLongError(TokenizerError):
    """The prompt (plus the tokens asked for) does not fit the model's context."""
