"""FileArbiter between real processes: one holder per term, fencing order, terms only go up.

Each agent is a separate Python process driving a FileArbiter on a shared
file and printing what it did as JSON lines, timed with CLOCK_MONOTONIC (one
clock for every process of the host, so the test can order events across
processes). Assertions are about order, never about speed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

LEASE = 1.0  # seconds; margin is the default fifth

DRIVER = textwrap.dedent(
    """
    import asyncio, json, sys, time
    from colo_agent.arbiter.base import TermTooLow
    from colo_agent.arbiter.local import FileArbiter

    def say(**event):
        event["t"] = time.monotonic()
        print(json.dumps(event), flush=True)

    class Traced(FileArbiter):
        async def _swap(self, expected, term, holder, floor=0):
            start = time.monotonic()
            written = await super()._swap(expected, term, holder, floor)
            say(event="swap", start=start, term=term, holder=holder, ok=written is not None)
            return written

    async def sleep_until(deadline):
        await asyncio.sleep(max(0.0, deadline - time.monotonic()))

    async def holder(path, identity, term, renewals, lease):
        a = Traced(path, identity, lease)
        assert await a.wait_acquire(term, timeout=30)
        say(event="acquired", term=term, valid_until=a.valid_until)
        n = 0
        while (renewals < 0 or n < renewals) and a.holding:
            start = time.monotonic()
            ok = await a.renew()
            say(event="renewed", ok=ok, start=start, valid_until=a.valid_until)
            n += 1
            await asyncio.sleep(a.renew_interval)
        # Stop renewing, as a primary cut off from the store would, and watch the lease run out.
        while a.is_valid():
            await asyncio.sleep(0.001)
        say(event="invalid", valid_until=a.valid_until)
        line = sys.stdin.readline()  # the test says when to try again
        ok = await a.renew()
        say(event="renew-again", ok=ok, holding=a.holding, term=a.term, holder=a.holder)
        try:
            await a.acquire(int(line))
            say(event="reacquire", ok=True)
        except TermTooLow as exc:
            say(event="reacquire", ok=False, error=str(exc))

    async def taker(path, identity, term, lease):
        b = Traced(path, identity, lease)
        await b.observe()
        say(event="watching")
        ok = await b.wait_acquire(term, timeout=30, poll=0.01)
        say(event="acquired" if ok else "gave-up", term=b.term, valid_until=b.valid_until)

    async def racer(paths, identity, start, step, lease):
        await sleep_until(start)
        for i, path in enumerate(paths):
            await sleep_until(start + i * step)
            b = FileArbiter(path, identity, lease)
            try:
                ok = await b.acquire(1)
            except TermTooLow:
                ok = False
            say(event="race", round=i, won=ok)

    mode, args = sys.argv[1], json.loads(sys.argv[2])
    asyncio.run({"holder": holder, "taker": taker, "racer": racer}[mode](**args))
    """
)


class Agent:
    def __init__(self, driver: Path, mode: str, **args: Any) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(driver), mode, json.dumps(args)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.events: list[dict[str, Any]] = []

    def next(self, event: str, timeout: float = 60.0) -> dict[str, Any]:
        """Read lines until `event` (the process's stdout is line-buffered JSON)."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                err = self.proc.stderr.read() if self.proc.stderr else ""
                raise AssertionError(f"agent exited before {event!r}: {err}")
            record = json.loads(line)
            self.events.append(record)
            if record["event"] == event:
                return record
        raise AssertionError(f"no {event!r} within {timeout} s")

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream:
                stream.close()


@pytest.fixture
def driver(tmp_path: Path) -> Path:
    path = tmp_path / "driver.py"
    path.write_text(DRIVER)
    return path


@pytest.fixture
def agents() -> Iterator[list[Agent]]:
    started: list[Agent] = []
    yield started
    for agent in started:
        agent.stop()


def holder_writes(events: list[dict[str, Any]], identity: str) -> list[float]:
    """Start times of every write that made `identity` the holder (taking or renewing)."""
    return [e["start"] for e in events if e["event"] == "swap" and e["ok"] and e["holder"] == identity]


def holder_deadlines(events: list[dict[str, Any]]) -> list[float]:
    """Every `valid_until` the holder reported after a successful acquire or renewal."""
    return [
        e["valid_until"] for e in events if e["event"] == "acquired" or (e["event"] == "renewed" and e["ok"])
    ]


def taking_swap(events: list[dict[str, Any]], term: int) -> dict[str, Any]:
    [swap] = [e for e in events if e["event"] == "swap" and e["ok"] and e["term"] == term]
    return swap


def assert_fenced(holder_events: list[dict[str, Any]], taker_swap: dict[str, Any]) -> None:
    """The taker's write began a full lease after each of the holder's writes began, and
    after every validity the holder reported had run out. Holds whatever the scheduling
    delays: they can only make the taker later or the holder's validity shorter."""
    writes = holder_writes(holder_events, "pod-a")
    deadlines = holder_deadlines(holder_events)
    assert writes and deadlines
    for start in writes:
        assert taker_swap["start"] >= start + LEASE
    for valid_until in deadlines:
        assert taker_swap["start"] > valid_until


def test_handover_after_the_holder_stops_renewing(driver: Path, tmp_path: Path, agents: list[Agent]) -> None:
    record = tmp_path / "vm.arbiter"
    holder = Agent(driver, "holder", path=str(record), identity="pod-a", term=1, renewals=8, lease=LEASE)
    agents.append(holder)
    holder.next("acquired")
    taker = Agent(driver, "taker", path=str(record), identity="pod-b", term=2, lease=LEASE)
    agents.append(taker)
    taker.next("watching")
    invalid = holder.next("invalid")
    got = taker.next("acquired")
    assert got["term"] == 2

    swap = taking_swap(taker.events, 2)
    assert_fenced(holder.events, swap)
    assert invalid["valid_until"] < swap["start"]

    # The old holder comes back: it cannot renew, learns the new term, cannot go back.
    holder.send("2")
    again = holder.next("renew-again")
    assert again == {**again, "ok": False, "holding": False, "term": 2, "holder": "pod-b"}
    reacquire = holder.next("reacquire")
    assert not reacquire["ok"] and "not above the arbiter's term 2" in reacquire["error"]
    doc = json.loads(record.read_text())
    assert (doc["term"], doc["holder"]) == (2, "pod-b")


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "stopped"])
def test_a_lost_holder_is_replaced_only_after_its_lease(
    driver: Path, tmp_path: Path, agents: list[Agent], how: signal.Signals
) -> None:
    record = tmp_path / "vm.arbiter"
    holder = Agent(driver, "holder", path=str(record), identity="pod-a", term=1, renewals=-1, lease=LEASE)
    agents.append(holder)
    holder.next("acquired")
    taker = Agent(driver, "taker", path=str(record), identity="pod-b", term=2, lease=LEASE)
    agents.append(taker)
    taker.next("watching")
    for _ in range(5):
        holder.next("renewed")
    os.kill(holder.proc.pid, how)
    taker.next("acquired")
    swap = taking_swap(taker.events, 2)
    if how == signal.SIGSTOP:
        os.kill(holder.proc.pid, signal.SIGCONT)
        # The continued holder fails its next renewal for good: its term is gone, so it
        # stops renewing and watches its lease run out.
        holder.next("invalid")
        assert any(e["event"] == "renewed" and not e["ok"] for e in holder.events)
    # Every validity the holder printed (a subset of what it had, never a superset) ended
    # before the taker's write began.
    assert_fenced(holder.events, swap)
    doc = json.loads(record.read_text())
    assert (doc["term"], doc["holder"]) == (2, "pod-b")


def test_of_racing_takers_exactly_one_wins_each_time(
    driver: Path, tmp_path: Path, agents: list[Agent]
) -> None:
    rounds, racers = 12, 3
    paths = [str(tmp_path / f"round-{i}.arbiter") for i in range(rounds)]
    # Start far enough ahead for every interpreter to be up, on the host's shared monotonic clock.
    start = time.monotonic() + 5.0
    for n in range(racers):
        agents.append(
            Agent(driver, "racer", paths=paths, identity=f"pod-{n}", start=start, step=0.05, lease=LEASE)
        )
    results: dict[int, list[bool]] = {i: [] for i in range(rounds)}
    for agent in agents:
        for _ in range(rounds):
            event = agent.next("race")
            results[event["round"]].append(event["won"])
    for i, outcomes in results.items():
        assert outcomes.count(True) == 1, f"round {i}: {outcomes}"
        holder = json.loads(Path(paths[i]).read_text())["holder"]
        [winner] = [n for n, a in enumerate(agents) if any(e["round"] == i and e["won"] for e in a.events)]
        assert holder == f"pod-{winner}"
