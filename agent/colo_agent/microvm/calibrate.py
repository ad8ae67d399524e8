"""`--accel auto`: run a short guest loop under each accelerator and pick the faster.

`/dev/kvm` opening is no promise of speed: under nested virtualization without
hardware help KVM can run guest code a hundred times slower than tcg's JIT. So
`auto` measures instead of assuming. The loop stores to guest RAM and branches,
with no port access (so no device model is involved), and takes tens of
microseconds under tcg or a fast kvm; the whole calibration stays in the tens of
milliseconds even where kvm is slow.
"""

from __future__ import annotations

import logging
import mmap
import struct
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from colo_agent.microvm import abi, boot
from colo_agent.microvm.accel import Accelerator, RunResult
from colo_agent.microvm.config import AcceleratorName

log = logging.getLogger(__name__)

LOOP_ITERATIONS = 1024
STORE_ADDR = 0x200000  # a page above the code, inside the smallest RAM
TIMED_RUNS = 2

# start: mov $LOOP_ITERATIONS, %ecx
#    1:  mov %ecx, STORE_ADDR
#        dec %ecx
#        jnz 1b
#        hlt
#        jmp start
# Hand-encoded so that calibrating needs no assembler; a test checks it against GNU as.
LOOP_CODE = (
    b"\xb9" + struct.pack("<I", LOOP_ITERATIONS)
    + b"\x89\x0c\x25" + struct.pack("<I", STORE_ADDR)
    + b"\xff\xc9"
    + b"\x75\xf5"
    + b"\xf4"
    + b"\xeb\xed"
)  # fmt: skip
LOOP_SOURCE = f"""
start:
    mov ${LOOP_ITERATIONS}, %ecx
1:  mov %ecx, {STORE_ADDR:#x}
    dec %ecx
    jnz 1b
    hlt
    jmp start
"""


class _NoDevices:
    """The loop touches no port; an access would mean the code is not what we think."""

    def io_out(self, port: int, size: int, value: int) -> None:
        raise RuntimeError(f"calibration loop wrote port {port:#x}")

    def io_in(self, port: int, size: int) -> int:
        raise RuntimeError(f"calibration loop read port {port:#x}")


def _factory(name: AcceleratorName) -> Callable[[mmap.mmap, _NoDevices], Accelerator]:
    if name == "kvm":
        from colo_agent.microvm.kvm import KvmAccelerator, install_kick_signal_handler

        # As for a machine: only the main thread may install the kick handler;
        # elsewhere the agent's main has done it, or run() says it is missing.
        if threading.current_thread() is threading.main_thread():
            install_kick_signal_handler()
        return KvmAccelerator
    from colo_agent.microvm.tcg import TcgAccelerator

    return TcgAccelerator


def time_loop(name: AcceleratorName) -> float:
    """Seconds the best of `TIMED_RUNS` runs of the loop took under `name`, after one untimed run.

    The untimed run pays for translation (tcg) and the first entry (kvm), which a
    running guest pays once. Raises whatever the accelerator raises when it cannot run.
    """
    ram = mmap.mmap(-1, abi.MIN_RAM)
    accel: Accelerator | None = None
    try:
        boot.write_boot_environment(ram, abi.MIN_RAM)
        ram[abi.FIRMWARE_ADDR : abi.FIRMWARE_ADDR + len(LOOP_CODE)] = LOOP_CODE
        accel = _factory(name)(ram, _NoDevices())
        accel.set_cpu_state(boot.initial_cpu_state())
        best = float("inf")
        for run in range(TIMED_RUNS + 1):
            struct.pack_into("<I", ram, STORE_ADDR, 0xFFFFFFFF)
            start = time.perf_counter()
            result = accel.run()
            elapsed = time.perf_counter() - start
            if result is not RunResult.HALTED:
                raise RuntimeError(f"calibration loop ended {result.value}: {accel.failure}")
            # The last store of a whole loop is 1: the guest really ran it.
            if struct.unpack_from("<I", ram, STORE_ADDR)[0] != 1:
                raise RuntimeError("calibration loop halted without finishing its stores")
            if run:
                best = min(best, elapsed)
        return best
    finally:
        if accel is not None:
            accel.close()
        ram.close()


@dataclass(frozen=True)
class Figure:
    """One accelerator's calibration: the loop's time, or why it could not run."""

    seconds: float | None
    error: str | None = None

    def describe(self) -> str:
        if self.seconds is None:
            return f"unusable ({self.error})"
        return f"{self.seconds * 1e3:.3f} ms"


def measure(names: tuple[AcceleratorName, ...] = ("kvm", "tcg")) -> dict[AcceleratorName, Figure]:
    figures: dict[AcceleratorName, Figure] = {}
    for name in names:
        try:
            figures[name] = Figure(time_loop(name))
        except (OSError, RuntimeError, ValueError, ImportError) as exc:
            figures[name] = Figure(None, str(exc) or type(exc).__name__)
    return figures


def pick(figures: Mapping[AcceleratorName, Figure]) -> AcceleratorName:
    """The accelerator whose loop ran fastest; kvm on a tie (it leaves the host's CPU to others).

    Raises RuntimeError when none could run the loop.
    """
    usable = [(f.seconds, name != "kvm", name) for name, f in figures.items() if f.seconds is not None]
    if not usable:
        why = "; ".join(f"{name}: {f.error}" for name, f in figures.items())
        raise RuntimeError(f"no accelerator can run a guest here ({why})")
    return min(usable)[2]


def choose_auto(measure_all: Callable[[], Mapping[AcceleratorName, Figure]] = measure) -> AcceleratorName:
    """Measure every accelerator, pick the faster and log both figures."""
    figures = measure_all()
    chosen = pick(figures)
    log.info(
        "accelerator: %s (auto: a %d-iteration guest loop took %s)",
        chosen,
        LOOP_ITERATIONS,
        ", ".join(f"{f.describe()} under {name}" for name, f in figures.items()),
    )
    return chosen
