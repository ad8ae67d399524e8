"""The firmware's Redis protocol through a real socket: redis-py, redis-cli,
redis-benchmark, and hostile input that must not take the service down."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest
import redis
from support.vm import ACCELS, VmServer, serve


@pytest.fixture(scope="module", params=ACCELS)
def vm(request: pytest.FixtureRequest) -> Iterator[VmServer]:
    with serve(request.param) as server:
        yield server


@pytest.fixture
def r(vm: VmServer) -> Iterator[redis.Redis]:
    client = vm.client()
    client.flushall()
    yield client
    client.close()


def test_commands(r: redis.Redis) -> None:
    assert r.ping() is True
    assert r.echo("hello") == b"hello"
    assert r.set("k", "v") is True
    assert r.get("k") == b"v"
    assert r.get("missing") is None
    assert r.exists("k", "missing", "k") == 2
    assert r.delete("k", "missing") == 1
    assert r.incr("n") == 1
    assert r.incrby("n", 41) == 42
    assert r.decr("n") == 41
    assert r.mset({"a": "1", "b": "2"}) is True
    assert r.mget("a", "missing", "b") == [b"1", None, b"2"]
    assert r.dbsize() == 3
    seconds, micros = r.time()
    assert abs(seconds - time.time()) < 3600 and 0 <= micros < 1_000_000
    assert isinstance(r.info(), dict)
    assert r.flushall() is True
    assert r.dbsize() == 0


def test_default_redis_py_client_with_hello_handshake(vm: VmServer) -> None:
    client = redis.Redis(host="127.0.0.1", port=vm.port, socket_timeout=60)  # RESP3 HELLO first
    try:
        assert client.ping() is True
        assert client.set("hello", "3") is True
        assert client.get("hello") == b"3"
    finally:
        client.close()


def test_binary_values_round_trip(r: redis.Redis) -> None:
    value = bytes(range(256)) * 300  # 76,800 bytes: spans many NIC frames
    r.set(b"\x00bin\xff", value)
    assert r.get(b"\x00bin\xff") == value


def test_expiry(r: redis.Redis) -> None:
    r.set("short", "x", px=100)
    r.set("long", "y", ex=100)
    assert r.get("short") == b"x"
    time.sleep(0.3)
    assert r.get("short") is None
    assert r.get("long") == b"y"


def test_errors_are_replies(r: redis.Redis) -> None:
    with pytest.raises(redis.ResponseError):
        r.execute_command("NOSUCHCOMMAND", "x")
    r.set("text", "abc")
    with pytest.raises(redis.ResponseError):
        r.incr("text")
    with pytest.raises(redis.ResponseError):
        r.execute_command("GET")  # wrong number of arguments
    assert r.ping()


def test_pipelined_requests_are_answered_in_order(r: redis.Redis) -> None:
    pipe = r.pipeline(transaction=False)
    for i in range(500):
        pipe.set(f"p{i}", i)
        pipe.get(f"p{i}")
    replies = pipe.execute()
    assert replies[1::2] == [str(i).encode() for i in range(500)]


def _cli(vm: VmServer, *args: str) -> str:
    out = subprocess.run(
        ["redis-cli", "-p", str(vm.port), *args], capture_output=True, text=True, timeout=60, check=True
    )
    return out.stdout.removesuffix("\n")


@pytest.mark.skipif(shutil.which("redis-cli") is None, reason="redis-cli missing (Debian redis-tools)")
def test_redis_cli(vm: VmServer, r: redis.Redis) -> None:
    assert _cli(vm, "ping") == "PONG"
    assert _cli(vm, "set", "cli", "hello world") == "OK"
    assert _cli(vm, "get", "cli") == "hello world"
    assert _cli(vm, "incrby", "c", "5") == "5"
    assert _cli(vm, "dbsize") == "2"
    assert _cli(vm, "mget", "cli", "nope") == "hello world\n"  # nil prints as an empty line
    assert "ERR" in _cli(vm, "bogus")


@pytest.mark.skipif(shutil.which("redis-benchmark") is None, reason="redis-benchmark missing (redis-tools)")
def test_redis_benchmark_completes(vm: VmServer) -> None:
    # Nested KVM on some hosts runs guest code far slower than unicorn's
    # JIT (about 1 us per instruction here): fewer requests there, same command.
    requests = 2000 if vm.machine.accelerator == "kvm" else 20000
    out = subprocess.run(
        ["redis-benchmark", "-p", str(vm.port), "-t", "set,get,incr,ping", "-n", str(requests),
         "-c", "10", "--csv"],
        capture_output=True, text=True, timeout=600, check=True,
    )
    rows = [line.split(",")[0].strip('"') for line in out.stdout.splitlines()[1:] if line]
    assert {"SET", "GET", "INCR", "PING_INLINE", "PING_MBULK"} <= set(rows), out.stdout + out.stderr
    # Without -r every request hits the same keys: INCR ran exactly `requests` times.
    client = vm.client()
    assert client.get("counter:__rand_int__") == str(requests).encode()
    value = client.get("key:__rand_int__")
    assert value is not None and len(value) == 3  # -d 3, the default payload size


def _raw(vm: VmServer, payload: bytes, wait: float = 1.0) -> bytes:
    """Send raw bytes; return what came back before the reply stalled or the server closed."""
    with socket.create_connection(("127.0.0.1", vm.port), timeout=wait) as sock:
        sock.sendall(payload)
        got = bytearray()
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                got += chunk
                if got.endswith(b"\r\n"):
                    sock.settimeout(0.3)
        except (TimeoutError, ConnectionResetError):
            pass
        return bytes(got)


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"*abc\r\n", id="bad-array-length"),
        pytest.param(b"*1\r\n$999999999999\r\n", id="huge-bulk-length"),
        pytest.param(b"*2\r\n$3\r\nGET\r\n$-5\r\n", id="negative-bulk-length"),
        pytest.param(b"*99999999\r\n", id="huge-array"),
        pytest.param(b"*1\r\n$4\r\nPINGxx\r\n", id="bulk-overrun"),
        pytest.param(b"\x00\xff\xfe garbage \x80\r\n", id="binary-inline"),
        pytest.param(b"*-7\r\n", id="negative-array"),
        pytest.param(b"$5\r\nhello\r\n", id="bulk-at-top-level"),
    ],
)
def test_malformed_resp_gets_an_error_or_a_clean_close(vm: VmServer, payload: bytes) -> None:
    healthy = vm.client()
    answer = _raw(vm, payload)
    # An error reply, or nothing at all before the guest closed the connection.
    assert answer == b"" or answer.startswith(b"-"), answer[:200]
    assert healthy.ping()
    assert vm.client().ping()


def test_random_garbage_does_not_break_the_guest(vm: VmServer) -> None:
    healthy = vm.client()
    healthy.set("survivor", "yes")
    for seed in range(20):
        blob = os.urandom(1 + seed * 997)
        _raw(vm, blob, wait=0.5)
    assert healthy.get("survivor") == b"yes"


def test_abrupt_disconnects_mid_command(vm: VmServer) -> None:
    healthy = vm.client()
    assert healthy.ping()
    baseline = len(vm.machine.devices.open_connections)
    for i in range(50):
        sock = socket.create_connection(("127.0.0.1", vm.port))
        sock.sendall(b"*3\r\n$3\r\nSET\r\n$5\r\nhalf" + b"x" * i)
        # RST instead of FIN: SO_LINGER with a zero timeout.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()
    deadline = time.monotonic() + 30
    while len(vm.machine.devices.open_connections) > baseline and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(vm.machine.devices.open_connections) == baseline
    assert healthy.ping()
    assert healthy.exists("half") == 0


def test_many_clients_at_once(vm: VmServer) -> None:
    clients = [vm.client() for _ in range(64)]
    for i, c in enumerate(clients):
        c.set(f"c{i}", i)
    for i, c in enumerate(clients):
        assert c.get(f"c{i}") == str(i).encode()
        c.close()
