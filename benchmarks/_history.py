"""What a fault campaign's clients saw, and the checks over it; shared by `faults.py` (agent
pairs) and `faults_cluster.py` (the operator on the local cluster).

Clients write unique keys, and one INCRs a counter, through whatever `Target` the campaign
says is the primary now. After each fault the checker reads every acknowledged key back from
the primary: nothing acknowledged may be missing, the counter must lie between the
acknowledged and the attempted INCRs, and no target may acknowledge a request sent after its
term was taken (a fenced primary).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from support.resp import RespClient, RespError


class Target(Protocol):
    """Where a client writes: one agent (by name) and a way to connect to its guest."""

    @property
    def name(self) -> str: ...

    def client(self, timeout: float = ...) -> RespClient: ...


@dataclass
class History:
    """What the clients saw; shared by their threads."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    acked: dict[str, int] = field(default_factory=dict)  # key -> value
    acked_by: dict[str, str] = field(default_factory=dict)  # key -> the agent that acknowledged it
    attempted_incr: int = 0
    acked_incr: int = 0
    ack_times: list[float] = field(default_factory=list)
    # (agent name, when the request was sent) of every acknowledgement, for the
    # fenced-primary check
    acks_by: list[tuple[str, float]] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    # split-brain probes whose primary was frozen holding the file arbiter's lock (no failover)
    store_blocked: int = 0

    def ack(self, agent: str, sent: float) -> None:
        self.ack_times.append(time.monotonic())
        self.acks_by.append((agent, sent))

    def acks_between(self, start: float, end: float) -> int:
        with self.lock:
            return sum(1 for t in self.ack_times if start <= t <= end)


def client_loop(current: Callable[[], Target | None], name: str, history: History, stop: threading.Event,
                counter: bool, pinned: Target | None = None, reply_timeout: float = 5.0,
                pause: float = 0.0) -> None:
    """Write unique keys `<name>:<n>` (or INCR the counter) through `current()` until `stop`,
    moving to a new target as soon as `current()` names another; `pinned`: through that one
    only, until its connection fails. `pause`: seconds between requests."""
    n = 0
    while not stop.is_set():
        agent = pinned or current()
        if agent is None:
            time.sleep(0.05)
            continue
        try:
            with agent.client(timeout=reply_timeout) as c:
                while not stop.is_set() and (pinned is not None or current() is agent):
                    n += 1
                    sent = time.monotonic()
                    if counter:
                        with history.lock:
                            history.attempted_incr += 1
                        reply = c.call("INCR", "counter")
                        if isinstance(reply, int):
                            with history.lock:
                                history.acked_incr += 1
                                history.ack(agent.name, sent)
                    else:
                        key = f"{name}:{n}"
                        if c.call("SET", key, str(n)) == b"OK":
                            with history.lock:
                                history.acked[key] = n
                                history.acked_by[key] = agent.name
                                history.ack(agent.name, sent)
                    if pause:
                        time.sleep(pause)
        except (OSError, ConnectionError, RespError) as exc:
            with history.lock:
                history.errors[type(exc).__name__] += 1
            if pinned is not None:
                return
            time.sleep(0.05)


def check(client: RespClient, history: History) -> tuple[list[str], str | None]:
    """Lost acknowledged writes, and a counter violation if any, read through `client` (the
    primary's guest)."""
    with history.lock:
        acked = dict(history.acked)
        low = history.acked_incr
    keys = sorted(acked)
    values = client.mget(keys, window=16)
    counter = client.call("GET", "counter")
    with history.lock:
        high = history.attempted_incr
    lost = [k for k, v in zip(keys, values, strict=True) if v != str(acked[k]).encode()]
    value = int(counter) if isinstance(counter, bytes) else 0
    bad = None if low <= value <= high else f"counter {value} outside [{low}, {high}]"
    return lost, bad


def worst_gap(times: list[float], start: float, end: float) -> float:
    """The longest time between `start` and `end` without an acknowledgement."""
    points = sorted(t for t in times if start <= t <= end)
    edges = [start, *points, end]
    return max(b - a for a, b in itertools.pairwise(edges))


def fenced_acks(history: History, fenced: dict[str, float]) -> list[str]:
    """Acknowledgements of requests sent after their agent's term was taken (`fenced`: agent ->
    when, monotonic). Such a request can only have run after it. (Output of an epoch
    acknowledged before the promotion may still reach its client after it, and that is safe.)"""
    with history.lock:
        acks = list(history.acks_by)
    return [f"{agent} acknowledged a request sent {sent - fenced[agent]:.3f}s after its term was taken"
            for agent, sent in acks if agent in fenced and sent > fenced[agent]]


@dataclass
class Tally:
    """The running result of one campaign: faults by kind, keys lost, counter errors, the
    worst unavailability, and the fault it could not recover from, if any."""

    label: str
    planned: int
    by_kind: Counter[str] = field(default_factory=Counter)
    lost: set[str] = field(default_factory=set)
    counter_errors: list[str] = field(default_factory=list)
    unrecovered: str | None = None
    worst: float = 0.0

    def after_fault(self, i: int, kind: str, started: float, history: History,
                    connect: Callable[[], RespClient]) -> bool:
        """Count fault `i` (injected at `started`) and check the history through a client of
        the primary; False when the check could not be made (the campaign ends)."""
        self.by_kind[kind] += 1
        try:
            with connect() as client:
                missing, bad = check(client, history)
        except (OSError, ConnectionError, RespError) as exc:
            self.unrecovered = f"checking after fault {i + 1} ({kind}): {exc!r}"
            return False
        if new := sorted(set(missing) - self.lost):
            with history.lock:
                by = Counter(history.acked_by[k] for k in new)
            print(f"  LOST after fault {i + 1} ({kind}): {len(new)}, acknowledged by {dict(by)}; "
                  f"{new[:10]}", flush=True)
        self.lost.update(missing)
        if bad:
            self.counter_errors.append(f"after fault {i + 1} ({kind}): {bad}")
        with history.lock:
            self.worst = max(self.worst, worst_gap(history.ack_times, started, time.monotonic()))
            acked = len(history.acked)
        print(f"  {self.label} fault {i + 1}/{self.planned}: {kind}, acknowledged {acked}, "
              f"lost {len(self.lost)}", flush=True)
        return True

    def failed(self, i: int, kind: str, exc: Exception) -> None:
        """Fault `i` was not recovered from in time: a finding, and the end of the campaign."""
        self.by_kind[kind] += 1
        self.unrecovered = f"after fault {i + 1} ({kind}): {str(exc).splitlines()[0]}"

    def figures(self, history: History, fenced: dict[str, float]) -> dict[str, Any]:
        return {
            "faults": dict(sorted(self.by_kind.items())), "faults_total": sum(self.by_kind.values()),
            "acknowledged_writes": len(history.acked), "acknowledged_incr": history.acked_incr,
            "attempted_incr": history.attempted_incr, "lost": sorted(self.lost),
            "fenced_acks": fenced_acks(history, fenced), "counter_errors": self.counter_errors,
            "unrecovered": self.unrecovered, "worst_unavailability_s": round(self.worst, 3),
            "client_errors": dict(history.errors),
        }


def summary(label: str, r: dict[str, Any], extra: str = "") -> str:
    """One line: faults by kind, acknowledged, lost, the checks, worst unavailability."""
    kinds = " ".join(f"{k}={v}" for k, v in r["faults"].items())
    return (f"{label}: {r['faults_total']} faults ({kinds}); "
            f"acknowledged {r['acknowledged_writes']} writes + {r['acknowledged_incr']} INCR; "
            f"lost {len(r['lost'])}; fenced acks {len(r['fenced_acks'])}; "
            f"counter errors {len(r['counter_errors'])}; {extra}"
            f"{'NOT RE-PROTECTED ' + r['unrecovered'] + '; ' if r['unrecovered'] else ''}"
            f"worst unavailability {r['worst_unavailability_s']:.2f} s "
            f"(seed {r['seed']}, {r['seconds']:.0f} s)")


def failed(r: dict[str, Any]) -> bool:
    return bool(r["lost"] or r["fenced_acks"] or r["counter_errors"] or r["unrecovered"])
