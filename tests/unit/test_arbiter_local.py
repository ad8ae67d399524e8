"""FileArbiter in one process: record format, compare-and-swap, malformed and locked files."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import pytest

from colo_agent.arbiter.base import ArbiterError, LeaseRecord, TermTooLow
from colo_agent.arbiter.local import FileArbiter, parse_record


class FakeClock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


async def test_record_on_disk(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "vm.arbiter"
    a = FileArbiter(path, "pod-a", 1.5, clock=clock)
    assert await a.acquire(1)
    assert json.loads(path.read_text()) == {
        "format": "colo-arbiter/v1",
        "term": 1,
        "holder": "pod-a",
        "writes": 1,
        "leaseDurationMs": 1500.0,
        "epochFloor": 0,
    }
    assert await a.renew()
    assert await a.renew()
    assert json.loads(path.read_text())["writes"] == 3
    await a.release()
    doc = json.loads(path.read_text())
    assert (doc["term"], doc["holder"], doc["writes"]) == (1, None, 4)
    # No temporary files left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vm.arbiter", "vm.arbiter.lock"]


async def test_two_arbiters_on_one_file(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "vm.arbiter"
    a = FileArbiter(path, "pod-a", 1.0, clock=clock)
    b = FileArbiter(path, "pod-b", 1.0, clock=clock)
    assert await a.acquire(1)
    await b.observe()
    clock.now += 0.5
    assert await a.renew()
    await b.observe()
    clock.now += 0.9
    assert not await b.acquire(2)  # 0.9 s since b saw the renewal
    clock.now += 0.1
    assert await b.acquire(2)
    assert not await a.renew()
    assert not a.holding and a.term == 2
    with pytest.raises(TermTooLow):
        await a.acquire(2)


async def test_a_stale_swap_is_refused(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "vm.arbiter"
    a = FileArbiter(path, "pod-a", 1.0, clock=clock)
    assert await a._swap(None, 1, "pod-a") == LeaseRecord(1, "pod-a", "1", 1.0)
    assert await a._swap(None, 2, "pod-a") is None  # expected "no record", there is one
    assert await a._swap(LeaseRecord(1, "pod-a", "7"), 2, "pod-a") is None
    assert (await a._read()) == LeaseRecord(1, "pod-a", "1", 1.0)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "not JSON"),
        (b"{", "not JSON"),
        (b"[]", "not a JSON object"),
        (b'{"format": "other"}', "format is 'other'"),
        (
            b'{"format": "colo-arbiter/v1", "term": -1, "holder": null, "writes": 1, "leaseDurationMs": 1}',
            "term",
        ),
        (
            b'{"format": "colo-arbiter/v1", "term": 1, "holder": "", "writes": 1, "leaseDurationMs": 1}',
            "holder",
        ),
        (
            b'{"format": "colo-arbiter/v1", "term": 1, "holder": "a", "writes": 0, "leaseDurationMs": 1}',
            "writes",
        ),
        (
            b'{"format": "colo-arbiter/v1", "term": 1, "holder": "a", "writes": 1, "leaseDurationMs": 0}',
            "leaseDuration",
        ),
        (
            b'{"format": "colo-arbiter/v1", "term": 1, "holder": "a", "writes": 1, '
            b'"leaseDurationMs": Infinity}',
            "leaseDuration",
        ),
    ],
)
async def test_a_malformed_record_is_an_error_not_a_free_lock(
    tmp_path: Path, clock: FakeClock, content: bytes, message: str
) -> None:
    path = tmp_path / "vm.arbiter"
    path.write_bytes(content)
    b = FileArbiter(path, "pod-b", 1.0, clock=clock)
    with pytest.raises(ArbiterError, match=message):
        await b.acquire(5)
    assert path.read_bytes() == content
    with pytest.raises(ArbiterError):
        parse_record(content)


async def test_a_writer_stuck_in_the_lock_does_not_block_forever(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "vm.arbiter"
    a = FileArbiter(path, "pod-a", 1.0, clock=clock, lock_timeout=0.05)
    assert await a.acquire(1)
    fd = os.open(tmp_path / "vm.arbiter.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert not await a.renew()  # failed, not lost
        assert a.holding
        with pytest.raises(ArbiterError, match="stayed locked"):
            await FileArbiter(path, "pod-b", 1.0, clock=clock, lock_timeout=0.05)._swap(None, 9, "pod-b")
    finally:
        os.close(fd)
    assert await a.renew()


async def test_an_unwritable_place_is_a_clear_error(tmp_path: Path, clock: FakeClock) -> None:
    a = FileArbiter(tmp_path / "missing" / "vm.arbiter", "pod-a", 1.0, clock=clock)
    with pytest.raises(ArbiterError, match="arbiter lock"):
        await a.acquire(1)
