"""Let traffic across one bridge of ours through a host firewall that drops forwarding.

Docker sets the iptables FORWARD policy to DROP and turns on
``net.bridge.bridge-nf-call-iptables``: every frame bridged between two
ports of *any* Linux bridge then passes the FORWARD chain and is dropped,
which cuts the harness's namespaces off from one another. ufw and
firewalld do the same to forwarded traffic.

``open_bridge`` inserts, at the top of FORWARD, one ACCEPT rule that
matches only frames entering and leaving ``bridge`` (``-i br -o br``: its
own ports talking to each other), tagged with a comment naming the
bridge. Nothing else on the host becomes reachable: routed traffic, other
bridges and Docker's own networks keep whatever the host's rules say.
``close_bridge`` deletes every rule carrying that tag, also after a crash
(the cluster reaper calls it with the dead cluster's bridge name).

The rule goes into the backend that ``iptables`` on PATH drives (the one
Docker uses too) and, when the other backend (legacy or nft) is present
and filters forwarding as well, into that one: a packet must pass both.
Without any iptables command there is no iptables firewall to open.
"""

from __future__ import annotations

import os
import shutil
import subprocess

COMMENT_PREFIX = "colo-e2e:"


class FirewallError(RuntimeError):
    """An iptables command failed; the message carries the command and its stderr."""


def _argv(ns: str | None, binary: str, *args: str) -> list[str]:
    return [*(["ip", "netns", "exec", ns] if ns else []), binary, "-w", "5", *args]


def _run(ns: str | None, binary: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = _argv(ns, binary, *args)
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise FirewallError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done


def _filters_forwarding(ns: str | None, binary: str) -> bool:
    """True when ``binary``'s FORWARD chain has a DROP policy or any rule at all."""
    done = _run(ns, binary, "-S", "FORWARD", check=False)
    if done.returncode != 0:
        return False
    lines = done.stdout.splitlines()
    return any(line.startswith("-A FORWARD") for line in lines) or "-P FORWARD ACCEPT" not in lines


def _legacy_tables_loaded(ns: str | None) -> bool:
    """Legacy tables exist only once the kernel's ip_tables module holds a filter table.

    Asking ``iptables-legacy`` itself would load the module and create them.
    """
    argv = [*(["ip", "netns", "exec", ns] if ns else []), "cat", "/proc/net/ip_tables_names"]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    return done.returncode == 0 and "filter" in done.stdout.split()


def _installed(ns: str | None) -> dict[str, str]:
    """Installed iptables commands by backend (the binary they resolve to), `iptables` first."""
    seen: dict[str, str] = {}
    for name in ("iptables", "iptables-nft", "iptables-legacy"):
        path = shutil.which(name)
        if path is None:
            continue
        real = os.path.realpath(path)
        if "legacy" in real and not _legacy_tables_loaded(ns):
            continue
        seen.setdefault(real, path)
    return seen


def backends(ns: str | None = None) -> list[str]:
    """The iptables commands whose FORWARD chain a bridged frame must pass.

    ``iptables`` always (Docker uses it: a rule there survives a Docker
    started later, which inserts its own jumps above it); the other
    backend only where it filters forwarding already.
    """
    installed = list(_installed(ns).values())
    default = shutil.which("iptables")
    return [b for b in installed if b == default or _filters_forwarding(ns, b)]


def _rule(bridge: str) -> list[str]:
    comment = f"{COMMENT_PREFIX}{bridge}"
    return ["-i", bridge, "-o", bridge, "-m", "comment", "--comment", comment, "-j", "ACCEPT"]


def open_bridge(bridge: str, ns: str | None = None) -> list[str]:
    """Accept forwarding between ``bridge``'s own ports; returns the backends changed."""
    changed = []
    for binary in backends(ns):
        if _run(ns, binary, "-C", "FORWARD", *_rule(bridge), check=False).returncode != 0:
            _run(ns, binary, "-I", "FORWARD", "1", *_rule(bridge))
        changed.append(binary)
    return changed


def close_bridge(bridge: str, ns: str | None = None) -> None:
    """Remove every rule ``open_bridge`` added for ``bridge``; absent rules are fine."""
    for binary in _installed(ns).values():
        for _ in range(16):  # a few duplicates at most; never loop forever
            if _run(ns, binary, "-D", "FORWARD", *_rule(bridge), check=False).returncode != 0:
                break


def rules(ns: str | None = None) -> list[str]:
    """Every FORWARD rule of ours, across backends (for tests and diagnostics)."""
    found = []
    for binary in _installed(ns).values():
        done = _run(ns, binary, "-S", "FORWARD", check=False)
        found += [line for line in done.stdout.splitlines() if COMMENT_PREFIX in line]
    return found
