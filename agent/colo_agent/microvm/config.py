"""Validated settings of a micro-VM: memory size and accelerator choice."""

from __future__ import annotations

import logging
from typing import Literal

from colo_agent.config import parse_quantity
from colo_agent.microvm import abi

log = logging.getLogger(__name__)

AcceleratorName = Literal["kvm", "tcg"]
ACCEL_CHOICES: tuple[str, ...] = ("auto", "kvm", "tcg")


def parse_memory(value: int | str) -> int:
    """Guest RAM size in bytes from `64Mi`, `1Gi`, `512M` or a plain byte count.

    Decimal sizes are rarely page multiples (`100M`), so the size is rounded up
    to a whole page rather than refused; it must then lie within the ABI's
    bounds (docs/guest-abi.md).
    """
    if isinstance(value, bool):
        raise TypeError("memory size must be an int or a string such as 64Mi")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        size = parse_quantity(value)
    else:
        raise TypeError(f"memory size must be an int or a string such as 64Mi, not {type(value).__name__}")
    size = -(-size // abi.PAGE_SIZE) * abi.PAGE_SIZE
    if not abi.MIN_RAM <= size <= abi.MAX_RAM:
        raise ValueError(
            f"memory size {value!r} is outside the supported range "
            f"{abi.MIN_RAM >> 20}Mi..{abi.MAX_RAM >> 30}Gi"
        )
    return size


def choose_accelerator(requested: str) -> AcceleratorName:
    """`kvm` and `tcg` as given; `auto` measures both (see `calibrate`) and picks the faster.

    Where /dev/kvm cannot be used at all, `auto` is tcg without measuring.
    """
    if requested not in ACCEL_CHOICES:
        raise ValueError(f"accelerator {requested!r} is not one of {', '.join(ACCEL_CHOICES)}")
    if requested == "kvm":
        return "kvm"
    if requested == "tcg":
        return "tcg"
    from colo_agent.microvm import calibrate
    from colo_agent.microvm.kvm import kvm_unavailable_reason

    reason = kvm_unavailable_reason()
    if reason is not None:
        log.info("accelerator: tcg (auto: %s)", reason)
        return "tcg"
    return calibrate.choose_auto()


def validate_dirty_rate(value: int | str) -> int:
    """Pages per second the idle firmware dirties; 0 turns it off."""
    try:
        rate = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"dirty rate {value!r} is not a whole number of pages per second") from None
    if not 0 <= rate < 1 << 32:
        raise ValueError(f"dirty rate {value!r} must be between 0 and {(1 << 32) - 1} pages per second")
    return rate
