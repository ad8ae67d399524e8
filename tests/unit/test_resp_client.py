"""The tests' RESP client: MGET in batches, sequential or with several sent ahead of their
replies, gives the same values in key order."""

from __future__ import annotations

import socket
import threading

import pytest
from support.resp import RespClient, encode_command


def _serve(sock: socket.socket, store: dict[str, bytes]) -> None:
    """Answer MGETs."""
    f = sock.makefile("rb")
    while line := f.readline():
        n = int(line[1:-2])
        args = []
        for _ in range(n):
            size = int(f.readline()[1:-2])
            args.append(f.read(size + 2)[:-2].decode())
        out = [b"*%d\r\n" % (n - 1)]
        for key in args[1:]:
            v = store.get(key)
            out.append(b"$-1\r\n" if v is None else b"$%d\r\n%s\r\n" % (len(v), v))
        sock.sendall(b"".join(out))


@pytest.mark.parametrize("window", [1, 3, 16])
def test_mget_in_batches_and_windows_keeps_key_order(window: int) -> None:
    keys = [f"k{i}" for i in range(1000)]
    store = {k: str(i).encode() for i, k in enumerate(keys) if i % 7}
    a, b = socket.socketpair()
    server = threading.Thread(target=_serve, args=(b, store), daemon=True)
    server.start()
    client = RespClient(a, timeout=10.0)
    try:
        values = client.mget(keys, batch=64, window=window)
        assert values == [store.get(k) for k in keys]
        assert client.mget([], window=window) == []
        assert client.mget(keys[:5], batch=2, window=window) == [store.get(k) for k in keys[:5]]
    finally:
        client.close()
        b.close()
    assert encode_command("MGET", "x") == b"*2\r\n$4\r\nMGET\r\n$1\r\nx\r\n"
