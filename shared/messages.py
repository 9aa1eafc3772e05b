"""Every message that crosses a process boundary, and nothing else.

Tagged msgspec Structs; one union per inbox (see the bottom of this file). Every message
is ``array_like`` (msgpack arrays with the tag first: compact, and msgspec requires the
members of one union to agree on it).
Token ids are ``list[int]``. Decoding with a typed decoder means a malformed frame is a
``msgspec.DecodeError``, never executed code.

Path of a request (see docs/architecture.md):

    api_proc       --GenerateRequest-->  tokenizer_proc
    tokenizer_proc --EngineRequest---->  scheduler_proc
    scheduler_proc --StepPlan--------->  gpu_worker (every rank)
    gpu_worker r0  --StepResult------->  scheduler_proc
    scheduler_proc --TokenDeltas------>  tokenizer_proc
    tokenizer_proc --TextDelta-------->  api_proc / client (owner)
    owner          --Abort------------>  tokenizer_proc / scheduler_proc (only the sender of the
                                         request may abort it)
"""

from __future__ import annotations

from typing import Annotated

import msgspec

# --------------------------------------------------------------------------- sampling


class SamplingParams(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True):
    """What the worker needs to pick the next token, and the scheduler to stop.

    temperature == 0 means greedy. top_k <= 0 disables top-k. max_tokens <= 0 in a
    GenerateRequest means "as many as fit in the context" (tokenizer_proc resolves it). logprobs: None = none,
    0 = the sampled token's logprob only, N = also the top-N alternatives.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    min_tokens: int = 0
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    logprobs: int | None = None
    # OpenAI's logit_bias: token id -> bias added to its logit before sampling (-100..100)
    logit_bias: dict[int, float] | None = None
    # constrained decoding (xgrammar): None = free text
    structured: StructuredOutput | None = None


class StructuredOutput(msgspec.Struct, frozen=True, array_like=True):
    """What the output must match. kind: "json" (spec: a JSON schema, as JSON text),
    "json_object" (any JSON object; spec ""), "regex", "choice" (spec: a JSON array of the
    allowed strings), "grammar" (EBNF), "structural_tag" (spec: xgrammar's structural tag JSON)."""

    kind: str
    spec: str = ""


class PoolingParams(msgspec.Struct, frozen=True, array_like=True):
    """An embedding request: the prompt is prefilled only and its hidden states pooled.
    pooling: "model" (the model's own: its sentence-transformers config, else --pooling),
    "mean", "cls", "last". normalize None: the model's default. dimensions: keep the first N
    (Matryoshka), None = all."""

    pooling: str = "model"
    normalize: bool | None = None
    dimensions: int | None = None


class PooledOutput(msgspec.Struct, frozen=True, array_like=True):
    """One embedding request's pooled vector: float32 little-endian bytes."""

    request_id: str
    data: bytes


class ErrorInfo(msgspec.Struct, frozen=True, array_like=True):
    """A request-level failure, shaped so api_proc can turn it into an OpenAI error body.

    status: the HTTP status it maps to (400 bad request, 429 overloaded, 500 engine error,
    503 unavailable). type: OpenAI's error type, e.g. "invalid_request_error".
    """

    status: int
    type: str
    message: str
    param: str | None = None
    code: str | None = None


class RequestTimings(msgspec.Struct, frozen=True, array_like=True):
    """Where one request's time went inside the engine, in seconds, measured by the scheduler
    (one monotonic clock sees both ends of every span), as vLLM defines its phases:

        queued ---queue_s---> first scheduled ---prefill_s---> first token ---decode_s---> last token
                              |<----------------------- inference_s ------------------------>|

    A preempted request keeps its first scheduling and first token. A request that ended
    before its first token (a deadline, an error) has prefill_s and decode_s 0 and inference_s
    the time it ran; one that never ran has only queue_s."""

    queue_s: float
    prefill_s: float = 0.0
    decode_s: float = 0.0
    inference_s: float = 0.0


class TopLogprob(msgspec.Struct, frozen=True, array_like=True):
    token_id: int
    logprob: float


class TokenLogprobs(msgspec.Struct, frozen=True, array_like=True):
    """Logprob of one sampled token and the top-N alternatives (raw model log-softmax)."""

    logprob: float
    top: list[TopLogprob] = []


# --------------------------------------------------------------------------- api -> tokenizer


class ChatMessage(msgspec.Struct, frozen=True):
    role: str
    content: str | None = None
    name: str | None = None
    tool_call_id: str | None = None
    # an assistant message's tool calls, as the JSON text of OpenAI's tool_calls list
    tool_calls: str | None = None


class GenerateRequest(msgspec.Struct, frozen=True, array_like=True, tag="generate"):
    """One completion to run. Exactly one of prompt / messages / prompt_token_ids is set."""

    request_id: str
    params: SamplingParams
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    prompt_token_ids: list[int] | None = None
    add_generation_prompt: bool = True
    stop: list[str] = []
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    priority: int = 0
    deadline_s: float | None = None  # seconds from arrival until it times out, queued or running
    cache_salt: str | None = None
    return_prompt: bool = False  # reply with the prompt's token ids and text (echo, prompt logprobs)
    # seconds from arrival it may wait before it starts (then it ends with "timeout"); once
    # running, only deadline_s bounds it. The API's request_timeout_s (server-wide) goes here.
    queue_timeout_s: float | None = None
    # requests of one session (the body's `user`, or the X-Session-Id header) stick to one replica
    session: str | None = None
    # W3C traceparent of the api span (shared/tracing.py): the tokenizer's spans continue its
    # trace; None: not traced (tracing off, or not sampled)
    trace: str | None = None
    # the JSON text of OpenAI's tools list, handed to the chat template (HF templates take `tools`)
    tools: str | None = None
    # an embedding request (prefill only, no tokens generated): its TextDelta carries `embedding`
    pooling: PoolingParams | None = None


class Abort(msgspec.Struct, frozen=True, array_like=True, tag="abort"):
    """Ends a request; ignored unless it comes from the connection that sent the request."""

    request_id: str
    reason: str = "abort"


class TokenizeRequest(msgspec.Struct, frozen=True, array_like=True, tag="tokenize"):
    request_id: str
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(msgspec.Struct, frozen=True, array_like=True, tag="detokenize"):
    request_id: str
    token_ids: list[int]


class Ping(msgspec.Struct, frozen=True, array_like=True, tag="ping"):
    """Heartbeat / readiness probe: tokenizer_proc answers with a Pong, scheduler_proc with its
    SchedulerStats."""

    sent_at: float
    request_id: str = ""


# --------------------------------------------------------------------------- tokenizer -> api


class TextDelta(msgspec.Struct, frozen=True, array_like=True, tag="text"):
    """New text for one request. The last one has finish_reason set (or error).

    token_ids / logprobs / token_texts are the tokens behind this delta (token_texts: each
    token decoded on its own, for OpenAI logprobs; top_token_texts[i][j] is the text of
    logprobs[i].top[j]; both filled whenever logprobs is). prompt_* fields are
    set on the first delta only. Finish reasons: "stop", "length", "abort", "timeout",
    "error". num_output_tokens counts every token generated so far for the request.
    """

    request_id: str
    text: str
    token_ids: list[int] = []
    token_texts: list[str] = []
    logprobs: list[TokenLogprobs] | None = None
    top_token_texts: list[list[str]] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    error: ErrorInfo | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_output_tokens: int = 0
    prompt_token_ids: list[int] | None = None
    prompt_text: str | None = None
    replica: str | None = None  # the replica serving the request (its id, "r0"); first delta and last
    # the engine's phases: so far on the first token's delta, all on the last when it ended the request
    timings: RequestTimings | None = None
    # an embedding request's pooled vector (float32 little-endian), on its last delta
    embedding: bytes | None = None


class TokenizeResult(msgspec.Struct, frozen=True, array_like=True, tag="tokenized"):
    request_id: str
    token_ids: list[int] = []
    max_model_len: int = 0
    text: str = ""
    error: ErrorInfo | None = None


class EngineStatus(msgspec.Struct, frozen=True, array_like=True):
    """A tokenizer's view of the engine, for readiness, /v1/models and /metrics.

    stats is the scheduler's latest report, with workers_ready set only while the scheduler
    answers the tokenizer's heartbeats. bad_frames counts the tokenizer's dropped frames.
    """

    model_name: str
    max_model_len: int
    vocab_size: int
    draining: bool
    bad_frames: int
    stats: SchedulerStats  # with several replicas: their sum (kv_cache_usage: the mean of the live ones)
    replicas: list[ReplicaStatus] = []  # each replica this tokenizer knows, in id order
    router: RouterStats | None = None  # this tokenizer's routing decisions (None: one fixed replica)


class ReplicaStatus(msgspec.Struct, frozen=True, array_like=True):
    """One replica as a tokenizer sees it: live = it answers, its worker is ready, and (with a
    registry) its load reports keep coming; stats: its scheduler's latest report."""

    replica_id: str
    live: bool
    stats: SchedulerStats


class BucketCounts(msgspec.Struct, frozen=True, array_like=True):
    """Cumulative observations: counts[i] fell at or below bounds[i] (and above the bound
    before); the last count is above every bound."""

    bounds: list[float]
    counts: list[int]
    total: float = 0.0


class RouteCount(msgspec.Struct, frozen=True, array_like=True):
    replica_id: str
    reason: str  # the Router's RouteDecision.reason ("prefix", "load", "session", ...), or "failover"
    count: int


class RouterStats(msgspec.Struct, frozen=True, array_like=True):
    """A tokenizer's routing since it started (cumulative): decisions per (replica, reason), the
    prompt's blocks the chosen replica held per decision, and the time each decision took."""

    decisions: list[RouteCount]
    matched_blocks: BucketCounts
    decision_seconds: BucketCounts
    failovers: int = 0  # requests re-sent to another replica after theirs failed before a token


class Pong(msgspec.Struct, frozen=True, array_like=True, tag="pong"):
    """The answer to a Ping, and a worker's heartbeat. engine: set by tokenizer_proc only."""

    sent_at: float
    role: str
    ready: bool = True
    request_id: str = ""
    engine: EngineStatus | None = None


# --------------------------------------------------------------------------- tokenizer -> scheduler


class EngineRequest(msgspec.Struct, frozen=True, array_like=True, tag="engine_request"):
    """A tokenized request. params.max_tokens is resolved (>= 1 unless the prompt fills the
    context); the scheduler checks it against the context length and the KV pool."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    priority: int = 0
    deadline: float | None = None  # wall time (time.time()) after which it ends with finish_reason "timeout"
    cache_salt: str | None = None
    queue_deadline: float | None = None  # wall time after which it ends with "timeout" if not yet started
    trace: str | None = None  # W3C traceparent of the tokenizer's span; None: not traced
    pooling: PoolingParams | None = None  # an embedding request: prefill only, then pooled


# --------------------------------------------------------------------------- scheduler -> worker


class NewRequestData(msgspec.Struct, frozen=True, array_like=True):
    """A request the worker has not seen (or sees again after preemption).

    token_ids holds every known token (prompt + tokens generated before a preemption);
    the first num_computed_tokens of them are already in the KV cache (prefix hit), and
    this step computes the next num_new_tokens. The first num_prompt_tokens are the prompt
    (-1: all of them): tokens generated before a preemption stay output for the penalties
    and min_tokens.
    """

    request_id: str
    token_ids: list[int]
    block_ids: list[int]
    num_computed_tokens: int
    num_new_tokens: int
    params: SamplingParams
    num_prompt_tokens: int = -1
    # W3C traceparent of the scheduler's llm_request span, only with --collect-detailed-traces:
    # the parent of the worker's per-step spans
    trace: str | None = None
    pooling: PoolingParams | None = None  # an embedding request: pool on its last prefill chunk


class RunningRequestData(msgspec.Struct, frozen=True, array_like=True):
    """A request the worker already holds: blocks appended since the last plan and how many
    tokens to compute this step. The worker appends its own sampled tokens to its state."""

    request_id: str
    new_block_ids: list[int]
    num_new_tokens: int


class StepPlan(msgspec.Struct, frozen=True, array_like=True, tag="plan"):
    """One forward step, as diffs against what the workers already hold.

    finished_ids: requests the workers must forget (finished, aborted or preempted) since
    the last plan; they are applied before new/running. A request samples a token this step
    only when the step reaches the end of its known tokens (the last chunk of a prefill, or
    a decode); otherwise it only fills KV.
    """

    step_id: int
    new: list[NewRequestData] = []
    running: list[RunningRequestData] = []
    finished_ids: list[str] = []


class StepResult(msgspec.Struct, frozen=True, array_like=True, tag="result"):
    """Sampled tokens for the requests that sampled in step step_id, in plan order."""

    step_id: int
    request_ids: list[str]
    sampled_token_ids: list[int]
    logprobs: list[TokenLogprobs | None] | None = None
    step_time_s: float = 0.0
    error: str | None = None
    # embedding requests that finished their prefill this step (they sample nothing)
    pooled: list[PooledOutput] = []
    # requests (in request_ids) whose grammar allowed no token: their sampled id is meaningless;
    # the scheduler ends them (finish_reason "stop", stop_reason "grammar_dead_end")
    dead_ends: list[str] = []


class WorkerExit(msgspec.Struct, frozen=True, array_like=True, tag="worker_exit"):
    """The scheduler gave up on the worker (a step ran past step_timeout_s, or its heartbeats
    stopped): the worker exits when it reads this, and its supervisor starts a fresh one."""

    reason: str


class WorkerGone(msgspec.Struct, frozen=True, array_like=True, tag="worker_gone"):
    """Worker rank 0 is exiting because its tensor-parallel group broke (a rank died or went
    silent), sent from its heartbeat thread whether or not a step is in progress: the scheduler
    fails what the worker held now, not after heartbeat_timeout_s of silence."""

    reason: str


class WorkerReady(msgspec.Struct, frozen=True, array_like=True, tag="worker_ready"):
    """max_model_len is the context the worker serves: the configured one, lowered to what its
    KV pool holds. The scheduler enforces it and reports it onwards (SchedulerStats)."""

    rank: int
    num_kv_blocks: int
    block_size: int
    max_model_len: int
    vocab_size: int
    eos_token_ids: list[int]
    load_time_s: float = 0.0


# --------------------------------------------------------------------------- scheduler -> tokenizer


class TokenDelta(msgspec.Struct, frozen=True, array_like=True):
    """New tokens of one request; finish_reason set on its last delta."""

    request_id: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # a stop token id, or "grammar_dead_end"
    error: ErrorInfo | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    # the phases so far on the first token's delta (queue, prefill), all of them on the last
    # delta of a request the scheduler ended
    timings: RequestTimings | None = None
    embedding: bytes | None = None  # an embedding request's pooled vector (float32 little-endian)


class TokenDeltas(msgspec.Struct, frozen=True, array_like=True, tag="deltas"):
    deltas: list[TokenDelta]


class SchedulerStats(msgspec.Struct, frozen=True, array_like=True, tag="stats"):
    """Snapshot for /metrics and readiness. Counters are cumulative.

    max_model_len: the context length the scheduler enforces (the worker's effective one,
    which may be below the configured value); 0 while no worker is ready.
    """

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    num_steps: int = 0
    tokens_scheduled_last_step: int = 0
    num_kv_blocks: int = 0
    num_free_blocks: int = 0
    workers_ready: bool = True
    max_model_len: int = 0
    # steps whose decodes alone were predicted past --target-itl-ms (prefills then get only the
    # minimum share); and the step cost model's mean relative error on steps it had not seen yet
    num_steps_over_target: int = 0
    step_cost_error: float = 0.0
    # tokens computed per step (prefill and decode), cumulative since the scheduler started
    iteration_tokens: BucketCounts | None = None
    # when this scheduler process started (wall time): a new value is a restarted scheduler,
    # which never heard of the requests sent to the old one
    started_at: float = 0.0


# --------------------------------------------------------------------------- replicas -> registry bus -> routers
# Every replica (one scheduler and its workers) publishes these on the registry bus
# (shared/registry.py) under a topic frame: b"announce", b"load", b"kv". Each tokenizer's
# Router (tokenizer_proc/router.py) builds its view of the replicas from them.


class ReplicaAnnounce(msgspec.Struct, frozen=True, array_like=True, tag="announce"):
    """A replica says it exists: at start and every ~1 s, so a router that starts later learns it
    within a second. started_at (wall time) changes when the replica restarts: its KV event
    sequence starts again at 0 and its cache is empty."""

    replica_id: str
    model: str
    request_address: str  # its ROUTER for EngineRequest / Abort / Ping
    replay_address: str  # its ROUTER for KVReplayRequest
    block_size: int
    num_kv_blocks: int
    max_model_len: int
    started_at: float


class LoadReport(msgspec.Struct, frozen=True, array_like=True, tag="load"):
    """A replica's load every ~100 ms. Counters (prefix_*) are cumulative, in tokens."""

    replica_id: str
    seq: int
    waiting: Annotated[int, msgspec.Meta(ge=0)]
    running: Annotated[int, msgspec.Meta(ge=0)]
    kv_usage: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]  # fraction of KV blocks held by requests
    prefix_hits: Annotated[int, msgspec.Meta(ge=0)] = 0
    prefix_queries: Annotated[int, msgspec.Meta(ge=0)] = 0


class BlockStored(msgspec.Struct, frozen=True, array_like=True, tag="stored"):
    """Blocks now held in the prefix cache, in the order they were keyed. A hash is
    ``prefix_hash.event_hash`` of the chained block key, so it names the whole prefix (salt
    included) and needs no parent to be looked up; parent_hash is the parent of
    block_hashes[0] when known (None: not stated, or the first block of a prompt)."""

    block_hashes: list[int]
    parent_hash: int | None = None


class BlockRemoved(msgspec.Struct, frozen=True, array_like=True, tag="removed"):
    """Blocks no longer in the prefix cache (evicted, or their KV turned out invalid)."""

    block_hashes: list[int]


class AllBlocksCleared(msgspec.Struct, frozen=True, array_like=True, tag="cleared"):
    """The replica's prefix cache is empty (its workers restarted)."""


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


class KVEventBatch(msgspec.Struct, frozen=True, array_like=True, tag="kv"):
    """The events of one scheduler step (or ~20 ms), in order. seq counts batches from 0 per
    replica start: a subscriber that sees seq jump asks the replica to replay what it missed."""

    replica_id: str
    seq: int
    ts: float
    events: list[KVEvent]


class KVReplayRequest(msgspec.Struct, frozen=True, array_like=True, tag="replay"):
    """To a replica's replay ROUTER: send the batches from from_seq on."""

    from_seq: int


class KVReplayReply(msgspec.Struct, frozen=True, array_like=True, tag="replay_reply"):
    """The batches from the requested seq to the latest, in order (empty: nothing newer)."""

    replica_id: str
    batches: list[KVEventBatch]


class KVReplayUnavailable(msgspec.Struct, frozen=True, array_like=True, tag="replay_unavailable"):
    """The requested batches left the replica's ring buffer; instead, the whole prefix cache as
    of batch ``seq`` (-1: before the first batch): a router drops what it knew of this replica,
    takes these hashes and continues from batch seq + 1."""

    replica_id: str
    seq: int
    block_hashes: list[int]


# --------------------------------------------------------------------------- worker rank 0 <-> ranks 1..N-1


class RankHello(msgspec.Struct, frozen=True, array_like=True, tag="rank_hello"):
    """A tensor-parallel rank > 0 asks rank 0 (its replica's group socket) to join the group."""

    rank: int
    pid: int


class GroupStart(msgspec.Struct, frozen=True, array_like=True, tag="group_start"):
    """Rank 0's answer once every rank said hello: where its torch.distributed store listens,
    and the prefix that keeps this group's keys apart from a previous (restarted) group's."""

    store_host: str
    store_port: int
    generation: str
    world_size: int


# --------------------------------------------------------------------------- unions per inbox

# tokenizer_proc's inbox from api processes and clients (a ROUTER socket)
TokenizerInbox = GenerateRequest | Abort | TokenizeRequest | DetokenizeRequest | Ping
# api_proc / client inbox from tokenizer_proc
ApiInbox = TextDelta | TokenizeResult | Pong
# scheduler_proc's inbox from tokenizer processes
SchedulerInbox = EngineRequest | Abort | Ping
# scheduler_proc's inbox from worker rank 0
SchedulerWorkerInbox = StepResult | WorkerReady | WorkerGone | Pong
# tokenizer_proc's inbox from the scheduler (SchedulerStats answers its heartbeat Ping)
TokenizerEngineInbox = TokenDeltas | SchedulerStats
# gpu_worker's inbox from the scheduler
WorkerInbox = StepPlan | WorkerExit
# a tensor-parallel rank > 0, from rank 0: the group's start, then every frame rank 0 received
RankInbox = GroupStart | StepPlan | WorkerExit
# a router's inbox from the registry bus (the topic frame is only for filtering)
RegistryInbox = ReplicaAnnounce | LoadReport | KVEventBatch
# a replica's replay ROUTER, and the answers its requester reads
ReplayInbox = KVReplayRequest
ReplayAnswer = KVReplayReply | KVReplayUnavailable
