"""Replicas on the real stack: `--data-parallel-size 2` with the packaged model.

One DP=2 engine serves the whole module (started next to a DP=1 engine, the reference for the
outputs); each replica runs at most two sequences at a time, so a third request waits in its
queue: that is how the kill test has requests that have not started when a worker dies.
The kill test goes last: it leaves the engine with a worker that restarted.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import start_server
from zeroserve.shared.client import EngineClient, EngineError
from zeroserve.shared.messages import SamplingParams

# one core per replica on this 2-core machine; the DP=1 reference runs the same kernels
COMMON = ("--num-threads", "1", "--max-num-seqs", "2", "--max-model-len", "1024")


# ---------------------------------------------------------------- no processes


def test_cores_are_split_between_replicas():
    from zeroserve.gpu_worker.proc import cpu_share

    cores = [0, 1, 2, 3, 4, 5, 6]
    shares = [cpu_share(r, 3, cores) for r in range(3)]
    assert shares == [[0, 1, 2], [3, 4], [5, 6]]
    assert [cpu_share(r, 4, [0, 1]) for r in range(4)] == [[0], [1], [0], [1]]  # more replicas than cores


def test_each_replica_has_its_own_addresses_and_one_replica_keeps_todays(tmp_path):
    from zeroserve.shared.config import EngineConfig

    one = EngineConfig(model="m.gguf", served_model_name="m", run_dir=str(tmp_path))
    assert one.scheduler_address_of(0) == one.scheduler_address and not one.uses_registry
    assert one.routing_policy == "round_robin"
    for transport in ("ipc", "tcp"):
        many = EngineConfig(
            model="m.gguf",
            served_model_name="m",
            run_dir=str(tmp_path),
            data_parallel_size=64,
            transport=transport,
        )
        addresses = [
            *many.tokenizer_addresses,
            many.registry_publish_address,
            many.registry_subscribe_address,
        ]
        for r in range(64):
            addresses += [many.scheduler_address_of(r), many.worker_address_of(r), many.replay_address_of(r)]
        assert len(set(addresses)) == len(addresses), "two sockets share an address"
        assert many.uses_registry and many.routing_policy == "prefix_aware"


def test_the_supervisor_starts_the_bus_and_each_replica_only_when_there_are_several(tmp_path):
    from zeroserve.launcher.supervisor import Supervisor
    from zeroserve.shared.config import EngineConfig

    def children(n: int) -> list[tuple[str, list[str]]]:
        run_dir = tmp_path / f"dp{n}"
        config = EngineConfig(
            model="m.gguf", served_model_name="m", run_dir=str(run_dir), data_parallel_size=n
        )
        sup = Supervisor(config)
        try:
            return [(c.name, c.command[c.command.index("proc") :]) for c in sup.children]
        finally:
            sup.run_dir.clean(config)

    one = children(1)
    assert [name for name, _ in one] == ["worker", "scheduler", "tokenizer", "api"]
    assert not any("--replica" in command for _, command in one)  # the same commands as before
    two = children(2)
    assert [name for name, _ in two] == [
        "registry", "worker-r0", "scheduler-r0", "worker-r1", "scheduler-r1", "tokenizer", "api"
    ]  # fmt: skip
    assert two[3][1][-2:] == ["--replica", "1"] and two[4][1][1] == "scheduler"


# ---------------------------------------------------------------- the real stack


@pytest.fixture(scope="module")
def servers():
    # Both load their models at once. The pool's threads must outlive the servers: a launcher
    # gets SIGTERM when the thread that started it ends (PR_SET_PDEATHSIG is per thread).
    pool = ThreadPoolExecutor(2)
    futures = [
        pool.submit(start_server, "--data-parallel-size", "2", *COMMON, api_key=None),
        pool.submit(start_server, *COMMON, api_key=None),
    ]
    started = []
    try:
        for future in futures:
            started.append(future.result())
        dp2, dp1 = started
        wait_for(lambda: all(r["live"] for r in replicas(dp2)) and len(replicas(dp2)) == 2, 120, "2 replicas")
        yield dp2, dp1
        for server in started:
            assert server.stop() == 0, server.log()
    finally:
        for future in futures:
            if future.done() and future.exception() is None:
                future.result().stop()  # a no-op for a server already stopped
        pool.shutdown()


def replicas(server) -> list[dict]:
    status, body = server.get("/health")
    assert status == 200
    return json.loads(body)["replicas"]


def metrics(server) -> dict[tuple[str, tuple], float]:
    status, raw = server.get("/metrics")
    assert status == 200
    return {
        (s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))): s.value
        for family in text_string_to_metric_families(raw.decode())
        for s in family.samples
    }


def per_replica(samples: dict, name: str, **labels) -> dict[str, float]:
    """{replica: value} of a metric, over the samples with these other labels."""
    out: dict[str, float] = {}
    for (sample_name, sample_labels), value in samples.items():
        got = dict(sample_labels)
        if sample_name == name and all(got.get(k) == v for k, v in labels.items()):
            out[got["replica"]] = out.get(got["replica"], 0.0) + value
    return out


def routed(server) -> dict[str, float]:
    return per_replica(metrics(server), "zeroserve:router_requests_total")


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def grown(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v > before.get(k, 0.0)}


def complete(server, prompts: list[str], max_tokens: int = 16) -> list[list[int]]:
    """Greedy completions of every prompt at once, over ZMQ."""

    async def main():
        async with EngineClient(server.tokenizer_address) as client:
            params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
            jobs = [client.complete(prompt=p, params=params) for p in prompts]
            return await asyncio.wait_for(asyncio.gather(*jobs), 120)

    return [r["token_ids"] for r in asyncio.run(main())]


def test_the_same_prompt_twice_lands_on_the_replica_that_caches_it(servers):
    dp2, _ = servers
    prompt = "Shared prefix test: " + " ".join(f"item {i} is green;" for i in range(60))  # ~300 tokens
    before = routed(dp2)
    complete(dp2, [prompt], max_tokens=4)
    wait_for(lambda: sum(routed(dp2).values()) > sum(before.values()), 10, "the first decision")
    (first,) = grown(before, routed(dp2))
    hits_before = per_replica(metrics(dp2), "zeroserve:prefix_cache_hits_total")

    complete(dp2, [prompt], max_tokens=4)
    wait_for(
        lambda: grown(hits_before, per_replica(metrics(dp2), "zeroserve:prefix_cache_hits_total")),
        10,
        "prefix-cache hits after the repeat",
    )
    samples = metrics(dp2)
    assert grown(before, per_replica(samples, "zeroserve:router_requests_total", reason="prefix")) == {
        first: 1.0
    }, "the repeat was not routed by its prefix to the replica that served it"
    hits = grown(hits_before, per_replica(samples, "zeroserve:prefix_cache_hits_total"))
    assert list(hits) == [first] and hits[first] >= 256, hits  # its cached blocks, on that replica only
    assert samples[("zeroserve:router_matched_prefix_blocks_count", ())] >= 2


def test_greedy_outputs_equal_one_replica(servers):
    dp2, dp1 = servers
    prompts = [f"Question {i}: name a colour and a fruit, then count to ten." for i in range(4)]
    before = routed(dp2)
    got = complete(dp2, prompts)
    assert got == complete(dp1, prompts)
    # /metrics lags the engine by up to a second: wait for all four, so the next test starts clean
    wait_for(lambda: sum(grown(before, routed(dp2)).values()) == 4, 10, "four decisions")
    assert len(grown(before, routed(dp2))) == 2, "the prompts were not spread over both replicas"


def post(server, body: dict, headers: dict | None = None) -> dict:
    req = urllib.request.Request(
        server.base_url + "/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def test_a_session_sticks_to_one_replica(servers):
    dp2, _ = servers
    before = routed(dp2)
    sessions_before = per_replica(metrics(dp2), "zeroserve:router_requests_total", reason="session")
    post(dp2, {"prompt": "Alice asks about trains.", "max_tokens": 2, "user": "alice"})
    wait_for(lambda: sum(routed(dp2).values()) > sum(before.values()), 10, "the first decision")
    (home,) = grown(before, routed(dp2))
    # the header names the same session as the body's `user`; the prompts share no prefix
    for prompt in ("Tell me about boats.", "What do whales eat?"):
        post(dp2, {"prompt": prompt, "max_tokens": 2}, headers={"X-Session-Id": "alice"})
    wait_for(lambda: sum(grown(before, routed(dp2)).values()) == 3, 10, "three decisions")
    sessions = per_replica(metrics(dp2), "zeroserve:router_requests_total", reason="session")
    sessions = grown(sessions_before, sessions)
    assert sessions == {home: 2.0}, sessions


def worker_pid(server, replica: int) -> int:
    for pid in server.children():
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
        if b"proc\0worker\0" in cmdline and f"--replica\0{replica}\0".encode() in cmdline + b"\0":
            return pid
    raise AssertionError(f"no worker of replica {replica} under the launcher")


def test_kill_one_worker_mid_load(servers):
    dp2, _ = servers
    # the running requests are long enough to still run when the kill comes (a decode step of
    # two sequences is ~5 ms here), the queued ones short
    long = SamplingParams(temperature=0, max_tokens=600, ignore_eos=True)
    short = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)

    async def run_one(client, prompt: str, first_token: asyncio.Event, params) -> tuple[str, str | None]:
        """(finish reason, error message) of a streamed request; sets first_token on its first."""
        try:
            async for delta in client.generate(prompt=prompt, params=params):
                if delta.token_ids:
                    first_token.set()
                if delta.error is not None:
                    return "error", delta.error.message
                if delta.finish_reason is not None:
                    return delta.finish_reason, None
        except EngineError as e:
            return "error", e.info.message
        return "no finish", None

    async def main():
        async with EngineClient(dp2.tokenizer_address) as client:
            running = [asyncio.Event() for _ in range(4)]
            first = [
                asyncio.ensure_future(run_one(client, f"Running story {i}: once upon a time", e, long))
                for i, e in enumerate(running)
            ]  # two per replica: each runs two at most
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in running)), 60)
            queued = [asyncio.Event() for _ in range(4)]
            later = [
                asyncio.ensure_future(run_one(client, f"Queued story {i}: in a land far away", e, short))
                for i, e in enumerate(queued)
            ]
            # a victim that holds both running requests and waiting ones
            deadline = time.monotonic() + 10
            while not any(r["waiting"] and r["running"] for r in replicas(dp2)):
                assert time.monotonic() < deadline, replicas(dp2)
                await asyncio.sleep(0.1)
            victim = next(int(r["id"][1:]) for r in replicas(dp2) if r["waiting"] and r["running"])
            assert not any(e.is_set() for e in queued), "a queued request started before the kill"
            os.kill(worker_pid(dp2, victim), signal.SIGKILL)
            done = await asyncio.wait_for(asyncio.gather(*first, *later), 120)  # nothing hangs
            return victim, done[:4], done[4:]

    failovers_before = metrics(dp2).get(("zeroserve:router_failovers_total", ()), 0.0)
    victim, first, later = asyncio.run(main())
    for reason, message in first + later:
        assert reason == "length" or (reason == "error" and "worker" in message), (reason, message)
    assert [r for r, _ in later] == ["length"] * 4, "a request that had not started was not served elsewhere"
    assert [r for r, _ in first].count("error") >= 1, "the victim's running requests did not fail"
    assert metrics(dp2)[("zeroserve:router_failovers_total", ())] > failovers_before

    # the supervisor restarts the worker; the replica rejoins the rotation and serves again
    wait_for(lambda: all(r["live"] for r in replicas(dp2)), 90, f"replica r{victim} to rejoin")
    before = routed(dp2)
    complete(dp2, [f"After the restart {i}: the weather is" for i in range(4)], max_tokens=8)
    wait_for(lambda: f"r{victim}" in grown(before, routed(dp2)), 10, f"a request routed to r{victim}")
