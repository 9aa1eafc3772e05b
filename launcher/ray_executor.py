"""`--distributed-executor-backend ray`: the replicas placed on a Ray cluster as actors.

The front end (api, tokenizers, the registry bus) stays where `zeroserve serve` runs, under its
own supervisor. Each replica (``--data-parallel-size``) becomes one placement group of
``--tensor-parallel-size`` bundles, packed on one node (STRICT_PACK), and one ``ReplicaActor``
in bundle 0 that runs the replica's processes with the same commands as on one machine::

    zeroserve serve (Ray driver) ── api, tokenizers, registry bus        (subprocesses, as with mp)
      └─ RayExecutor: per replica r
           placement group "r": [rank 0 bundle, rank 1 bundle, ...]      STRICT_PACK: one node
             ReplicaActor r (bundle 0) ── zeroserve proc scheduler --replica r
                                       └─ zeroserve proc worker --index RANK --replica r  (x TP)
             _RankHolder (bundles 1..), GPU only: holds a GPU so its id can be handed to a rank

Ray starts, places, restarts and stops the actors; it never carries a request. The processes
meet as on one machine, msgspec over ZeroMQ: tcp with CURVE between nodes (every process
reads the engine's keys from the config the launcher wrote; a replica's processes get it on
stdin, so no key lies on a remote node's disk), ipc in the run dir when the transport is ipc
(every replica then kept on the launcher's node). Ray pickles only its actor calls' arguments
and answers: the config as msgspec JSON bytes, the forwarded environment (strings), the
placement group, numbers (pids, exit codes).

Failure: a replica's dead process is restarted inside its actor with backoff (a dead rank
takes its whole TP group down and up again, as ``launcher/supervisor.py`` does); a dead actor
(killed, or lost with its node) is restarted by Ray (``max_restarts=-1``) in its placement
group, which Ray re-places on a node with room when the old one is gone. The new scheduler
announces itself on the registry bus and the routers take it back into rotation.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass
from typing import Any

import msgspec
import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from zeroserve.launcher.replica_processes import STOP_TIMEOUT_S, ReplicaProcesses
from zeroserve.shared.config import EngineConfig

log = logging.getLogger("zeroserve.launcher.ray")

NAMESPACE = "zeroserve"
# a local cluster started for `serve`: the object store is never used (requests go over ZeroMQ)
LOCAL_OBJECT_STORE_BYTES = 128 * 1024 * 1024
# driver variables the replicas' processes get too, as a child of `serve` would (the rest of
# their environment is their node's: Ray's own OMP_NUM_THREADS=1 is dropped, not inherited)
FORWARDED_ENV_PREFIXES = ("ZEROSERVE_", "OMP_", "GOMP_", "OTEL_", "TRITON_")


def rank_resources(config: EngineConfig) -> dict[str, float]:
    """What one TP rank reserves: a GPU (and a CPU to drive it), or its CPU threads."""
    if config.device.startswith("cuda"):
        return {"CPU": 1.0, "GPU": 1.0}
    return {"CPU": float(max(config.num_threads, 1))}


def replica_bundles(config: EngineConfig, pin_node_ip: str | None = None) -> list[dict[str, float]]:
    """One bundle per TP rank (STRICT_PACK keeps them on one node). ``pin_node_ip``: every
    bundle on that node (Ray's ``node:IP`` resource), for ipc sockets, which do not cross machines."""
    bundle = rank_resources(config)
    if pin_node_ip is not None:
        bundle[f"node:{pin_node_ip}"] = 0.001
    return [dict(bundle) for _ in range(config.tensor_parallel_size)]


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def with_cluster_addresses(config: EngineConfig, node_ip: str) -> EngineConfig:
    """The launcher's config, with the registry bus at an address a replica on any node reaches.

    Replicas bind on their own node (``node_config``), so they cannot derive the bus's address
    from ``bind_host`` as local processes do; it is written out. On 0.0.0.0 the bus is reached
    through this machine's address."""
    if config.transport != "tcp" or config.registry_address is not None:
        return config
    host = node_ip if config.bind_host in ("0.0.0.0", "::", "*") else config.bind_host
    return msgspec.structs.replace(config, registry_address=f"tcp://{host}:{config.base_port + 70}")


def node_config(config: EngineConfig, node_ip: str) -> EngineConfig:
    """A replica's config on the node Ray put it on: with tcp, its sockets bind on that node's
    address (announced to the routers on the bus); on loopback (one machine) as configured."""
    if config.transport != "tcp" or is_loopback(config.bind_host):
        return config
    return msgspec.structs.replace(config, bind_host=node_ip)


def actor_name(config: EngineConfig, replica: int) -> str:
    """Unique per engine (its run dir) and replica, so several engines can share a cluster."""
    return f"{os.path.basename(config.run_dir)}-r{replica}"


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A cluster address (HOST:PORT) that does not answer is refused at once: ray.init would
    keep retrying it for minutes, deaf to SIGTERM meanwhile."""
    if address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as e:
        raise SystemExit(
            f"zeroserve: no Ray cluster answers at --ray-address {address} ({e}); start one with "
            f"`ray start --head`, or leave --ray-address out for a local one"
        ) from None


# ------------------------------------------------------------------------------ on the node (processes:
# launcher/replica_processes.py)


def _node_env(driver_env: dict[str, str]) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    environ.update(driver_env)
    environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    environ.pop("PROMETHEUS_MULTIPROC_DIR", None)  # only api processes write metrics files
    return environ


def _renice(niceness: int) -> None:
    """Back to the launcher's priority: Ray starts its workers at niceness 15 (its
    ``worker_niceness``), which a replica's processes would inherit, and a loaded node would
    then starve the model worker of CPU until its heartbeats stop. Linux keeps niceness per
    thread, and a thread or process inherits its creator's: this runs before the thread that
    starts the processes."""
    try:
        if os.getpriority(os.PRIO_PROCESS, 0) > niceness:
            os.setpriority(os.PRIO_PROCESS, 0, niceness)
    except PermissionError:
        log.warning(
            "this replica runs at Ray's worker niceness %d (lowering it needs CAP_SYS_NICE); start the "
            "nodes with RAY_worker_niceness=%d in the environment of `ray start` to avoid it",
            os.getpriority(os.PRIO_PROCESS, 0),
            niceness,
        )


@ray.remote(num_cpus=0)
class _RankHolder:
    """Holds the GPU of one rank's bundle (ranks 1..TP-1) for as long as its replica lives."""

    def gpu_ids(self) -> list[str]:
        return [str(i) for i in ray.get_gpu_ids()]


@ray.remote
class ReplicaActor:
    """One replica on the node of its placement group; restarted by Ray when it dies."""

    def __init__(
        self, config_json: bytes, replica: int, driver_env: dict[str, str], niceness: int, pg: Any
    ) -> None:
        from zeroserve.shared.proc_main import setup_logging

        config = msgspec.json.decode(config_json, type=EngineConfig)
        setup_logging(f"ray-replica r{replica}", config.log_format)
        logging.getLogger().setLevel(logging.INFO)
        self.node_ip = ray.util.get_node_ip_address()
        if not os.path.exists(config.model):
            raise RuntimeError(
                f"replica {replica}: the model {config.model} is not on node {self.node_ip}; every node "
                f"needs it at the same path (a shared file system, or a copy)"
            )
        _renice(niceness)
        env = _node_env(driver_env)
        self.holders: list[Any] = []
        gpus = [str(i) for i in ray.get_gpu_ids()]
        if gpus:
            # the group's GPUs, rank order: this actor's, then each holder's (owned by this actor,
            # so they go when it goes and come back when Ray restarts it)
            self.holders = [
                _RankHolder.options(
                    num_gpus=1, scheduling_strategy=PlacementGroupSchedulingStrategy(pg, bundle)
                ).remote()
                for bundle in range(1, config.tensor_parallel_size)
            ]
            for ids in ray.get([h.gpu_ids.remote() for h in self.holders]):
                gpus += ids
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
        self.replica = replica
        self.processes = ReplicaProcesses.of_replica(node_config(config, self.node_ip), replica, env)
        log.info("replica %d placed on node %s (pid %d)", replica, self.node_ip, os.getpid())

    def info(self) -> dict[str, Any]:
        """Where this replica runs: the node, the actor's pid, its processes' pids."""
        return {
            "node_id": ray.get_runtime_context().get_node_id(),
            "node_ip": self.node_ip,
            "pid": os.getpid(),
            "process_pids": self.processes.pids(),
        }

    def stop(self) -> dict[str, list[int]]:
        return self.processes.stop()


# ------------------------------------------------------------------------------ the driver


@dataclass
class _Placed:
    replica: int
    pg: Any
    actor: Any
    ready_ref: Any = None  # a pending info() call: its answer, or its error, tells the actor's state
    failed: str | None = None  # why the actor is dead for good (Ray will not restart it)
    noted_pending_at: float = 0.0
    checked_at: float = 0.0


class RayExecutor:
    """The replicas of one engine on a Ray cluster: placed at ``start``, watched by ``check``,
    stopped by ``stop``. The launcher is the Ray driver; its actors die with it."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.placed: list[_Placed] = []
        self.started_at = 0.0
        self.driver_ip: str | None = None

    @staticmethod
    def cluster_config(config: EngineConfig) -> EngineConfig:
        """The config the whole engine runs with (written before any process starts)."""
        return with_cluster_addresses(config, ray.util.get_node_ip_address())

    def connect(self) -> None:
        """Join the cluster at ``--ray-address``, or start a local one (small: no dashboard, a
        small object store) when none is given."""
        # ray.init puts its own SIGTERM/SIGINT handlers in place of the launcher's drain
        handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
        address = self.config.ray_address
        local = address is None or address == "local"
        if not local:
            check_reachable(address)
        try:
            ray.init(
                address="local" if local else address,
                namespace=NAMESPACE,
                include_dashboard=False if local else None,
                object_store_memory=LOCAL_OBJECT_STORE_BYTES if local else None,
                configure_logging=False,
                log_to_driver=True,
            )
        except (ConnectionError, RuntimeError, ray.exceptions.RayError) as e:
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            if local:
                raise SystemExit(f"zeroserve: cannot start a local Ray instance: {why}") from None
            raise SystemExit(
                f"zeroserve: cannot join the Ray cluster at --ray-address {address}: {why} (a cluster "
                f"started by `ray start` uses token authentication: this machine needs RAY_AUTH_MODE=token "
                f"and the cluster's token too, see docs/distributed.md)"
            ) from None
        finally:
            for sig, handler in handlers.items():
                if handler is not None:
                    signal.signal(sig, handler)
        self.driver_ip = ray.util.get_node_ip_address()
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        log.info(
            "Ray: %s cluster of %d node(s), resources %s",
            "a new local" if local else f"the {address}",
            len(nodes),
            ray.cluster_resources(),
        )

    def start(self) -> None:
        self.connect()
        self.started_at = time.monotonic()
        driver_env = {
            k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES) or k == "PATH"
        }
        pin = self.driver_ip if self.config.transport == "ipc" else None
        if pin is not None and len([n for n in ray.nodes() if n.get("Alive")]) > 1:
            log.warning(
                "transport ipc: every replica stays on this node (%s); use --transport tcp to spread", pin
            )
        config_json = msgspec.json.encode(self.config)
        for r in range(self.config.data_parallel_size):
            name = actor_name(self.config, r)
            bundles = replica_bundles(self.config, pin)
            pg = placement_group(bundles, strategy="STRICT_PACK", name=name)
            actor = ReplicaActor.options(
                name=name,
                namespace=NAMESPACE,
                max_restarts=-1,  # lost with its node: back when Ray finds room for its group again
                max_task_retries=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0),
                **_actor_resources(bundles[0]),
            ).remote(config_json, r, driver_env, os.getpriority(os.PRIO_PROCESS, 0), pg)
            self.placed.append(_Placed(r, pg, actor))
            log.info(
                "replica %d: placement group of %d bundle(s) %s, STRICT_PACK", r, len(bundles), bundles[0]
            )

    def check(self) -> None:
        """Non-blocking: note replicas Ray cannot place, and actors dead for good (a creation error)."""
        now = time.monotonic()
        for p in self.placed:
            if p.failed is not None or now - p.checked_at < 1.0:
                continue
            p.checked_at = now
            if p.ready_ref is None:
                p.ready_ref = p.actor.info.remote()
                continue
            done, _ = ray.wait([p.ready_ref], timeout=0)
            if not done:
                if now - max(self.started_at, p.noted_pending_at) > 30:
                    p.noted_pending_at = now
                    log.warning(
                        "replica %d is not placed yet: Ray needs %s on one node (see `ray status`)",
                        p.replica,
                        replica_bundles(self.config),
                    )
                continue
            p.ready_ref = None
            try:
                ray.get(done[0])
            except ray.exceptions.ActorDiedError as e:
                p.failed = str(e).strip().splitlines()[-1][:500]
                log.error("replica %d failed for good: %s", p.replica, p.failed)
            except ray.exceptions.RayActorError:
                pass  # restarting: Ray brings it back
            p.noted_pending_at = now

    @property
    def failed(self) -> list[str]:
        return [f"replica r{p.replica} ({p.failed})" for p in self.placed if p.failed is not None]

    def stop(self) -> bool:
        """Stop every replica's processes, then the actors and placement groups; disconnect.
        True when every process exited 0."""
        if not ray.is_initialized():
            return True
        clean = True
        refs = {p.replica: p.actor.stop.remote() for p in self.placed if p.failed is None}
        for replica, ref in refs.items():
            try:
                codes = ray.get(ref, timeout=STOP_TIMEOUT_S + 10)
            except (ray.exceptions.RayError, TimeoutError) as e:
                log.error("replica %d did not stop cleanly: %s", replica, type(e).__name__)
                clean = False
                continue
            for group, exits in codes.items():
                if any(code != 0 for code in exits):
                    log.error("%s exited with codes %s", group, exits)
                    clean = False
        for p in self.placed:
            ray.kill(p.actor, no_restart=True)
            remove_placement_group(p.pg)
        self.placed = []
        ray.shutdown()
        return clean


def _actor_resources(bundle: dict[str, float]) -> dict[str, Any]:
    """The actor takes all of bundle 0: rank 0's CPUs (and GPU)."""
    out: dict[str, Any] = {"num_cpus": bundle.get("CPU", 0.0)}
    if bundle.get("GPU"):
        out["num_gpus"] = bundle["GPU"]
    return out
