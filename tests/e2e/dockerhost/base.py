"""Base images made here from Debian packages, for machines that cannot pull.

The Dockerfile starts ``FROM python:3.11-slim-bookworm``. Where that image
is not in the engine already and no registry is reachable, an equivalent is
made locally: ``mmdebstrap --variant=minbase bookworm`` from the Debian
mirror apt uses, with Debian's Python 3.11 (``python``, ``venv``, pip
through ensurepip) and the environment the official image sets, then
``docker import``-ed under that name. The same Dockerfile then builds here
and, unchanged, on a machine that pulls the official image.

The host's trust settings go in too: its CA bundle and ``/etc/pip.conf``,
when it has them. A machine behind an intercepting proxy trusts the
proxy's CA there, and ``pip install`` inside the build needs the same.

An image carries a label with a digest of what it was made from (suite,
packages, mirror, trust files); a different digest remakes it.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .engine import Engine, EngineError

SUITE = "bookworm"
LABEL = "dev.colo.base-digest"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_SECURITY = "http://deb.debian.org/debian-security"
TRUST_FILES = (Path("/etc/ssl/certs/ca-certificates.crt"), Path("/etc/pip.conf"))


@dataclass(frozen=True)
class BaseImage:
    tag: str
    packages: tuple[str, ...]
    changes: tuple[str, ...]  # docker import --change lines


PYTHON_SLIM = BaseImage(
    tag="python:3.11-slim-bookworm",
    packages=("python3", "python3-venv", "python-is-python3", "ca-certificates"),
    changes=(
        "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "ENV LANG=C.UTF-8",
        'CMD ["python3"]',
    ),
)


def host_mirrors(sources_dir: Path = Path("/etc/apt")) -> tuple[str, str]:
    """The Debian and Debian-security URIs apt uses on this machine (defaults if none)."""
    mirror, security = DEFAULT_MIRROR, DEFAULT_SECURITY
    texts = [p.read_text() for p in sorted(sources_dir.glob("sources.list.d/*.sources")) if p.is_file()]
    texts += [p.read_text() for p in [sources_dir / "sources.list"] if p.is_file()]
    for text in texts:
        for uri in re.findall(r"(?:^URIs:|^deb)\s+(?:\[[^\]]*\]\s+)?(\S+)", text, re.MULTILINE):
            uri = uri.rstrip("/")
            if uri.endswith("/debian-security"):
                security = uri
            elif uri.endswith("/debian"):
                mirror = uri
    return mirror, security


def digest(base: BaseImage, mirror: str, security: str) -> str:
    h = hashlib.sha256()
    for item in (SUITE, mirror, security, *base.packages, *base.changes):
        h.update(item.encode() + b"\0")
    for path in TRUST_FILES:
        h.update(path.read_bytes() if path.is_file() else b"-")
    return h.hexdigest()[:16]


def current_digest(engine: Engine, tag: str) -> str | None:
    """The digest label of ``tag`` ("" for an image that has none, e.g. a pulled one), None if absent."""
    done = engine.docker("image", "inspect", "--format", "{{json .Config.Labels}}", tag, check=False)
    if done.returncode != 0:
        return None
    labels = done.stdout.strip()
    match = re.search(rf'"{re.escape(LABEL)}":"([0-9a-f]+)"', labels)
    return match.group(1) if match else ""


def ensure(engine: Engine, base: BaseImage = PYTHON_SLIM) -> str:
    """Make ``base.tag`` available; returns what was done ("present", "made in N s")."""
    mirror, security = host_mirrors()
    want = digest(base, mirror, security)
    have = current_digest(engine, base.tag)
    if have == "" or have == want:
        return "present" if have == want else "present (not made here)"
    if shutil.which("mmdebstrap") is None:
        raise EngineError(
            f"{base.tag} is missing and mmdebstrap is not installed (apt-get install mmdebstrap)"
        )
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="colo-base-") as tmp:
        tarball = Path(tmp) / "rootfs.tar"
        hooks = []
        for path in TRUST_FILES:
            if path.is_file():
                hooks += ["--customize-hook", f"upload {path} {path}"]
        argv = [
            "mmdebstrap", "--quiet", "--variant=minbase", "--format=tar",
            f"--include={','.join(base.packages)}",
            # What the official slim image leaves out too.
            "--dpkgopt=path-exclude=/usr/share/doc/*",
            "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/locale/*",
            "--customize-hook=rm -rf \"$1\"/var/lib/apt/lists/* \"$1\"/var/cache/apt/*.bin",
            *hooks,
            SUITE, str(tarball),
            f"deb {mirror} {SUITE} main",
            f"deb {mirror} {SUITE}-updates main",
            f"deb {security} {SUITE}-security main",
        ]  # fmt: skip
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise EngineError(f"mmdebstrap failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        changes = [*base.changes, f"LABEL {LABEL}={want}"]
        engine.docker("import", *(f"--change={c}" for c in changes), str(tarball), base.tag)
    return f"made in {time.monotonic() - start:.0f}s"
