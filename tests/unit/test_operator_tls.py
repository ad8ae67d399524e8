"""The operator's TLS objects: issued certificates, the agent pod's mount, cert-manager, NetworkPolicy."""

from __future__ import annotations

import base64
import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from support.operator_world import vm
from support.tls_certs import SecretVolume

from colo_agent.api.identity import OPERATOR_IDENTITY, vm_identity
from colo_agent.tls import TlsFiles
from colo_operator import certs, pki
from colo_operator.config import ConfigError, OperatorConfig
from colo_operator.decide import CreatePod
from colo_operator.manifests import TLS_MOUNT, agent_pod, certificate, network_policy, tls_secret
from colo_operator.placement import Place

PLACE = Place(("n3",), (), ())
SECONDARY = CreatePod(name="vm-2", serial=2, role="secondary", peer="10.0.0.10:7700", place=PLACE)
NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def test_a_leaf_names_its_vm_and_chains_to_the_ca() -> None:
    ca = certs.new_ca(NOW)
    leaf = certs.issue(ca, vm_identity("ns", "db"), NOW)
    assert certs.uri_of(leaf.cert_pem) == "spiffe://colo.dev/ns/ns/colovm/db"
    cert = leaf.cert
    cert.verify_directly_issued_by(ca.cert)  # raises if the signature or issuer does not match
    with pytest.raises(InvalidSignature):
        cert.verify_directly_issued_by(certs.new_ca(NOW).cert)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False


def test_renewal_when_two_thirds_of_the_life_are_gone_or_the_ca_changed() -> None:
    ca = certs.new_ca(NOW)
    leaf = certs.issue(ca, OPERATOR_IDENTITY, NOW, lifetime=dt.timedelta(days=30))
    assert not certs.needs_renewal(leaf.cert_pem, NOW + dt.timedelta(days=19), ca)
    assert certs.needs_renewal(leaf.cert_pem, NOW + dt.timedelta(days=21), ca)
    assert certs.needs_renewal(leaf.cert_pem, NOW, certs.new_ca(NOW))
    assert certs.needs_renewal(b"not a certificate", NOW)


def test_the_issued_files_work_with_the_agents_tls_loader(tmp_path: Path) -> None:
    ca = certs.new_ca(dt.datetime.now(dt.UTC))
    leaf = certs.issue(ca, vm_identity("ns", "db"), dt.datetime.now(dt.UTC))
    files = TlsFiles(certs.write_dir(tmp_path, ca, leaf))
    assert files.server_context().minimum_version.name == "TLSv1_3"
    assert (tmp_path / "tls.key").stat().st_mode & 0o077 == 0
    with pytest.raises(ValueError, match=r"tls\.key is missing"):
        (tmp_path / "tls.key").unlink()
        TlsFiles(tmp_path)


def test_the_agent_pod_mounts_its_certificate_and_probes_over_https() -> None:
    pod = agent_pod(vm(), OperatorConfig(), SECONDARY)
    container = pod["spec"]["containers"][0]
    args = container["args"]
    assert args[args.index("--tls-dir") + 1] == TLS_MOUNT and "--insecure-clear" not in args
    assert {"name": "agent-tls", "mountPath": TLS_MOUNT, "readOnly": True} in container["volumeMounts"]
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == "agent-tls")
    assert volume["secret"]["secretName"] == "vm-agent-tls" and "subPath" not in str(container)
    assert container["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    assert container["livenessProbe"]["httpGet"]["scheme"] == "HTTPS"


def test_the_explicit_opt_out_runs_in_clear() -> None:
    pod = agent_pod(vm(spec={"replication": {"insecureClear": True}}), OperatorConfig(), SECONDARY)
    container = pod["spec"]["containers"][0]
    args = container["args"]
    assert args[args.index("--insecure-clear") + 1] == "true" and "--tls-dir" not in args
    assert all(v["name"] != "agent-tls" for v in pod["spec"]["volumes"])
    assert container["readinessProbe"]["httpGet"]["scheme"] == "HTTP"
    secure = agent_pod(vm(), OperatorConfig(), SECONDARY)
    assert secure["metadata"]["annotations"] != pod["metadata"]["annotations"]  # a change rolls the pods


def test_the_tls_secret_carries_the_kubernetes_tls_layout() -> None:
    secret = tls_secret(vm(), b"CERT", b"KEY", b"CA")
    assert secret["type"] == "kubernetes.io/tls"
    assert {k: base64.b64decode(v) for k, v in secret["data"].items()} == {
        "tls.crt": b"CERT", "tls.key": b"KEY", "ca.crt": b"CA"
    }
    assert secret["metadata"]["ownerReferences"][0]["kind"] == "ColoVM"


def test_a_cert_manager_certificate_names_the_vm_and_the_issuer() -> None:
    config = OperatorConfig.from_env({"COLO_CERT_ISSUER": "ClusterIssuer/colo-ca"})
    assert config.issuer_ref is not None
    cert = certificate(vm(), config.issuer_ref)
    assert cert["apiVersion"] == "cert-manager.io/v1" and cert["kind"] == "Certificate"
    spec = cert["spec"]
    assert spec["secretName"] == "vm-agent-tls"
    assert spec["uris"] == [vm_identity(vm().namespace, "vm")]
    assert spec["issuerRef"] == {"group": "cert-manager.io", "kind": "ClusterIssuer", "name": "colo-ca"}
    assert set(spec["usages"]) == {"digital signature", "server auth", "client auth"}
    with pytest.raises(ConfigError, match="COLO_CERT_ISSUER"):
        OperatorConfig.from_env({"COLO_CERT_ISSUER": "colo-ca"})


def test_the_network_policy_admits_the_operator_to_control_and_the_vms_agents_to_replication() -> None:
    policy = network_policy(vm(), "colo-system", {"app.kubernetes.io/name": "colo-operator"})
    spec = policy["spec"]
    agents = {"colo.dev/vm": "vm", "app.kubernetes.io/component": "agent"}
    assert spec["podSelector"] == {"matchLabels": agents} and spec["policyTypes"] == ["Ingress"]
    by_port = {rule["ports"][0]["port"]: rule.get("from") for rule in spec["ingress"]}
    assert by_port[8080] == [{
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "colo-system"}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "colo-operator"}},
    }]  # fmt: skip
    assert by_port[7700] == [{"podSelector": {"matchLabels": agents}}]  # same namespace, same VM only
    assert by_port[6379] is None  # clients of the Service, from anywhere
    assert set(by_port) == {8080, 7700, 6379}


def test_a_ca_bundle_keeps_each_certificate_once_in_order() -> None:
    old, new = certs.new_ca(NOW), certs.new_ca(NOW)
    both = certs.bundle(old.cert_pem, new.cert_pem)
    assert certs.bundle(both, old.cert_pem) == both
    assert certs.bundle(new.cert_pem, both) == new.cert_pem + old.cert_pem
    assert certs.bundle(old.cert_pem, b"") == old.cert_pem
    with pytest.raises(ValueError):
        certs.bundle(b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")


def test_the_operators_own_certificate_is_renewed_before_it_expires() -> None:
    """Issued for 30 days and once used for the operator's whole life: after 30 days
    every control call failed. Now renewed with a third of its life left."""
    clock = [NOW]
    ca = pki.ClusterCa.of(certs.new_ca(NOW - dt.timedelta(days=1)))
    creds = pki.OperatorCredentials(OperatorConfig(), ca, clock=lambda: clock[0])
    first_ctx, first = creds.context(), creds.leaf_pem
    assert certs.uri_of(first) == OPERATOR_IDENTITY
    clock[0] = NOW + dt.timedelta(days=19)
    assert creds.context() is first_ctx and creds.leaf_pem == first
    clock[0] = NOW + dt.timedelta(days=21)
    renewed_ctx = creds.context()
    assert renewed_ctx is not first_ctx and creds.leaf_pem != first
    assert not certs.needs_renewal(creds.leaf_pem, clock[0], ca.signer)
    assert creds.context() is renewed_ctx  # once per renewal, not per call


def test_a_mounted_operator_certificate_is_read_again_when_the_kubelet_updates_it(tmp_path: Path) -> None:
    ca = certs.new_ca(NOW)
    volume = SecretVolume(tmp_path / "tls")
    volume.issue(ca, None)
    creds = pki.OperatorCredentials(OperatorConfig(tls_dir=str(volume.directory)), None)
    first_ctx, first = creds.context(), creds.leaf_pem
    assert creds.context() is first_ctx
    volume.issue(ca, None)  # cert-manager renewed it
    assert creds.context() is not first_ctx and creds.leaf_pem != first
    assert certs.uri_of(creds.leaf_pem) == OPERATOR_IDENTITY


def test_an_agent_keeps_its_last_good_certificate_while_the_files_are_half_written(tmp_path: Path) -> None:
    ca = certs.new_ca(dt.datetime.now(dt.UTC))
    files = TlsFiles(certs.write_dir(tmp_path, ca, certs.issue(ca, vm_identity("ns", "db"), NOW)))
    first = files.server_context()
    renewed = certs.issue(ca, vm_identity("ns", "db"), dt.datetime.now(dt.UTC))
    (tmp_path / "tls.crt").write_bytes(renewed.cert_pem)  # the key does not match it yet
    assert files.server_context() is first
    (tmp_path / "tls.key").write_bytes(renewed.key_pem)
    assert files.server_context() is not first
