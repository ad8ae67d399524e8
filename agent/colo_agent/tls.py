"""Mutual TLS 1.3 for the agent's ports: contexts, peer names, non-blocking handshakes.

The certificate, key and CA come from a directory (`colo_agent.api.identity`
names the files; a pod mounts its VM's Secret there). `TlsFiles` re-reads
them whenever they change on disk, so a renewed certificate is used by the
next connection while the connections already open keep theirs: rotation
never opens a window without protection.

A peer is admitted when its chain verifies against the CA *and* its URI
name is one the caller allows (`colo_agent.api.identity`): the CA says the
operator issued it, the name says for which VM.

The replication stream keeps plain non-blocking sockets and runs TLS over
memory BIOs (`colo_agent.tls_stream`), so that it reads and writes
ciphertext in large pieces and ciphers on more than one thread.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from colo_agent.api.identity import CA_FILE, CERT_FILE, KEY_FILE, uri_names, vm_identity

log = logging.getLogger(__name__)


class PeerNotAllowed(ssl.SSLError):
    """The peer's certificate verified but names someone this port does not admit."""


@dataclass(frozen=True)
class _Stamp:
    files: tuple[int, ...]


def _identity(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_ino, st.st_mtime_ns, st.st_size


class TlsFiles:
    """A certificate directory, and SSL contexts built from its current contents."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self._stamp: _Stamp | None = None
        self._server: ssl.SSLContext | None = None
        self._client: ssl.SSLContext | None = None
        self.check()

    @property
    def paths(self) -> tuple[Path, Path, Path]:
        d = self.directory
        return d / CERT_FILE, d / KEY_FILE, d / CA_FILE

    def check(self) -> None:
        """Raise ValueError naming what is missing or unusable in the directory."""
        for path in self.paths:
            if not path.is_file():
                raise ValueError(
                    f"TLS: {path} is missing (the directory needs {CERT_FILE}, {KEY_FILE} and {CA_FILE})"
                )
        try:
            self._build(ssl.Purpose.CLIENT_AUTH)
        except ssl.SSLError as exc:
            raise ValueError(f"TLS: the files in {self.directory} are unusable: {exc}") from exc

    def _current_stamp(self) -> _Stamp:
        # A Secret volume swaps a symlinked directory atomically; stat follows it. The
        # inode tells new files apart even where two writes share an mtime tick.
        return _Stamp(tuple(x for p in self.paths for x in _identity(p.stat())))

    def _build(self, purpose: ssl.Purpose, *, optional_client_cert: bool = False) -> ssl.SSLContext:
        server = purpose is ssl.Purpose.CLIENT_AUTH
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.maximum_version = ssl.TLSVersion.TLSv1_3
        cert, key, ca = self.paths
        ctx.load_cert_chain(cert, key)
        ctx.load_verify_locations(cafile=str(ca))
        # Peers are pod addresses, not host names: the URI name is checked instead.
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_OPTIONAL if optional_client_cert else ssl.CERT_REQUIRED
        if server:
            # No resumption tickets: every connection proves its certificate afresh,
            # and no post-handshake message arrives on the stream.
            ctx.num_tickets = 0
        ctx.options |= ssl.OP_NO_TICKET
        return ctx

    def _refresh(self) -> None:
        try:
            stamp = self._current_stamp()
            if stamp == self._stamp:
                return
            server, client = self._build(ssl.Purpose.CLIENT_AUTH), self._build(ssl.Purpose.SERVER_AUTH)
        except (OSError, ssl.SSLError) as exc:
            if self._stamp is None:
                raise
            # Caught mid-update (a key that does not match its certificate yet):
            # the last good set stays in use and the files are read again next time.
            log.warning("TLS: cannot reload %s, keeping the certificates in use: %s", self.directory, exc)
            return
        self._server, self._client = server, client
        if self._stamp is not None:
            log.info("TLS: certificates in %s changed; new connections use them", self.directory)
        self._stamp = stamp

    def server_context(self) -> ssl.SSLContext:
        self._refresh()
        assert self._server is not None
        return self._server

    def client_context(self) -> ssl.SSLContext:
        self._refresh()
        assert self._client is not None
        return self._client

    def http_server_context(self) -> ssl.SSLContext:
        """For the control API: a client certificate is verified when offered
        (the operator's) but not required (the kubelet's probes offer none).
        Each handshake switches to a context built from the current files."""
        ctx = self._build(ssl.Purpose.CLIENT_AUTH, optional_client_cert=True)
        stamp: list[_Stamp | None] = [self._current_stamp()]
        current = [ctx]

        def fresh(sslobj: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
            try:
                now = self._current_stamp()
                if now != stamp[0]:
                    current[0] = self._build(ssl.Purpose.CLIENT_AUTH, optional_client_cert=True)
                    stamp[0] = now
                    log.info("TLS: control API certificates in %s changed", self.directory)
            except (OSError, ssl.SSLError) as exc:  # mid-rotation: keep the last good one
                log.warning("TLS: cannot reload %s: %s", self.directory, exc)
            if sslobj.context is not current[0]:
                sslobj.context = current[0]

        ctx.sni_callback = fresh  # called for every ClientHello, with or without SNI
        current[0].sni_callback = fresh
        return ctx


@dataclass(frozen=True)
class PeerTls:
    """TLS for one port: the certificate files and the peer names it admits."""

    files: TlsFiles
    admit: frozenset[str]

    @classmethod
    def for_vm(cls, files: TlsFiles, vm: str) -> PeerTls:
        """Replication: only the other agent of ColoVM `vm` ("NAMESPACE/NAME")."""
        namespace, _, name = vm.partition("/")
        return cls(files, frozenset({vm_identity(namespace, name)}))

    async def secure(self, sock: socket.socket, *, server_side: bool) -> tuple[ssl.SSLSocket, str]:
        ctx = self.files.server_context() if server_side else self.files.client_context()
        return await establish(sock, ctx, server_side=server_side, allowed=self.admit)


peer_names = uri_names


def check_peer(peer: ssl.SSLSocket | ssl.SSLObject, allowed: Iterable[str]) -> str:
    """The peer's admitted name; raises `PeerNotAllowed` naming who it was."""
    names = peer_names(peer)
    allowed = set(allowed)
    for name in names:
        if name in allowed:
            return name
    who = ", ".join(names) or "a certificate without a URI name"
    raise PeerNotAllowed(f"peer {who} is not admitted here (expected {' or '.join(sorted(allowed))})")


async def wait_ready(sock: socket.socket, *, write: bool) -> None:
    """Until the socket is readable (or writable)."""
    loop = asyncio.get_running_loop()
    fd = sock.fileno()
    if fd < 0:
        raise ConnectionError("socket closed")
    fut = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    (loop.add_writer if write else loop.add_reader)(fd, ready)
    try:
        await fut
    finally:
        # Only while the descriptor is still this socket's: once closed, its
        # number may already belong to a new connection with its own waiter.
        if sock.fileno() == fd:
            (loop.remove_writer if write else loop.remove_reader)(fd)


async def establish(
    sock: socket.socket, ctx: ssl.SSLContext, *, server_side: bool, allowed: Iterable[str]
) -> tuple[ssl.SSLSocket, str]:
    """TLS handshake on a connected non-blocking socket, then the peer's name check.

    Returns the wrapped socket and the peer's admitted name; on any failure
    the socket is closed and the error (an `ssl.SSLError`, hence OSError) raised.
    """
    tls = ctx.wrap_socket(sock, server_side=server_side, do_handshake_on_connect=False)
    try:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await wait_ready(tls, write=False)
            except ssl.SSLWantWriteError:
                await wait_ready(tls, write=True)
        return tls, check_peer(tls, allowed)
    except BaseException:
        tls.close()
        raise


__all__ = ["PeerNotAllowed", "PeerTls", "TlsFiles", "check_peer", "establish", "peer_names", "wait_ready"]
