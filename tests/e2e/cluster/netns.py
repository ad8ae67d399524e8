"""Thin wrappers over iproute2 for the cluster's bridge, namespaces and routes.

Every address used here lives on a bridge the harness creates, inside
namespaces it creates, or on loopback. Nothing is routed off the machine:
namespaces get no default route, only the bridge's subnet, and the service
CIDR is blackholed so a client that resolves a Service's ClusterIP fails
at once instead of sending packets anywhere.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

NETNS_DIR = Path("/run/netns")


class NetnsError(RuntimeError):
    """An ip command failed; the message carries the command and its stderr."""


def ip(*args: str, ns: str | None = None, check: bool = True) -> str:
    argv = ["ip", *(["-n", ns] if ns else []), *args]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise NetnsError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done.stdout


def exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def add(name: str) -> None:
    ip("netns", "add", name)
    ip("link", "set", "lo", "up", ns=name)


def delete(name: str) -> None:
    """Kill what still runs in ``name`` and remove it; a missing namespace is fine."""
    kill_all(name)
    if exists(name):
        ip("netns", "delete", name, check=False)


def pids(name: str) -> list[int]:
    if not exists(name):
        return []
    out = ip("netns", "pids", name, check=False)
    return [int(p) for p in out.split() if p.isdigit()]


def _is_host_namespace(name: str) -> bool:
    """True when ``name`` is a handle on this process's or init's namespace."""
    try:
        target = os.stat(NETNS_DIR / name)
    except FileNotFoundError:
        return False
    for own in ("/proc/self/ns/net", "/proc/1/ns/net"):
        with contextlib.suppress(OSError):
            st = os.stat(own)
            if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
                return True
    return False


def kill_all(name: str, sig: int = signal.SIGKILL) -> None:
    if _is_host_namespace(name):
        raise NetnsError(f"refusing to kill every process of {name}: it is the host's network namespace")
    for pid in pids(name):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def list_names(prefix: str) -> list[str]:
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(prefix))
    except FileNotFoundError:
        return []


def mac_for(address: str) -> str:
    """A locally administered MAC address derived from an IPv4 address (02:c0:a:b:c:d)."""
    return "02:c0:" + ":".join(f"{int(octet):02x}" for octet in address.split("."))


def add_veth_to_bridge(
    root_ns: str | None, bridge: str, host_end: str, ns: str, address: str, prefix_len: int
) -> None:
    """A veth pair: ``host_end`` on ``bridge`` (in ``root_ns``), ``eth0`` with ``address`` in ``ns``.

    eth0's MAC address is derived from its IP address. A pod's address is
    reused by a later pod; with the same MAC, the neighbour entries other
    namespaces still hold for it stay right, where a fresh random MAC would
    leave them sending to a vanished port until their entry goes stale.
    """
    mac = mac_for(address)
    ip(
        "link", "add", host_end, "type", "veth", "peer", "name", "eth0", "address", mac, "netns", ns,
        ns=root_ns,
    )  # fmt: skip
    ip("link", "set", host_end, "master", bridge, "up", ns=root_ns)
    ip("addr", "add", f"{address}/{prefix_len}", "dev", "eth0", ns=ns)
    ip("link", "set", "eth0", "up", ns=ns)


def set_link(dev: str, up: bool, ns: str | None = None) -> None:
    ip("link", "set", dev, "up" if up else "down", ns=ns, check=False)


def blackhole(ns: str | None, cidrs: Sequence[str], metric: int | None = None) -> None:
    for cidr in cidrs:
        extra = ["metric", str(metric)] if metric is not None else []
        ip("route", "replace", "blackhole", cidr, *extra, ns=ns)


def unblackhole(ns: str | None, cidrs: Sequence[str], metric: int | None = None) -> None:
    for cidr in cidrs:
        extra = ["metric", str(metric)] if metric is not None else []
        ip("route", "del", "blackhole", cidr, *extra, ns=ns, check=False)


def blackholes(ns: str | None) -> set[str]:
    out = ip("route", "show", "type", "blackhole", ns=ns, check=False)
    return {line.split()[1] for line in out.splitlines() if len(line.split()) > 1}
