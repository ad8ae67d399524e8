"""Build the guest firmware (freestanding C in `firmware/`) with the host's gcc.

The result is cached under ``$XDG_CACHE_HOME/colo-agent/firmware/<key>/``,
where the key hashes every source, the flags and the compiler's version, so
an edit or a new compiler rebuilds and anything else reuses the image.
Builds write to a temporary name and rename, so concurrent builders never
see half a file.

A container image ships the firmware prebuilt and no compiler:
``python -m colo_agent.microvm.firmware_build --install DIR`` writes
``DIR/firmware.bin`` and ``DIR/firmware.sources`` (the digest of the
sources and flags it was built from), and ``$COLO_AGENT_FIRMWARE`` naming
that ``firmware.bin`` makes the agent load it instead of building; one
built from other sources is refused rather than booted.

The flat image begins with a jump over a small header (docs/guest-abi.md
leaves the layout to the firmware): magic ``COLOFW01`` at offset 8, then the
page-aligned end of image plus bss at offset 16. That end is where the
monitor may start the heap (``boot_info.heap_start``); `Firmware.end` carries
it for callers that did not read the header themselves.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from colo_agent.microvm import abi

FIRMWARE_DIR = Path(__file__).parent / "firmware"

# Link order matters only for start.S, whose section the linker script puts first.
# (host_test_driver.c and libc_host_test.c are host-only test programs.)
GUEST_SOURCES = ("start.S", "main.c", "nic.c", "resp.c", "commands.c", "store.c", "alloc.c", "libc.c")
# The port-free core, shared by the guest and the host test driver.
CORE_SOURCES = ("nic.c", "resp.c", "commands.c", "store.c", "alloc.c")
HOST_DRIVER_SOURCE = "host_test_driver.c"
LIBC_TEST_SOURCE = "libc_host_test.c"
LINKER_SCRIPT = "firmware.ld"
SOURCE_SUFFIXES = (".c", ".h", ".S", ".ld")

GUEST_CFLAGS = (
    "-std=gnu11",
    "-O2",
    "-Wall",
    "-Wextra",
    "-ffreestanding",
    "-fno-pic",
    "-fno-pie",
    "-mcmodel=small",
    # No SSE: the monitor does not enable it (CR4.OSFXSR is clear).
    "-mgeneral-regs-only",
    "-mno-red-zone",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-fno-unwind-tables",
    "-fcf-protection=none",
    "-fno-common",
    # Loops must not turn into calls of the very memcpy/memset being defined.
    "-fno-tree-loop-distribute-patterns",
)
GUEST_LDFLAGS = ("-nostdlib", "-static", "-no-pie", "-Wl,--build-id=none")
HOST_CFLAGS = ("-std=gnu11", "-O1", "-g", "-Wall", "-Wextra", "-Werror", "-fno-omit-frame-pointer")
SANITIZE_FLAGS = ("-fsanitize=address,undefined", "-fno-sanitize-recover=all")

PREBUILT_ENV = "COLO_AGENT_FIRMWARE"
SOURCES_SUFFIX = ".sources"

HEADER_MAGIC = b"COLOFW01"
HEADER_MAGIC_OFFSET = 8
HEADER_END_OFFSET = 16

_INSTALL_HINTS = {
    "gcc": "install it with `apt-get install gcc`",
    "objcopy": "install binutils with `apt-get install binutils`",
}


class FirmwareBuildError(RuntimeError):
    """The firmware could not be built (missing toolchain, compiler error, bad image)."""


@dataclass(frozen=True)
class Firmware:
    """A built firmware image, ready to be copied to FIRMWARE_ADDR."""

    path: Path  # the flat binary on disk
    image: bytes  # its contents
    end: int  # guest address after image + bss, page aligned: the lowest heap_start

    @property
    def heap_start(self) -> int:
        return self.end


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "colo-agent" / "firmware"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        hint = _INSTALL_HINTS.get(name, f"install {name}")
        raise FirmwareBuildError(f"{name} not found: {hint}")
    return path


def _run(argv: list[str], what: str, cwd: Path) -> str:
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise FirmwareBuildError(f"{what}: cannot run {argv[0]}: {exc}") from exc
    if done.returncode != 0:
        output = (done.stdout + done.stderr).strip()
        raise FirmwareBuildError(f"{what} failed (exit {done.returncode}): {' '.join(argv)}\n{output}")
    return done.stdout


def _compiler_identity(cc: str) -> str:
    return _run([cc, "--version"], "asking the compiler for its version", FIRMWARE_DIR).splitlines()[0]


def source_digest(*extra: str) -> str:
    """sha256 over every firmware source plus `extra` strings (flags, compiler)."""
    h = hashlib.sha256()
    for path in sorted(FIRMWARE_DIR.iterdir()):
        if path.suffix in SOURCE_SUFFIXES and path.is_file():
            h.update(path.name.encode() + b"\0")
            h.update(path.read_bytes())
            h.update(b"\0")
    for item in extra:
        h.update(item.encode() + b"\0")
    return h.hexdigest()


def parse_image_end(image: bytes) -> int:
    """The page-aligned end of image + bss, read from the image header."""
    if len(image) < HEADER_END_OFFSET + 8:
        raise FirmwareBuildError(f"firmware image is {len(image)} bytes, too short for its header")
    magic = image[HEADER_MAGIC_OFFSET : HEADER_MAGIC_OFFSET + len(HEADER_MAGIC)]
    if magic != HEADER_MAGIC:
        raise FirmwareBuildError(f"firmware image header magic is {magic!r}, expected {HEADER_MAGIC!r}")
    (end,) = struct.unpack_from("<Q", image, HEADER_END_OFFSET)
    if end % abi.PAGE_SIZE or end < abi.FIRMWARE_ADDR + len(image) or end >= abi.MIN_RAM:
        raise FirmwareBuildError(
            f"firmware image end {end:#x} is not a page-aligned address between the image's last byte "
            f"{abi.FIRMWARE_ADDR + len(image):#x} and the smallest RAM size {abi.MIN_RAM:#x}"
        )
    return end


def _atomic_copy(src: Path, dest: Path) -> None:
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dest)


def build_firmware(cache_dir: Path | None = None, cc: str = "gcc") -> Firmware:
    """Compile the firmware (or reuse the cached build) and return it."""
    cc_path = _tool(cc)
    objcopy = _tool("objcopy")
    flags = GUEST_CFLAGS + GUEST_LDFLAGS
    key = source_digest(*flags, _compiler_identity(cc_path))
    out_dir = (cache_dir or cache_root()) / key
    binary = out_dir / "firmware.bin"
    if not binary.exists():
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            _build_into(out_dir, cc_path, objcopy, flags)
        except OSError as exc:
            raise FirmwareBuildError(
                f"cannot write the firmware cache {out_dir}: {exc}; point XDG_CACHE_HOME at a writable "
                "directory (or build the image ahead of time: "
                "`python -m colo_agent.microvm.firmware_build`)"
            ) from exc
    image = binary.read_bytes()
    return Firmware(path=binary, image=image, end=parse_image_end(image))


def prebuilt_digest() -> str:
    """What a prebuilt image must have been built from: sources and flags, any gcc."""
    return source_digest(*GUEST_CFLAGS, *GUEST_LDFLAGS)


def install_prebuilt(dest: Path) -> Firmware:
    """Build (or reuse) the firmware and copy it to ``dest/firmware.bin`` with its sources digest."""
    fw = build_firmware()
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / "firmware.bin"
    _atomic_copy(fw.path, target)
    (dest / f"firmware.bin{SOURCES_SUFFIX}").write_text(prebuilt_digest() + "\n")
    return Firmware(path=target, image=fw.image, end=fw.end)


def load_prebuilt(path: Path) -> Firmware:
    """A firmware image built ahead of time; refused unless built from these very sources."""
    try:
        image = path.read_bytes()
        recorded = path.with_name(path.name + SOURCES_SUFFIX).read_text().strip()
    except OSError as exc:
        raise FirmwareBuildError(f"cannot read the prebuilt firmware ({PREBUILT_ENV}={path}): {exc}") from exc
    if recorded != prebuilt_digest():
        raise FirmwareBuildError(
            f"the prebuilt firmware {path} was built from other sources than this agent's "
            f"(digest {recorded[:12]}, expected {prebuilt_digest()[:12]}); rebuild it with "
            "`python -m colo_agent.microvm.firmware_build --install DIR`, or unset "
            f"{PREBUILT_ENV} to build with gcc"
        )
    return Firmware(path=path, image=image, end=parse_image_end(image))


def default_firmware() -> Firmware:
    """``$COLO_AGENT_FIRMWARE`` if set, else built (or reused from the cache) with gcc."""
    prebuilt = os.environ.get(PREBUILT_ENV)
    return load_prebuilt(Path(prebuilt)) if prebuilt else build_firmware()


def _build_into(out_dir: Path, cc_path: str, objcopy: str, flags: tuple[str, ...]) -> None:
    with tempfile.TemporaryDirectory(prefix="build-", dir=out_dir.parent) as tmp_name:
        tmp = Path(tmp_name)
        elf = tmp / "firmware.elf"
        flat = tmp / "firmware.bin"
        _run(
            [
                cc_path,
                *flags,
                f"-Wl,-T,{FIRMWARE_DIR / LINKER_SCRIPT}",
                "-o",
                str(elf),
                *(str(FIRMWARE_DIR / s) for s in GUEST_SOURCES),
            ],
            "compiling the firmware",
            tmp,
        )
        _run([objcopy, "-O", "binary", str(elf), str(flat)], "extracting the flat firmware image", tmp)
        parse_image_end(flat.read_bytes())  # refuse a broken image before caching it
        _atomic_copy(elf, out_dir / "firmware.elf")  # kept for gdb/objdump
        _atomic_copy(flat, out_dir / "firmware.bin")


def build_host_test_driver(dest: Path, cc: str = "gcc", sanitize: bool = True) -> Path:
    """Compile the firmware core with the host test driver into `dest`.

    With `sanitize`, AddressSanitizer and UBSan check every access the core
    makes; the build falls back to plain when the toolchain lacks them.
    """
    cc_path = _tool(cc)
    dest.mkdir(parents=True, exist_ok=True)
    exe = dest / "host_test_driver"
    sources = [str(FIRMWARE_DIR / s) for s in (HOST_DRIVER_SOURCE, *CORE_SOURCES)]
    attempts = [SANITIZE_FLAGS, ()] if sanitize else [()]
    error: FirmwareBuildError | None = None
    for extra in attempts:
        try:
            argv = [cc_path, *HOST_CFLAGS, *extra, "-o", str(exe), *sources]
            _run(argv, "compiling the host test driver", dest)
            return exe
        except FirmwareBuildError as exc:
            error = exc
    assert error is not None
    raise error


def build_libc_host_test(dest: Path, cc: str = "gcc") -> Path:
    """Compile the guest's memcpy/memmove/memset/memcmp, renamed, with a host
    program that checks them against the host libc (prints "ok")."""
    cc_path = _tool(cc)
    dest.mkdir(parents=True, exist_ok=True)
    renamed = [f"-D{name}=fw_{name}" for name in ("memcpy", "memmove", "memset", "memcmp")]
    obj = dest / "libc.o"
    _run(
        [
            cc_path,
            *HOST_CFLAGS,
            "-fno-builtin",
            "-fno-tree-loop-distribute-patterns",
            *renamed,
            "-c",
            "-o",
            str(obj),
            str(FIRMWARE_DIR / "libc.c"),
        ],
        "compiling the guest libc for the host",
        dest,
    )
    exe = dest / "libc_host_test"
    _run(
        [cc_path, *HOST_CFLAGS, "-o", str(exe), str(FIRMWARE_DIR / LIBC_TEST_SOURCE), str(obj)],
        "compiling the guest libc test",
        dest,
    )
    return exe


def main(argv: list[str] | None = None) -> int:
    """`python -m colo_agent.microvm.firmware_build [--install DIR]`: build (e.g. into a
    container image, with XDG_CACHE_HOME set) and print where the image is."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m colo_agent.microvm.firmware_build",
        description="Build the guest firmware with gcc (cached) and print where it is.",
    )
    parser.add_argument(
        "--install",
        metavar="DIR",
        type=Path,
        help=f"also copy it to DIR/firmware.bin with its sources digest, for {PREBUILT_ENV}",
    )
    args = parser.parse_args(argv)
    try:
        fw = install_prebuilt(args.install) if args.install else build_firmware()
    except FirmwareBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{fw.path} ({len(fw.image)} bytes, heap from {fw.end:#x})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
