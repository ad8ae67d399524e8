"""The e2e harness against real openssl, TLS and HTTP: its certificates and its proxy-free client."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
from cluster.pki import CertificateAuthority, service_account_keys
from cluster.rest import ApiError, Kube

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


def test_harness_http_ignores_proxy_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    import http.server

    from cluster.rest import direct_opener, without_proxies

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    # A proxy that would refuse every connection: going through it fails.
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:1")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:1")
    try:
        with direct_opener().open(f"http://127.0.0.1:{server.server_address[1]}/", timeout=10) as response:
            assert response.status == 200
    finally:
        server.shutdown()
    env = without_proxies({"http_proxy": "x", "HTTPS_PROXY": "y", "NO_PROXY": "z", "PATH": "/bin"})
    assert env == {"PATH": "/bin"}


def test_kube_apiserver_fixture_serves_with_rbac(kube_apiserver: Any) -> None:
    status, body = kube_apiserver.get("/version")
    assert status == 200 and b'"gitVersion": "v1.34.4"' in body
    # Admin may do anything; an authenticated user without bindings may not.
    assert kube_apiserver.get("/api/v1/namespaces/default/secrets")[0] == 200
    pair = kube_apiserver.ca.issue("stranger", "stranger")
    stranger = Kube.from_kubeconfig(kube_apiserver.client_kubeconfig("stranger", pair, "stranger"))
    with pytest.raises(ApiError) as refused:
        stranger.get("/api/v1/namespaces/default/secrets")
    assert refused.value.status == 403
