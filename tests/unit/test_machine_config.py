"""Micro-VM settings: memory sizes and the accelerator choice."""

from __future__ import annotations

import logging

import pytest

from colo_agent.microvm import abi
from colo_agent.microvm.config import choose_accelerator, parse_memory, validate_dirty_rate
from colo_agent.microvm.kvm import kvm_unavailable_reason


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("64Mi", 64 << 20),
        ("1Gi", 1 << 30),
        ("4Mi", 4 << 20),
        ("512M", 512 * 10**6),
        ("100M", (100 * 10**6 + 4095) // 4096 * 4096),  # rounded up to a page
        (str(8 << 20), 8 << 20),
        (16 << 20, 16 << 20),
    ],
)
def test_sizes(text: str | int, size: int) -> None:
    assert parse_memory(text) == size
    assert size % abi.PAGE_SIZE == 0


@pytest.mark.parametrize("text", ["", "64 MB", "-1Mi", "1.5Gi", "Mi", "64mi"])
def test_malformed_sizes_say_what_is_expected(text: str) -> None:
    with pytest.raises(ValueError, match="64Mi"):
        parse_memory(text)


@pytest.mark.parametrize("text", ["1Mi", "2Gi", "0"])
def test_sizes_out_of_bounds(text: str) -> None:
    with pytest.raises(ValueError, match=r"outside the supported range 4Mi\.\.1Gi"):
        parse_memory(text)


def test_bool_is_not_a_size() -> None:
    with pytest.raises(TypeError):
        parse_memory(True)


def test_accelerator_choice(caplog: pytest.LogCaptureFixture) -> None:
    assert choose_accelerator("tcg") == "tcg"
    assert choose_accelerator("kvm") == "kvm"
    with caplog.at_level(logging.INFO):
        picked = choose_accelerator("auto")
    assert f"accelerator: {picked} (auto:" in caplog.text
    if kvm_unavailable_reason() is None:
        # Both were measured and both figures are in the log.
        assert " ms under kvm" in caplog.text and " ms under tcg" in caplog.text
    else:
        assert picked == "tcg"
    with pytest.raises(ValueError, match="auto, kvm, tcg"):
        choose_accelerator("qemu")


def test_dirty_rate() -> None:
    assert validate_dirty_rate("1000") == 1000
    assert validate_dirty_rate(0) == 0
    for bad in ("-1", "fast", "1e3", str(1 << 32)):
        with pytest.raises(ValueError, match="dirty rate"):
            validate_dirty_rate(bad)
