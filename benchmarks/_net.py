"""Network paths for the benchmarks: loopback, or two namespaces joined by a veth.

The veth pair lives only inside the two namespaces it creates (10.77.0.1/24
and 10.77.0.2/24, no routes beyond that subnet), so no packet can leave the
machine. Names carry the process id, so parallel runs do not collide.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Path:
    """Where each side runs: a command prefix and the address the other side dials."""

    name: str
    client_prefix: tuple[str, ...]
    server_prefix: tuple[str, ...]
    server_addr: str


LOOPBACK = Path("loopback", (), (), "127.0.0.1")


class NetnsUnavailable(RuntimeError):
    pass


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise NetnsUnavailable(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")


@contextlib.contextmanager
def veth_pair() -> Iterator[Path]:
    """Two fresh namespaces joined by a veth; removed on exit (with anything left in them).

    Raises NetnsUnavailable where namespaces cannot be made (not root, no
    iproute2, a sandbox without CAP_SYS_ADMIN).
    """
    if os.geteuid() != 0 or shutil.which("ip") is None:
        raise NetnsUnavailable("needs root and iproute2 to create network namespaces")
    tag = str(os.getpid())
    ns_a, ns_b = f"colo-stream-a-{tag}", f"colo-stream-b-{tag}"
    dev_a, dev_b = f"csa{tag}"[:15], f"csb{tag}"[:15]
    created: list[str] = []
    try:
        for ns in (ns_a, ns_b):
            _ip("netns", "add", ns)
            created.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("link", "add", dev_a, "netns", ns_a, "type", "veth", "peer", "name", dev_b, "netns", ns_b)
        _ip("-n", ns_a, "addr", "add", "10.77.0.1/24", "dev", dev_a)
        _ip("-n", ns_b, "addr", "add", "10.77.0.2/24", "dev", dev_b)
        _ip("-n", ns_a, "link", "set", dev_a, "up")
        _ip("-n", ns_b, "link", "set", dev_b, "up")
        yield Path("veth", ("ip", "netns", "exec", ns_a), ("ip", "netns", "exec", ns_b), "10.77.0.2")
    finally:
        for ns in created:
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, check=False)
            for pid in pids.stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), 9)
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True, check=False)
