"""The micro-VM as a `colo_agent.guest` backend: `--backend microvm`."""

from __future__ import annotations

from colo_agent.backends import BackendError
from colo_agent.guest import Guest, GuestOptions
from colo_agent.microvm.machine import Machine, MachineError


def create_guest(options: GuestOptions) -> Guest:
    # In the main thread: the kvm accelerator installs its kick signal handler there.
    try:
        return Machine.create(options.memory, accel=options.accel, dirty_rate=options.dirty_rate)
    except MachineError as exc:
        raise BackendError(str(exc)) from exc
