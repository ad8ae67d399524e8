"""What the accelerator tests (kvm and tcg) share: tiny guests from assembly, a recording device."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

needs_assembler = pytest.mark.skipif(
    shutil.which("gcc") is None or shutil.which("objcopy") is None,
    reason="the test guests need gcc and objcopy (Debian: gcc, binutils)",
)

_assembled: dict[str, bytes] = {}


def assemble(source: str, tmp_path: Path) -> bytes:
    """Flat binary of `source` (GNU as, AT&T syntax, 64-bit), position-independent by construction."""
    if source not in _assembled:
        src = tmp_path / "guest.S"
        obj = tmp_path / "guest.o"
        out = tmp_path / "guest.bin"
        src.write_text(".code64\n.text\n" + source + "\n")
        subprocess.run(["gcc", "-c", "-o", str(obj), str(src)], check=True, capture_output=True)
        subprocess.run(
            ["objcopy", "-O", "binary", "-j", ".text", str(obj), str(out)], check=True, capture_output=True
        )
        _assembled[source] = out.read_bytes()
    return _assembled[source]


@dataclass
class RecordingIo:
    """A device model that records every access and answers INs from a queue."""

    inputs: dict[int, list[int]] = field(default_factory=dict)
    outs: list[tuple[int, int, int]] = field(default_factory=list)
    ins: list[tuple[int, int]] = field(default_factory=list)
    on_access: Callable[[], None] | None = None

    def io_out(self, port: int, size: int, value: int) -> None:
        self.outs.append((port, size, value))
        if self.on_access:
            self.on_access()

    def io_in(self, port: int, size: int) -> int:
        self.ins.append((port, size))
        if self.on_access:
            self.on_access()
        return self.inputs[port].pop(0)
