"""The e2e harness's certificates work for real TLS with client authentication."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading
from pathlib import Path

import pytest
from cluster.pki import CertificateAuthority, service_account_keys

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")


def openssl(*args: str) -> str:
    return subprocess.run(["openssl", *args], capture_output=True, text=True, check=True).stdout


def test_serving_and_client_certificates_complete_a_mutual_tls_handshake(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path)
    server = ca.issue("server", "kube-apiserver", server_names=["127.0.0.1", "kubernetes.default"])
    client = ca.issue("admin", "colo-e2e-admin", ["system:masters"])

    sans = openssl("x509", "-in", str(server.cert), "-noout", "-ext", "subjectAltName")
    assert "IP Address:127.0.0.1" in sans and "DNS:kubernetes.default" in sans
    subject = openssl("x509", "-in", str(client.cert), "-noout", "-subject")
    assert "O = system:masters" in subject and "CN = colo-e2e-admin" in subject

    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(str(server.cert), str(server.key))
    server_ctx.load_verify_locations(str(ca.cert))
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    client_ctx = ssl.create_default_context(cafile=str(ca.cert))
    client_ctx.load_cert_chain(str(client.cert), str(client.key))

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    peer: dict[str, object] = {}

    def serve() -> None:
        conn, _ = listener.accept()
        with server_ctx.wrap_socket(conn, server_side=True) as tls:
            peer["cert"] = tls.getpeercert()
            tls.sendall(b"ok")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        client_ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        assert tls.recv(2) == b"ok"
    thread.join(10)
    listener.close()
    subject_fields = dict(item[0] for item in peer["cert"]["subject"])  # type: ignore[index]
    assert subject_fields["commonName"] == "colo-e2e-admin"
    assert subject_fields["organizationName"] == "system:masters"


def test_a_client_certificate_cannot_serve(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path)
    client = ca.issue("node", "system:node:node-1", ["system:nodes"])
    purpose = openssl("x509", "-in", str(client.cert), "-noout", "-ext", "extendedKeyUsage")
    assert "TLS Web Client Authentication" in purpose
    assert "TLS Web Server Authentication" not in purpose


def test_bad_subjects_are_refused_before_openssl_sees_them(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path)
    with pytest.raises(ValueError, match="subject part"):
        ca.issue("x", "evil/CN=admin")
    with pytest.raises(ValueError, match="subject part"):
        ca.issue("x", "user", [""])
    with pytest.raises(ValueError, match="server names, client use"):
        ca.issue("x", "nobody", client=False)


def test_service_account_keys_are_a_matching_ec_pair(tmp_path: Path) -> None:
    keys = service_account_keys(tmp_path)
    derived = openssl("ec", "-in", str(keys.key), "-pubout")
    assert derived == keys.cert.read_text()
