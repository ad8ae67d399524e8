"""A TCP proxy on loopback that a test can cut and restore: a network partition for one peer.

While cut, established connections are dropped and new ones are accepted and
then left silent (no bytes either way), as a peer behind a partition looks:
requests time out rather than being refused.

`mute_upstream()` is the one-way partition: what the client sends is thrown
away while the target's bytes still reach the client (a peer that still
hears but is no longer heard).

`reply_delay` (seconds) holds each chunk of the target's answer that long
before passing it on: a slow server. The request has reached the target, so
a client that times out meanwhile does not know whether its write landed.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading


class CuttableProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.cut_now = False
        self.upstream_muted = False
        self.reply_delay = 0.0
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="cuttable-proxy", daemon=True)
        self._thread.start()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)

    async def _start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self._writers.add(w)
        if self.cut_now:
            return  # held open and silent until restore() closes it
        try:
            tr, tw = await asyncio.open_connection(*self.target)
        except OSError:
            self._close(w)
            return
        self._writers.add(tw)
        for src, dst, upstream in ((r, tw, True), (tr, w, False)):
            task = asyncio.ensure_future(self._pipe(src, dst, upstream))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, r: asyncio.StreamReader, w: asyncio.StreamWriter, upstream: bool) -> None:
        try:
            while data := await r.read(1 << 16):
                if upstream and self.upstream_muted:
                    continue
                if not upstream and self.reply_delay > 0:
                    await asyncio.sleep(self.reply_delay)
                w.write(data)
                await w.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._close(w)

    def _close(self, w: asyncio.StreamWriter) -> None:
        self._writers.discard(w)
        with contextlib.suppress(Exception):
            w.close()

    def _set(self, cut: bool) -> None:
        self.cut_now = cut
        for w in list(self._writers):
            self._close(w)

    async def _aset(self, cut: bool) -> None:
        self.upstream_muted = False
        self._set(cut)

    def cut(self) -> None:
        """Drop every connection; new ones hang until `restore()`."""
        asyncio.run_coroutine_threadsafe(self._aset(True), self.loop).result(10)

    def mute_upstream(self) -> None:
        """From now on the client's bytes are thrown away; the target's still reach it."""
        self.upstream_muted = True

    def restore(self) -> None:
        """Forward again (the connections held while cut are closed)."""
        asyncio.run_coroutine_threadsafe(self._aset(False), self.loop).result(10)

    def close(self) -> None:
        def stop() -> None:
            if self._server is not None:
                self._server.close()
            self._set(False)
            self.loop.stop()

        self.loop.call_soon_threadsafe(stop)
        self._thread.join(10)
