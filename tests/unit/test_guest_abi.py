"""The firmware's abi.h and the monitor's abi.py must describe the same ABI."""

from __future__ import annotations

import re
from pathlib import Path

from colo_agent.microvm import abi

HEADER = Path(abi.__file__).parent / "firmware" / "abi.h"


def _header_constants() -> dict[str, int]:
    out = {}
    for name, value in re.findall(r"^#define (\w+) (0x[0-9A-Fa-f]+|\d+)U*L*\b", HEADER.read_text(), re.M):
        out[name] = int(value, 0)
    return out


def test_every_header_constant_matches_python() -> None:
    consts = _header_constants()
    assert len(consts) > 20
    for name, value in consts.items():
        if name.startswith("FRAME_") and name[6:] in abi.FrameType.__members__:
            assert abi.FrameType[name[6:]] == value, name
        elif name.startswith("PORT_"):
            assert abi.Port[name[5:]] == value, name
        elif name == "COLO_ABI_H":
            continue
        else:
            assert getattr(abi, name) == value, name
