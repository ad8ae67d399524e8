"""Real `colo-agent run` processes for the test_agent_* suites and the failover benchmark.

`AgentGroup` starts agents of one VM (one secret, one file arbiter) as
separate processes, each in its own process group, optionally inside a
network namespace; it waits on their control API, talks RESP to their
guests and reads their logs. `close()` kills every process group it
started and removes the guests' RAM files, which an agent killed with
SIGKILL leaves behind in /dev/shm.

Namespaced agents are reached from a worker thread that joined the
namespace (`Netns.run`): network namespaces are per thread, so the test
process itself never leaves the root namespace.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import httpx
import pytest

from colo_agent.api.models import AgentStatus, PromoteRequest
from colo_agent.microvm.kvm import kvm_unavailable_reason
from support.resp import RespClient, RespError

T = TypeVar("T")

KVM_REASON = kvm_unavailable_reason()
# tcg is what CI always has; kvm runs as well wherever /dev/kvm opens.
ACCELS = [
    pytest.param("tcg", id="tcg"),
    pytest.param("kvm", id="kvm", marks=[pytest.mark.kvm, pytest.mark.skipif(KVM_REASON is not None,
                                                                              reason=str(KVM_REASON))]),
]

# Generous bounds: several agents, builds and test suites share two cores.
START_TIMEOUT = 60.0
SYNC_TIMEOUT = 120.0
# The fencing lease the demo uses; promotion waits for it to run out, so it
# bounds failover time (the run default, 2 s, suits a cluster's API server).
LEASE_DURATION_MS = 400

_RAM_LINE = re.compile(r"RAM at (\S+\.ram)\b")
_DIGEST_LINE = re.compile(r"epoch-digest term=(\d+) epoch=(\d+) ram=(\S+)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class HarnessError(AssertionError):
    """An agent did not do what the test waited for; the message carries its log tail."""


# --------------------------------------------------------------------------- namespaces

_CLONE_NEWNET = 0x40000000


def netns_unavailable_reason() -> str | None:
    """None if this process may create network namespaces and veths, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_SYS_ADMIN and CAP_NET_ADMIN)"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    return None


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {done.stderr.strip()}")


class Netns:
    """A network namespace created for a test, with a worker thread inside it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def _enter(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/var/run/netns/{self.name}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if libc.setns(fd, _CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns into {self.name}: {os.strerror(err)}")
        finally:
            os.close(fd)

    def run(self, fn: Callable[[], T], timeout: float = 120.0) -> T:
        """Call `fn` in a thread that lives in this namespace (sockets it opens belong here)."""
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=f"netns-{self.name}", initializer=self._enter)
        return self._pool.submit(fn).result(timeout)

    def command(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


@contextlib.contextmanager
def veth_pair(prefix: str, subnet: str = "10.78.0") -> Iterator[tuple[Netns, Netns, str, str]]:
    """Two fresh namespaces joined by a veth: yields (ns_a, ns_b, address_a, address_b).

    The addresses exist inside the namespaces only; everything is removed on exit
    (deleting a namespace deletes its end of the veth, and with it the other end).
    """
    a, b = Netns(f"{prefix}-a"), Netns(f"{prefix}-b")
    addr_a, addr_b = f"{subnet}.1", f"{subnet}.2"
    made: list[Netns] = []
    try:
        for ns in (a, b):
            _ip("netns", "add", ns.name)
            made.append(ns)
            _ip("-n", ns.name, "link", "set", "lo", "up")
        # Interface names are at most 15 bytes; create both ends inside namespace a
        # first so nothing ever appears in the root namespace under a clashing name.
        _ip("-n", a.name, "link", "add", "veth0", "type", "veth", "peer", "name", "veth1", "netns", b.name)
        for ns, addr, dev in ((a, addr_a, "veth0"), (b, addr_b, "veth1")):
            _ip("-n", ns.name, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns.name, "link", "set", dev, "up")
        yield a, b, addr_a, addr_b
    finally:
        for ns in made:
            ns.close()
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                _ip("netns", "del", ns.name)


# --------------------------------------------------------------------------- agents


@dataclass
class AgentProcess:
    name: str
    role: str
    host: str  # where its ports are reached from its namespace (loopback or the veth address)
    client_port: int
    control_port: int
    replication_port: int
    log_path: Path
    proc: subprocess.Popen[bytes]
    netns: Netns | None = None
    ram_files: set[Path] = field(default_factory=set)
    # Over TLS: the client context (the operator's certificate) for the control API.
    tls: ssl.SSLContext | None = None

    # -- network, from the right namespace

    def _in_ns(self, fn: Callable[[], T]) -> T:
        return fn() if self.netns is None else self.netns.run(fn)

    @property
    def control_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.control_port}"

    def status(self) -> AgentStatus | None:
        """`GET /v1/status`, or None while the API does not answer."""
        def get() -> AgentStatus | None:
            try:
                r = httpx.get(f"{self.control_url}/v1/status", timeout=5.0, verify=self.tls or True)
                r.raise_for_status()
                return AgentStatus.from_json(r.text)
            except (httpx.HTTPError, ValueError):
                return None
        return self._in_ns(get)

    def wait_for(self, what: str, predicate: Callable[[AgentStatus], bool],
                 timeout: float = START_TIMEOUT) -> AgentStatus:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise HarnessError(f"{self.name} exited with {self.proc.returncode} while waiting to be "
                                   f"{what}:\n{self.tail()}")
            st = self.status()
            if st is not None and predicate(st):
                return st
            if time.monotonic() > deadline:
                raise HarnessError(f"{self.name} was not {what} within {timeout:.0f} s (last status: "
                                   f"{st}):\n{self.tail()}")
            time.sleep(0.05)

    def promote(self, term: int, secret: str, timeout: float = 30.0) -> httpx.Response:
        def post() -> httpx.Response:
            return httpx.post(
                f"{self.control_url}/v1/promote", content=PromoteRequest(term=term).to_json(),
                headers={"Authorization": f"Bearer {secret}", "Content-Type": "application/json"},
                timeout=timeout, verify=self.tls or True)
        return self._in_ns(post)

    def client(self, timeout: float = 30.0) -> RespClient:
        """A RESP connection to the guest (opened in the agent's namespace)."""
        return self._in_ns(lambda: RespClient.connect(self.host, self.client_port, timeout))

    def in_ns(self, fn: Callable[[], T]) -> T:
        """Run `fn` where this agent's addresses are reachable."""
        return self._in_ns(fn)

    # -- process

    def signal(self, sig: signal.Signals) -> None:
        """Send `sig` to the agent's process group (its vCPU threads included)."""
        if sig in (signal.SIGKILL, signal.SIGTERM):
            self._note_ram_files()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL, and reap: the crash the tests are about."""
        self.signal(signal.SIGKILL)
        self.proc.wait(30)

    def _note_ram_files(self) -> None:
        self.ram_files.update(Path(p) for p in _RAM_LINE.findall(self.log()))
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{self.proc.pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.endswith(".ram") and "colo-vm-" in target:
                        self.ram_files.add(Path(target.removesuffix(" (deleted)")))

    # -- logs

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 25) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def digests(self) -> dict[tuple[int, int], str]:
        """(term, epoch) -> RAM digest, from the `COLO_DEBUG_DIGESTS=1` log lines."""
        return {(int(t), int(e)): d for t, e, d in _DIGEST_LINE.findall(self.log())}


class AgentGroup:
    """The agents of one protected VM: one secret, one file arbiter, one work directory."""

    def __init__(self, workdir: Path, *, accel: str = "tcg", vm: str = "test/colo-vm",
                 lease_duration_ms: int = LEASE_DURATION_MS) -> None:
        self.workdir = workdir
        self.accel = accel
        self.vm = vm
        self.lease_duration_ms = lease_duration_ms
        self.secret = secrets.token_hex(24)
        self.arbiter = workdir / "arbiter.json"
        self.agents: list[AgentProcess] = []

    def spawn(
        self,
        name: str,
        role: str,
        *,
        peer: AgentProcess | None = None,
        peer_host: str | None = None,
        peer_address: str | None = None,
        secret: str | None = None,
        memory: str = "64Mi",
        dirty_rate: int = 0,
        extra: Sequence[str] = (),
        env: dict[str, str] | None = None,
        netns: Netns | None = None,
        host: str = "127.0.0.1",
        tls_dir: Path | None = None,
        tls_client: ssl.SSLContext | None = None,
    ) -> AgentProcess:
        """Start one agent. Its ports listen on `host` (the namespace's address, if any).

        A secondary dials `peer`'s replication port (at `peer_host` if given), or
        `peer_address` (HOST:PORT, e.g. a proxy in between).
        """
        log_path = self.workdir / f"{name}.log"
        agent_ports = (free_port(), free_port(), free_port())
        argv = [
            sys.executable, "-m", "colo_agent", "run",
            "--role", role, "--vm", self.vm, "--identity", name,
            "--memory", memory, "--accel", self.accel, "--dirty-rate", str(dirty_rate),
            "--listen", host, "--host", host,
            "--port", str(agent_ports[0]), "--control-port", str(agent_ports[1]),
            "--replication-port", str(agent_ports[2]),
            "--arbiter", f"file:{self.arbiter}", "--lease-duration-ms", str(self.lease_duration_ms),
            *extra,
        ]
        if peer_address is not None:
            argv += ["--peer", peer_address]
        elif peer is not None:
            argv += ["--peer", f"{peer_host or peer.host}:{peer.replication_port}"]
        if netns is not None:
            argv = netns.command() + argv
        if tls_dir is not None:
            argv += ["--tls-dir", str(tls_dir)]
        # Without a certificate directory, the explicit opt-out (tests of everything but TLS).
        clear = {"COLO_INSECURE_CLEAR": "true"} if tls_dir is None else {}
        full_env = {**os.environ, "COLO_SECRET": secret or self.secret, **clear, **(env or {})}
        with log_path.open("wb") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    env=full_env, start_new_session=True)
        agent = AgentProcess(name, role, host, *agent_ports, log_path=log_path, proc=proc, netns=netns,
                             tls=tls_client)
        self.agents.append(agent)
        return agent

    def pair(self, *, memory: str = "64Mi", dirty_rate: int = 0, extra: Sequence[str] = (),
             env: dict[str, str] | None = None) -> tuple[AgentProcess, AgentProcess]:
        """A primary and a synced secondary on loopback."""
        primary = self.spawn("agent-a", "primary", memory=memory, dirty_rate=dirty_rate, extra=extra, env=env)
        primary.wait_for("serving as primary", lambda s: s.role == "primary")
        secondary = self.spawn("agent-b", "secondary", peer=primary, memory=memory, dirty_rate=dirty_rate,
                               extra=extra, env=env)
        wait_protected(primary, secondary)
        return primary, secondary

    def close(self) -> None:
        """Kill every process group still alive, then remove the RAM files they left."""
        for agent in self.agents:
            if agent.proc.poll() is None:
                agent.signal(signal.SIGCONT)  # a stopped process would ignore SIGTERM until woken
                agent.signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for agent in self.agents:
            with contextlib.suppress(subprocess.TimeoutExpired):
                agent.proc.wait(max(0.1, deadline - time.monotonic()))
            # Kill the group even when the leader exited: nothing of it may outlive the test.
            agent.signal(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                agent.proc.wait(10)
        for agent in self.agents:
            agent._note_ram_files()
            for path in agent.ram_files:
                path.unlink(missing_ok=True)


def wait_protected(primary: AgentProcess, secondary: AgentProcess, timeout: float = SYNC_TIMEOUT) -> int:
    """Until the primary reports a synced secondary that has committed an epoch; returns the term."""
    st = primary.wait_for("protected (secondary synced)", lambda s: s.synced and s.last_acked_epoch > 0,
                          timeout)
    secondary.wait_for("synced", lambda s: s.synced, timeout)
    return st.term


# --------------------------------------------------------------------------- the stream


def queued_bytes(port: int) -> int:
    """Bytes queued right now on TCP connections of the local namespace to or from `port`.

    Send and receive queues both count: on loopback a checkpoint in flight
    shows as data the primary has not got acknowledged or the secondary has
    not read yet. Read from /proc/net/tcp{,6}, so it costs no syscall on the
    agents' sockets and sees them from outside.
    """
    total = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) < 5 or f[3] != "01":  # ESTABLISHED only
                continue
            local, remote = int(f[1].rsplit(":", 1)[1], 16), int(f[2].rsplit(":", 1)[1], 16)
            if port in (local, remote):
                tx, rx = f[4].split(":")
                total += int(tx, 16) + int(rx, 16)
    return total


def wait_mid_stream(port: int, threshold: int = 256 << 10, timeout: float = 10.0) -> int:
    """Until at least `threshold` bytes are in flight on the replication port; returns them.

    Heartbeats and acknowledgements are a few dozen bytes: only a stream of
    pages fills queues this much, so a kill right after is a kill mid-epoch.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        queued = queued_bytes(port)
        if queued >= threshold:
            return queued
    raise HarnessError(f"no checkpoint stream of {threshold} bytes seen on port {port} in {timeout:.0f} s")


# --------------------------------------------------------------------------- writers


@dataclass
class WriteLog:
    """What the guest acknowledged (`+OK`), per key, with the value written."""

    acknowledged: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def write_keys(agent: AgentProcess, prefix: str, stop: Callable[[], bool], log: WriteLog,
               timeout: float = 30.0) -> None:
    """One client writing `prefix:n` = n in order until `stop()` or the connection fails."""
    n = 0
    try:
        with agent.client(timeout) as c:
            while not stop():
                n += 1
                key = f"{prefix}:{n}"
                if c.call("SET", key, str(n)) != b"OK":
                    log.errors.append(f"{key}: unexpected reply")
                    return
                log.acknowledged[key] = n
    except (OSError, ConnectionError, RespError) as exc:
        log.errors.append(f"{prefix}: {exc!r}")


def missing_writes(agent: AgentProcess, log: WriteLog) -> list[str]:
    """Acknowledged keys that the agent's guest does not have (or has with another value)."""
    keys = sorted(log.acknowledged)
    with agent.client() as c:
        values = c.mget(keys)
    return [k for k, v in zip(keys, values, strict=True) if v != str(log.acknowledged[k]).encode()]
