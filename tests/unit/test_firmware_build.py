"""Building the guest firmware image: cache, header, and errors that say what to do."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from colo_agent.microvm import abi, firmware_build
from colo_agent.microvm.firmware_build import (
    FirmwareBuildError,
    build_firmware,
    parse_image_end,
)

needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is needed to build the firmware")


@needs_gcc
def test_build_gives_a_flat_image_with_its_end_in_the_header(tmp_path: Path) -> None:
    fw = build_firmware(cache_dir=tmp_path)
    assert fw.path.read_bytes() == fw.image
    assert fw.image[8:16] == b"COLOFW01"
    assert fw.end == fw.heap_start == struct.unpack_from("<Q", fw.image, 16)[0]
    assert fw.end % abi.PAGE_SIZE == 0
    assert abi.FIRMWARE_ADDR + len(fw.image) <= fw.end < abi.MIN_RAM // 2
    # The ELF kept beside the image agrees on where bss ends.
    nm = subprocess.run(["nm", str(fw.path.with_name("firmware.elf"))], capture_output=True, text=True)
    symbols = {
        line.split()[2]: int(line.split()[0], 16) for line in nm.stdout.splitlines() if line.count(" ") == 2
    }
    assert symbols["_end"] == fw.end
    assert symbols["_start"] == abi.FIRMWARE_ADDR


@needs_gcc
def test_the_guest_code_uses_no_sse_registers(tmp_path: Path) -> None:
    fw = build_firmware(cache_dir=tmp_path)
    dump = subprocess.run(
        ["objdump", "-d", str(fw.path.with_name("firmware.elf"))], capture_output=True, text=True, check=True
    ).stdout
    assert "xmm" not in dump and "ymm" not in dump


@needs_gcc
def test_a_second_build_reuses_the_cache(tmp_path: Path) -> None:
    first = build_firmware(cache_dir=tmp_path)
    stamp = first.path.stat().st_mtime_ns
    second = build_firmware(cache_dir=tmp_path)
    assert second == first
    assert second.path.stat().st_mtime_ns == stamp
    assert first.path.parent.name == firmware_build.source_digest(
        *firmware_build.GUEST_CFLAGS,
        *firmware_build.GUEST_LDFLAGS,
        firmware_build._compiler_identity(shutil.which("gcc") or "gcc"),
    )


@needs_gcc
def test_default_cache_follows_xdg_cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    fw = build_firmware()
    assert fw.path.is_relative_to(tmp_path / "colo-agent" / "firmware")


def test_missing_compiler_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(FirmwareBuildError, match=r"gcc not found: install it with `apt-get install gcc`"):
        build_firmware(cache_dir=tmp_path)


@needs_gcc
def test_compiler_errors_come_with_the_compiler_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sources = tmp_path / "src"
    shutil.copytree(firmware_build.FIRMWARE_DIR, sources)
    (sources / "main.c").write_text((sources / "main.c").read_text() + "\nthis is not C;\n")
    monkeypatch.setattr(firmware_build, "FIRMWARE_DIR", sources)
    with pytest.raises(FirmwareBuildError, match="compiling the firmware failed") as info:
        build_firmware(cache_dir=tmp_path / "cache")
    assert "main.c" in str(info.value) and "error" in str(info.value)
    assert not list((tmp_path / "cache").rglob("firmware.bin"))


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (b"\xeb\x1e", "too short"),
        (b"\xeb\x1e" + bytes(6) + b"NOTCOLO!" + struct.pack("<Q", 0x200000), "magic"),
        (b"\xeb\x1e" + bytes(6) + b"COLOFW01" + struct.pack("<Q", 0x200001), "page-aligned"),
        (b"\xeb\x1e" + bytes(6) + b"COLOFW01" + struct.pack("<Q", 0x100000), "page-aligned"),
    ],
)
def test_a_broken_image_header_is_refused(image: bytes, message: str) -> None:
    with pytest.raises(FirmwareBuildError, match=message):
        parse_image_end(image)


@needs_gcc
def test_an_unwritable_cache_says_how_to_fix_it(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    with pytest.raises(FirmwareBuildError, match=r"cannot write the firmware cache .*XDG_CACHE_HOME"):
        build_firmware(cache_dir=blocker / "cache")


@needs_gcc
def test_module_entry_point_builds_and_prints_the_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert firmware_build.main([]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(str(tmp_path / "colo-agent" / "firmware")) and "firmware.bin" in printed
    monkeypatch.setenv("PATH", str(tmp_path))
    assert firmware_build.main([]) == 1
    assert "gcc not found" in capsys.readouterr().err


@needs_gcc
def test_a_prebuilt_image_loads_without_a_compiler_and_says_where_it_came_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    installed = firmware_build.install_prebuilt(tmp_path / "fw")
    assert installed.path == tmp_path / "fw" / "firmware.bin"
    # What a container image without gcc does: the environment names the image.
    monkeypatch.setenv(firmware_build.PREBUILT_ENV, str(installed.path))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    loaded = firmware_build.default_firmware()
    assert loaded.image == installed.image and loaded.end == installed.end
    assert loaded.path == installed.path


@needs_gcc
def test_a_prebuilt_image_from_other_sources_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    installed = firmware_build.install_prebuilt(tmp_path / "fw")
    stamp = installed.path.with_name("firmware.bin.sources")
    stamp.write_text("0" * 64 + "\n")
    with pytest.raises(FirmwareBuildError, match="built from other sources"):
        firmware_build.load_prebuilt(installed.path)
    stamp.unlink()
    with pytest.raises(FirmwareBuildError, match="cannot read the prebuilt firmware"):
        firmware_build.load_prebuilt(installed.path)
