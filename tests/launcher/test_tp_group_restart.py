"""The supervisor's restart of a tensor-parallel group (launcher/engine_groups.ProcessSet), on
real child processes: when one rank dies, the others get TP_EXIT_GRACE_S to exit by themselves
(rank 0 first tells its scheduler why) and are killed only after it; no rank restarts while
another of its group still runs; only the rank that died counts as an exit."""

from __future__ import annotations

import sys
import time

import pytest

from zeroserve.launcher import engine_groups
from zeroserve.launcher.engine_groups import Child, ProcessSet


def sleeper(seconds: float) -> list[str]:
    return [sys.executable, "-c", f"import time; time.sleep({seconds})"]


@pytest.fixture
def group(monkeypatch):
    monkeypatch.setattr(engine_groups, "TP_EXIT_GRACE_S", 1.5)
    ranks = [
        Child("worker", 0, sleeper(1.5), replica=0),  # exits by itself, within the grace
        Child("worker", 1, sleeper(60), replica=0),  # killed by the test
        Child("worker", 2, sleeper(60), replica=0),  # stuck: killed after the grace
    ]
    procs = ProcessSet(ranks, env={}, tensor_parallel_size=3)
    procs.start()
    yield procs, ranks
    for c in ranks:
        if c.popen is not None:
            c.popen.kill()
            c.popen.wait()


def test_a_dead_rank_gives_the_others_a_grace_then_the_group_restarts_whole(group):
    procs, ranks = group
    first = [c.popen for c in ranks]
    time.sleep(0.5)
    first[1].kill()
    died_at = time.monotonic()
    lived: dict[int, float] = {}  # rank -> when it was last seen running (first generation)
    restarted_at = None
    while time.monotonic() - died_at < 10 and restarted_at is None:
        procs.check()
        now = time.monotonic()
        for i, (c, p) in enumerate(zip(ranks, first)):
            if c.popen is p and p.poll() is None:
                lived[i] = now
            if c.popen is not None and c.popen is not p:
                restarted_at = now
                # a new generation starts only once every rank of the old one is gone
                assert all(q.poll() is not None for q in first), [q.poll() for q in first]
        time.sleep(0.05)
    assert restarted_at is not None, "the group was not restarted"
    assert first[0].returncode == 0  # rank 0 exited by itself: not killed
    assert first[2].returncode == -9  # rank 2 did not: killed, and only after the grace
    assert lived[2] - died_at >= 1.3, lived
    assert [len(c.exit_codes) for c in ranks] == [0, 1, 0]  # the broken group counts one exit
    assert all(c.popen is not None for c in ranks)  # the whole group again
