"""What the operator's end-to-end tests share: waiting, helm, and a small RESP client."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Callable
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
