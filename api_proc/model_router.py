"""Which (model, version) serves a request: the first level of routing (docs/models.md).

A ``RouteTable`` is built once per registry snapshot (api_proc/versions.py) and answers each
request in a few microseconds (benchmarks/bench_version_router.py):

    model omitted      -> the default model, then as "NAME"
    "NAME"             -> among its versions that are ready with weight > 0, by weight: at random,
                          or, with a session (the body's `user` or X-Session-Id), at the point its
                          hash maps to in [0, total weight) through the cumulative weights in
                          version order, so one session keeps its version while the weights hold
    "NAME@VERSION"     -> that version (404 when unknown, 503 when it is not ready)
    a virtual name     -> the first of its rules that matches (prompt length, max_tokens, tier
                          header), then its fallback chain: a choice that is not ready or failing
                          (window error rate over the virtual model's max_error_rate) is skipped
                          here, one that answers 429 (or 503) is left for the next at run time
    anything else      -> 404 model_not_found, listing what is served

``route(request, model, ...)`` is what handlers call: the Targets to try in order (one, but for
a virtual model), each with the EngineClient, EngineMonitor and name of its engine group.
"""

from __future__ import annotations

import bisect
import random
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
from aiohttp import web

from zeroserve.api_proc.errors import ApiError
from zeroserve.shared.control import READY, ModelEntry, RegistrySnapshot, VirtualModel

CHARS_PER_TOKEN = 4  # a virtual model's length rules estimate prompt tokens from characters
VERSIONS = web.AppKey("zeroserve_versions", object)  # app[VERSIONS]: api_proc.versions.Versions


@dataclass(frozen=True, slots=True)
class Choice:
    model: str  # the real model's NAME
    version: str


class _Model:
    """One model's routable versions: ready, weight > 0, in the snapshot's version order."""

    __slots__ = ("entry", "versions", "cumulative", "total", "states")

    def __init__(self, entry: ModelEntry):
        self.entry = entry
        self.states = {v.version: v for v in entry.versions}
        self.versions: list[str] = []
        self.cumulative: list[int] = []
        total = 0
        for v in entry.versions:
            if v.state == READY and v.weight > 0:
                total += v.weight
                self.versions.append(v.version)
                self.cumulative.append(total)
        self.total = total

    def pick(self, session: str | None, rand: float | None) -> str | None:
        if not self.total:
            return None
        if session is not None:
            # a hash every api process computes the same (crc32, not Python's salted hash())
            point = (zlib.crc32(session.encode("utf-8", "surrogatepass")) * self.total) >> 32
        else:
            point = int((random.random() if rand is None else rand) * self.total)
        return self.versions[bisect.bisect_right(self.cumulative, point)]


class RouteTable:
    """The routing view of one RegistrySnapshot (immutable; a new snapshot makes a new table)."""

    def __init__(self, snapshot: RegistrySnapshot):
        self.snapshot = snapshot
        self.models = {m.name: _Model(m) for m in snapshot.models}
        self.virtual: dict[str, VirtualModel] = {v.name: v for v in snapshot.virtual}
        self.default = snapshot.default_model or (snapshot.models[0].name if snapshot.models else None)

    # ------------------------------------------------------------------ names

    def served(self) -> list[str]:
        """Every name a request may use: NAME, NAME@VERSION (versions not unloaded), virtual names."""
        out = []
        for name, m in self.models.items():
            out.append(name)
            out.extend(f"{name}@{v.version}" for v in m.entry.versions if v.state in (READY, "loading"))
        out.extend(self.virtual)
        return out

    def not_found(self, model: str) -> ApiError:
        served = ", ".join(f"`{n}`" for n in self.served()[:50]) or "nothing yet"
        return ApiError(
            404,
            f"The model `{model[:100]}` does not exist. This server serves {served} (see GET /v1/models).",
            param="model",
            code="model_not_found",
        )

    # ------------------------------------------------------------------ choice

    def choose(self, model: str | None, session: str | None = None, rand: float | None = None) -> Choice:
        """One real (model, version) for ``model`` (not a virtual name); ApiError 404 / 503."""
        name = self.default if model is None else model
        if name is None:
            raise ApiError(503, "No model is loaded yet. Retry shortly.", headers={"Retry-After": "1"})
        m = self.models.get(name)
        if m is not None:
            version = m.pick(session, rand)
            if version is None:
                raise ApiError(
                    503,
                    f"No version of `{name}` is ready with traffic; retry shortly.",
                    code="model_not_ready",
                    headers={"Retry-After": "1"},
                )
            return Choice(name, version)
        base, at, version = name.partition("@")
        m = self.models.get(base) if at else None
        if m is None or version not in m.states:
            raise self.not_found(name)
        state = m.states[version].state
        if state != READY:
            raise ApiError(
                503,
                f"Version `{version[:64]}` of `{base}` is {state}, not ready.",
                param="model",
                code="model_not_ready",
                headers={"Retry-After": "1"},
            )
        return Choice(base, version)

    def candidates(
        self,
        model: str | None,
        session: str | None = None,
        *,
        prompt_tokens: int = 0,
        max_tokens: int | None = None,
        tier_of: Callable[[str], str | None] | None = None,
        rand: float | None = None,
    ) -> list[Choice]:
        """The choices to try in order: one for a real name; a virtual model's pick, then its
        fallback chain (each version once; those not ready left out, failing ones last)."""
        virtual = self.virtual.get(model) if model is not None else None
        if virtual is None:
            return [self.choose(model, session, rand)]
        tier = tier_of(virtual.tier_header) if tier_of is not None else None
        names: list[str] = []
        for rule in virtual.rules:
            if _matches(rule, prompt_tokens, max_tokens, tier):
                names.append(rule.model)
                break
        names.extend(n for n in virtual.fallback if n not in names)
        good: list[Choice] = []
        weak: list[Choice] = []  # failing: tried only after the healthy ones
        first_error: ApiError | None = None
        seen = set()
        for n in names:
            try:
                c = self.choose(n, session, rand)
            except ApiError as e:
                first_error = first_error or e
                continue
            if c in seen:
                continue
            seen.add(c)
            stats = self.models[c.model].states[c.version].stats
            (weak if stats.requests and stats.error_rate > virtual.max_error_rate else good).append(c)
        if not good and not weak:
            raise first_error or ApiError(
                503,
                f"`{model}` has no rule for this request and no fallback model is ready.",
                code="model_not_ready",
                headers={"Retry-After": "1"},
            )
        return good + weak


def _matches(rule: Any, prompt_tokens: int, max_tokens: int | None, tier: str | None) -> bool:
    if rule.max_prompt_tokens is not None and prompt_tokens > rule.max_prompt_tokens:
        return False
    if rule.min_prompt_tokens is not None and prompt_tokens < rule.min_prompt_tokens:
        return False
    if rule.max_tokens_at_most is not None and (max_tokens is None or max_tokens > rule.max_tokens_at_most):
        return False
    if rule.max_tokens_over is not None and (max_tokens is None or max_tokens <= rule.max_tokens_over):
        return False
    return rule.tier is None or rule.tier == tier


def estimate_prompt_tokens(prompt: Any = None, messages: Any = None) -> int:
    """Prompt tokens as a virtual model's rules see them: token ids counted, text by characters."""
    if messages is not None:
        chars = 0
        for m in messages:
            content = getattr(m, "content", None)
            if isinstance(content, str):
                chars += len(content)
            elif isinstance(content, list):
                chars += sum(len(p.text or "") for p in content if getattr(p, "text", None))
        return -(-chars // CHARS_PER_TOKEN)
    if isinstance(prompt, str):
        return -(-len(prompt) // CHARS_PER_TOKEN)
    if isinstance(prompt, list) and prompt:
        if isinstance(prompt[0], int):
            return len(prompt)
        if isinstance(prompt[0], str):
            return max(-(-len(p) // CHARS_PER_TOKEN) for p in prompt)
        return max(len(p) for p in prompt)
    return 0


async def route(
    request: web.Request,
    model: str | None,
    *,
    user: str | None = None,
    prompt: Any = None,
    messages: Any = None,
    max_tokens: int | None = None,
) -> list[Any]:
    """The Targets (api_proc.versions.Target) to try in order for this request's ``model``.

    For the TGI, embeddings and any other endpoint that takes a model: call it with the body's
    model (and `user`), use ``targets[0].client`` / ``.monitor`` / ``.name``, and run the request
    under ``versions.run_targets`` to get fallbacks, in-flight counts and X-Model-Version."""
    versions = request.app[VERSIONS]
    session = request.headers.get("X-Session-Id") or user
    return await versions.fresh_targets(
        model,
        session,
        prompt_tokens=estimate_prompt_tokens(prompt, messages),
        max_tokens=max_tokens,
        tier_of=request.headers.get,
    )


def unrouted(body: Any) -> Any:
    """``body`` for the request planners once the router has resolved its model: they check
    `model` against the one configured name (the single-model path, batch jobs), not the registry."""
    return msgspec.structs.replace(body, model=None) if body.model is not None else body


async def route_one(request: web.Request, model: str | None, ctx: Any = None) -> Any:
    """The one Target of a request that runs no generation (/tokenize, /detokenize, ...); its
    model and version go into the request's context (the access log, X-Model-Version)."""
    target = (await route(request, model))[0]
    if ctx is not None:
        ctx.model, ctx.version = target.name, target.version
    return target
