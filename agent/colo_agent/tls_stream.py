"""TLS for the replication connections, the cipher apart from the socket.

`ssl.SSLSocket` makes one system call per 16 KiB record on send and two on
receive (a record's header, then its body), and runs OpenSSL on the thread
that owns the socket, the event loop's. Here the TLS state lives in an
`ssl.SSLObject` between two `ssl.MemoryBIO`s and the socket stays a plain
non-blocking one, so the transport keeps its own paths (`sendmsg`,
`recv_into`, the yank) and moves ciphertext in large reads and writes.
Encryption and decryption are plain calls that any thread may make (a lock
keeps OpenSSL's state to one thread at a time): the lockstep mirror
encrypts in the vCPU thread that produced a message.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from collections.abc import Sequence
from typing import cast

from colo_agent.tls import PeerTls, check_peer

_HANDSHAKE_READ = 1 << 16
_ENCRYPT_PIECE = 1 << 18


class TlsStream:
    """One connection's TLS state: plaintext in and out, ciphertext through memory."""

    def __init__(
        self, obj: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO, peer: str
    ) -> None:
        self.peer = peer
        self._obj = obj
        self._in = incoming
        self._out = outgoing
        self._lock = threading.Lock()
        self._ended = False

    @property
    def pending(self) -> int:
        """Ciphertext received and not decrypted yet."""
        return self._in.pending

    def encrypt(self, buffers: Sequence[bytes | bytearray | memoryview]) -> list[bytes]:
        """The records for `buffers`, in order, ready for the socket (`sendmsg`).

        Ciphertext is taken out of the memory BIO every `_ENCRYPT_PIECE`
        bytes of plaintext, so the BIO never grows to the size of a batch:
        growing it reallocates and copies (measured 10-25% of the cipher's
        cost for 1 MiB batches).
        """
        out: list[bytes] = []
        with self._lock:
            for buf in buffers:
                view = memoryview(buf).cast("B") if not isinstance(buf, bytes) else buf
                for start in range(0, len(view), _ENCRYPT_PIECE):
                    self._obj.write(view[start : start + _ENCRYPT_PIECE])
                    if self._out.pending >= _ENCRYPT_PIECE:
                        out.append(self._out.read())
            if self._out.pending:
                out.append(self._out.read())
        return out

    def feed(self, ciphertext: bytes | bytearray | memoryview) -> None:
        with self._lock:
            self._in.write(ciphertext)

    def feed_eof(self) -> None:
        """The socket reached its end: what is left decrypts, then the stream ends."""
        with self._lock:
            if not self._in.eof:
                self._in.write_eof()

    def decrypt_into(self, buf: memoryview) -> int | None:
        """Decrypt into `buf` as much as there is room and ciphertext for.

        Returns the bytes written, 0 once the peer closed the stream (a
        close_notify, or the socket's end), or None when it needs more
        ciphertext (`feed`).
        """
        got = 0
        want = len(buf)
        with self._lock:
            while got < want and not self._ended:
                try:
                    # With a buffer, read returns a count (typeshed says bytes).
                    n = cast(int, self._obj.read(want - got, buf[got:] if got else buf))
                except ssl.SSLWantReadError:
                    break
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    self._ended = True
                    break
                if n == 0:
                    self._ended = True
                    break
                got += n
        if got:
            return got
        return 0 if self._ended else None


async def establish(
    sock: socket.socket, ctx: ssl.SSLContext, *, server_side: bool, allowed: frozenset[str] | set[str]
) -> TlsStream:
    """TLS handshake on a connected non-blocking socket, then the peer's name check.

    Raises `ssl.SSLError` (an OSError; `colo_agent.tls.PeerNotAllowed` for a
    certificate naming someone else) or ConnectionError; the caller closes
    the socket. Ciphertext that arrived after the handshake stays in the
    stream for the first `decrypt_into`.
    """
    loop = asyncio.get_running_loop()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_side=server_side)
    while True:
        try:
            obj.do_handshake()
            done = True
        except ssl.SSLWantReadError:
            done = False
        except ssl.SSLError:
            # Our alert tells the peer why (a certificate refused) before we hang up.
            if outgoing.pending:
                await loop.sock_sendall(sock, outgoing.read())
            raise
        if outgoing.pending:
            await loop.sock_sendall(sock, outgoing.read())
        if done:
            break
        data = await loop.sock_recv(sock, _HANDSHAKE_READ)
        if not data:
            raise ConnectionResetError("connection closed during the TLS handshake")
        incoming.write(data)
    return TlsStream(obj, incoming, outgoing, check_peer(obj, allowed))


async def secure(tls: PeerTls, sock: socket.socket, *, server_side: bool) -> TlsStream:
    """`establish` with the port's current certificates and admitted peers."""
    ctx = tls.files.server_context() if server_side else tls.files.client_context()
    return await establish(sock, ctx, server_side=server_side, allowed=tls.admit)


__all__ = ["TlsStream", "establish", "secure"]
