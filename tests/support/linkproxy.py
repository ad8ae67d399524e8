"""A faulty replication link between two agent processes.

`LinkProxy` listens on loopback and forwards every connection a secondary
opens to its primary's replication port. The primary -> secondary direction
is parsed frame by frame, so faults land on frame boundaries or, on purpose,
inside a frame (lockstep's mirror frames always pass unharmed: the faults are
the checkpoint stream's):

- `cut(n)`: the next `n` page frames are cut in the middle of their page
  data: the header and part of the payload go through, then both ends of
  that connection are closed (a peer that died mid-send).
- `corrupt(n)`: one bit of the page data of each of the next `n` page
  frames is flipped; the frame stays well formed, only its checksum fails.
- `drop(n)`: the next `n` frames (of any type) vanish from the stream.
- `partition()` / `heal()`: nothing is forwarded in either direction until
  healed; what arrived meanwhile is thrown away and every connection that
  lived through the partition is closed at `heal()`.

It runs its own event loop in a thread, so blocking tests and benchmarks can
use it as they are.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import threading
from collections import Counter

from colo_agent.replication import protocol as p

_PAGE_TYPES = frozenset({p.MessageType.PAGES, p.MessageType.SYNC_PAGES})
_MIRROR_TYPES = frozenset({p.MessageType.MIRROR_INPUT, p.MessageType.MIRROR_OUTPUT})


class LinkProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self._lock = threading.Lock()
        self._pending: Counter[str] = Counter()
        self.done: Counter[str] = Counter()  # faults carried out, by kind
        self._partitioned = False
        self._writers: set[asyncio.StreamWriter] = set()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="link-proxy", daemon=True)
        self._thread.start()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    # -- faults (thread-safe) -------------------------------------------------------

    def cut(self, frames: int = 1) -> None:
        self._arm("cut", frames)

    def corrupt(self, frames: int = 1) -> None:
        self._arm("corrupt", frames)

    def drop(self, frames: int = 1) -> None:
        self._arm("drop", frames)

    def pending(self) -> int:
        """Faults armed but not carried out yet."""
        with self._lock:
            return sum(self._pending.values())

    def disarm(self) -> None:
        with self._lock:
            self._pending.clear()

    def partition(self) -> None:
        with self._lock:
            self._partitioned = True

    def heal(self) -> None:
        with self._lock:
            self._partitioned = False

        def close_all() -> None:
            for w in list(self._writers):
                w.close()

        self.loop.call_soon_threadsafe(close_all)

    def _arm(self, kind: str, frames: int) -> None:
        with self._lock:
            self._pending[kind] += frames

    def _take(self, kind: str) -> bool:
        with self._lock:
            if self._pending[kind] <= 0:
                return False
            self._pending[kind] -= 1
            self.done[kind] += 1
            return True

    def _blocked(self) -> bool:
        with self._lock:
            return self._partitioned

    # -- forwarding ---------------------------------------------------------------------

    async def _start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        if self._blocked():
            w.close()
            return
        try:
            tr, tw = await asyncio.open_connection(*self.target)
        except OSError:
            w.close()
            return
        self._writers.update((w, tw))
        for coro in (self._raw(r, tw, w), self._frames(tr, w, tw)):
            task = asyncio.ensure_future(coro)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _frames(self, r: asyncio.StreamReader, w: asyncio.StreamWriter,
                      other: asyncio.StreamWriter) -> None:
        try:
            while True:
                magic = await r.readexactly(len(p.MAGIC))
                if magic != p.MAGIC:
                    # Not replication framing: passed on as it is, for the agent to refuse.
                    w.write(magic)
                    await self._raw(r, w, other)
                    return
                head = magic + await r.readexactly(p.HEADER_SIZE - len(magic))
                (length,) = struct.unpack_from("<I", head, 8)
                body = bytearray(await r.readexactly(length))
                if self._blocked():
                    continue
                pages = head[5] in _PAGE_TYPES
                if head[5] not in _MIRROR_TYPES and self._take("drop"):
                    continue
                if pages and self._take("cut"):
                    w.write(head)
                    w.write(body[: len(body) // 2])
                    await w.drain()
                    return
                if pages and self._take("corrupt"):
                    body[-100] ^= 0x10  # inside the last page's data
                w.write(head)
                w.write(body)
                await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._close(w, other)

    async def _raw(self, r: asyncio.StreamReader, w: asyncio.StreamWriter,
                   other: asyncio.StreamWriter) -> None:
        try:
            while data := await r.read(1 << 16):
                if self._blocked():
                    continue
                w.write(data)
                await w.drain()
        except ConnectionError:
            pass
        finally:
            self._close(w, other)

    def _close(self, *writers: asyncio.StreamWriter) -> None:
        for w in writers:
            self._writers.discard(w)
            w.close()

    def close(self) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()
            for w in list(self._writers):
                w.close()
            for t in list(self._tasks):
                t.cancel()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()

    def __enter__(self) -> LinkProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
