"""The micro-VM's device-state format: everything outside RAM the guest needs.

Layout (little-endian):

    header   magic "COLOVMST" | u16 version | u16 flags (0) | u32 payload length
             | u64 xxh3_64 of the payload
    payload  CPU state   16 GPRs, rip, rflags (u64 each)
                         6 segments (cs ds es fs gs ss): u16 selector, u64 base,
                         u32 limit, u32 attributes
                         gdt, idt: u64 base, u32 limit
                         cr0 cr2 cr3 cr4 efer (u64 each)
                         u16 count, then per extra register: u8 name length,
                         name (ASCII), u64 value
             clock       u64 virtual ns at save, u64 latched value
             NIC         u32 rx head, u32 tx tail, u32 next connection id,
                         u32 count, u32 id per open connection
             console     u16 length, bytes of the unfinished log line
             origin      u8 length, accelerator name (informational)

The CPU state is accelerator-neutral (`accel.CpuState`), so a state saved
under kvm loads under tcg and back. Any change to the payload bumps
`VERSION`; a reader refuses versions it does not know rather than guess.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import xxhash

from colo_agent.microvm.accel import GPR_NAMES, SEGMENT_NAMES, CpuState, DescriptorTable, Segment
from colo_agent.microvm.devices import NicHostState

MAGIC = b"COLOVMST"
VERSION = 1

_HEADER = struct.Struct("<8sHHIQ")
_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_REGS = struct.Struct(f"<{len(GPR_NAMES) + 2}Q")
_SEGMENT = struct.Struct("<HQII")
_TABLE = struct.Struct("<QI")
_CONTROL = struct.Struct("<5Q")
_CLOCK = struct.Struct("<QQ")
_NIC = struct.Struct("<IIII")

# Far above anything real, low enough that a corrupt count cannot make the
# reader allocate much before the length checks catch it.
MAX_EXTRA_REGISTERS = 256


class DeviceStateError(ValueError):
    """A device state that cannot be loaded; the message says why."""


class DeviceStateVersionError(DeviceStateError):
    """Written by a newer (or unknown) version of this format."""


class DeviceStateChecksumError(DeviceStateError):
    """The payload does not match its checksum: corrupted or truncated in transit."""


@dataclass(frozen=True)
class DeviceState:
    cpu: CpuState
    clock_ns: int
    clock_latch: int
    nic: NicHostState
    console: bytes = b""
    accelerator: str = ""


def encode(state: DeviceState) -> bytes:
    """Serialize; raises DeviceStateError for values the format cannot hold."""
    try:
        payload = _encode_payload(state)
    except (struct.error, UnicodeEncodeError, OverflowError) as exc:
        raise DeviceStateError(f"device state cannot be encoded: {exc}") from exc
    return _HEADER.pack(MAGIC, VERSION, 0, len(payload), xxhash.xxh3_64_intdigest(payload)) + payload


def decode(data: bytes | bytearray | memoryview) -> DeviceState:
    """Parse and verify; raises a DeviceStateError subclass that says what is wrong."""
    view = memoryview(data).cast("B")
    if len(view) < _HEADER.size:
        raise DeviceStateError(
            f"device state is {len(view)} bytes, shorter than its {_HEADER.size}-byte header"
        )
    magic, version, flags, length, checksum = _HEADER.unpack_from(view, 0)
    if magic != MAGIC:
        raise DeviceStateError(f"not a micro-VM device state: magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise DeviceStateVersionError(
            f"device state version {version} is not supported (this agent reads version {VERSION})"
        )
    if flags:
        raise DeviceStateError(f"device state has unknown flags {flags:#x}")
    if len(view) - _HEADER.size != length:
        raise DeviceStateError(
            f"device state payload is {len(view) - _HEADER.size} bytes, the header says {length}"
        )
    payload = view[_HEADER.size :]
    actual = xxhash.xxh3_64_intdigest(payload)
    if actual != checksum:
        raise DeviceStateChecksumError(
            f"device state checksum mismatch: computed {actual:#018x}, header says {checksum:#018x}"
        )
    reader = _Reader(payload)
    try:
        state = _decode_payload(reader)
    except struct.error as exc:
        raise DeviceStateError(f"device state payload is truncated: {exc}") from None
    if reader.pos != len(payload):
        raise DeviceStateError(f"device state payload has {len(payload) - reader.pos} trailing bytes")
    return state


def _encode_payload(state: DeviceState) -> bytes:
    cpu = state.cpu
    if len(cpu.gprs) != len(GPR_NAMES) or len(cpu.segments) != len(SEGMENT_NAMES):
        raise DeviceStateError(
            f"CPU state has {len(cpu.gprs)} GPRs and {len(cpu.segments)} segments, "
            f"expected {len(GPR_NAMES)} and {len(SEGMENT_NAMES)}"
        )
    if len(cpu.extra) > MAX_EXTRA_REGISTERS:
        raise DeviceStateError(
            f"CPU state has {len(cpu.extra)} extra registers, at most {MAX_EXTRA_REGISTERS}"
        )
    out = bytearray()
    out += _REGS.pack(*cpu.gprs, cpu.rip, cpu.rflags)
    for seg in cpu.segments:
        out += _SEGMENT.pack(seg.selector, seg.base, seg.limit, seg.attributes)
    for table in (cpu.gdt, cpu.idt):
        out += _TABLE.pack(table.base, table.limit)
    out += _CONTROL.pack(cpu.cr0, cpu.cr2, cpu.cr3, cpu.cr4, cpu.efer)
    out += _U16.pack(len(cpu.extra))
    for name, value in sorted(cpu.extra.items()):
        raw = name.encode("ascii")
        if not 0 < len(raw) < 256:
            raise DeviceStateError(f"extra register name {name!r} must be 1..255 ASCII characters")
        out += _U8.pack(len(raw)) + raw + _U64.pack(value)
    out += _CLOCK.pack(state.clock_ns, state.clock_latch)
    nic = state.nic
    out += _NIC.pack(nic.rx_head, nic.tx_tail, nic.next_conn_id, len(nic.open_connections))
    for conn in nic.open_connections:
        out += _U32.pack(conn)
    console = state.console
    out += _U16.pack(len(console)) + console
    accel = state.accelerator.encode("ascii")
    out += _U8.pack(len(accel)) + accel
    return bytes(out)


class _Reader:
    def __init__(self, view: memoryview) -> None:
        self.view = view
        self.pos = 0

    def take(self, fmt: struct.Struct) -> tuple[int, ...]:
        values = fmt.unpack_from(self.view, self.pos)
        self.pos += fmt.size
        return values

    def raw(self, length: int) -> bytes:
        if self.pos + length > len(self.view):
            raise struct.error(f"needs {length} bytes at offset {self.pos}, {len(self.view) - self.pos} left")
        data = bytes(self.view[self.pos : self.pos + length])
        self.pos += length
        return data


def _decode_payload(r: _Reader) -> DeviceState:
    regs = r.take(_REGS)
    segments = tuple(Segment(*r.take(_SEGMENT)) for _ in SEGMENT_NAMES)
    gdt = DescriptorTable(*r.take(_TABLE))
    idt = DescriptorTable(*r.take(_TABLE))
    cr0, cr2, cr3, cr4, efer = r.take(_CONTROL)
    (count,) = r.take(_U16)
    if count > MAX_EXTRA_REGISTERS:
        raise DeviceStateError(f"device state lists {count} extra registers, at most {MAX_EXTRA_REGISTERS}")
    extra: dict[str, int] = {}
    for _ in range(count):
        (name_len,) = r.take(_U8)
        try:
            name = r.raw(name_len).decode("ascii")
        except UnicodeDecodeError:
            raise DeviceStateError("device state has an extra register whose name is not ASCII") from None
        (extra[name],) = r.take(_U64)
    cpu = CpuState(
        gprs=tuple(regs[: len(GPR_NAMES)]),
        rip=regs[-2],
        rflags=regs[-1],
        segments=segments,
        gdt=gdt,
        idt=idt,
        cr0=cr0,
        cr2=cr2,
        cr3=cr3,
        cr4=cr4,
        efer=efer,
        extra=extra,
    )
    clock_ns, clock_latch = r.take(_CLOCK)
    rx_head, tx_tail, next_conn_id, n_open = r.take(_NIC)
    if n_open * _U32.size > len(r.view) - r.pos:
        raise DeviceStateError(f"device state lists {n_open} open connections but holds fewer")
    conns = struct.unpack_from(f"<{n_open}I", r.view, r.pos)
    r.pos += n_open * _U32.size
    if 0 in conns:
        raise DeviceStateError("device state lists connection id 0, which is never valid")
    if not next_conn_id:
        raise DeviceStateError("device state has next connection id 0, which is never valid")
    (console_len,) = r.take(_U16)
    console = r.raw(console_len)
    (accel_len,) = r.take(_U8)
    try:
        accelerator = r.raw(accel_len).decode("ascii")
    except UnicodeDecodeError:
        raise DeviceStateError("device state names its accelerator in non-ASCII bytes") from None
    return DeviceState(
        cpu=cpu,
        clock_ns=clock_ns,
        clock_latch=clock_latch,
        nic=NicHostState(rx_head=rx_head, tx_tail=tx_tail, next_conn_id=next_conn_id, open_connections=conns),
        console=console,
        accelerator=accelerator,
    )
