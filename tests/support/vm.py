"""Running a real micro-VM behind a real client bridge, for the test_vm_* suites."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import numpy.typing as npt
import pytest
import redis

from colo_agent.bridge import ClientBridge
from colo_agent.microvm import abi
from colo_agent.microvm.kvm import kvm_unavailable_reason
from colo_agent.microvm.machine import Machine

KVM_REASON = kvm_unavailable_reason()
# tcg is the accelerator CI always has; kvm runs too wherever /dev/kvm opens.
ACCELS = [
    pytest.param("tcg", id="tcg"),
    pytest.param("kvm", id="kvm", marks=[pytest.mark.kvm, pytest.mark.skipif(KVM_REASON is not None,
                                                                              reason=str(KVM_REASON))]),
]


class VmServer:
    """A started Machine whose NIC is bridged to a loopback port (loop in its own thread)."""

    def __init__(self, machine: Machine, start: bool = True) -> None:
        self.machine = machine
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="bridge-loop", daemon=True)
        self._thread.start()
        self.bridge = self._call(self._start_bridge())
        if start:
            machine.start()

    async def _start_bridge(self) -> ClientBridge:
        bridge = ClientBridge(self.machine)
        await bridge.start("127.0.0.1", 0)
        return bridge

    def _call(self, coro):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    @property
    def port(self) -> int:
        return self.bridge.port

    def client(self, timeout: float = 60.0) -> redis.Redis:
        # RESP2: the firmware speaks no RESP3, so no HELLO handshake.
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=timeout, protocol=2)

    def close(self) -> None:
        self._call(self.bridge.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()
        self.machine.stop()


@contextmanager
def serve(accel: str, memory: str = "64Mi", dirty_rate: int = 0) -> Iterator[VmServer]:
    server = VmServer(Machine.create(memory, accel=accel, dirty_rate=dirty_rate))
    try:
        yield server
    finally:
        server.close()


def changed_pages(before: npt.NDArray[np.uint8], after: npt.NDArray[np.uint8]) -> npt.NDArray[np.int64]:
    """Indices of pages whose bytes differ."""
    diff = (before.reshape(-1, abi.PAGE_SIZE) != after.reshape(-1, abi.PAGE_SIZE)).any(axis=1)
    return np.flatnonzero(diff).astype(np.int64)
