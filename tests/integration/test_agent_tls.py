"""Agents as processes with mutual TLS: only their own VM's peer and the operator get in,
the operator talks only to the agents of the VM it means, and a renewed certificate
is used from the next pairing on."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from support.agents import AgentGroup, AgentProcess, WriteLog, missing_writes, wait_protected, write_keys
from support.linkproxy import LinkProxy
from support.tls_certs import SecretVolume, now, operator_dir, vm_dir

from colo_agent.api.identity import vm_identity
from colo_agent.api.models import PromoteResult
from colo_agent.tls import TlsFiles
from colo_operator import certs, pki
from colo_operator.agent_client import WRONG_PEER, AgentClient, AgentError
from colo_operator.config import OperatorConfig

VM = "test/colo-vm"
OUR_NAME = vm_identity("test", "colo-vm")


@pytest.fixture
def ca() -> certs.KeyPair:
    return certs.new_ca(now())


@pytest.fixture
def group(tmp_path: Path) -> Iterator[AgentGroup]:
    g = AgentGroup(tmp_path, vm=VM)
    try:
        yield g
    finally:
        g.close()


def presented_serial(port: int, client_dir: Path) -> int:
    """The serial of the certificate an agent's replication port presents."""
    ctx = TlsFiles(client_dir).client_context()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, ctx.wrap_socket(raw) as s:
        der = s.getpeercert(binary_form=True)
    assert der is not None
    return int(x509.load_der_x509_certificate(der).serial_number)


def serial(path: Path) -> int:
    return int(x509.load_pem_x509_certificate((path / "tls.crt").read_bytes()).serial_number)


def test_only_the_vms_own_secondary_pairs_and_only_the_operator_controls(
    group: AgentGroup, tmp_path: Path, ca: certs.KeyPair
) -> None:
    op = TlsFiles(operator_dir(tmp_path / "operator", ca)).client_context()
    primary = group.spawn("agent-a", "primary", tls_dir=vm_dir(tmp_path / "a", ca, VM), tls_client=op)
    primary.wait_for("serving as primary", lambda s: s.role == "primary")

    # A secondary holding another VM's certificate (same CA, same secret even) is refused.
    other = vm_dir(tmp_path / "x", ca, "test/other")
    intruder = group.spawn("intruder", "secondary", peer=primary, tls_dir=other)
    deadline = time.monotonic() + 30
    while "not admitted" not in primary.log() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "spiffe://colo.dev/ns/test/colovm/other is not admitted" in primary.log()
    st = primary.status()
    assert st is not None and not st.synced and st.last_acked_epoch == 0  # nothing streamed to it
    intruder.kill()

    # Its own secondary pairs.
    own = vm_dir(tmp_path / "b", ca, VM)
    secondary = group.spawn("agent-b", "secondary", peer=primary, tls_dir=own, tls_client=op)
    term = wait_protected(primary, secondary)

    # The control API: the operator's certificate is admitted, anything else is not.
    url = f"https://127.0.0.1:{primary.control_port}"
    other_vm = TlsFiles(vm_dir(tmp_path / "y", ca, "test/other")).client_context()
    r = httpx.get(f"{url}/v1/status", verify=other_vm, timeout=5)
    assert r.status_code == 403 and "not admitted" in r.json()["error"]
    r = httpx.post(f"{url}/v1/demote", verify=other_vm, timeout=5,
                   headers={"Authorization": f"Bearer {group.secret}"})
    assert r.status_code == 403
    no_cert = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # trusts the CA, offers no certificate
    no_cert.check_hostname = False
    no_cert.load_verify_locations(cafile=str(tmp_path / "y" / "ca.crt"))
    r = httpx.get(f"{url}/v1/status", verify=no_cert, timeout=5)
    assert r.status_code == 403 and "operator's client certificate" in r.json()["error"]
    r = httpx.post(f"{url}/v1/promote", json={"term": 99}, verify=no_cert, timeout=5,
                   headers={"Authorization": f"Bearer {group.secret}"})
    assert r.status_code == 403
    # Probes carry no certificate and still work.
    assert httpx.get(f"{url}/healthz", verify=no_cert, timeout=5).status_code == 200
    # Clear HTTP to the TLS port gets nothing.
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{primary.control_port}/v1/status", timeout=5)
    st = primary.status()
    assert st is not None and st.role == "primary" and st.term == term and st.synced  # nothing changed


def test_a_renewed_certificate_is_used_from_the_next_pairing(
    group: AgentGroup, tmp_path: Path, ca: certs.KeyPair
) -> None:
    op = TlsFiles(operator_dir(tmp_path / "operator", ca)).client_context()
    pdir = vm_dir(tmp_path / "primary-tls", ca, VM)
    probe_dir = vm_dir(tmp_path / "probe", ca, VM)
    primary = group.spawn("agent-a", "primary", tls_dir=pdir, tls_client=op)
    primary.wait_for("serving as primary", lambda s: s.role == "primary")
    first = serial(pdir)
    # A waiting primary answers on its replication port (a paired one leaves dialers in the backlog).
    assert presented_serial(primary.replication_port, probe_dir) == first
    secondary = group.spawn("agent-b", "secondary", peer=primary, tls_dir=vm_dir(tmp_path / "b", ca, VM),
                            tls_client=op)
    wait_protected(primary, secondary)

    vm_dir(pdir, ca, VM)  # the operator renews the Secret; the kubelet updates the files
    renewed = serial(pdir)
    assert renewed != first
    mark = primary.status()
    assert mark is not None
    primary.wait_for("still protected on the old certificate",
                     lambda s: s.synced and s.last_acked_epoch > mark.last_acked_epoch + 3)  # fmt: skip

    # The next pairing runs on the renewed certificate.
    secondary.kill()
    primary.wait_for("unprotected", lambda s: not s.synced)
    assert presented_serial(primary.replication_port, probe_dir) == renewed
    replacement = group.spawn("agent-c", "secondary", peer=primary, tls_dir=vm_dir(tmp_path / "c", ca, VM),
                              tls_client=op)
    wait_protected(primary, replacement)


def test_lockstep_over_tls_releases_output_on_match(
    group: AgentGroup, tmp_path: Path, ca: certs.KeyPair
) -> None:
    """The mirror link over TLS: output leaves when both guests produced it, not by timeout."""
    op = TlsFiles(operator_dir(tmp_path / "operator", ca)).client_context()
    extra = ["--mode", "lockstep"]
    primary = group.spawn("agent-a", "primary", tls_dir=vm_dir(tmp_path / "a", ca, VM), tls_client=op,
                          extra=extra)
    primary.wait_for("serving as primary", lambda s: s.role == "primary")
    secondary = group.spawn("agent-b", "secondary", peer=primary, tls_dir=vm_dir(tmp_path / "b", ca, VM),
                            tls_client=op, extra=extra)  # fmt: skip
    wait_protected(primary, secondary)
    with primary.client() as client:
        for i in range(50):
            assert client.call("SET", f"k{i}", "v") == b"OK"
    st = primary.status()
    assert st is not None and st.lockstep is not None
    assert st.lockstep.released_on_match_bytes > 0, st.lockstep


def test_the_operator_refuses_an_agent_whose_certificate_names_another_vm(
    group: AgentGroup, tmp_path: Path, ca: certs.KeyPair
) -> None:
    """A stale status or a reused pod address can point the operator at another VM's
    agent: that agent gets neither the request nor the bearer token."""
    op = TlsFiles(operator_dir(tmp_path / "operator", ca)).client_context()
    ours = group.spawn("agent-a", "primary", tls_dir=vm_dir(tmp_path / "a", ca, VM), tls_client=op)
    # Another VM's primary, same CA and even the same bearer secret: only the name differs.
    others = AgentGroup(tmp_path / "other", vm="test/other")
    others.secret = group.secret
    (tmp_path / "other").mkdir()
    try:
        theirs = others.spawn("agent-x", "primary", tls_dir=vm_dir(tmp_path / "x", ca, "test/other"),
                              tls_client=op)
        for agent in (ours, theirs):
            agent.wait_for("serving as primary", lambda s: s.role == "primary")
        asyncio.run(_operator_calls(op, ours, theirs, group.secret))
    finally:
        others.close()


async def _operator_calls(op: ssl.SSLContext, ours: AgentProcess, theirs: AgentProcess, token: str) -> None:
    client = AgentClient(tls=op, timeout_s=5.0)
    us, them = vm_identity("test", "colo-vm"), vm_identity("test", "other")
    try:
        report = await client.status("127.0.0.1", ours.control_port, peer=us)
        assert report.status is not None and report.status.role == "primary", report.error
        # The same address reached with another VM's name in mind: refused, although
        # a connection to it, checked for its own name, is open in the pool.
        report = await client.status("127.0.0.1", ours.control_port, peer=them)
        assert report.status is None and report.error is not None
        assert f"presented {us}, not {them}" in report.error

        with pytest.raises(AgentError) as refused:
            await client.demote("127.0.0.1", theirs.control_port, token, peer=us)
        assert refused.value.reason == WRONG_PEER and "nothing was sent" in str(refused.value)
        # Addressed by its own name, the same request reaches it and the agent answers
        # (no secondary, so it declines to step down): the refusal above was the operator's.
        with pytest.raises(AgentError) as answered:
            await client.demote("127.0.0.1", theirs.control_port, token, peer=them)
        assert answered.value.status == 503 and "no synced secondary" in str(answered.value)
        st = theirs.status()
        assert st is not None and st.role == "primary"
        report = await client.status("127.0.0.1", ours.control_port, peer=us)
        assert report.status is not None and report.status.role == "primary"
    finally:
        await client.aclose()


def _pairings(agent: AgentProcess) -> int:
    return agent.log().count("pairing with a primary")


def _pair_again(proxy: LinkProxy, primary: AgentProcess, secondary: AgentProcess, probe: Path) -> int:
    """Cut the replication link and pair again; returns the serial of the certificate the
    primary's replication port presented in between (probed with the certificate in `probe`)."""
    before, mark = _pairings(secondary), primary.status()
    assert mark is not None
    proxy.partition()
    try:
        primary.wait_for("without its secondary", lambda s: not s.synced, timeout=60)
        presented = presented_serial(primary.replication_port, probe)
    finally:
        proxy.heal()  # closes every connection that lived through the partition
    deadline = time.monotonic() + 60
    while _pairings(secondary) <= before:
        assert time.monotonic() < deadline, f"no new pairing:\n{secondary.tail()}\n{primary.tail()}"
        time.sleep(0.05)
    wait_protected(primary, secondary)
    primary.wait_for("acknowledging epochs on the new pairing",
                     lambda s: s.synced and s.last_acked_epoch > mark.last_acked_epoch + 2)  # fmt: skip
    return presented


def test_certificates_and_the_ca_rotate_under_a_protected_pair_and_nothing_is_lost(
    group: AgentGroup, tmp_path: Path
) -> None:
    """Kubelet-style Secret updates under running agents: a renewed certificate, then a
    CA rotation (stage the new CA in the bundle, switch the signer, retire the old CA).
    Each step is followed by a forced re-pairing, which runs on whatever the files hold
    now; the operator's calls carry on; no acknowledged write is lost at the failover
    that ends it."""
    old, new = certs.new_ca(now()), certs.new_ca(now())
    both = certs.bundle(old.cert_pem, new.cert_pem)
    pvol, svol, opvol, probe = (SecretVolume(tmp_path / d) for d in ("a", "b", "operator", "probe"))
    pvol.issue(old, VM)
    svol.issue(old, VM)
    opvol.issue(old, None)
    operator = pki.OperatorCredentials(OperatorConfig(tls_dir=str(opvol.directory)), None)
    old_operator = operator.context()
    primary = group.spawn("agent-a", "primary", tls_dir=pvol.directory, tls_client=old_operator)
    primary.wait_for("serving as primary", lambda s: s.role == "primary")
    writes, stop = WriteLog(), threading.Event()
    with LinkProxy(primary.replication_port) as proxy:
        secondary = group.spawn("agent-b", "secondary", peer_address=proxy.address, tls_dir=svol.directory,
                                tls_client=old_operator)
        term = wait_protected(primary, secondary)
        writer = threading.Thread(target=write_keys, args=(primary, "w", stop.is_set, writes))
        writer.start()
        try:
            def step(signer: certs.KeyPair, trust: bytes, *updates: Callable[[], object]) -> None:
                for update in updates:
                    update()
                for agent in (primary, secondary):
                    agent.tls = operator.context()
                probe.issue(signer, VM, trust)
                assert _pair_again(proxy, primary, secondary, probe.directory) == serial(pvol.directory)
                _operator_sees_both(operator, primary, secondary)

            first = serial(pvol.directory)
            step(old, old.cert_pem, lambda: pvol.issue(old, VM))  # renewal, same CA
            assert serial(pvol.directory) != first
            step(old, both, lambda: pvol.trust(both), lambda: svol.trust(both), lambda: opvol.trust(both))
            # Switch: the primary's Secret is updated first, so one pairing mixes a new-CA and an
            # old-CA certificate; then the others.
            step(new, both, lambda: pvol.issue(new, VM, both))
            step(new, both, lambda: svol.issue(new, VM, both), lambda: opvol.issue(new, None, both))
            # Retire: the old CA is trusted nowhere.
            step(new, new.cert_pem, lambda: pvol.trust(new.cert_pem), lambda: svol.trust(new.cert_pem),
                 lambda: opvol.trust(new.cert_pem))
            # The operator's certificate of the old CA no longer opens the control API.
            with pytest.raises(httpx.HTTPError):
                httpx.get(f"https://127.0.0.1:{primary.control_port}/v1/status", verify=old_operator,
                          timeout=5)
        finally:
            stop.set()
            writer.join(60)
        assert len(writes.acknowledged) > 20 and not writes.errors, writes.errors
        assert missing_writes(primary, writes) == []
        st = primary.status()
        assert st is not None and st.term == term  # no failover happened on the way

    # Failover: the promoted agent lost nothing, and a fresh secondary that knows only the
    # new CA pairs with it, so its replication port, never restarted, runs on the new files too.
    primary.kill()
    result = asyncio.run(_operator_promotes(operator, secondary, group.secret, term + 1))
    assert result.term == term + 1
    assert missing_writes(secondary, writes) == []
    fresh = group.spawn("agent-c", "secondary", peer=secondary, tls_dir=vm_dir(tmp_path / "c", new, VM),
                        tls_client=operator.context())
    wait_protected(secondary, fresh)


def _operator_sees_both(operator: pki.OperatorCredentials, *agents: AgentProcess) -> None:
    async def poll() -> None:
        client = AgentClient(tls=operator.context, timeout_s=5.0)
        try:
            for agent in agents:
                report = await client.status("127.0.0.1", agent.control_port, peer=OUR_NAME)
                assert report.status is not None and report.status.synced, report.error
        finally:
            await client.aclose()

    asyncio.run(poll())


async def _operator_promotes(
    operator: pki.OperatorCredentials, agent: AgentProcess, token: str, term: int
) -> PromoteResult:
    client = AgentClient(tls=operator.context, timeout_s=30.0)
    try:
        return await client.promote("127.0.0.1", agent.control_port, token, term, peer=OUR_NAME)
    finally:
        await client.aclose()
