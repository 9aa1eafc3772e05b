"""The model registry's control channel: the launcher (``zeroserve serve``) and its api processes.

The launcher owns the registry (launcher/model_registry.py): every served (model, version), its
state, its traffic weight and its engine group's addresses; it writes it to --state-dir and
runs the canary controller. It binds a ROUTER at ``EngineConfig.control_address``; each api
process connects a DEALER and

- asks for the registry with ``RegistryWatch`` (its last epoch) about every 200 ms, and gets a
  ``RegistrySnapshot`` whenever the epoch moved (else an empty ``RegistryUnchanged``);
- reports what it served per version with ``VersionReport`` every second (the canary's and
  GET /admin/models' window stats, and in-flight counts for draining);
- forwards every admin call it accepted (auth done) as ``AdminCommand`` and returns the
  ``AdminReply``'s status and body as the HTTP answer.

Without a launcher (supervisord/systemd units) there is no control channel: the api serves
the one model it was configured with, as version "v1", and the registry admin calls are 404.
Messages are msgspec structs, as everywhere (no pickle); JSON-shaped payloads are JSON text.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

# version states
LOADING, READY, DRAINING, UNLOADED, FAILED = "loading", "ready", "draining", "unloaded", "failed"


class FaultSpec(msgspec.Struct, frozen=True, array_like=True):
    """Fault injection for one version (only with --allow-fault-injection): this share of its
    requests fail with a 500 before they reach the engine; every request is delayed latency_ms."""

    error_rate: float = 0.0
    latency_ms: float = 0.0


class WindowStats(msgspec.Struct, frozen=True, array_like=True):
    """A version's outcomes over the last window (the launcher's sum of every api process'
    reports): requests that ended, those that ended in a server error (5xx), TTFT quantiles."""

    window_s: float = 0.0
    requests: int = 0
    errors: int = 0
    ttft_p50_s: float | None = None
    ttft_p95_s: float | None = None

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


class VersionEntry(msgspec.Struct, frozen=True, array_like=True):
    version: str
    state: str  # loading | ready | draining | unloaded | failed
    weight: int  # its share of the model's traffic (integers, any scale)
    path: str  # GGUF file or HF folder
    tokenizer_addresses: list[str] = []  # its engine group's frontends (empty until loading starts)
    reason: str | None = None  # why it failed / was rolled back
    fault: FaultSpec | None = None
    options: str = "{}"  # its engine options, JSON text (as loaded)
    stats: WindowStats = WindowStats()
    max_model_len: int = 0


class CanaryStatus(msgspec.Struct, frozen=True, array_like=True):
    version: str
    steps: list[int]
    step: int  # index into steps of the weight in force
    interval_s: float
    state: str  # running | promoted | rolled_back | cancelled
    reason: str | None = None


class ModelEntry(msgspec.Struct, frozen=True, array_like=True):
    name: str
    stable: str | None  # the version rollback gives all traffic to
    versions: list[VersionEntry]
    canary: CanaryStatus | None = None
    promotions: int = 0
    rollbacks: int = 0


class VirtualRule(msgspec.Struct, frozen=True, array_like=True):
    """One rule of a virtual model; the first rule whose conditions all hold picks ``model``
    (a NAME or NAME@VERSION). Conditions left None always hold."""

    model: str
    max_prompt_tokens: int | None = None  # prompt length (estimated from its characters in the api)
    min_prompt_tokens: int | None = None
    max_tokens_at_most: int | None = None  # the request's max_tokens
    max_tokens_over: int | None = None
    tier: str | None = None  # the value of the tier header (VirtualModel.tier_header)


class VirtualModel(msgspec.Struct, frozen=True, array_like=True):
    """A name like "auto" that picks a real model per request: the first matching rule, then
    ``fallback`` in order when the choice is overloaded (429), not ready, or failing (its
    window error rate over max_error_rate)."""

    name: str
    rules: list[VirtualRule]
    fallback: list[str] = []
    tier_header: str = "X-Tier"
    max_error_rate: float = 0.5


class RegistrySnapshot(msgspec.Struct, frozen=True, array_like=True, tag="registry"):
    epoch: int
    models: list[ModelEntry]
    virtual: list[VirtualModel] = []
    default_model: str | None = None  # what a request without `model` gets


class RegistryUnchanged(msgspec.Struct, frozen=True, array_like=True, tag="unchanged"):
    epoch: int


class RegistryWatch(msgspec.Struct, frozen=True, array_like=True, tag="watch"):
    epoch: int  # the snapshot the api holds (-1: none)


class VersionCounts(msgspec.Struct, frozen=True, array_like=True):
    """What one api process saw of one version since its last report."""

    model: str
    version: str
    requests: int = 0  # ended since the last report
    errors: int = 0  # of them, 5xx (fault injection included)
    ttfts_s: list[float] = []  # their TTFTs (at most a few hundred per report)
    in_flight: int = 0  # running now


class VersionReport(msgspec.Struct, frozen=True, array_like=True, tag="report"):
    api_index: int
    epoch: int  # the snapshot the api routes by
    counts: list[VersionCounts]


class AdminCommand(msgspec.Struct, frozen=True, array_like=True, tag="admin"):
    """op: list | load | unload | traffic | canary | rollback; body: the HTTP body (JSON text)."""

    request_id: str
    op: str
    model: str | None = None
    version: str | None = None
    body: str = ""


class AdminReply(msgspec.Struct, frozen=True, array_like=True, tag="admin_reply"):
    request_id: str
    status: int  # the HTTP status to answer with
    body: str  # JSON text: the result, or an OpenAI-style error body


ToLauncher = Annotated[RegistryWatch | VersionReport | AdminCommand, "api -> launcher"]
ToApi = Annotated[RegistrySnapshot | RegistryUnchanged | AdminReply, "launcher -> api"]
