"""The harness's bridge works behind a host firewall like Docker's, and opens nothing else.

Docker sets the FORWARD policy to DROP and turns on
``bridge-nf-call-iptables``, so frames bridged between two namespaces are
dropped. The test builds that firewall inside a network namespace of its
own (standing for a host where Docker runs: iptables and the br_netfilter
switch are per namespace), so the machine's real firewall is never touched,
and checks that ``firewall.open_bridge`` lets exactly one bridge through
and that ``close_bridge`` takes it back.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest

from .cluster import firewall, netns

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, iptables)"),
    pytest.mark.skipif(shutil.which("iptables") is None, reason="needs iptables (Debian package iptables)"),
]

# The rules Docker 20.10 puts in FORWARD (its isolation chains only match its own bridges).
DOCKER_RULES = (
    ("-P", "FORWARD", "DROP"),
    ("-N", "DOCKER-USER"),
    ("-A", "DOCKER-USER", "-j", "RETURN"),
    ("-N", "DOCKER-ISOLATION-STAGE-1"),
    ("-A", "DOCKER-ISOLATION-STAGE-1", "-j", "RETURN"),
    ("-A", "FORWARD", "-j", "DOCKER-USER"),
    ("-A", "FORWARD", "-j", "DOCKER-ISOLATION-STAGE-1"),
)

LISTEN = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 7000)); s.listen(8); print("ready", flush=True)
while True:
    c, _ = s.accept(); c.sendall(b"pong"); c.close()
"""

CONNECT = """
import socket, sys
try:
    with socket.create_connection((sys.argv[1], 7000), timeout=1.0) as c:
        sys.exit(0 if c.recv(4) == b"pong" else 1)
except OSError:
    sys.exit(1)
"""


def _in(ns: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, check=False)


class Host:
    """A namespace with Docker's forwarding firewall and bridges of namespaces on it."""

    def __init__(self) -> None:
        self.id = secrets.token_hex(2)
        self.ns = f"colo-fwhost-{self.id}"
        self.listeners: list[subprocess.Popen[str]] = []

    def start(self) -> None:
        netns.add(self.ns)
        done = _in(self.ns, "sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1")
        assert done.returncode == 0, done.stderr
        for rule in DOCKER_RULES:
            done = _in(self.ns, "iptables", "-w", "5", *rule)
            assert done.returncode == 0, f"iptables {' '.join(rule)}: {done.stderr}"

    def bridge(self, name: str, octet: int) -> tuple[str, str]:
        """A bridge with two namespaces on it; returns their addresses, a server listening on the second."""
        netns.ip("link", "add", name, "type", "bridge", ns=self.ns)
        netns.ip("link", "set", name, "up", ns=self.ns)
        addresses = []
        for i in (1, 2):
            member = f"colo-fw-{self.id}-{name}-{i}"
            netns.add(member)
            address = f"10.{octet}.0.{i}"
            netns.add_veth_to_bridge(self.ns, name, f"{name}v{i}", member, address, 24)
            addresses.append(address)
        member = f"colo-fw-{self.id}-{name}-2"
        server = subprocess.Popen(
            ["ip", "netns", "exec", member, sys.executable, "-c", LISTEN, addresses[1]],
            stdout=subprocess.PIPE,
            text=True,
        )
        self.listeners.append(server)
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        return addresses[0], addresses[1]

    def reaches(self, name: str, target: str) -> bool:
        return _in(f"colo-fw-{self.id}-{name}-1", sys.executable, "-c", CONNECT, target).returncode == 0

    def stop(self) -> None:
        for server in self.listeners:
            server.kill()
            server.wait()
        for name in netns.list_names(f"colo-fw-{self.id}-"):
            netns.delete(name)
        netns.delete(self.ns)


@pytest.fixture
def host() -> Iterator[Host]:
    h = Host()
    try:
        h.start()
        yield h
    finally:
        h.stop()


def test_the_bridge_passes_dockers_forward_drop_and_no_other_bridge_does(host: Host) -> None:
    _, ours = host.bridge("cbfwours", 201)
    _, theirs = host.bridge("cbfwother", 202)
    # The firewall bites: without the rule neither bridge forwards.
    assert not host.reaches("cbfwours", ours)
    assert not host.reaches("cbfwother", theirs)

    assert firewall.open_bridge("cbfwours", ns=host.ns)
    assert host.reaches("cbfwours", ours)
    assert not host.reaches("cbfwother", theirs), "opening our bridge must not open another one"
    policy = _in(host.ns, "iptables", "-S", "FORWARD").stdout
    assert "-P FORWARD DROP" in policy, "the host's policy stays as it was"
    firewall.open_bridge("cbfwours", ns=host.ns)  # idempotent
    assert len(firewall.rules(host.ns)) == 1

    firewall.close_bridge("cbfwours", ns=host.ns)
    assert firewall.rules(host.ns) == []
    assert not host.reaches("cbfwours", ours)


def test_closing_a_bridge_that_was_never_opened_is_harmless(host: Host) -> None:
    firewall.close_bridge("cbfwnever", ns=host.ns)
    assert firewall.rules(host.ns) == []
