"""Constants of the guest ABI (docs/guest-abi.md); mirrored in firmware/abi.h."""

from __future__ import annotations

from enum import IntEnum

from colo_agent.constants import MAX_GUEST_RAM, MIN_GUEST_RAM
from colo_agent.constants import PAGE_SIZE as PAGE_SIZE

GDT_ADDR = 0x500
PML4_ADDR = 0x1000
PDPT_ADDR = 0x2000
PD_ADDR = 0x3000
BOOT_INFO_ADDR = 0x4000
STACK_TOP = 0x80000
RX_RING_ADDR = 0x80000
TX_RING_ADDR = 0xC0000
RING_CAPACITY = 0x20000
RING_HEAD_OFFSET = 0
RING_TAIL_OFFSET = 64
RING_DATA_OFFSET = 4096
FIRMWARE_ADDR = 0x100000

MIN_RAM = MIN_GUEST_RAM
MAX_RAM = MAX_GUEST_RAM

BOOT_MAGIC = 0x544F4F424F4C4F43  # "COLOBOOT"
FRAME_HEADER_SIZE = 8
FRAME_ALIGN = 8
MAX_FRAME_PAYLOAD = 4096

CODE_SELECTOR = 0x08
DATA_SELECTOR = 0x10


class FrameType(IntEnum):
    PAD = 0
    OPEN = 1
    DATA = 2
    CLOSE = 3


class Port(IntEnum):
    CONSOLE = 0x3F8
    TX_DOORBELL = 0x500
    CLOCK_LO = 0x510
    CLOCK_HI = 0x514
    WAIT = 0x520
    PANIC = 0x530


WAIT_FOREVER = 0xFFFFFFFF
