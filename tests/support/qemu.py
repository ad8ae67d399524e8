"""The qemu backend's test tools: the patched QEMU, the Linux guest, a writing client.

`.ci/qemu-build` and `.ci/qemu-guest` build both once and cache them under
~/.cache/colo-qemu (CI runs them before the tests); here they only print
the cached paths.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from colo_agent.qemu.colo import Binaries
from colo_agent.qemu.command import Endpoint, GuestSpec

ROOT = Path(__file__).resolve().parents[2]
GUEST_INIT = "agent/colo_agent/qemu/guest-init.sh"  # as .ci/qemu-guest names it


@dataclass(frozen=True)
class QemuTools:
    binaries: Binaries
    guest: Path  # vmlinuz, initrd.img, disk.qcow2

    def spec(self, memory_mib: int = 192) -> GuestSpec:
        g = self.guest
        return GuestSpec(kernel=g / "vmlinuz", initrd=g / "initrd.img", memory_mib=memory_mib)

    def disk_copy(self, dest: Path) -> Path:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.guest / "disk.qcow2", dest)
        return dest


def _last_line(script: str) -> str:
    out = subprocess.run(["bash", str(ROOT / ".ci" / script)], capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(f".ci/{script} failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    return out.stdout.strip().splitlines()[-1]


@cache
def qemu_tools() -> QemuTools:
    qemu = Path(_last_line("qemu-build"))
    guest = Path(_last_line("qemu-guest"))
    return QemuTools(Binaries(qemu=str(qemu), qemu_img=str(qemu.parent / "qemu-img")), guest)


def cached_qemu_tools() -> QemuTools | None:
    """The tools if `.ci/qemu-build` and `.ci/qemu-guest` have built them, else None; never builds.

    The guest's cache key is `.ci/qemu-guest`'s own: the script and the
    guest's /init hashed together."""
    out = subprocess.run(["bash", str(ROOT / ".ci" / "qemu-build"), "--cached"],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    if out.returncode != 0:
        return None
    qemu = Path(out.stdout.strip().splitlines()[-1])
    key = (ROOT / ".ci" / "qemu-guest").read_bytes() + (ROOT / GUEST_INIT).read_bytes()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "colo-qemu"
    guest = cache / f"guest-{hashlib.sha256(key).hexdigest()[:12]}"
    if not all((guest / name).is_file() for name in ("vmlinuz", "initrd.img", "disk.qcow2")):
        return None
    return QemuTools(Binaries(qemu=str(qemu), qemu_img=str(qemu.parent / "qemu-img")), guest)


def redis_client(client: Endpoint, timeout: float, connect_timeout: float | None = None) -> aioredis.Redis:
    """A client that tries each command once.

    redis-py retries a failed command on its own (10 times, with exponential
    backoff and jitter up to 10 s between tries, by default). Around a
    failover that hides what the client saw and when: a write to the dead
    primary would be retried for up to a minute, and the first answer of the
    promoted one would be measured after the client's own sleep, which
    grows with how slowly the machine let the new primary open its port."""
    return aioredis.Redis(host=client.host, port=client.port, socket_timeout=timeout,
                          socket_connect_timeout=connect_timeout or timeout, retry=Retry(NoBackoff(), 0))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def loopback() -> Endpoint:
    return Endpoint("127.0.0.1", free_port())


async def wait_redis(client: Endpoint, timeout: float) -> float:
    """Seconds until the guest's redis answers PING on `client`."""
    start = time.monotonic()
    while True:
        r = redis_client(client, 2.0)
        try:
            if await r.ping():
                return time.monotonic() - start
        except (OSError, aioredis.RedisError):
            pass
        finally:
            await r.aclose()
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"redis in the guest did not answer on {client} within {timeout:.0f}s")
        await asyncio.sleep(0.1)


@dataclass
class Writer:
    """Writes key i = i until stopped; `acked` holds every key whose SET was answered."""

    client: Endpoint
    prefix: str
    acked: list[int] = field(default_factory=list)
    errors: int = 0

    async def run(
        self, stop: asyncio.Event, count: int, pause: float = 0.0, value: bytes | None = None
    ) -> None:
        r = redis_client(self.client, 5.0)
        try:
            for i in range(count):
                if stop.is_set():
                    return
                try:
                    await r.set(f"{self.prefix}:{i}", str(i) if value is None else value)
                except (OSError, aioredis.RedisError):
                    self.errors += 1
                    return
                self.acked.append(i)
                if pause:
                    await asyncio.sleep(pause)
        finally:
            await r.aclose()


async def missing(client: Endpoint, prefix: str, keys: list[int]) -> list[int]:
    r = redis_client(client, 10.0)
    try:
        values = await r.mget([f"{prefix}:{i}" for i in keys]) if keys else []
    finally:
        await r.aclose()
    return [i for i, v in zip(keys, values, strict=True) if v != str(i).encode()]


async def reload_from_disk(client: Endpoint) -> None:
    """Make redis drop its RAM and load the append-only file from the replicated disk."""
    r = redis_client(client, 60.0)
    try:
        await r.execute_command("DEBUG", "LOADAOF")
    finally:
        await r.aclose()
