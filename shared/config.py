"""The engine's configuration: parsed once by the launcher, written to a file, read by every process.

Each process gets ``--config FILE`` (JSON) and decodes it into the frozen ``EngineConfig``;
nothing mutates it afterwards. Values only known at run time (the number of KV blocks a
worker could allocate) travel in ready messages instead.

``EngineConfig`` is the only place a default is written. A process's own config
(``SchedulerConfig``, ``RunnerConfig``, ``ApiConfig``) is a view of it: a field named as in
``EngineConfig`` takes its default from ``DEFAULTS`` and its value from ``view_of``; the
command line (``launcher/engine_args.py``) reads its defaults from ``DEFAULTS`` too.
"""

from __future__ import annotations

import os
import stat
from types import SimpleNamespace
from typing import Any, TypeVar

import msgspec

V = TypeVar("V", bound=msgspec.Struct)


class CurveKeys(msgspec.Struct, frozen=True):
    """Z85 CURVE keys for tcp transport: servers use server_*, every connecting peer client_*."""

    server_public: str
    server_secret: str
    client_public: str
    client_secret: str


class EngineConfig(msgspec.Struct, frozen=True, kw_only=True):
    # model
    model: str  # resolved path: a .gguf file or a Hugging Face folder
    served_model_name: str
    # transport: ipc:// sockets in run_dir (mode 0700), or tcp:// on host with CURVE
    run_dir: str
    transport: str = "ipc"
    bind_host: str = "127.0.0.1"
    base_port: int = 5550  # tcp: tokenizer frontends from base_port, scheduler base_port+50, workers +60
    curve: CurveKeys | None = None
    # processes
    num_tokenizers: int = 1
    api_workers: int = 1
    # replicas (data parallel): each a scheduler and its worker(s) with its own KV pool, routed by
    # the tokenizers; with several, they meet the tokenizers on the registry bus
    data_parallel_size: int = 1
    routing: str = "auto"  # auto: prefix_aware with several replicas (or a registry), else round_robin
    registry_address: str | None = None  # the bus (tcp://HOST:PORT or ipc://PATH); None: in run_dir if N > 1
    # tensor parallel: worker ranks per replica, one torch.distributed group (gloo on CPU, NCCL on GPU)
    tensor_parallel_size: int = 1
    # where replicas run: mp = processes on this machine; ray = Ray actors, each replica (its TP group
    # packed on one node) placed on a Ray cluster (launcher/ray_executor.py, docs/distributed.md)
    distributed_executor_backend: str = "mp"
    ray_address: str | None = None  # ray: the cluster to join (HOST:PORT, auto, ray://...); None: a local one
    # scheduler
    block_size: int = 16
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    max_model_len: int = 0  # 0 = from the model's config; the launcher writes the resolved value
    vocab_size: int = 0  # the model's vocabulary (token ids must be below it); resolved by the launcher
    max_waiting_requests: int = 4096
    max_waiting_tokens: int = 4_000_000
    enable_prefix_caching: bool = True
    priority_aging_s: float | None = 10.0  # waiting this long is worth one priority level; None = strict
    target_itl_ms: float = 0.0  # size each step to this predicted time (learned cost model); 0 = off
    # the deadline (ms from arrival) a request of this priority gets when it names none
    priority_deadline_ms: dict[int, float] = {}
    # worker
    device: str = "cpu"
    dtype: str = "auto"
    kv_cache_dtype: str = "auto"  # auto = the compute dtype (CPU, quantized: float16); fp8: GPU
    num_kv_blocks: int = 0  # 0 = size from memory
    kv_cache_memory_gb: float = 0.0  # CPU: 0 = default
    gpu_memory_utilization: float = 0.9
    kernel_backend: str | None = None
    # none | int8 | q4 | fp8 | auto (kernels/quantized.QUANTIZATIONS); auto: resolved per machine and
    # checkpoint by the worker (gpu_worker/quantization.py)
    quantization: str = "auto"
    enforce_eager: bool = False
    load_format: str = "auto"
    num_threads: int = 0  # torch threads in the worker, 0 = all cores
    seed: int = 0
    # embeddings (docs/embeddings.md): how hidden states become one vector. auto: a
    # sentence-transformers folder's own pooling (and normalisation), else the last token,
    # normalised; last | mean | cls: that, normalised
    pooling: str = "auto"
    # resolved by the launcher from the model: an encoder serves only embeddings; their width; the
    # sizes `dimensions` may cut them to (Matryoshka: None = not supported, [] = any)
    embedding_only: bool = False
    embedding_size: int = 0
    matryoshka_dimensions: list[int] | None = None
    # api
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: list[str] = []  # NAME:KEY (the tenant NAME) or KEY (tenant named from its hash)
    api_keys_file: str | None = None  # tenants, their keys and limits (TOML/JSON, mode 0600; docs/audit.md)
    admin_key: str | None = None  # enables /admin (else ZEROSERVE_ADMIN_KEY, read by the api process)
    # audit trail (docs/audit.md): "" = STATE_DIR/audit.db, "off", sqlite:///PATH or postgresql://...
    audit_db: str = ""
    audit_content: str = "none"  # none | hash | full: the prompt and output text kept in each record
    audit_retention_days: float = 0.0  # records older than this are deleted; 0 = kept
    state_dir: str = ""  # "" = ZEROSERVE_STATE_DIR, else ~/.local/state/zeroserve (shared/env.py)
    auth_exempt_paths: list[str] = msgspec.field(
        default_factory=lambda: ["/health", "/ready", "/metrics", "/dashboard"]
    )
    max_body_bytes: int = 4 * 1024 * 1024
    max_n: int = 16
    max_seqs_per_request: int = 256  # prompts x n that one request may fan out to
    priority_range: tuple[int, int] = (-100, 100)  # the priorities a request may ask for, inclusive
    # how tool calls are read from the model's output (api_proc/tools.py, docs/tools.md): hermes |
    # llama3_json; also the format tools are described in when the chat template ignores them
    tool_call_parser: str = "hermes"
    # supervision: a worker silent for heartbeat_timeout_s is dead to the scheduler, a tokenizer to its clients
    heartbeat_interval_s: float = 0.2
    heartbeat_timeout_s: float = 1.0
    step_timeout_s: float = 120.0  # a model step running longer fails its requests, restarts the worker
    # observability: every process's log lines (text or JSON), and prompt/output text in the access log
    log_format: str = "text"
    log_prompts: bool = False
    metrics_prefix: str = "zeroserve"  # /metrics names: zeroserve:... or vllm:... (vLLM's dashboards)
    # OpenTelemetry traces: the OTLP/HTTP collector (None: tracing off, nothing imported or sent),
    # and per-step worker spans (costly: one span per request per step)
    otlp_traces_endpoint: str | None = None
    collect_detailed_traces: bool = False
    # model registry (docs/models.md): the models file (None: the one MODEL, as version "v1"), the
    # launcher's control socket (set by `serve` only: None under supervisord/systemd), whether a
    # version's `fault` is accepted, how long an unload waits for its in-flight requests
    models_file: str | None = None
    control_address: str | None = None
    allow_fault_injection: bool = False
    model_drain_timeout_s: float = 60.0

    # ---------------------------------------------------------------- addresses
    def _address(self, name: str, port_offset: int) -> str:
        if self.transport == "ipc":
            return f"ipc://{os.path.join(self.run_dir, name)}.sock"
        return f"tcp://{self.bind_host}:{self.base_port + port_offset}"

    def tokenizer_address(self, index: int) -> str:
        """Where tokenizer_proc #index takes GenerateRequests (ROUTER; api and clients connect)."""
        return self._address(f"tokenizer-{index}", index)

    @property
    def tokenizer_addresses(self) -> list[str]:
        return [self.tokenizer_address(i) for i in range(self.num_tokenizers)]

    @property
    def scheduler_address(self) -> str:
        """Where scheduler_proc takes EngineRequests from tokenizers (ROUTER)."""
        return self._address("scheduler", 50)

    @property
    def worker_address(self) -> str:
        """Where scheduler_proc talks to workers: plans out, results and heartbeats in (ROUTER)."""
        return self._address("workers", 60)

    # ---------------------------------------------------------------- replicas
    # Replica 0 keeps the single-engine addresses (scheduler.sock, workers.sock; tcp base_port+50
    # and +60); replica r > 0 gets scheduler-r.sock / workers-r.sock (tcp +100+3r, +101+3r); each
    # replica's KV-event replay ROUTER is replay-r.sock (tcp +102+3r); the bus is +70 (publishers)
    # and +71 (subscribers).

    @staticmethod
    def replica_id(replica: int) -> str:
        """The id a local replica announces itself with (remote ones may use any unique string)."""
        return f"r{replica}"

    def scheduler_address_of(self, replica: int) -> str:
        if replica == 0:
            return self.scheduler_address
        return self._address(f"scheduler-{replica}", 100 + 3 * replica)

    def worker_address_of(self, replica: int) -> str:
        if replica == 0:
            return self.worker_address
        return self._address(f"workers-{replica}", 101 + 3 * replica)

    def replay_address_of(self, replica: int) -> str:
        """Where replica #replica answers KV-event replay requests (ROUTER)."""
        return self._address(f"replay-{replica}", 102 + 3 * replica)

    def tp_group_address_of(self, replica: int) -> str:
        """Where worker rank 0 of replica #replica meets its other ranks (ROUTER): hellos, the
        group's start, every plan it received. tcp: base_port + 1000 + 2r."""
        return self._address(f"tp-{replica}", 1000 + 2 * replica)

    def tp_heartbeat_address_of(self, replica: int) -> str:
        """Where rank 0's heartbeat thread takes the other ranks' heartbeats (PULL)."""
        return self._address(f"tp-hb-{replica}", 1001 + 2 * replica)

    @property
    def uses_registry(self) -> bool:
        """Whether replicas and tokenizers meet on the registry bus (else: one replica, fixed address)."""
        if self.distributed_executor_backend == "ray":  # replicas may be anywhere: they announce themselves
            return True
        return self.data_parallel_size > 1 or self.registry_address is not None

    @property
    def routing_policy(self) -> str:
        if self.routing != "auto":
            return self.routing
        return "prefix_aware" if self.uses_registry else "round_robin"

    def _registry_address(self, side: str, port_step: int) -> str:
        base = self.registry_address
        if base is None:
            return self._address(f"registry-{side}", 70 + port_step)
        if base.startswith("ipc://"):
            return f"{base}-{side}.sock"
        host, _, port = base.rpartition(":")
        return f"{host}:{int(port) + port_step}"

    @property
    def registry_publish_address(self) -> str:
        """The bus's XSUB side: each replica's PUB connects here."""
        return self._registry_address("pub", 0)

    @property
    def registry_subscribe_address(self) -> str:
        """The bus's XPUB side: each tokenizer's SUB connects here."""
        return self._registry_address("sub", 1)

    @property
    def metrics_dir(self) -> str:
        return os.path.join(self.run_dir, "metrics")


def _defaults() -> SimpleNamespace:
    values = {}
    for field in msgspec.structs.fields(EngineConfig):
        if field.default is not msgspec.NODEFAULT:
            values[field.name] = field.default
        elif field.default_factory is not msgspec.NODEFAULT:
            values[field.name] = field.default_factory()
    return SimpleNamespace(**values)


# EngineConfig's defaults by name (``DEFAULTS.max_num_seqs``): where every other default is read
DEFAULTS = _defaults()
_ENGINE_FIELDS = frozenset(f.name for f in msgspec.structs.fields(EngineConfig))


def view_of(config: EngineConfig, view: type[V], **own: Any) -> V:
    """``view`` (a process's config struct) built from ``config``: each field the two share by
    name is copied; ``own`` gives the rest, and overrides what is resolved at run time."""
    shared = {
        f.name: getattr(config, f.name) for f in msgspec.structs.fields(view) if f.name in _ENGINE_FIELDS
    }
    return view(**{**shared, **own})


def write_config(config: EngineConfig, path: str) -> None:
    """Write the config readable by its owner alone (it may hold keys)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, stat.S_IRUSR | stat.S_IWUSR)
    with os.fdopen(fd, "wb") as f:
        f.write(msgspec.json.format(msgspec.json.encode(config)))


def read_config(path: str) -> EngineConfig:
    try:
        with open(path, "rb") as f:
            return msgspec.json.decode(f.read(), type=EngineConfig)
    except FileNotFoundError:
        raise SystemExit(
            f"config file {path} not found: start the engine with `zeroserve serve`, "
            "or render one with `zeroserve deploy`"
        ) from None
    except msgspec.ValidationError as e:
        raise SystemExit(f"config file {path} is invalid: {e}") from None
