"""A blocking RESP2 client, what the tests and benchmarks speak to a guest (or a Service) with."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Sequence


class RespError(Exception):
    """An error reply (`-ERR ...`) from the guest."""


Reply = bytes | int | None | list["Reply"]


class RespClient:
    """A blocking RESP2 client on one connection, enough for SET/GET/MGET and raw timing.

    `send` and `read_reply` are separate so a test can time a single reply.
    """

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        sock.settimeout(timeout)
        self.sock = sock
        self._file = sock.makefile("rb")

    @classmethod
    def connect(cls, host: str, port: int, timeout: float = 30.0) -> RespClient:
        return cls(socket.create_connection((host, port), timeout=timeout), timeout)

    def send(self, *args: str | bytes) -> None:
        self.sock.sendall(encode_command(*args))

    def read_reply(self) -> Reply:
        line = self._file.readline()
        if not line.endswith(b"\r\n"):
            raise ConnectionError(f"connection closed inside a reply ({line!r})")
        kind, body = line[:1], line[1:-2]
        if kind == b"+":
            return body
        if kind == b"-":
            raise RespError(body.decode(errors="replace"))
        if kind == b":":
            return int(body)
        if kind == b"$":
            n = int(body)
            if n < 0:
                return None
            data = self._file.read(n + 2)
            if len(data) != n + 2:
                raise ConnectionError("connection closed inside a bulk string")
            return data[:-2]
        if kind == b"*":
            n = int(body)
            return None if n < 0 else [self.read_reply() for _ in range(n)]
        raise ConnectionError(f"not a RESP reply: {line!r}")

    def call(self, *args: str | bytes) -> Reply:
        self.send(*args)
        return self.read_reply()

    def mget(self, keys: Sequence[str], batch: int = 256, window: int = 1) -> list[bytes | None]:
        """GET of every key, `batch` keys per MGET, up to `window` MGETs sent ahead of their
        replies (a guest that holds output until a checkpoint answers a window per epoch)."""
        out: list[bytes | None] = []
        starts = range(0, len(keys), batch)
        for i, start in enumerate(starts):
            self.send("MGET", *keys[start:start + batch])
            if i + 1 >= window:
                out.extend(self._values())
        for _ in range(min(window - 1, len(starts))):
            out.extend(self._values())
        return out

    def _values(self) -> list[bytes | None]:
        reply = self.read_reply()
        assert isinstance(reply, list), reply
        return [v if isinstance(v, bytes) or v is None else None for v in reply]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()
            self.sock.close()

    def __enter__(self) -> RespClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def encode_command(*args: str | bytes) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a.encode() if isinstance(a, str) else a
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)
