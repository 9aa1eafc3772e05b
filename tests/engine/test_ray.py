"""`--distributed-executor-backend ray` on the real stack: a local Ray cluster started by this
module (ray.cluster_utils: a head node with no CPUs, and one node of 2 CPUs with a 80 MB object
store, no dashboard), and `zeroserve serve --data-parallel-size 2` joining it: one replica actor
per CPU, both on that node.

The tests run in order on one engine: both replicas serve; one actor is killed and comes back;
the node is lost and both replicas come back on a new one; the engine stops and leaves no
actor, placement group or process behind.
"""

from __future__ import annotations

import json
import os
import time

import pytest

ray = pytest.importorskip("ray", reason="the ray backend needs Ray: pip install 'zeroserve[ray]'")

from ray.cluster_utils import Cluster  # noqa: E402

from tests.conftest import start_server  # noqa: E402
from tests.engine.test_data_parallel import routed, wait_for  # noqa: E402
from zeroserve.launcher.ray_executor import NAMESPACE  # noqa: E402

COMMON = ("--num-threads", "1", "--max-num-seqs", "2", "--max-model-len", "1024", "--routing", "round_robin")
NODE = {"num_cpus": 2, "object_store_memory": 80 * 1024 * 1024}


@pytest.fixture(scope="module")
def cluster():
    head = {
        "num_cpus": 0,  # replicas go to the worker node, which the node test takes away
        "include_dashboard": False,
        **{k: v for k, v in NODE.items() if k != "num_cpus"},
        # a lost node is noticed in ~2 s (default: ~30 s)
        "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 4},
    }
    c = Cluster(initialize_head=True, head_node_args=head)
    state = {"cluster": c, "node": c.add_node(**NODE)}
    try:
        ray.init(address=c.address, namespace="zeroserve-tests", log_to_driver=False)
        yield state
    finally:
        ray.shutdown()
        c.shutdown()


@pytest.fixture(scope="module")
def engine(cluster, gguf_path):
    server = start_server(
        "--data-parallel-size", "2", "--distributed-executor-backend", "ray",
        "--ray-address", cluster["cluster"].address, *COMMON, api_key=None,
    )  # fmt: skip
    state = {"server": server, "names": [f"{os.path.basename(server.run_dir)}-r{r}" for r in range(2)]}
    try:
        wait_for(lambda: live(server) == ["r0", "r1"], 120, "both replicas live")
        yield state
    finally:
        server.stop()


def live(server) -> list[str]:
    status, body = server.get("/health")
    return sorted(r["id"] for r in json.loads(body)["replicas"] if r["live"]) if status == 200 else []


def actor_info(name: str, timeout: float = 60.0) -> dict:
    """Its answer once it is alive (a call to an actor Ray is restarting fails, and is asked again)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return ray.get(ray.get_actor(name, namespace=NAMESPACE).info.remote(), timeout=timeout)
        except ray.exceptions.ActorUnavailableError:
            assert time.monotonic() < deadline, f"actor {name} did not come back in {timeout:.0f}s"
            time.sleep(0.2)


def complete(server, n: int) -> None:
    for i in range(n):
        status, body = server.post(
            "/v1/completions", {"prompt": f"Count to {i}:", "max_tokens": 3, "temperature": 0}
        )
        assert status == 200 and body["choices"][0]["text"], body


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_both_replicas_run_as_actors_and_serve(engine):
    server = engine["server"]
    infos = [actor_info(name) for name in engine["names"]]
    for info in infos:  # a scheduler and a worker each, alive, children of the actor
        assert len(info["process_pids"]) == 2 and all(pid_alive(p) for p in info["process_pids"])
        # at the launcher's priority, not at the niceness Ray gives its workers (15)
        assert {os.getpriority(os.PRIO_PROCESS, p) for p in info["process_pids"]} == {
            os.getpriority(os.PRIO_PROCESS, 0)
        }
    engine["pids"] = [p for info in infos for p in info["process_pids"]]
    before = routed(server)
    complete(server, 4)
    wait_for(lambda: sum(routed(server).values()) >= sum(before.values()) + 4, 10, "the routing metrics")
    grown = {r: v - before.get(r, 0.0) for r, v in routed(server).items()}
    assert grown.get("r0", 0) >= 1 and grown.get("r1", 0) >= 1, grown  # round robin: both served


def test_a_killed_actor_is_placed_again_and_rejoins(engine):
    server = engine["server"]
    old = actor_info(engine["names"][1])
    ray.kill(ray.get_actor(engine["names"][1], namespace=NAMESPACE), no_restart=False)
    # its processes go with it (they die with the thread that started them), none is orphaned
    wait_for(lambda: not any(pid_alive(p) for p in old["process_pids"]), 20, "the killed replica's processes")
    new = actor_info(engine["names"][1])  # Ray restarted it in its placement group
    assert new["pid"] != old["pid"] and set(new["process_pids"]).isdisjoint(old["process_pids"])
    engine["pids"] += new["process_pids"]
    # out of rotation until its new worker is ready (the routers may not have noticed the kill yet)
    wait_for(lambda: live(server) == ["r0"], 30, "r1 out of rotation")
    wait_for(lambda: live(server) == ["r0", "r1"], 60, "r1 back in rotation")
    served_by_r1(server)


def served_by_r1(server, timeout: float = 30.0) -> None:
    """Requests (round robin over the live replicas) until one is served by r1."""
    before = routed(server).get("r1", 0.0)
    deadline = time.monotonic() + timeout
    while routed(server).get("r1", 0.0) == before:
        assert time.monotonic() < deadline, f"no request went to r1 in {timeout:.0f}s: {routed(server)}"
        complete(server, 2)


def test_replicas_lost_with_their_node_are_placed_on_a_new_one_and_rejoin(engine, cluster):
    server = engine["server"]
    old = [actor_info(name) for name in engine["names"]]
    cluster["cluster"].remove_node(cluster["node"], allow_graceful=False)
    wait_for(lambda: live(server) == [], 30, "both replicas out of rotation")
    assert server.get("/ready")[0] == 503  # no replica left to serve
    wait_for(lambda: not any(pid_alive(p) for o in old for p in o["process_pids"]), 30, "the lost processes")

    cluster["node"] = cluster["cluster"].add_node(**NODE)  # capacity returns
    new = [actor_info(name, timeout=120) for name in engine["names"]]
    assert all(n["node_id"] != o["node_id"] for n, o in zip(new, old, strict=True))
    engine["pids"] += [p for n in new for p in n["process_pids"]]
    wait_for(lambda: live(server) == ["r0", "r1"], 90, "both replicas back in rotation")
    before = routed(server).get("r0", 0.0)
    served_by_r1(server)
    complete(server, 2)  # round robin: the next one goes to r0
    wait_for(lambda: routed(server).get("r0", 0.0) > before, 10, "a request served by r0")


def test_shutdown_leaves_no_actor_placement_group_or_process(engine):
    server = engine["server"]
    assert server.stop() == 0, server.log()
    for name in engine["names"]:
        with pytest.raises(ValueError):
            ray.get_actor(name, namespace=NAMESPACE)
    groups = {g["name"]: g["state"] for g in ray.util.placement_group_table().values()}
    assert all(groups[name] == "REMOVED" for name in engine["names"]), groups
    assert engine["pids"] and not [p for p in engine["pids"] if pid_alive(p)]
    assert "zeroserve: stopped; every process exited cleanly" in server.log()
