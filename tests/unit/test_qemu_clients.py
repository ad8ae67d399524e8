"""The qemu tests' redis clients try each command once (`support.qemu.redis_client`).

redis-py's default retries a failed command with growing sleeps; around a
failover that made a writer hang on a dead primary for up to a minute and
put the client's own sleep into the measured failover time."""

from __future__ import annotations

import time

import pytest
import redis.asyncio as aioredis
from support.qemu import free_port, redis_client

from colo_agent.qemu.command import Endpoint


async def test_a_refused_command_fails_at_once() -> None:
    client = redis_client(Endpoint("127.0.0.1", free_port()), 2.0)  # nothing listens there
    started = time.monotonic()
    try:
        with pytest.raises(aioredis.ConnectionError):
            await client.ping()
    finally:
        await client.aclose()
    assert time.monotonic() - started < 0.5


async def test_the_library_default_would_have_retried() -> None:
    # What the helper guards against: the default client keeps trying with backoff.
    client = aioredis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=2.0)
    try:
        retry = client.connection_pool.connection_kwargs["retry"]
        assert retry.get_retries() > 0
    finally:
        await client.aclose()
