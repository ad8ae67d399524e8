"""The firmware's key-value core and NIC ring code, run on the host.

The host test driver links the same C sources the guest runs (everything but
the port I/O) and plays the monitor over in-memory rings, so these tests
reach every command, the parser, the allocator and the ring code without a
virtual machine, under AddressSanitizer and UBSan where the toolchain has them.
"""

from __future__ import annotations

import itertools
import shutil
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from colo_agent.microvm.firmware_build import build_host_test_driver, build_libc_host_test

pytestmark = pytest.mark.skipif(
    shutil.which("gcc") is None, reason="gcc is needed to build the firmware core"
)

MiB = 1 << 20
OOM = "OOM"


@pytest.fixture(scope="session")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_host_test_driver(tmp_path_factory.mktemp("firmware-host"))


class Err(str):
    """An error reply, e.g. Err("ERR syntax error")."""


def resp(*args: bytes | str | int) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def parse_replies(data: bytes) -> list[object]:
    """RESP2 replies -> Python values (str, Err, int, bytes, None, list)."""
    values: list[object] = []
    pos = 0

    def one() -> object:
        nonlocal pos
        end = data.index(b"\r\n", pos)
        kind, line = data[pos : pos + 1], data[pos + 1 : end]
        pos = end + 2
        if kind == b"+":
            return line.decode()
        if kind == b"-":
            return Err(line.decode())
        if kind == b":":
            return int(line)
        if kind == b"$":
            n = int(line)
            if n < 0:
                return None
            body = data[pos : pos + n]
            assert data[pos + n : pos + n + 2] == b"\r\n", "bulk not terminated"
            pos += n + 2
            return body
        if kind == b"*":
            return [one() for _ in range(int(line))]
        raise AssertionError(f"bad reply type {kind!r} at {pos}")

    while pos < len(data):
        values.append(one())
    return values


@dataclass
class Outcome:
    output: dict[int, bytes] = field(default_factory=dict)
    closed: list[int] = field(default_factory=list)
    stats: list[dict[str, int]] = field(default_factory=list)

    def replies(self, conn: int = 1) -> list[object]:
        return parse_replies(self.output.get(conn, b""))


class Script:
    """Records for the host driver: what the monitor would put in RX."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def _rec(self, op: str, conn: int = 0, data: bytes = b"") -> Script:
        self.parts.append(struct.pack("<BII", ord(op), conn, len(data)) + data)
        return self

    def open(self, conn: int = 1) -> Script:
        return self._rec("O", conn)

    def data(self, data: bytes, conn: int = 1) -> Script:
        for i in range(0, len(data), 1 << 19):
            self._rec("D", conn, data[i : i + (1 << 19)])
        return self

    def cmd(self, *args: bytes | str | int, conn: int = 1) -> Script:
        return self.data(resp(*args), conn)

    def close(self, conn: int = 1) -> Script:
        return self._rec("C", conn)

    def clock(self, ns: int) -> Script:
        return self._rec("T", 0, struct.pack("<Q", ns))

    def run(self) -> Script:
        return self._rec("R")

    def stats(self) -> Script:
        return self._rec("S")

    def idle(self) -> Script:
        return self._rec("I")

    def execute(self, driver: Path, heap: int = 4 * MiB, ring: int | None = None) -> Outcome:
        argv = [str(driver), str(heap)] + ([str(ring)] if ring else [])
        done = subprocess.run(argv, input=b"".join(self.parts), capture_output=True, timeout=120)
        assert done.returncode == 0, done.stderr.decode(errors="replace")
        assert not done.stderr, done.stderr.decode(errors="replace")
        out = Outcome()
        pos, raw = 0, done.stdout
        while pos < len(raw):
            op, conn, n = struct.unpack_from("<BII", raw, pos)
            pos += 9
            body = raw[pos : pos + n]
            pos += n
            if op == ord("D"):
                assert conn not in out.closed, f"data on conn {conn} after the service closed it"
                out.output[conn] = out.output.get(conn, b"") + body
            elif op == ord("C"):
                out.closed.append(conn)
            elif op == ord("S"):
                out.stats.append({k: int(v) for k, v in (w.split("=") for w in body.decode().split())})
        return out


def run_commands(driver: Path, *commands: tuple[bytes | str | int, ...], heap: int = 4 * MiB) -> list[object]:
    s = Script().open()
    for c in commands:
        s.cmd(*c)
    return s.execute(driver, heap=heap).replies()


# --- commands --------------------------------------------------------------


def test_every_command_answers_like_redis(driver: Path) -> None:
    replies = run_commands(
        driver,
        ("PING",),
        ("PING", "hello"),
        ("ECHO", b"bin\x00\r\nary"),
        ("GET", "k"),
        ("SET", "k", "v1"),
        ("GET", "k"),
        ("SET", "k", "v2", "NX"),
        ("SET", "k", "v2", "XX"),
        ("SET", "other", "x", "XX"),
        ("SET", "new", "n", "NX"),
        ("SET", "k", "v3", "GET"),
        ("GET", "k"),
        ("EXISTS", "k", "k", "missing", "new"),
        ("DEL", "new", "missing", "new"),
        ("INCR", "n"),
        ("INCR", "n"),
        ("DECR", "n"),
        ("INCRBY", "n", "41"),
        ("INCRBY", "n", "-2"),
        ("DECRBY", "n", "10"),
        ("INCR", "k"),
        ("INCRBY", "n", "x"),
        ("SET", "big", str(2**63 - 1)),
        ("INCR", "big"),
        ("MSET", "a", "1", "b", "2", "c", ""),
        ("MGET", "a", "nope", "b", "c"),
        ("MSET", "a", "1", "b"),
        ("DBSIZE",),
        ("STRLEN", "a"),
        ("APPEND", "a", "23"),
        ("GET", "a"),
        ("SETNX", "a", "z"),
        ("TYPE", "a"),
        ("TYPE", "zz"),
        ("GETSET", "a", "new"),
        ("FLUSHALL",),
        ("DBSIZE",),
        ("GET", "k"),
        ("SELECT", "0"),
        ("SELECT", "1"),
        ("CLIENT", "SETNAME", "me"),
        ("GET",),
        ("SET", "k", "v", "EX"),
        ("SET", "k", "v", "EX", "0"),
        ("SET", "k", "v", "EX", "x"),
        ("SET", "k", "v", "NX", "XX"),
        ("SET", "k", "v", "BOGUS"),
    )
    assert replies == [
        "PONG",
        b"hello",
        b"bin\x00\r\nary",
        None,
        "OK",
        b"v1",
        None,
        "OK",
        None,
        "OK",
        b"v2",
        b"v3",
        3,
        1,
        1,
        2,
        1,
        42,
        40,
        30,
        Err("ERR value is not an integer or out of range"),
        Err("ERR value is not an integer or out of range"),
        "OK",
        Err("ERR increment or decrement would overflow"),
        "OK",
        [b"1", None, b"2", b""],
        Err("ERR wrong number of arguments for 'mset' command"),
        6,  # k, n, big, a, b, c
        1,
        3,
        b"123",
        0,
        "string",
        "none",
        b"123",
        "OK",
        0,
        None,
        "OK",
        Err("ERR DB index is out of range"),
        "OK",
        Err("ERR wrong number of arguments for 'get' command"),
        Err("ERR syntax error"),
        Err("ERR invalid expire time in 'set' command"),
        Err("ERR value is not an integer or out of range"),
        Err("ERR syntax error"),
        Err("ERR syntax error"),
    ]


def test_command_names_are_case_insensitive(driver: Path) -> None:
    assert run_commands(driver, ("set", "K", "v"), ("gEt", "K"), ("GET", "k"), ("Ping",)) == [
        "OK",
        b"v",
        None,
        "PONG",
    ]


def test_unknown_command_names_itself_and_its_first_arguments(driver: Path) -> None:
    (reply,) = run_commands(driver, ("FROB", "a", b"b\r\nc"))
    assert reply == Err("ERR unknown command 'FROB', with args beginning with: 'a' 'b  c' ")


def test_server_commands_redis_tools_call(driver: Path) -> None:
    time_ns = 12_345_678_901
    s = Script().clock(time_ns).open()
    for c in (
        ("TIME",),
        ("CONFIG", "GET", "*"),
        ("CONFIG", "GET", "save", "APPENDONLY"),
        ("COMMAND",),
        ("COMMAND", "DOCS"),
        ("SET", "x", "1", "EX", "100"),
        ("INFO",),
        ("CONFIG", "SET", "save", ""),
        ("info", "memory", "KEYSPACE"),
        ("INFO", "nosuchsection"),
        ("QUIT",),
        ("PING",),
    ):
        s.cmd(*c)
    out = s.execute(driver)
    replies = out.replies()
    assert replies[0] == [b"12", b"345678"]
    assert replies[1] == []
    assert replies[2] == [b"save", b"", b"appendonly", b"no"]
    assert replies[3] == [] and replies[4] == []
    info = replies[6]
    assert isinstance(info, bytes)
    fields = dict(line.split(":", 1) for line in info.decode().split("\r\n") if ":" in line)
    assert fields["colo_version"] == "0.1.0"
    assert int(fields["used_memory"]) > 0
    assert fields["db0"] == "keys=1,expires=1,avg_ttl=0"
    assert "uptime_in_seconds" in fields
    assert isinstance(replies[7], Err)
    sections = replies[8]
    assert isinstance(sections, bytes)
    assert sections.startswith(b"# Memory\r\nused_memory:") and b"# Keyspace\r\ndb0:keys=1," in sections
    assert b"# Server" not in sections and b"# Clients" not in sections
    assert replies[9] == b""
    # QUIT answers, then closes: the PING after it is never executed.
    assert replies[10:] == ["OK"]
    assert out.closed == [1]


def test_inline_commands_as_typed_in_telnet(driver: Path) -> None:
    out = (
        Script()
        .open()
        .data(b"PING\r\n\r\nset  greeting\thello \r\nGET greeting\nincr n\r\nECHO\r\n")
        .execute(driver)
    )
    assert out.replies() == [
        "PONG",
        "OK",
        b"hello",
        1,
        Err("ERR wrong number of arguments for 'echo' command"),
    ]


def test_inline_quotes_and_escapes_as_redis_splits_them(driver: Path) -> None:
    out = (
        Script()
        .open()
        .data(b'SET greeting "hello world"\r\nGET greeting\r\n')
        .data(b"SET 'it s' 'don\\'t'\r\nGET \"it s\"\r\n")
        .data(b'ECHO "tab\\there\\x41\\n"\r\nEC"HO" x\r\nECHO ""\r\n')
        .data(b'SET k "a"b\r\nPING\r\n')
        .execute(driver)
    )
    assert out.replies() == [
        "OK",
        b"hello world",
        "OK",
        b"don't",
        b"tab\there" + b"A\n",
        b"x",
        b"",
        Err("ERR Protocol error: unbalanced quotes in request"),
    ]
    assert out.closed == [1]


# --- framing ---------------------------------------------------------------

PIPELINE = (
    resp("SET", "alpha", "1")
    + resp("INCR", "alpha")
    + b"GET alpha\r\n"
    + resp("SET", "blob", b"x" * 5000)
    + resp("MGET", "alpha", "blob", "none")
    + resp("DEL", "alpha")
)
PIPELINE_REPLIES = ["OK", 2, b"2", "OK", [b"2", b"x" * 5000, None], 1]


def test_pipelined_commands_in_one_frame_run_in_order(driver: Path) -> None:
    assert Script().open().data(PIPELINE).execute(driver).replies() == PIPELINE_REPLIES


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 100, 4095])
def test_commands_split_across_frames_give_the_same_replies(driver: Path, chunk: int) -> None:
    s = Script().open()
    for i in range(0, len(PIPELINE), chunk):
        s.data(PIPELINE[i : i + chunk]).run()  # .run(): each piece is its own batch
    assert s.execute(driver).replies() == PIPELINE_REPLIES


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuts=st.lists(st.integers(min_value=1, max_value=len(PIPELINE) - 1), max_size=12, unique=True))
def test_any_split_of_a_pipeline_gives_the_same_replies(driver: Path, cuts: list[int]) -> None:
    s = Script().open()
    bounds = [0, *sorted(cuts), len(PIPELINE)]
    for a, b in itertools.pairwise(bounds):
        s.data(PIPELINE[a:b]).run()
    assert s.execute(driver).replies() == PIPELINE_REPLIES


def test_large_values_cross_many_frames_and_ring_wraps(driver: Path) -> None:
    value = bytes(range(256)) * 4096  # 1 MiB
    out = (
        Script()
        .open()
        .cmd("SET", "big", value)
        .cmd("GET", "big")
        .cmd("GET", "big")
        .stats()
        .execute(driver, heap=16 * MiB, ring=16384)
    )
    assert out.replies() == ["OK", value, value]
    # 2 MiB of replies through a 16 KiB ring: the guest rang early when full.
    assert out.stats[0]["doorbells"] > 2 * MiB // 16384


def test_one_doorbell_per_batch_of_replies(driver: Path) -> None:
    s = Script()
    for c in range(1, 11):
        s.open(c)
    s.stats()
    for c in range(1, 11):
        for i in range(10):
            s.cmd("SET", f"k{c}-{i}", "v", conn=c)
    s.stats()
    out = s.execute(driver)
    assert out.stats[1]["doorbells"] - out.stats[0]["doorbells"] == 1
    assert all(out.replies(c) == ["OK"] * 10 for c in range(1, 11))


def test_data_for_unknown_or_closed_connections_is_dropped(driver: Path) -> None:
    out = Script().cmd("PING", conn=7).open(8).close(8).cmd("PING", conn=8).open(9).cmd("PING", conn=9)
    result = out.execute(driver)
    assert result.output == {9: b"+PONG\r\n"}
    assert result.closed == []


def test_more_than_a_thousand_concurrent_connections(driver: Path) -> None:
    n = 4096
    s = Script()
    for c in range(1, n + 1):
        s.open(c)
    s.open(n + 1)  # one too many
    for c in range(1, n + 1):
        s.cmd("SET", f"key{c}", c, conn=c)
    s.cmd("DBSIZE", conn=n)
    out = s.execute(driver, heap=16 * MiB)
    assert out.replies(n + 1) == [Err("ERR max number of clients reached")]
    assert out.closed == [n + 1]
    assert all(out.replies(c) == ["OK"] for c in range(1, n))
    assert out.replies(n) == ["OK", n]


# --- malformed input ----------------------------------------------------------

MALFORMED = [
    pytest.param(b"*1\r\n+PING\r\n", "expected '$'", id="bad-type-byte-in-array"),
    pytest.param(b"$4\r\nPING\r\n", "expected '*'", id="bulk-at-top-level"),
    pytest.param(b":1\r\n", "expected '*'", id="integer-at-top-level"),
    pytest.param(b"*x\r\n", "invalid multibulk length", id="non-numeric-count"),
    pytest.param(b"*2000000\r\n", "invalid multibulk length", id="too-many-arguments"),
    pytest.param(b"*" + b"1" * 40 + b"\r\n", "invalid multibulk length", id="endless-count"),
    pytest.param(b"*1\r\n$-5\r\n", "invalid bulk length", id="negative-bulk"),
    pytest.param(b"*1\r\n$99999999999\r\n", "invalid bulk length", id="bulk-over-512MiB"),
    pytest.param(b"*1\r\n$+4\r\nPING\r\n", "invalid bulk length", id="signed-bulk"),
    pytest.param(b"*1\r\n$4\r\nPINGxx", "not followed by CRLF", id="bulk-without-crlf"),
    pytest.param(b"*2\r\n$3\r\nSET\r\n$100000000\r\n", "input buffer limit", id="bulk-past-input-limit"),
    pytest.param(b"\x00\x01\x02\xff garbage", "expected '*'", id="binary-garbage"),
    pytest.param(b"GET a\x00b\r\n", "invalid byte", id="control-byte-inline"),
    pytest.param(b"A" * 70000, "too big inline request", id="endless-inline"),
]


@pytest.mark.parametrize(("garbage", "message"), MALFORMED)
def test_malformed_input_gets_a_protocol_error_and_a_close(
    driver: Path, garbage: bytes, message: str
) -> None:
    s = Script().open(1).open(2).cmd("SET", "k", "v", conn=2).run()
    s.cmd("PING", conn=1).data(garbage, conn=1).cmd("PING", conn=1)
    s.cmd("GET", "k", conn=2)
    out = s.execute(driver)
    first, error = out.replies(1)
    assert first == "PONG"
    assert isinstance(error, Err) and error.startswith("ERR Protocol error: ") and message in error, error
    assert out.closed == [1]
    assert out.replies(2) == ["OK", b"v"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(garbage=st.binary(min_size=1, max_size=3000), split=st.integers(min_value=1, max_value=3000))
def test_random_bytes_never_hurt_other_connections(driver: Path, garbage: bytes, split: int) -> None:
    s = Script().open(1).open(2)
    s.data(garbage[:split], conn=1).run()
    if garbage[split:]:
        s.data(garbage[split:], conn=1)
    s.close(1).cmd("SET", "k", "v", conn=2).cmd("GET", "k", conn=2).stats()
    out = s.execute(driver, heap=MiB)
    assert out.replies(2) == ["OK", b"v"]
    assert out.stats[0]["connections"] == 1


# --- memory ------------------------------------------------------------------


def test_memory_full_gives_oom_errors_and_recovers_after_del(driver: Path) -> None:
    heap = 256 * 1024
    s = Script().open()
    for i in range(400):
        s.cmd("SET", f"key{i}", b"v" * 1000)
    s.cmd("INCR", "counter").cmd("MSET", "m1", b"x" * 2000, "m2", "y").cmd("GET", "m2")
    for i in range(400):
        s.cmd("DEL", f"key{i}")
    s.cmd("SET", "after", b"v" * 1000).cmd("GET", "key0").stats()
    out = s.execute(driver, heap=heap)
    replies = out.replies()
    sets = replies[:400]
    assert "OK" in sets and any(isinstance(r, Err) and r.startswith(OOM) for r in sets)
    first_oom = next(i for i, r in enumerate(sets) if r != "OK")
    assert all(isinstance(r, Err) and r.startswith(OOM) for r in sets[first_oom:])
    incr, mset, m2 = replies[400:403]
    # A small key may still fit where a 1 KB value did not.
    assert incr == 1 or (isinstance(incr, Err) and incr.startswith(OOM))
    assert isinstance(mset, Err) and mset.startswith(OOM)
    assert m2 is None  # MSET is all or nothing
    assert replies[403:803] == [1] * first_oom + [0] * (400 - first_oom)
    assert replies[803:] == ["OK", None]
    assert out.stats[0]["keys"] == 1 + (incr == 1)


def test_oom_while_buffering_a_request_closes_only_that_connection(driver: Path) -> None:
    heap = 256 * 1024
    s = Script().open(1).open(2)
    for i in range(200):
        s.cmd("SET", f"key{i}", b"v" * 1000, conn=2)
    big = resp("SET", "huge", b"z" * 100_000)
    s.data(big[:5000], conn=1).run().data(big[5000:], conn=1)
    s.cmd("DEL", "key0", conn=2).cmd("PING", conn=2)
    out = s.execute(driver, heap=heap)
    (error,) = out.replies(1)
    assert isinstance(error, Err) and error.startswith(OOM)
    assert out.closed == [1]
    assert out.replies(2)[-2:] == [1, "PONG"]


def test_del_and_flushall_return_memory_to_baseline(driver: Path) -> None:
    s = Script().open().stats()
    for i in range(2000):
        s.cmd("SET", f"key:{i}", b"v" * (i % 700))
    s.stats()
    for i in range(2000):
        s.cmd("DEL", f"key:{i}")
    s.stats()
    for i in range(3000):
        s.cmd("SET", f"other:{i}", b"w" * (i % 1300), "PX", 100000)
    s.cmd("INCRBY", "n", 5).cmd("APPEND", "n", "0")
    s.cmd("FLUSHALL").stats()
    # A request split across frames uses a buffer; closing frees it.
    big = resp("SET", "big", b"q" * 300_000)
    s.open(2).data(big[:1000], conn=2).run().data(big[1000:], conn=2).cmd("DEL", "big", conn=2)
    s.data(b"*2\r\n$3\r\nGET", conn=2).close(2).stats()
    out = s.execute(driver)
    baseline, full, after_del, after_flush, after_close = out.stats
    assert full["used_memory"] > baseline["used_memory"] + 2000 * 300
    assert full["keys"] == 2000
    assert after_del["keys"] == 0 and after_flush["keys"] == 0
    for st_ in (after_del, after_flush, after_close):
        assert st_["used_memory"] == baseline["used_memory"]
        assert st_["heap_blocks"] == baseline["heap_blocks"]
    assert out.replies(2) == ["OK", 1]


def test_the_table_grows_through_many_resizes_and_loses_nothing(driver: Path) -> None:
    n = 50_000
    s = Script().open()
    for i in range(0, n, 100):
        pairs: list[str] = []
        for j in range(i, i + 100):
            pairs += [f"k{j}", f"v{j}"]
        s.cmd("MSET", *pairs)
    s.cmd("DBSIZE")
    s.cmd("MGET", *(f"k{j}" for j in range(0, n, 7)))
    for j in range(0, n, 2):
        s.cmd("DEL", f"k{j}")  # shrinking resizes too
    s.cmd("DBSIZE").cmd("MGET", *(f"k{j}" for j in range(0, n, 499)))
    replies = s.execute(driver, heap=64 * MiB).replies()
    assert replies[n // 100] == n
    assert replies[n // 100 + 1] == [f"v{j}".encode() for j in range(0, n, 7)]
    assert replies[-2] == n // 2
    assert replies[-1] == [None if j % 2 == 0 else f"v{j}".encode() for j in range(0, n, 499)]


# --- expiry ------------------------------------------------------------------

S = 1_000_000_000


def test_keys_expire_on_the_virtual_clock(driver: Path) -> None:
    s = Script().clock(5 * S).open()
    s.cmd("SET", "ex", "1", "EX", 10).cmd("SET", "px", "2", "PX", 1500).cmd("SET", "keep", "3")
    s.cmd("SETEX", "setex", 3, "4").cmd("SET", "persist", "5", "EX", 1).cmd("PERSIST", "persist")
    s.cmd("TTL", "ex").cmd("PTTL", "px").cmd("TTL", "keep").cmd("TTL", "missing")
    s.clock(5 * S + 1_499_999_999).cmd("GET", "px")
    s.clock(5 * S + 1_500_000_000).cmd("GET", "px").cmd("EXISTS", "px")
    s.clock(14 * S).cmd("GET", "ex").cmd("TTL", "ex").stats()
    s.clock(15 * S).cmd("GET", "ex").cmd("GET", "keep").cmd("GET", "setex").cmd("GET", "persist")
    s.cmd("SET", "k", "v", "PX", 100).cmd("EXPIRE", "keep", 1).cmd("PEXPIRE", "k", -1).cmd("GET", "k")
    s.clock(17 * S).cmd("GET", "keep").cmd("INCR", "keep").cmd("DBSIZE").stats()
    out = s.execute(driver)
    assert out.replies() == [
        "OK", "OK", "OK", "OK", "OK", 1,
        10, 1500, -1, -2,
        b"2",
        None, 0,
        b"1", 1,
        None, b"3", None, b"5",
        "OK", 1, 1, None,
        None, 1, 2,
    ]  # fmt: skip
    assert out.stats[0]["expires"] == 2  # ex, setex (px is gone)
    assert out.stats[1]["keys"] == 2  # keep (recreated by INCR), persist


def test_expired_keys_nobody_reads_are_swept_while_idle(driver: Path) -> None:
    s = Script().clock(0).open().stats()
    for i in range(1000):
        s.cmd("SET", f"short{i}", b"v" * 100, "PX", 1000)
    for i in range(300):
        s.cmd("SET", f"long{i}", "v", "EX", 100)
    s.cmd("SET", "forever", "v").stats().clock(2 * S)
    for _ in range(30):  # 128 buckets a pass over 2048, after the resize
        s.idle()
    s.stats().cmd("DBSIZE")
    out = s.execute(driver)
    baseline, full, swept = out.stats
    assert full["keys"] == 1301 and full["expires"] == 1300
    assert swept["keys"] == 301 and swept["expires"] == 300
    assert out.replies()[-1] == 301
    assert swept["used_memory"] < baseline["used_memory"] + 301 * 200


def test_incr_keeps_the_expiry_and_set_clears_it(driver: Path) -> None:
    s = Script().clock(0).open()
    s.cmd("SET", "n", "1", "EX", 10).cmd("INCR", "n").cmd("TTL", "n")
    s.cmd("SET", "n", "5").cmd("TTL", "n").cmd("SET", "m", "1", "PX", 10).cmd("SET", "m", "2", "KEEPTTL")
    s.clock(S // 100).cmd("GET", "m")
    assert s.execute(driver).replies() == ["OK", 2, 10, "OK", -1, "OK", "OK", None]


def test_same_input_gives_byte_identical_output(driver: Path) -> None:
    s = Script().open()
    for i in range(3000):
        s.cmd("SET", f"key{i * 7919 % 3001}", b"v" * (i % 50))
        if i % 3 == 0:
            s.cmd("DEL", f"key{i * 31 % 3001}")
    s.cmd("MGET", *(f"key{i}" for i in range(0, 3001, 10))).cmd("INFO")
    first, second = s.execute(driver), s.execute(driver)
    assert first.output == second.output


def test_the_guest_memory_functions_match_libc(tmp_path: Path) -> None:
    """Every size, alignment and overlap, on the word-loop and the rep paths."""
    exe = build_libc_host_test(tmp_path)
    done = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout.strip()) == (0, "ok"), done.stdout + done.stderr


def test_hello_switches_the_connection_to_resp3(driver: Path) -> None:
    out = (
        Script()
        .open(1)
        .open(2)
        .cmd("HELLO", "3", conn=1)
        .cmd("GET", "missing", conn=1)
        .cmd("CONFIG", "GET", "appendonly", conn=1)
        .cmd("GET", "missing", conn=2)
        .cmd("HELLO", "4", conn=2)
        .cmd("HELLO", "2", "AUTH", "default", "secret", "SETNAME", "me", conn=2)
        .execute(driver)
    )
    hello = out.output[1].split(b"_\r\n")[0]
    assert hello.startswith(b"%7\r\n$6\r\nserver\r\n$7\r\ncolo-kv\r\n")
    assert b"$5\r\nproto\r\n:3\r\n" in hello
    assert out.output[1].endswith(b"_\r\n%1\r\n$10\r\nappendonly\r\n$2\r\nno\r\n")
    replies = out.replies(2)
    assert replies[0] is None
    assert replies[1] == Err("NOPROTO unsupported protocol version")
    assert isinstance(replies[2], list) and replies[2][4:6] == [b"proto", 2]
