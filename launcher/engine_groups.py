"""Engine groups: one (model, version)'s processes (bus, workers, schedulers, tokenizers) and their supervision.

A group has its own EngineConfig (the server's, with the version's path, served name and
options) written to its own file, and its own sockets: the first group of a `serve` keeps the
run dir's root names (tokenizer-0.sock, ...: the single-model layout is unchanged), any other
lives in RUN_DIR/groups/NAME@VERSION/ (mode 0700). ``GroupManager`` is the registry's
``Groups``: it checks a version can be served and fits in memory before anything starts,
starts it, watches it become ready (or fail: a child that keeps dying, or no ready engine in
time), and stops it (tokenizers drain first).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import msgspec

from zeroserve.launcher.models_file import ModelsFileError, VersionSpec
from zeroserve.shared.config import EngineConfig, write_config

log = logging.getLogger("zeroserve.launcher")

BACKOFF_START_S, BACKOFF_MAX_S, HEALTHY_AFTER_S = 1.0, 30.0, 60.0
GROUPS_DIR = "groups"
TCP_PORTS_PER_GROUP = 3000  # tcp: group #slot's internal ports start at base_port + slot * this
FAILED_AFTER_EXITS = 3
# a tensor-parallel group with a dead rank: the others get this long to exit by themselves
# (rank 0 first tells its scheduler why, within a heartbeat interval; the others follow rank 0)
# before they are killed, so the requests fail at once with the reason, not after the
# scheduler's heartbeat timeout as "no heartbeat"
TP_EXIT_GRACE_S = 2.0
LOAD_TIMEOUT_S = 600.0
# the resident memory of a group's processes besides its weights and KV cache: the python
# interpreters, torch, the tokenizer (measured on SmolLM2: docs/models.md "Capacity")
PROCESS_OVERHEAD_BYTES = {
    "worker": 320 << 20,
    "scheduler": 60 << 20,
    "tokenizer": 300 << 20,
    "registry": 60 << 20,
}
GiB = 1 << 30


def proc_command(role: str, config_path: str, index: int, replica: int | None = None) -> list[str]:
    """The command line of one process; it names its role (``zeroserve proc worker ...``)."""
    script = os.path.join(os.path.dirname(sys.executable), "zeroserve")
    if not os.path.exists(script):
        script = shutil.which("zeroserve") or ""
    head = [sys.executable, script] if script else [sys.executable, "-m", "zeroserve.launcher.cli"]
    tail = [] if replica is None else ["--replica", str(replica)]
    return head + ["proc", role, "--config", config_path, "--index", str(index), *tail]


def child_env(config: EngineConfig) -> dict[str, str]:
    environ = dict(os.environ)
    environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    environ["PROMETHEUS_MULTIPROC_DIR"] = config.metrics_dir
    return environ


@dataclass
class Child:
    role: str
    index: int
    command: list[str]
    replica: int | None = None  # scheduler / worker of replica #replica, when there are several
    popen: subprocess.Popen | None = None
    started_at: float = 0.0
    restarts: int = 0
    backoff_s: float = BACKOFF_START_S
    restart_at: float | None = None
    exit_codes: list[int] = field(default_factory=list)
    tail: deque | None = None  # the last lines of its stderr, when the group keeps them
    kill_at: float | None = None  # a rank of a broken tensor-parallel group: killed then if still alive

    @property
    def name(self) -> str:
        name = self.role if self.index == 0 else f"{self.role}-{self.index}"
        return name if self.replica is None else f"{name}-r{self.replica}"


class ProcessSet:
    """Children restarted with backoff when they die (a tensor-parallel group of workers as one)."""

    def __init__(
        self, children: list[Child], env: dict[str, str], tensor_parallel_size: int = 1, label: str = ""
    ):
        self.children = children
        self.env = env
        self.tensor_parallel_size = tensor_parallel_size
        self.label = label  # "smol@v2: " in log lines of a group other than the first

    def spawn(self, child: Child) -> None:
        pipe = subprocess.PIPE if child.tail is not None else None
        child.popen = subprocess.Popen(child.command, env=self.env, stdin=subprocess.DEVNULL, stderr=pipe)
        if pipe is not None:
            threading.Thread(target=_tee, args=(child.popen.stderr, child.tail), daemon=True).start()
        child.started_at = time.monotonic()
        child.restart_at = None
        log.debug("started %s%s (pid %d)", self.label, child.name, child.popen.pid)

    def start(self) -> None:
        for child in self.children:
            self.spawn(child)

    def check(self) -> None:
        """Restart the dead (with backoff)."""
        now = time.monotonic()
        for child in self.children:
            if child.popen is None:
                if child.restart_at is not None and now >= child.restart_at and not self.rank_alive(child):
                    for c in self.tp_group(child):  # a tensor-parallel group restarts whole
                        c.restarts += 1
                        log.warning("restarting %s%s (restart #%d)", self.label, c.name, c.restarts)
                        self.spawn(c)
                continue
            code = child.popen.poll()
            if code is None:
                if child.kill_at is not None and now >= child.kill_at:
                    log.warning(
                        "%s%s: killing it, its tensor-parallel group broke %.0fs ago and it has not exited",
                        self.label,
                        child.name,
                        TP_EXIT_GRACE_S,
                    )
                    child.popen.kill()
                elif now - child.started_at > HEALTHY_AFTER_S:
                    child.backoff_s = BACKOFF_START_S
                continue
            if child.kill_at is not None:  # a rank of a broken group, gone as expected: restarts with it
                child.popen, child.kill_at = None, None
                continue
            child.exit_codes.append(code)
            child.popen = None
            delay = child.backoff_s
            child.backoff_s = min(child.backoff_s * 2, BACKOFF_MAX_S)
            child.restart_at = now + delay
            if child.role == "worker" and self.tensor_parallel_size > 1:
                self.stop_tp_group(child)
            level = logging.ERROR if delay >= 8 else logging.WARNING
            log.log(
                level,
                "%s%s exited with code %s; restarting in %.0fs%s",
                self.label,
                child.name,
                code,
                delay,
                " (crash loop: check the log above)" if delay >= 8 else "",
            )

    def tp_group(self, child: Child) -> list[Child]:
        """The worker ranks of ``child``'s replica (just ``child`` without tensor parallelism)."""
        if child.role != "worker" or self.tensor_parallel_size <= 1:
            return [child]
        return [c for c in self.children if c.role == "worker" and c.replica == child.replica]

    def rank_alive(self, child: Child) -> bool:
        """Whether another rank of ``child``'s tensor-parallel group still runs: the group
        restarts only as a whole, once all are down (a fresh torch.distributed group needs
        every rank anew)."""
        return any(c is not child and c.popen is not None for c in self.tp_group(child))

    def stop_tp_group(self, dead: Child) -> None:
        """Tensor parallel: the dead worker's other ranks exit by themselves (rank 0 after telling
        its scheduler why) or are killed after TP_EXIT_GRACE_S; the group restarts as one."""
        group = self.tp_group(dead)
        kill_at = time.monotonic() + TP_EXIT_GRACE_S
        for rank in group:
            if rank is not dead and rank.popen is not None and rank.kill_at is None:
                log.warning(
                    "%s%s exited: %s, of its tensor-parallel group, is to exit too",
                    self.label,
                    dead.name,
                    rank.name,
                )
                rank.kill_at = kill_at
        restart_at = max(c.restart_at or 0.0 for c in group)
        for rank in group:
            rank.restart_at, rank.backoff_s = restart_at, max(c.backoff_s for c in group)

    def signal(self, roles: tuple[str, ...], sig: int) -> None:
        for child in self.children:
            if child.role in roles and child.popen is not None and child.popen.poll() is None:
                child.popen.send_signal(sig)

    def running(self, roles: tuple[str, ...]) -> list[Child]:
        return [
            c for c in self.children if c.role in roles and c.popen is not None and c.popen.poll() is None
        ]

    def crash_looping(self) -> list[Child]:
        return [c for c in self.children if len(c.exit_codes) >= FAILED_AFTER_EXITS]

    def restarting_in_a_loop(self) -> list[Child]:
        """Children that exited FAILED_AFTER_EXITS times in a row, each before it had run
        HEALTHY_AFTER_S (their backoff doubled that often without being reset)."""
        return [c for c in self.children if c.backoff_s >= BACKOFF_START_S * 2**FAILED_AFTER_EXITS]


def _tee(pipe, tail: deque) -> None:
    """Copy a child's stderr to ours, keeping its last lines (a failed load's reason)."""
    out = sys.stderr.buffer
    for line in iter(pipe.readline, b""):
        try:
            out.write(line)
            out.flush()
        except (OSError, ValueError):
            pass
        text = line.decode(errors="replace").strip()
        if text:
            tail.append(text)
    pipe.close()


class EngineGroup(ProcessSet):
    """One (model, version)'s engine processes."""

    def __init__(self, model: str, version: str, config: EngineConfig, config_path: str, own_dir: str | None):
        self.model, self.version = model, version
        self.config, self.config_path, self.own_dir = config, config_path, own_dir
        order: list[tuple[str, int, int | None]] = [("registry", 1, None)] if config.uses_registry else []
        replicas = config.data_parallel_size
        for r in range(replicas if config.distributed_executor_backend != "ray" else 0):
            order += [
                ("worker", config.tensor_parallel_size, None if replicas == 1 else r),
                ("scheduler", 1, None if replicas == 1 else r),
            ]
        order += [("tokenizer", config.num_tokenizers, None)]
        keep_tail = own_dir is not None  # the first group's children write to the terminal as before
        children = [
            Child(
                role,
                i,
                proc_command(role, config_path, i, replica),
                replica,
                tail=deque(maxlen=30) if keep_tail else None,
            )
            for role, n, replica in order
            for i in range(n)
        ]
        label = "" if own_dir is None else f"{model}@{version}: "
        super().__init__(children, child_env(config), config.tensor_parallel_size, label)
        self.stopping = False

    @property
    def key(self) -> str:
        return f"{self.model}@{self.version}"

    def failure_reason(self) -> str | None:
        bad = self.crash_looping()
        if not bad:
            return None
        names = ", ".join(f"{c.name} (exit codes {', '.join(map(str, c.exit_codes))})" for c in bad)
        lines = [line for c in bad if c.tail for line in c.tail]
        hint = next(
            (x for x in reversed(lines) if "Error" in x or "error" in x), lines[-1] if lines else None
        )
        return f"{names} failed to start {FAILED_AFTER_EXITS} times" + (
            f": {hint[-300:]}" if hint else "; see the log above"
        )

    async def wait_ready(self, timeout_s: float = LOAD_TIMEOUT_S) -> tuple[str | None, int]:
        """(None, max_model_len) once tokenizer 0 reports a ready engine, or (why it failed, 0)."""
        from zeroserve.shared.client import EngineClient
        from zeroserve.shared.ipc import client_keys

        started = time.monotonic()
        async with EngineClient(self.config.tokenizer_addresses, client_keys(self.config.curve)) as client:
            while not self.stopping:
                try:
                    pong = await client.ping(timeout=0.5)
                    if pong.ready:
                        status = pong.engine
                        return None, (status.max_model_len if status is not None else 0)
                except TimeoutError:
                    pass
                reason = self.failure_reason()
                if reason is not None:
                    return reason, 0
                if time.monotonic() - started > timeout_s:
                    return f"no ready engine after {timeout_s:.0f}s", 0
                await asyncio.sleep(0.2)
        return "stopped while loading", 0

    async def stop(self, drain_timeout_s: float) -> None:
        """Tokenizers first (they drain what clients still have in flight), then the engine."""
        self.stopping = True
        for roles, timeout in (
            (("tokenizer",), drain_timeout_s),
            (("scheduler", "worker", "registry"), 15.0),
        ):
            self.signal(roles, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while self.running(roles) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            if self.running(roles):
                log.error("%s%s did not stop in %.0fs; killing", self.label, "/".join(roles), timeout)
                self.signal(roles, signal.SIGKILL)
            for c in self.children:
                if c.role in roles and c.popen is not None:
                    await asyncio.to_thread(c.popen.wait)
                    c.popen = None
        self.remove_files()

    def remove_files(self) -> None:
        if self.own_dir is None:
            return  # the run dir's own files: RunDir.clean removes them
        from zeroserve.launcher.run_dir import RunDir

        RunDir(self.own_dir, [self.own_dir]).clean(self.config)


# ---------------------------------------------------------------------------- configs


def model_context(model_cfg) -> int:
    try:  # the command line's own rule, where it has one (a sentence-transformers folder's length)
        from zeroserve.launcher.engine_args import default_context

        return default_context(model_cfg)
    except ImportError:
        return model_cfg.max_position_embeddings


def model_facts(model_cfg) -> dict:
    """What config_from_args resolves from the model besides its context and vocabulary (embeddings)."""
    facts = {
        "embedding_only": lambda: model_cfg.is_encoder,
        "embedding_size": lambda: model_cfg.hidden_size,
        "matryoshka_dimensions": lambda: model_cfg.matryoshka_dimensions,
    }
    fields = {f.name for f in msgspec.structs.fields(EngineConfig)}
    out = {}
    for name, value in facts.items():
        if name in fields:
            try:
                out[name] = value()
            except AttributeError:
                pass
    return out


def group_config(base: EngineConfig, model: str, spec: VersionSpec, run_dir: str, slot: int) -> EngineConfig:
    """The server's config with this version's path, name and options; checked as the command
    line checks its flags. ModelsFileError (naming the option) when it cannot be served."""
    from zeroserve.gpu_worker.loader import load_model_config
    from zeroserve.gpu_worker.loader.errors import CheckpointError

    try:
        model_cfg = load_model_config(spec.path)
    except (CheckpointError, OSError, ValueError, KeyError) as e:
        raise ModelsFileError(f"path: cannot read the model at {spec.path}: {e}", "path") from None
    opts = dict(spec.options)
    if base.registry_address is not None and slot > 0:
        raise ModelsFileError("a second engine group cannot share --registry-address; serve it separately")
    if base.distributed_executor_backend == "ray" and slot > 0:
        raise ModelsFileError(
            "loading more versions is not supported with --distributed-executor-backend ray"
        )
    max_len = opts.pop("max_model_len", 0) or min(base.max_model_len, model_context(model_cfg))
    if max_len > model_cfg.max_position_embeddings:
        raise ModelsFileError(
            f"options.max_model_len {max_len} exceeds the model's context ({model_cfg.max_position_embeddings})",
            "options.max_model_len",
        )
    values = {**msgspec.structs.asdict(base), **opts}
    values.update(
        model=spec.path,
        served_model_name=model,
        run_dir=run_dir,
        # the launcher's socket lives in the root run dir: the first group's files, not another's to remove
        control_address=base.control_address if slot == 0 else None,
        base_port=base.base_port + slot * TCP_PORTS_PER_GROUP,
        max_model_len=max_len,
        vocab_size=model_cfg.vocab_size,
        **model_facts(model_cfg),
        max_num_batched_tokens=max(values["max_num_batched_tokens"], values["block_size"]),
    )
    config = msgspec.convert(values, EngineConfig, from_attributes=False, strict=False)
    if config.tensor_parallel_size > 1:
        from zeroserve.gpu_worker.parallel import check_tp_size

        try:
            check_tp_size(model_cfg, config.tensor_parallel_size)
        except ValueError as e:
            raise ModelsFileError(
                f"options.tensor_parallel_size: {e}", "options.tensor_parallel_size"
            ) from None
    from zeroserve.gpu_worker.quantization import CheckpointFacts, check_flags

    try:
        check_flags(
            config.quantization,
            config.dtype,
            config.device,
            CheckpointFacts.of(spec.path, config.load_format),
        )
    except ValueError as e:
        raise ModelsFileError(f"options: {e}", "options") from None
    return config


def weights_bytes(config: EngineConfig) -> int:
    """What the worker's weights take in memory: a GGUF kept in blocks (q4) is its file; floats
    are widened to the compute dtype (float32 on a CPU unless quantized or bf16)."""
    from zeroserve.gpu_worker.loader import checkpoint_format, load_model_config

    path = config.model
    if checkpoint_format(path) == "hf":
        files = [os.path.join(path, f) for f in os.listdir(path) if f.endswith((".safetensors", ".bin"))]
        on_disk = sum(os.path.getsize(f) for f in files)
    else:
        on_disk = os.path.getsize(path)
    cfg = load_model_config(path)
    params = cfg.vocab_size * cfg.hidden_size * 2 + cfg.num_hidden_layers * (
        cfg.hidden_size * cfg.head_dim * (cfg.num_attention_heads * 2 + cfg.num_key_value_heads * 2)
        + 3 * cfg.hidden_size * cfg.intermediate_size
    )
    if config.device.startswith("cuda"):
        per = 1 if config.quantization == "fp8" else (4 if config.dtype == "float32" else 2)
    elif config.quantization in ("auto", "q4") and path.endswith(".gguf"):
        return on_disk
    elif config.quantization in ("auto", "int8"):
        per = 1
    else:
        per = 2 if config.dtype in ("bfloat16", "float16") else 4
    return max(on_disk, params * per) if per >= 2 else params * per


def kv_bytes(config: EngineConfig, gpu_free_total: tuple[int, int] | None = None) -> int:
    """The KV cache the worker will allocate: --num-kv-blocks, else its budget (CPU: the memory
    option or 2 GiB), capped at max_num_seqs full-length sequences; on a GPU without an explicit
    budget, one full-length sequence (the least it must hold)."""
    from zeroserve.gpu_worker.loader import load_model_config

    cfg = load_model_config(config.model)
    cpu_fp16 = config.device == "cpu" and config.kv_cache_dtype == "auto" and config.quantization != "none"
    elem = (
        2
        if config.kv_cache_dtype in ("float16", "bfloat16") or cpu_fp16
        else (1 if config.kv_cache_dtype == "fp8" else 4)
    )
    if config.device != "cpu" and config.dtype != "float32" and config.kv_cache_dtype == "auto":
        elem = 2
    per_block = 2 * cfg.num_hidden_layers * config.block_size * cfg.num_key_value_heads * cfg.head_dim * elem
    blocks_per_seq = -(-config.max_model_len // config.block_size)
    if config.num_kv_blocks:
        blocks = config.num_kv_blocks
    elif config.device == "cpu" or config.kv_cache_memory_gb:
        budget = (config.kv_cache_memory_gb or 2.0) * GiB
        blocks = min(int(budget // per_block), config.max_num_seqs * blocks_per_seq)
    else:
        blocks = blocks_per_seq
    return blocks * per_block * config.data_parallel_size


def memory_available(device: str) -> tuple[int, int, str]:
    """(bytes free, bytes in all, where it was read) on the device a new group would load on."""
    if device.startswith("cuda"):
        index = device.partition(":")[2] or "0"
        code = f"import torch; f, t = torch.cuda.mem_get_info({index}); print(f, t)"
        try:  # in a child: the launcher itself must not hold a CUDA context
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
            free, total = map(int, out.stdout.split())
            return free, total, "free GPU memory (torch.cuda.mem_get_info)"
        except (ValueError, subprocess.SubprocessError, OSError):
            return 1 << 62, 1 << 62, "unknown (the GPU could not be queried)"
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, 1 << 62, "MemAvailable in /proc/meminfo"
    return 1 << 62, 1 << 62, "unknown"


def check_capacity(config: EngineConfig, what: str) -> None:
    """Raise CapacityError when the group's weights + KV cache + processes cannot fit now.

    On a GPU without an explicit KV budget the worker takes gpu_memory_utilization of the whole
    GPU minus what is in use (other groups included): that, less its weights, must hold one
    full-length sequence."""
    from zeroserve.launcher.model_registry import CapacityError

    weights, kv = weights_bytes(config), kv_bytes(config)
    ranks = config.tensor_parallel_size * config.data_parallel_size
    overhead = (
        PROCESS_OVERHEAD_BYTES["worker"] * ranks
        + PROCESS_OVERHEAD_BYTES["scheduler"] * config.data_parallel_size
        + PROCESS_OVERHEAD_BYTES["tokenizer"] * config.num_tokenizers
    )
    gpu = config.device.startswith("cuda")
    if gpu:
        overhead = 0  # the processes' host memory is not what runs out
    free, total, source = memory_available(config.device)
    if gpu and not (config.num_kv_blocks or config.kv_cache_memory_gb):
        budget = total * config.gpu_memory_utilization - (total - free) - weights
        if budget < kv:
            raise CapacityError(
                f"{what} does not fit: with gpu_memory_utilization {config.gpu_memory_utilization:g} its KV "
                f"cache would get {budget / GiB:.2f} GiB after its weights ({weights / GiB:.2f} GiB) and what "
                f"the GPU already holds ({(total - free) / GiB:.2f} of {total / GiB:.2f} GiB), less than one "
                f"sequence needs ({kv / GiB:.2f} GiB); serve the running versions with a lower "
                "--gpu-memory-utilization, or give this one options.kv_cache_memory_gb, or unload a version first"
            )
        return
    need = weights + kv + overhead
    if need > free:
        raise CapacityError(
            f"{what} does not fit: it needs about {need / GiB:.2f} GiB (weights {weights / GiB:.2f} + KV cache "
            f"{kv / GiB:.2f} + processes {overhead / GiB:.2f}) and {free / GiB:.2f} GiB is available ({source}); "
            "lower its options (kv_cache_memory_gb, num_kv_blocks, max_num_seqs, max_model_len, quantization) "
            "or unload a version first"
        )


# ---------------------------------------------------------------------------- the registry's Groups


class GroupManager:
    """Starts, watches and stops the registry's engine groups on the supervisor's event loop."""

    def __init__(self, base: EngineConfig, root_dir: str, check_memory: bool = True):
        self.base = base
        self.root_dir = root_dir
        self.groups: dict[str, EngineGroup] = {}
        self.pending: dict[str, EngineConfig] = {}  # prepared, not started
        self.registry = None  # set by the supervisor (group events go there)
        self.root_taken = False
        self.accept_root = True  # only groups prepared as the server starts may take the root sockets
        self.check_memory = check_memory
        self.tasks: set[asyncio.Task] = set()

    def prepare(self, model: str, spec: VersionSpec) -> list[str]:
        key = f"{model}@{spec.version}"
        root = self.accept_root and not self.root_taken
        run_dir = self.root_dir if root else os.path.join(self.root_dir, GROUPS_DIR, key)
        config = group_config(self.base, model, spec, run_dir, 0 if root else self._free_slot(key))
        if self.check_memory and not self.accept_root:
            check_capacity(config, key)
        self.root_taken = self.root_taken or root
        self.pending[key] = config
        return list(config.tokenizer_addresses)

    def _free_slot(self, key: str) -> int:
        """The lowest tcp port slot (> 0: 0 is the root sockets') that no live or prepared group
        holds: an unloaded version's slot is taken again, and refused loads take none for good, so
        the ports stay within base_port + a few slots * TCP_PORTS_PER_GROUP however many loads."""
        configs = [g.config for g in self.live_groups()]
        configs += [c for k, c in self.pending.items() if k != key]
        used = {(c.base_port - self.base.base_port) // TCP_PORTS_PER_GROUP for c in configs}
        slot = 1
        while slot in used:
            slot += 1
        return slot

    def build(self, model: str, version: str) -> EngineGroup:
        key = f"{model}@{version}"
        old = self.groups.get(key)
        if old is not None and old.running(("worker", "scheduler", "tokenizer", "registry")):
            raise RuntimeError("its previous processes are still stopping")
        config = self.pending.pop(key)
        if config.run_dir == self.root_dir:
            group = EngineGroup(model, version, config, os.path.join(self.root_dir, "config.json"), None)
        else:
            os.makedirs(os.path.dirname(config.run_dir), mode=0o700, exist_ok=True)
            os.makedirs(config.run_dir, mode=0o700, exist_ok=True)
            os.chmod(config.run_dir, 0o700)
            path = os.path.join(config.run_dir, "config.json")
            write_config(config, path)
            group = EngineGroup(model, version, config, path, config.run_dir)
        self.groups[key] = group
        return group

    def start(self, model: str, spec: VersionSpec) -> None:
        key = f"{model}@{spec.version}"
        group = self.groups.get(key) if key not in self.pending else self.build(model, spec.version)
        group.start()
        self._spawn_task(self.watch(group))

    def stop(self, model: str, version: str) -> None:
        group = self.groups.get(f"{model}@{version}")
        if group is not None and not group.stopping:
            self._spawn_task(self._stop(group))

    def _spawn_task(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def watch(self, group: EngineGroup) -> tuple[str, str | None]:
        """(its key, None once ready or why it failed), told to the registry too."""
        reason, max_model_len = await group.wait_ready()
        if group.stopping:
            return group.key, reason or "stopped"
        if self.registry is not None:
            if reason is None:
                self.registry.group_ready(group.model, group.version, max_model_len)
            else:
                self.registry.group_failed(group.model, group.version, reason)
        return group.key, reason

    async def _stop(self, group: EngineGroup) -> None:
        await group.stop(self.base.model_drain_timeout_s)
        self.registry.group_stopped(group.model, group.version)

    def check(self) -> None:
        for group in self.groups.values():
            if not group.stopping:
                group.check()
                looping = group.restarting_in_a_loop() if self.registry is not None else []
                if looping:
                    names = ", ".join(
                        f"{c.name} (exit codes {', '.join(map(str, c.exit_codes[-3:]))})" for c in looping
                    )
                    self.registry.group_crash_looping(
                        group.model, group.version, f"{names} keeps exiting soon after each restart"
                    )

    def live_groups(self) -> list[EngineGroup]:
        return [
            g
            for g in self.groups.values()
            if not g.stopping or g.running(("worker", "scheduler", "tokenizer", "registry"))
        ]
