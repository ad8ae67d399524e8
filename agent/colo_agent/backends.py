"""Guest backends by name: `colo-agent run --backend NAME` (env `COLO_BACKEND`).

A backend's module is imported only when it is chosen, so the engine and
the agents of other backends never load it (nor its native dependencies).
How to write one: `colo_agent.guest`.
"""

from __future__ import annotations

import importlib
from typing import Protocol, cast

from colo_agent.guest import Guest, GuestOptions

# name -> module with `create_guest(options: GuestOptions) -> Guest`
BACKENDS: dict[str, str] = {
    "microvm": "colo_agent.microvm.backend",
    "qemu": "colo_agent.qemu.backend",
}
DEFAULT_BACKEND = "microvm"


class BackendError(RuntimeError):
    """The chosen backend cannot start its guest."""


class _BackendModule(Protocol):
    def create_guest(self, options: GuestOptions) -> Guest: ...


def create_guest(name: str, options: GuestOptions) -> Guest:
    """Start nothing yet: build the guest of backend `name` (ValueError for an unknown name)."""
    try:
        module_name = BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; known: {', '.join(sorted(BACKENDS))}") from None
    module = cast(_BackendModule, importlib.import_module(module_name))
    return module.create_guest(options)
