"""What the operator's end-to-end tests share: waiting, helm, and a small RESP client."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "colo-operator"
RELEASE, RELEASE_NAMESPACE = "colo", "colo-system"
T = TypeVar("T")


def wait_for(predicate: Callable[[], T | None], timeout: float, what: str, interval: float = 0.25) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def helm(cluster: Any, *args: str) -> subprocess.CompletedProcess[str]:
    from cluster import build

    binary = build.bin_dir() / "helm"
    return subprocess.run(
        [str(binary) if binary.exists() else "helm", f"--kubeconfig={cluster.kubeconfig}", *args],
        capture_output=True, text=True, timeout=400, check=False,
    )  # fmt: skip


# --------------------------------------------------------------------------- a RESP client


def resp_command(*args: str) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class RespConnection:
    """One blocking RESP connection; enough for SET and MGET."""

    def __init__(self, address: tuple[str, int], timeout: float) -> None:
        self.sock = socket.create_connection(address, timeout=timeout)
        self.file = self.sock.makefile("rb")

    def call(self, *args: str) -> Any:
        self.sock.sendall(resp_command(*args))
        return self._reply()

    def _reply(self) -> Any:
        line = self.file.readline()
        if not line.endswith(b"\r\n"):
            raise ConnectionError(f"connection closed inside a reply ({line!r})")
        kind, body = line[:1], line[1:-2]
        if kind == b"+":
            return body
        if kind == b"-":
            raise ConnectionError(f"error reply: {body.decode(errors='replace')}")
        if kind == b":":
            return int(body)
        if kind == b"$":
            n = int(body)
            if n < 0:
                return None
            data = self.file.read(n + 2)
            if len(data) != n + 2:
                raise ConnectionError("connection closed inside a bulk string")
            return data[:-2]
        if kind == b"*":
            n = int(body)
            return None if n < 0 else [self._reply() for _ in range(n)]
        raise ConnectionError(f"not a RESP reply: {line!r}")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
            self.sock.close()


def missing(address: tuple[str, int], acknowledged: dict[str, str]) -> list[str]:
    keys = sorted(acknowledged)
    conn = RespConnection(address, timeout=30.0)
    try:
        values: list[Any] = []
        for start in range(0, len(keys), 256):
            values += conn.call("MGET", *keys[start : start + 256])
    finally:
        conn.close()
    return [k for k, v in zip(keys, values, strict=True) if v != acknowledged[k].encode()]


# --------------------------------------------------------------------------- the test


@dataclass
class Writer:
    """Writes `<prefix>:n` = n in order through `endpoint()` (the address to use now, or None),
    reconnecting when a connection fails or a reply does not come within `reply_timeout` (a
    primary that stopped releasing output holds replies back). Records every acknowledgement,
    when (monotonic) it arrived and which address gave it."""

    prefix: str
    endpoint: Callable[[], tuple[str, int] | None]
    reply_timeout: float = 5.0
    acknowledged: dict[str, str] = field(default_factory=dict)
    ack_times: list[float] = field(default_factory=list)  # in order
    ack_at: dict[str, float] = field(default_factory=dict)
    acks_by_address: dict[tuple[str, int], int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> Writer:
        self.thread = threading.Thread(target=self._run, name=f"resp-writer-{self.prefix}", daemon=True)
        self.thread.start()
        return self

    def finish(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(60)
            assert not self.thread.is_alive(), f"writer {self.prefix} did not stop"

    def acks_after(self, moment: float) -> int:
        return sum(1 for t in list(self.ack_times) if t > moment)

    def _run(self) -> None:
        n = 0
        while not self.stop.is_set():
            address = self.endpoint()
            if address is None:
                time.sleep(0.1)
                continue
            try:
                conn = RespConnection(address, timeout=self.reply_timeout)
            except OSError as exc:
                self.errors.append(f"connect {address}: {exc!r}")
                time.sleep(0.1)
                continue
            try:
                while not self.stop.is_set():
                    n += 1
                    key, value = f"{self.prefix}:{n}", str(n)
                    if conn.call("SET", key, value) != b"OK":
                        self.errors.append(f"{key}: unexpected reply")
                        break
                    now = time.monotonic()
                    self.acknowledged[key] = value
                    self.ack_times.append(now)
                    self.ack_at[key] = now
                    self.acks_by_address[address] = self.acks_by_address.get(address, 0) + 1
            except (OSError, ConnectionError) as exc:
                self.errors.append(f"{address}: {exc!r}")
                time.sleep(0.1)
            finally:
                conn.close()
