"""One QEMU process: start, QMP, events, sequences, kill (asyncio).

The process runs in its own session so that a kill reaches it whatever it
is doing; its QMP socket is a unix socket in the run directory. Every QMP
event is kept with the loop time it arrived at, so waiting for one never
misses an event that came before the wait began.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener, ExecuteError, QMPClient, QMPError

from colo_agent.guest import StreamError
from colo_agent.qemu.command import RunDir
from colo_agent.qemu.plan import Command

log = logging.getLogger(__name__)

QMP_CONNECT_TIMEOUT = 10.0


class QemuError(StreamError):
    """QEMU refused a command, exited, or did not reach a state in time."""


@dataclass(frozen=True)
class Event:
    name: str
    data: dict[str, Any]
    at: float  # time.monotonic() on arrival


def _die_with_parent() -> None:
    """In the child before exec: QEMU gets SIGKILL when the agent that started it dies.

    An agent killed outright (SIGKILL, OOM) must not leave its guest running:
    a primary's QEMU would go on serving clients with no agent holding the
    lease. In a pod the container's end takes QEMU with it anyway; this makes
    it so wherever the agent runs. (The agent spawns QEMU from its event loop
    thread, which lives as long as the agent.)"""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


_PR_SET_PDEATHSIG = 1


class QemuProcess:
    def __init__(self, argv: Sequence[str], run: RunDir, name: str) -> None:
        self.argv = list(argv)
        self.run = run
        self.name = name
        self.qmp = QMPClient(name)
        self.events: list[Event] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._listener = EventListener()
        self._pump: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc else None

    def spawn(self) -> None:
        """Start the QEMU process (the guest boots unless it waits for a migration)."""
        self.run.path.mkdir(parents=True, exist_ok=True)
        self.run.check_paths()
        for stale in (self.run.qmp, self.run.qmp_sync, self.run.compare_in, self.run.compare_out):
            stale.unlink(missing_ok=True)
        with self.run.log.open("ab") as out:
            self._proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=_die_with_parent,
            )
        log.info("%s: started qemu pid %d", self.name, self._proc.pid)

    async def connect(self) -> None:
        """Connect QMP (QEMU creates its socket at start) and start collecting events."""
        if self._pump is not None:
            return
        deadline = time.monotonic() + QMP_CONNECT_TIMEOUT
        while True:
            if self.returncode is not None:
                raise QemuError(f"{self.name}: qemu exited with {self.returncode}: {self.tail_log()}")
            try:
                if not self.run.qmp.exists():
                    raise FileNotFoundError(self.run.qmp)
                await self.qmp.connect(str(self.run.qmp))
                break
            except (QMPError, OSError) as exc:
                if time.monotonic() > deadline:
                    await self.kill()
                    raise QemuError(f"{self.name}: no QMP on {self.run.qmp}: {exc}") from exc
                await asyncio.sleep(0.05)
        self.qmp.register_listener(self._listener)
        self._pump = asyncio.create_task(self._pump_events(), name=f"{self.name}-qmp-events")

    async def start(self) -> None:
        self.spawn()
        await self.connect()

    async def _pump_events(self) -> None:
        async for ev in self._listener:
            data = ev.get("data", {})
            event = Event(str(ev["event"]), dict(data) if isinstance(data, dict) else {}, time.monotonic())
            self.events.append(event)
            log.debug("%s: event %s %s", self.name, event.name, event.data)
            self._changed.set()

    def tail_log(self, lines: int = 5) -> str:
        try:
            text = self.run.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])

    async def execute(self, name: str, args: dict[str, object] | None = None) -> Any:
        try:
            result = await self.qmp.execute(name, args or None)
        except ExecuteError as exc:
            raise QemuError(f"{self.name}: {name}: {exc.error.error.desc}") from exc
        except QMPError as exc:
            raise QemuError(f"{self.name}: {name}: {exc!r}") from exc
        if name == "human-monitor-command" and isinstance(result, str) and result.strip() not in ("", "OK"):
            # HMP reports failure as text, not as a QMP error.
            raise QemuError(f"{self.name}: {args and args.get('command-line')}: {result.strip()}")
        return result

    async def run_plan(self, commands: Iterable[Command]) -> None:
        for cmd in commands:
            try:
                await self.execute(cmd.name, dict(cmd.args))
            except QemuError as exc:
                if not cmd.tolerant:
                    raise
                log.info("%s: %s skipped: %s", self.name, cmd.name, exc)

    def events_since(self, since: float, name: str) -> list[Event]:
        return [e for e in self.events if e.at >= since and e.name == name]

    async def wait_event(
        self, name: str, since: float, timeout: float, match: Callable[[Event], bool] = lambda e: True
    ) -> Event:
        deadline = time.monotonic() + timeout
        while True:
            for e in self.events_since(since, name):
                if match(e):
                    return e
            if self.returncode is not None:
                raise QemuError(f"{self.name}: qemu exited while waiting for {name}: {self.tail_log()}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise QemuError(f"{self.name}: no {name} event within {timeout:.0f}s")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, 0.5))

    async def wait_until(
        self, check: Callable[[], Any], what: str, timeout: float, every: float = 0.1
    ) -> Any:
        """Poll an async QMP query until it returns something true."""
        deadline = time.monotonic() + timeout
        while True:
            value = await check()
            if value:
                return value
            if self.returncode is not None:
                raise QemuError(f"{self.name}: qemu exited while waiting for {what}: {self.tail_log()}")
            if time.monotonic() > deadline:
                raise QemuError(f"{self.name}: {what} not reached within {timeout:.0f}s")
            await asyncio.sleep(every)

    async def run_state(self) -> str:
        status = await self.execute("query-status")
        return str(status["status"])

    def kill_now(self) -> None:
        """SIGKILL, as a crash would; does not wait."""
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)

    async def kill(self) -> None:
        self.kill_now()
        await self.close()

    async def close(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._pump
            self._pump = None
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.qmp.disconnect(), 2.0)
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(self._proc.wait, 5.0)
            if self._proc.poll() is None:
                self.kill_now()
                await asyncio.to_thread(self._proc.wait)
        if self.returncode is not None:
            for sock in (self.run.qmp, self.run.qmp_sync, self.run.compare_in, self.run.compare_out):
                sock.unlink(missing_ok=True)


async def qemu_img_create(qemu_img: str, path: Path, size: int) -> None:
    proc = await asyncio.create_subprocess_exec(
        qemu_img, "create", "-q", "-f", "qcow2", str(path), str(size),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise QemuError(f"qemu-img create {path}: {out.decode(errors='replace').strip()}")
