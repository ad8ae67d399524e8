"""Checkpoint replication between a primary and a secondary agent.

Layers, bottom up (only `transport` does I/O; an import-linter contract keeps
the others free of asyncio, sockets and clocks):

- `protocol`: frames and messages (lockstep's mirror frames too).
  `FrameEncoder` / `FrameDecoder`; page data is announced by a `PagesHeader`
  and received in place.
- `handshake`: HELLO + HMAC-SHA256 challenge/response in both directions.
- `cache`: `ColoCache` (the epoch in flight beside the committed image,
  checkpoint or lockstep mode), `IncomingDirtyBitmap`, `StagingBuffer`.
- `session`: `PrimarySession` / `SecondarySession` state machines: events and
  `now` in, actions out; `next_deadline()` / `handle_timer(now)`.
- `transport`: `CheckpointSender` / `CheckpointReceiver` over asyncio.

The primary listens (`CheckpointSender.accept(listener, ...)`) and the
secondary dials it (`CheckpointReceiver.dial(host, port)`): a secondary joins
a running primary with nothing but its address. The primary always speaks
first in the handshake.

The engine's view (primary)::

    sender = await CheckpointSender.accept(listener, secret=..., vm=..., term=..., page_count=...)
    await sender.sync(ram_pages, guest.collect_dirty)       # guest keeps running
    # every interval (or when the dirty set nears sender.cache_pages):
    guest.pause()
    dirty = guest.collect_dirty()          # first epoch: union with sender.take_sync_remainder()
    staged = staging.stage(ram_pages, dirty)
    state = guest.save_device_state()
    guest.resume()
    await sender.send_epoch(dirty, staged, state)   # returns on ACK: release that epoch's output
    # PeerLostError: the secondary is gone (yanked); keep serving unprotected.

The engine's view (secondary)::

    receiver = CheckpointReceiver(ColoCache(guest.ram), secret=..., vm=..., term=...,
                                  on_commit=..., on_peer_lost=...)
    await receiver.dial(primary_host, primary_port)
    reason = await receiver.wait_lost()
    promoted = receiver.promote()   # RAM is the committed image; load promoted.device_state
"""

from colo_agent.replication.cache import CacheMode, ColoCache, IncomingDirtyBitmap, StagingBuffer
from colo_agent.replication.handshake import AuthRefused
from colo_agent.replication.protocol import LocalProtocolError, ProtocolError, RemoteProtocolError
from colo_agent.replication.session import PrimarySession, SecondarySession

__all__ = [
    "AuthRefused",
    "CacheMode",
    "ColoCache",
    "IncomingDirtyBitmap",
    "LocalProtocolError",
    "PrimarySession",
    "ProtocolError",
    "RemoteProtocolError",
    "SecondarySession",
    "StagingBuffer",
]
