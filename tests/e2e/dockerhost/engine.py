"""Which Docker engine the image build and the kind cluster use, and starting our own.

On a normal machine (a CI runner, a laptop) that is the system's Docker,
used unchanged. A private ``dockerd`` is started instead when there is no
running system Docker, or when this machine cannot run privileged
containers (below). It has its own socket, data root and exec root, and
``iptables: false``: it never touches the host firewall (no FORWARD DROP,
no NAT), so the local e2e harness and everything else on the machine keep
working. Its data root lives under ``~/.cache/colo-docker`` so base
images, build layers and the kind node image survive between runs.

The quirk: some virtual machines start every process without
``CAP_SYS_RESOURCE`` in the capability bounding set. runc then fails every
``--privileged`` container with "unable to apply caps: operation not
permitted". It is detected from ``CapBnd`` in ``/proc/self/status``; only
then does the private engine's default runtime become ``colo-runc``, a
wrapper that removes that one capability from the container's spec.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

CAP_SYS_RESOURCE = 24
RUN_DIR = Path("/run/colo-docker")
SOCKET = RUN_DIR / "docker.sock"
PIDFILE = RUN_DIR / "dockerd.pid"
WRAPPER = Path(__file__).resolve().parent / "colo-runc"


class EngineError(RuntimeError):
    """No usable Docker engine; the message says what is missing."""


def cache_root() -> Path:
    return Path(os.environ.get("COLO_DOCKER_CACHE") or Path.home() / ".cache" / "colo-docker")


def lacks_cap_sys_resource(status: str | None = None) -> bool:
    """True when this process's capability bounding set lacks CAP_SYS_RESOURCE."""
    text = status if status is not None else Path("/proc/self/status").read_text()
    for line in text.splitlines():
        if line.startswith("CapBnd:"):
            return not (int(line.split()[1], 16) >> CAP_SYS_RESOURCE) & 1
    return False


def _responds(env: dict[str, str]) -> bool:
    try:
        done = subprocess.run(
            ["docker", "version", "--format", "{{.Server.Version}}"],
            env={**os.environ, **env}, capture_output=True, text=True, timeout=20, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


@dataclass(frozen=True)
class Engine:
    """A Docker engine to talk to: ``env`` is what the docker CLI needs (DOCKER_HOST or nothing)."""

    env: dict[str, str]
    private: bool
    runtime_wrapped: bool

    def docker(self, *args: str, check: bool = True, **kw: object) -> subprocess.CompletedProcess[str]:
        argv = ["docker", *args]
        done = subprocess.run(
            argv,
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            check=False,
            **kw,  # type: ignore[call-overload]
        )
        if check and done.returncode != 0:
            raise EngineError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        return done  # type: ignore[no-any-return]

    def describe(self) -> str:
        where = f"private dockerd at {SOCKET}" if self.private else "the system's Docker"
        extra = ", runtime colo-runc (no CAP_SYS_RESOURCE here)" if self.runtime_wrapped else ""
        return where + extra


def private_env() -> dict[str, str]:
    return {"DOCKER_HOST": f"unix://{SOCKET}"}


def current() -> Engine | None:
    """The engine already usable, without starting anything."""
    quirk = lacks_cap_sys_resource()
    if SOCKET.exists() and _responds(private_env()):
        return Engine(private_env(), private=True, runtime_wrapped=quirk)
    if not quirk and "DOCKER_HOST" not in os.environ and _responds({}):
        return Engine({}, private=False, runtime_wrapped=False)
    if not quirk and "DOCKER_HOST" in os.environ and _responds({}):
        return Engine({"DOCKER_HOST": os.environ["DOCKER_HOST"]}, private=False, runtime_wrapped=False)
    return None


def daemon_config(quirk: bool, data_root: Path) -> dict[str, object]:
    config: dict[str, object] = {
        "hosts": [f"unix://{SOCKET}"],
        "data-root": str(data_root),
        "exec-root": str(RUN_DIR / "exec"),
        "pidfile": str(PIDFILE),
        # Never touch the host firewall: no FORWARD DROP, no NAT, no default bridge.
        "iptables": False,
        "ip-masq": False,
        "ip-forward": False,
        "bridge": "none",
        "storage-driver": "overlay2",
        "log-driver": "json-file",
        "log-opts": {"max-size": "10m", "max-file": "2"},
        "features": {"buildkit": False},
    }
    if quirk:
        config["runtimes"] = {"colo-runc": {"path": str(WRAPPER)}}
        config["default-runtime"] = "colo-runc"
    return config


def start_private(timeout: float = 60.0) -> Engine:
    """Start (or reuse) the private dockerd; installs nothing, so dockerd must exist."""
    quirk = lacks_cap_sys_resource()
    if SOCKET.exists() and _responds(private_env()):
        return Engine(private_env(), private=True, runtime_wrapped=quirk)
    dockerd = shutil.which("dockerd")
    if dockerd is None:
        raise EngineError("dockerd not found: install Debian's docker.io (bash .ci/docker does)")
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    root = cache_root()
    data_root = root / "data-root"
    data_root.mkdir(parents=True, exist_ok=True)
    config_path = RUN_DIR / "daemon.json"
    config_path.write_text(json.dumps(daemon_config(quirk, data_root), indent=2))
    log = (root / "dockerd.log").open("ab")
    # Its own session: the daemon outlives the command that started it
    # (the CI script starts it, the tests use it).
    subprocess.Popen(
        [dockerd, "--config-file", str(config_path)],
        stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if SOCKET.exists() and _responds(private_env()):
            return Engine(private_env(), private=True, runtime_wrapped=quirk)
        time.sleep(0.5)
    raise EngineError(f"the private dockerd did not answer within {timeout:.0f}s; see {root / 'dockerd.log'}")


def ensure() -> Engine:
    """The system Docker where it is usable as it is, else a private dockerd."""
    engine = current()
    return engine if engine is not None else start_private()


def stop_private(timeout: float = 30.0) -> None:
    """Stop the private dockerd (containers keep their state in the data root)."""
    try:
        pid = int(PIDFILE.read_text())
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        time.sleep(0.2)
    if Path(f"/proc/{pid}").exists():
        print(f"dockerhost: dockerd {pid} still running after {timeout:.0f}s", file=sys.stderr)
