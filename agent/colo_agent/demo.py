"""`colo-agent demo`: a primary, a secondary, a client, a crash, and a check that nothing was lost.

No cluster is needed. The demo starts two `colo-agent run` processes on
loopback (a file arbiter stands in for the Kubernetes Lease), waits until the
secondary is synced, drives a client that writes numbered keys through the
primary, shows live progress, kills the primary with SIGKILL, promotes the
secondary through its control API (the part the operator plays in a
cluster), and reads every acknowledged key back from the new primary.
It exits 0 only if every write a client saw acknowledged is there.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.live import Live
from rich.table import Table

from colo_agent.api.models import AgentStatus, PromoteRequest
from colo_agent.constants import CHANNELS, CHECKPOINT_INTERVAL_MS, LOCKSTEP_CHECKPOINT_INTERVAL_MS

SECRET_BYTES = 32


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo",
        help="protect a micro-VM, crash its primary and show that no acknowledged write is lost",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--memory", default="64Mi", help="guest RAM (default: %(default)s)")
    p.add_argument("--accel", default="auto", choices=["auto", "kvm", "tcg"],
                   help="accelerator for both agents (default: %(default)s)")
    p.add_argument("--mode", default="checkpoint", choices=["checkpoint", "lockstep"],
                   help="replication mode (default: %(default)s)")
    p.add_argument("--channels", type=int, default=CHANNELS,
                   help="multifd data channels (default: %(default)s)")
    p.add_argument("--interval-ms", type=int, default=None,
                   help=f"checkpoint interval (default: {CHECKPOINT_INTERVAL_MS}, "
                   f"or {LOCKSTEP_CHECKPOINT_INTERVAL_MS} in lockstep mode)")
    p.add_argument("--writes-for", type=float, default=5.0, metavar="SECONDS",
                   help="how long the client writes before the primary is killed (default: %(default)s)")
    p.add_argument("--clients", type=int, default=4, help="concurrent writing clients (default: %(default)s)")
    p.add_argument("--lease-duration-ms", type=int, default=400,
                   help="fencing lease of the file arbiter (default: %(default)s)")
    p.add_argument("--plain", action="store_true",
                   help="print progress lines instead of a live table (automatic without a terminal)")
    p.add_argument("--keep", action="store_true", help="keep the work directory with the agents' logs")
    p.set_defaults(func=lambda args: asyncio.run(Demo(args).run()))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class AgentProcess:
    name: str
    role: str
    client_port: int
    control_port: int
    replication_port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def control_url(self) -> str:
        return f"http://127.0.0.1:{self.control_port}"


@dataclass
class ClientTally:
    acknowledged: dict[str, int] = field(default_factory=dict)
    errors: int = 0


class DemoFailed(Exception):
    pass


class Demo:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.console = Console(stderr=False)
        self.plain = args.plain or not self.console.is_terminal
        self.workdir = Path(tempfile.mkdtemp(prefix="colo-demo-"))
        self.secret = secrets.token_hex(SECRET_BYTES)
        self.arbiter = self.workdir / "arbiter.json"
        self.tally = ClientTally()
        self.http = httpx.AsyncClient(timeout=2.0)
        # One status poll per refresh would drown the story in request logs.
        logging.getLogger("httpx").setLevel(logging.WARNING)
        self.agents: list[AgentProcess] = []

    # ------------------------------------------------------------------ processes

    def _spawn(self, name: str, role: str, peer: AgentProcess | None) -> AgentProcess:
        agent = AgentProcess(name, role, free_port(), free_port(), free_port(), self.workdir / f"{name}.log")
        a = self.args
        argv = [
            sys.executable, "-m", "colo_agent", "run",
            "--role", role, "--vm", "demo/colo-demo", "--identity", name,
            "--memory", a.memory, "--accel", a.accel, "--mode", a.mode,
            "--channels", str(a.channels),
            "--port", str(agent.client_port), "--control-port", str(agent.control_port),
            "--replication-port", str(agent.replication_port),
            "--arbiter", f"file:{self.arbiter}", "--lease-duration-ms", str(a.lease_duration_ms),
        ]
        if a.interval_ms is not None:
            argv += ["--interval-ms", str(a.interval_ms)]
        if peer is not None:
            argv += ["--peer", f"127.0.0.1:{peer.replication_port}"]
        # Both agents on this machine's loopback: the demo opts out of TLS explicitly.
        env = dict(os.environ, COLO_SECRET=self.secret, COLO_INSECURE_CLEAR="true")
        with agent.log_path.open("wb") as log:
            agent.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                          start_new_session=True)
        self.agents.append(agent)
        return agent

    async def _status(self, agent: AgentProcess) -> AgentStatus | None:
        try:
            r = await self.http.get(f"{agent.control_url}/v1/status")
            r.raise_for_status()
            return AgentStatus.from_json(r.text)
        except (httpx.HTTPError, ValueError):
            return None

    async def _wait_for(self, agent: AgentProcess, what: str, predicate: Any, timeout: float) -> AgentStatus:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if agent.proc is not None and agent.proc.poll() is not None:
                raise DemoFailed(f"{agent.name} exited with {agent.proc.returncode} while {what}; "
                                 f"see {agent.log_path}:\n{self._tail(agent)}")
            st = await self._status(agent)
            if st is not None and predicate(st):
                return st
            await asyncio.sleep(0.1)
        raise DemoFailed(f"{agent.name} did not become {what} within {timeout:.0f} s; see {agent.log_path}"
                         f":\n{self._tail(agent)}")

    @staticmethod
    def _tail(agent: AgentProcess, lines: int = 15) -> str:
        try:
            return "\n".join(agent.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # ------------------------------------------------------------------ client

    async def _writer(self, agent: AgentProcess, client_id: int, stop: asyncio.Event) -> None:
        """Write `key:<client>:<n>` = n, one at a time; remember what was acknowledged."""
        n = 0
        while not stop.is_set():
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", agent.client_port)
            except OSError:
                self.tally.errors += 1
                await asyncio.sleep(0.05)
                continue
            try:
                while not stop.is_set():
                    n += 1
                    key = f"key:{client_id}:{n}"
                    value = str(n)
                    writer.write(_resp("SET", key, value))
                    await writer.drain()
                    line = await reader.readline()
                    if line != b"+OK\r\n":
                        raise ConnectionError(f"unexpected reply {line!r}")
                    self.tally.acknowledged[key] = n
            except (OSError, ConnectionError, asyncio.IncompleteReadError):
                self.tally.errors += 1
            finally:
                writer.close()
                with contextlib.suppress(OSError, ConnectionError):
                    await writer.wait_closed()

    async def _verify(self, agent: AgentProcess) -> list[str]:
        reader, writer = await asyncio.open_connection("127.0.0.1", agent.client_port)
        missing: list[str] = []
        keys = list(self.tally.acknowledged.items())
        for start in range(0, len(keys), 256):
            batch = keys[start:start + 256]
            writer.write(_resp("MGET", *[k for k, _ in batch]))
            await writer.drain()
            values = await _read_array(reader)
            for (key, want), got in zip(batch, values, strict=True):
                if got is None or int(got) < want:
                    missing.append(key)
        writer.close()
        return missing

    # ------------------------------------------------------------------ live view

    def _table(
        self, primary: AgentStatus | None, phase: str, started: float, last: dict[str, float]
    ) -> Table:
        t = Table(title=f"colo-agent demo — {phase}", show_header=True, header_style="bold")
        for col in ("elapsed", "term", "epoch", "epochs/s", "pause ms", "MB/s", "acked writes", "errors"):
            t.add_column(col, justify="right")
        now = time.monotonic()
        epochs_s = mbs = 0.0
        pause = "-"
        term = epoch = "-"
        if primary is not None:
            term, epoch = str(primary.term), str(primary.last_acked_epoch)
            dt = now - last.get("t", now)
            if dt > 0 and "epoch" in last:
                epochs_s = (primary.last_acked_epoch - last["epoch"]) / dt
                mbs = (primary.totals.bytes - last["bytes"]) / dt / 1e6
            if primary.last_checkpoint is not None:
                pause = f"{primary.last_checkpoint.pause_ms:.2f}"
            last.update(t=now, epoch=primary.last_acked_epoch, bytes=primary.totals.bytes)
        t.add_row(f"{now - started:.1f} s", term, epoch, f"{epochs_s:.1f}", pause, f"{mbs:.1f}",
                  str(len(self.tally.acknowledged)), str(self.tally.errors))
        return t

    async def _show_progress(self, agent: AgentProcess, phase: str, seconds: float) -> None:
        started = time.monotonic()
        last: dict[str, float] = {}
        if self.plain:
            while time.monotonic() - started < seconds:
                await asyncio.sleep(1.0)
                st = await self._status(agent)
                self.console.print(self._table(st, phase, started, last))
            return
        first = self._table(None, phase, started, last)
        with Live(first, console=self.console, refresh_per_second=4) as live:
            while time.monotonic() - started < seconds:
                await asyncio.sleep(0.25)
                live.update(self._table(await self._status(agent), phase, started, last))

    # ------------------------------------------------------------------ the story

    async def run(self) -> int:
        try:
            return await self._run()
        except DemoFailed as exc:
            self.console.print(f"[bold red]demo failed:[/] {exc}")
            return 1
        finally:
            await self.http.aclose()
            for agent in self.agents:
                if agent.proc is not None and agent.proc.poll() is None:
                    agent.proc.send_signal(signal.SIGTERM)
                    try:
                        agent.proc.wait(5)
                    except subprocess.TimeoutExpired:
                        agent.proc.kill()
            if self.args.keep:
                self.console.print(f"logs kept in {self.workdir}")
            else:
                for p in self.workdir.iterdir():
                    p.unlink(missing_ok=True)
                self.workdir.rmdir()

    async def _run(self) -> int:
        say = self.console.print
        say("[bold]1.[/] starting a primary and a secondary agent (separate processes, loopback)")
        primary = self._spawn("agent-a", "primary", None)
        await self._wait_for(primary, "serving", lambda s: s.role == "primary", 60)
        secondary = self._spawn("agent-b", "secondary", primary)
        st = await self._wait_for(primary, "protected (secondary synced)", lambda s: s.synced, 120)
        say(f"   secondary synced: term {st.term}, first epoch {st.last_acked_epoch}, "
            f"guest {st.guest.accel} {st.guest.memory_bytes >> 20} MiB")

        say(f"[bold]2.[/] {self.args.clients} clients write numbered keys through the primary "
            f"for {self.args.writes_for:.0f} s")
        stop = asyncio.Event()
        writers = [asyncio.create_task(self._writer(primary, i, stop)) for i in range(self.args.clients)]
        await self._show_progress(primary, "writing", self.args.writes_for)
        before_kill = await self._status(primary)

        say("[bold]3.[/] SIGKILL of the primary")
        assert primary.proc is not None
        killed_at = time.monotonic()
        primary.proc.kill()
        primary.proc.wait()
        stop.set()
        await asyncio.gather(*writers)
        acked = len(self.tally.acknowledged)

        term = (before_kill.term if before_kill else 1) + 1
        say(f"[bold]4.[/] promoting the secondary with term {term}")
        r = await self.http.post(
            f"{secondary.control_url}/v1/promote",
            content=PromoteRequest(term=term).to_json(),
            headers={"Authorization": f"Bearer {self.secret}", "Content-Type": "application/json"},
            timeout=30.0,
        )
        if r.status_code != 200:
            raise DemoFailed(f"promote refused: {r.status_code} {r.text}\n{self._tail(secondary)}")
        # The first write that succeeds on the new primary ends the failover.
        while True:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", secondary.client_port)
                writer.write(_resp("SET", "after-failover", "1"))
                await writer.drain()
                if await reader.readline() == b"+OK\r\n":
                    writer.close()
                    break
                writer.close()
            except OSError:
                pass
            if time.monotonic() - killed_at > 30:
                raise DemoFailed("the new primary did not accept a write within 30 s")
            await asyncio.sleep(0.01)
        failover = time.monotonic() - killed_at

        say(f"[bold]5.[/] checking all {acked} acknowledged writes on the new primary")
        missing = await self._verify(secondary)
        final = await self._status(secondary)
        summary = Table(show_header=False)
        summary.add_row("acknowledged writes", str(acked))
        summary.add_row("missing after failover", str(len(missing)))
        summary.add_row("failover (kill -> first write)", f"{failover * 1000:.0f} ms")
        if final is not None:
            summary.add_row("new primary term", str(final.term))
        if before_kill is not None:
            summary.add_row("epochs before the crash", str(before_kill.last_acked_epoch))
        say(summary)
        if missing:
            say(f"[bold red]LOST {len(missing)} acknowledged writes[/], e.g. {missing[:5]}")
            return 1
        if acked == 0:
            raise DemoFailed("the client got no write acknowledged; nothing was tested")
        say("[bold green]no acknowledged write was lost[/]")
        return 0


def _resp(*parts: str) -> bytes:
    out = [f"*{len(parts)}\r\n".encode()]
    for p in parts:
        b = p.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


async def _read_array(reader: asyncio.StreamReader) -> list[bytes | None]:
    head = await reader.readline()
    if not head.startswith(b"*"):
        raise DemoFailed(f"expected an array reply, got {head!r}")
    items: list[bytes | None] = []
    for _ in range(int(head[1:])):
        line = await reader.readline()
        if line.startswith(b"$-1"):
            items.append(None)
            continue
        n = int(line[1:])
        items.append((await reader.readexactly(n + 2))[:-2])
    return items
