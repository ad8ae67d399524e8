"""Connection handshake and mutual authentication, sans-IO.

Every connection (control, each data channel, heartbeat) opens with::

    client (primary)                       server (secondary)
    HELLO(version, vm, role, channel, session, term, nonce_c)  ->
                                        <- AUTH_CHALLENGE(nonce_s)   or REFUSED
    AUTH_RESPONSE(mac_c)               ->
                                        <- AUTH_OK(mac_s, ...)       or REFUSED

    mac_c = HMAC-SHA256(secret, "colo-client" | nonce_c | nonce_s | HELLO payload)
    mac_s = HMAC-SHA256(secret, "colo-server" | nonce_c | nonce_s | HELLO payload | AUTH_OK fields)

The handshake direction is fixed (the primary says HELLO), the TCP
direction is not: a primary may dial a listening secondary or accept a
secondary that dials it, and speaks first either way.

The secret is per VM. Both nonces make a recorded exchange useless on
another connection; MACing the HELLO payload binds what the client claimed
(channel, session, term) to the proof; the server's MAC lets the primary
refuse to stream guest memory to an impostor. MACs are compared with
`hmac.compare_digest`. A refusal names its reason so both logs say why.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import hmac
import secrets
import struct
from collections.abc import Callable

from colo_agent.replication.protocol import (
    NONCE_SIZE,
    PROTOCOL_VERSION,
    AuthChallenge,
    AuthOk,
    AuthResponse,
    ChannelKind,
    Hello,
    LocalProtocolError,
    Message,
    Refused,
    RefuseReason,
    RemoteProtocolError,
    Role,
    encode_payload,
)

MIN_SECRET_BYTES = 16


class AuthRefused(Exception):
    """The peer refused this connection (or we refused the peer)."""

    def __init__(self, reason: RefuseReason, text: str) -> None:
        super().__init__(f"refused ({reason.name.lower()}): {text}")
        self.reason = reason
        self.text = text


def _mac(
    label: bytes, secret: bytes, nonce_c: bytes, nonce_s: bytes, hello: Hello, ok: AuthOk | None = None
) -> bytes:
    _, payload = encode_payload(hello)
    if ok is not None:  # what the server states is bound to its proof too
        payload += struct.pack("<QQQ", ok.term, ok.page_count, ok.cache_pages)
    return hmac.new(secret, label + b"\0" + nonce_c + nonce_s + payload, hashlib.sha256).digest()


def _check_secret(secret: bytes) -> None:
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"the per-VM secret must be at least {MIN_SECRET_BYTES} bytes")


class _Step(enum.Enum):
    START = "start"
    WAIT_CHALLENGE = "wait_challenge"
    WAIT_RESULT = "wait_result"
    DONE = "done"
    REFUSED = "refused"


class ClientHandshake:
    """The connecting side. `start()` gives the HELLO; feed each reply to
    `receive`, which returns the next message to send (or None); when `done`,
    `accepted` holds the server's AUTH_OK. A REFUSED raises `AuthRefused`."""

    def __init__(
        self,
        *,
        secret: bytes,
        vm: str,
        kind: ChannelKind,
        index: int,
        channels: int,
        session: int,
        term: int,
        page_count: int,
        nonce: bytes | None = None,
        version: int = PROTOCOL_VERSION,
    ) -> None:
        _check_secret(secret)
        self._secret = secret
        self.hello = Hello(
            version,
            vm,
            Role.PRIMARY,
            kind,
            index,
            channels,
            session,
            term,
            page_count,
            0,
            nonce if nonce is not None else secrets.token_bytes(NONCE_SIZE),
        )
        encode_payload(self.hello)  # validate our own fields now
        self._step = _Step.START
        self._nonce_s = b""
        self.accepted: AuthOk | None = None

    @property
    def done(self) -> bool:
        return self._step is _Step.DONE

    def start(self) -> Hello:
        if self._step is not _Step.START:
            raise LocalProtocolError("handshake already started")
        self._step = _Step.WAIT_CHALLENGE
        return self.hello

    def receive(self, msg: Message) -> Message | None:
        if isinstance(msg, Refused):
            self._step = _Step.REFUSED
            raise AuthRefused(msg.reason, msg.text)
        if self._step is _Step.WAIT_CHALLENGE and isinstance(msg, AuthChallenge):
            self._nonce_s = msg.nonce
            self._step = _Step.WAIT_RESULT
            return AuthResponse(_mac(b"colo-client", self._secret, self.hello.nonce, msg.nonce, self.hello))
        if self._step is _Step.WAIT_RESULT and isinstance(msg, AuthOk):
            expected = _mac(b"colo-server", self._secret, self.hello.nonce, self._nonce_s, self.hello, msg)
            if not hmac.compare_digest(expected, msg.mac):
                self._step = _Step.REFUSED
                raise AuthRefused(
                    RefuseReason.BAD_AUTH, "the server could not prove it knows the VM's secret"
                )
            self.accepted = msg
            self._step = _Step.DONE
            return None
        raise RemoteProtocolError(f"handshake: unexpected {type(msg).__name__} while {self._step.value}")


# A policy hook: given an authenticated HELLO, a refusal or None to accept.
Policy = Callable[[Hello], Refused | None]


class ServerHandshake:
    """The accepting side. Feed the client's messages to `receive`; it returns
    the reply to send. After a REFUSED reply `refused` says why (and the
    connection must be closed); when `done`, `hello` is authenticated."""

    def __init__(
        self,
        *,
        secret: bytes,
        vm: str,
        term: int,
        page_count: int,
        cache_pages: int,
        policy: Policy | None = None,
        nonce: bytes | None = None,
    ) -> None:
        _check_secret(secret)
        self._secret = secret
        self.vm = vm
        self.term = term
        self.page_count = page_count
        self.cache_pages = cache_pages
        self._policy = policy
        self._nonce = nonce if nonce is not None else secrets.token_bytes(NONCE_SIZE)
        self._step = _Step.START
        self.hello: Hello | None = None
        self.refused: Refused | None = None

    @property
    def done(self) -> bool:
        return self._step is _Step.DONE

    def receive(self, msg: Message) -> Message:
        if self._step is _Step.START and isinstance(msg, Hello):
            self.hello = msg
            if msg.version != PROTOCOL_VERSION:
                return self._refuse(
                    RefuseReason.BAD_VERSION,
                    f"protocol version {msg.version} is not supported (this agent speaks {PROTOCOL_VERSION})",
                )
            self._step = _Step.WAIT_RESULT
            return AuthChallenge(self._nonce)
        if self._step is _Step.WAIT_RESULT and isinstance(msg, AuthResponse):
            hello = self.hello
            assert hello is not None
            expected = _mac(b"colo-client", self._secret, hello.nonce, self._nonce, hello)
            if not hmac.compare_digest(expected, msg.mac):
                return self._refuse(RefuseReason.BAD_AUTH, "authentication failed: wrong secret for this VM")
            refusal = self._check(hello)
            if refusal is not None:
                return self._refuse(refusal.reason, refusal.text)
            self._step = _Step.DONE
            ok = AuthOk(b"", self.term, self.page_count, self.cache_pages)
            mac = _mac(b"colo-server", self._secret, hello.nonce, self._nonce, hello, ok)
            return dataclasses.replace(ok, mac=mac)
        raise RemoteProtocolError(f"handshake: unexpected {type(msg).__name__} while {self._step.value}")

    def _check(self, hello: Hello) -> Refused | None:
        # Only once the peer proved it holds the secret: no probing.
        if hello.vm != self.vm:
            return Refused(RefuseReason.UNKNOWN_VM, f"this agent protects {self.vm!r}, not {hello.vm!r}")
        if hello.role is not Role.PRIMARY:
            return Refused(
                RefuseReason.BAD_ROLE, f"only a primary connects to a secondary, not a {hello.role.name}"
            )
        if hello.term < self.term:
            return Refused(
                RefuseReason.STALE_TERM, f"term {hello.term} is older than this agent's term {self.term}"
            )
        if hello.page_count != self.page_count:
            return Refused(
                RefuseReason.PROTOCOL,
                f"guest RAM differs: primary has {hello.page_count} pages, this secondary {self.page_count}",
            )
        if hello.kind is ChannelKind.DATA and not 0 <= hello.index < hello.channels:
            return Refused(RefuseReason.BAD_CHANNEL, f"data channel {hello.index} of {hello.channels}")
        if hello.kind is not ChannelKind.DATA and hello.index != 0:
            return Refused(RefuseReason.BAD_CHANNEL, f"{hello.kind.name.lower()} channel index {hello.index}")
        return self._policy(hello) if self._policy is not None else None

    def _refuse(self, reason: RefuseReason, text: str) -> Refused:
        self._step = _Step.REFUSED
        self.refused = Refused(reason, text)
        return self.refused
