"""What choosing a (model, version) costs each request (target: under 20 us).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_version_router.py [--requests 200000]

Times, per request, on a registry of 8 models x 4 versions (2 with traffic) and a virtual model:
the route table's choice by weight (random), by session (sticky: crc32 + bisect), a pinned
NAME@VERSION, a virtual model's rules and fallback chain, and ``Versions.targets`` (the choice
plus the group lookup a handler does), each the median of 5 rounds. The table is rebuilt once
per registry snapshot (at most every 200 ms), so its build time is printed apart.
"""

from __future__ import annotations

import argparse
import statistics
import time

from zeroserve.api_proc.model_router import RouteTable
from zeroserve.api_proc.versions import Group, Versions
from zeroserve.shared.control import ModelEntry, RegistrySnapshot, VersionEntry, VirtualModel, VirtualRule


def registry(models: int = 8, versions: int = 4) -> RegistrySnapshot:
    entries = []
    for m in range(models):
        vs = [
            VersionEntry(
                version=f"v{v}",
                state="ready",
                weight=(70 if v == 0 else 30 if v == 1 else 0),
                path="",
                tokenizer_addresses=[f"ipc:///m{m}v{v}"],
            )
            for v in range(versions)
        ]
        entries.append(ModelEntry(name=f"model-{m}", stable="v0", versions=vs))
    auto = VirtualModel(
        name="auto",
        rules=[
            VirtualRule(model="model-1", tier="gold"),
            VirtualRule(model="model-0", max_prompt_tokens=256),
            VirtualRule(model="model-2", max_tokens_over=512),
        ],
        fallback=["model-3", "model-4"],
    )
    return RegistrySnapshot(epoch=1, models=entries, virtual=[auto], default_model="model-0")


def per_request_us(fn, n: int) -> float:
    rounds = []
    for _ in range(5):
        t = time.perf_counter()
        for i in range(n):
            fn(i)
        rounds.append((time.perf_counter() - t) / n * 1e6)
    return statistics.median(rounds)


class _Config:
    control_address = None
    engine_address = "ipc:///m0v0"
    model_name = "model-0"
    index = 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200_000)
    n = parser.parse_args().requests
    snap = registry()
    t = time.perf_counter()
    table = RouteTable(snap)
    build_us = (time.perf_counter() - t) * 1e6
    sessions = [f"user-{i}" for i in range(1024)]
    tiers = {"X-Tier": "silver"}.get

    versions = Versions(_Config(), client=None, monitor=None)
    versions.snapshot, versions.table = snap, table
    for m in snap.models:
        for v in m.versions:
            versions.groups[(m.name, v.version)] = Group(m.name, v.version, (), None, None, None, owned=False)

    cases = {
        "weighted (random)": lambda i: table.choose("model-3"),
        "sticky session": lambda i: table.choose("model-3", sessions[i & 1023]),
        "pinned NAME@VERSION": lambda i: table.choose("model-3@v2"),
        "virtual (rules + fallback)": lambda i: table.candidates(
            "auto", prompt_tokens=i & 511, max_tokens=300, tier_of=tiers
        ),
        "Versions.targets (choice + group)": lambda i: versions.targets("model-3", sessions[i & 1023]),
    }
    print(f"route table build (8 models x 4 versions, 1 virtual): {build_us:.1f} us per snapshot")
    worst = 0.0
    for name, fn in cases.items():
        us = per_request_us(fn, n)
        worst = max(worst, us)
        print(f"{name:36s} {us:6.2f} us/request")
    print(f"worst {worst:.2f} us/request: {'within' if worst < 20 else 'OVER'} the 20 us target")


if __name__ == "__main__":
    main()
