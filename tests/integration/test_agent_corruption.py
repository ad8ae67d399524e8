"""A corrupted page frame between two agent processes: rejected, re-sent, never half-applied."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.agents import AgentGroup, WriteLog, missing_writes, wait_protected, write_keys

from colo_agent.api.models import AgentStatus
from colo_agent.replication import protocol as p


class CorruptingProxy:
    """Forwards a secondary's connections to its primary, and can flip a bit in PAGES frames.

    Runs its own event loop in a thread. Only the primary -> secondary direction
    is parsed, frame by frame (every channel uses the same framing); a PAGES
    frame only ever travels on a data channel.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._to_corrupt = 0
        self.corrupted = 0
        self._lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="corrupting-proxy", daemon=True)
        self._thread.start()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)

    def corrupt(self, frames: int) -> None:
        with self._lock:
            self._to_corrupt += frames

    async def _start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            tr, tw = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            w.close()
            return
        for coro in (self._raw(r, tw), self._frames(tr, w)):
            task = asyncio.ensure_future(coro)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _take(self) -> bool:
        with self._lock:
            if self._to_corrupt <= 0:
                return False
            self._to_corrupt -= 1
            self.corrupted += 1
            return True

    async def _frames(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await r.readexactly(p.HEADER_SIZE)
                (length,) = struct.unpack_from("<I", head, 8)
                body = bytearray(await r.readexactly(length))
                if head[5] == p.MessageType.PAGES and self._take():
                    # A bit inside the last page's data: the frame stays well formed, only its
                    # checksum fails, which the secondary must notice and reject.
                    body[-100] ^= 0x10
                w.write(head)
                w.write(body)
                await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            w.close()

    async def _raw(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while data := await r.read(1 << 16):
                w.write(data)
                await w.drain()
        except ConnectionError:
            pass
        finally:
            w.close()

    def close(self) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()
            for t in list(self._tasks):
                t.cancel()
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@pytest.fixture
def group(tmp_path: Path) -> Iterator[AgentGroup]:
    g = AgentGroup(tmp_path)
    try:
        yield g
    finally:
        g.close()


_REJECTED = re.compile(r"epoch (\d+) attempt (\d+) rejected \((\w+)\)")


def _acked_past(epoch: int, status: AgentStatus) -> bool:
    return status.last_acked_epoch > epoch


def test_corrupted_page_frame_is_rejected_and_resent_and_the_image_stays_exact(group: AgentGroup) -> None:
    debug = {"COLO_DEBUG_DIGESTS": "1"}
    primary = group.spawn("agent-a", "primary", env=debug)
    primary.wait_for("serving as primary", lambda s: s.role == "primary")
    proxy = CorruptingProxy(primary.replication_port)
    try:
        secondary = group.spawn("agent-b", "secondary", peer_address=f"127.0.0.1:{proxy.port}", env=debug)
        term = wait_protected(primary, secondary)
        pairings = primary.log().count("paired with")
        writes = WriteLog()
        stop = threading.Event()
        writers = [threading.Thread(target=write_keys, args=(primary, f"w{i}", stop.is_set, writes))
                   for i in range(2)]
        for t in writers:
            t.start()
        # One frame at a time, each in a later epoch: an epoch rejected three times in a row
        # makes the primary give up on the pairing and re-sync, which is not the point here.
        for n in range(1, 4):
            proxy.corrupt(1)
            deadline = time.monotonic() + 60
            while len(found := _REJECTED.findall(primary.log())) < n:
                assert time.monotonic() < deadline, f"no rejection logged:\n{primary.tail()}"
                time.sleep(0.05)
            primary.wait_for("past the rejected epoch", functools.partial(_acked_past, int(found[-1][0]) + 1))
        stop.set()
        for t in writers:
            t.join(60)

        rejected = _REJECTED.findall(primary.log())
        assert proxy.corrupted == 3
        assert {reason for _, _, reason in rejected} == {"corrupt_frame"}, rejected
        # Rejected and re-sent within the same pairing: no re-sync, no lost protection.
        assert primary.log().count("paired with") == pairings, primary.tail(40)
        assert "running unprotected" not in primary.log()
        ours, theirs = primary.digests(), secondary.digests()
        for e, _, _ in rejected:
            key = (term, int(e))
            assert key in ours and key in theirs, f"rejected epoch {e} was never completed"
        mismatched = sorted(k for k in ours.keys() & theirs.keys() if ours[k] != theirs[k])
        assert not mismatched, f"committed image differs from the primary's RAM at epochs {mismatched[:10]}"
        assert not writes.errors and len(writes.acknowledged) > 0

        # And the image a promotion resumes from holds every acknowledged write.
        primary.kill()
        r = secondary.promote(term + 1, group.secret)
        assert r.status_code == 200, r.text
        assert not missing_writes(secondary, writes)
    finally:
        proxy.close()
