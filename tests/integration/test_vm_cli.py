"""`colo-agent vm run` as a process: serves, stops cleanly on a signal, refuses bad flags."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from support.vm import ACCELS


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_for_port(port: int, proc: subprocess.Popen[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr else ""
            raise AssertionError(f"vm run exited early ({proc.returncode}): {err}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("vm run did not start listening")


@pytest.mark.parametrize("accel", ACCELS)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serves_then_stops_cleanly(accel: str, sig: signal.Signals, tmp_path: Path) -> None:
    port = _free_port()
    ram = tmp_path / "vm.ram"
    env = {**os.environ, "COLO_PORT": str(port), "COLO_MEMORY": "16Mi"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "colo_agent", "vm", "run", "--accel", accel, "--ram-path", str(ram)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        _wait_for_port(port, proc)
        assert ram.stat().st_size == 16 << 20
        client = redis.Redis(port=port, socket_timeout=60, protocol=2)
        assert client.set("cli", "works")
        assert client.get("cli") == b"works"
        client.close()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert f"accelerator {accel}" in err
    assert not ram.exists(), "the RAM file must be removed on shutdown"


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--memory", "2Ki"], {}, "outside the supported range"),
        (["--memory", "lots"], {}, "is not a memory size"),
        (["--accel", "qemu"], {}, "is not one of auto, kvm, tcg"),
        (["--port", "70000"], {}, "between 0 and 65535"),
        (["--dirty-rate", "-5"], {}, "dirty rate"),
        ([], {"COLO_MEMORY": "12 parsecs"}, "is not a memory size"),
    ],
)
def test_bad_values_give_one_clear_line(args: list[str], env: dict[str, str], message: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "colo_agent", "vm", "run", *args],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_port_in_use_is_reported_without_a_traceback() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "colo_agent", "vm", "run", "--accel", "tcg", "--memory", "8Mi",
             "--port", str(port)],
            capture_output=True, text=True, timeout=120, check=False,
        )
    assert done.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "Traceback" not in done.stderr


def test_help_explains_every_flag() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "colo_agent", "vm", "run", "--help"],
        capture_output=True, text=True, timeout=60, check=True,
    )
    for flag, env in [("--memory", "COLO_MEMORY"), ("--accel", "COLO_ACCEL"), ("--host", "COLO_HOST"),
                      ("--port", "COLO_PORT"), ("--dirty-rate", "COLO_DIRTY_RATE"),
                      ("--ram-path", "COLO_RAM_PATH")]:
        assert flag in done.stdout and env in done.stdout


def test_missing_compiler_is_one_clear_line(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    done = subprocess.run(
        [sys.executable, "-m", "colo_agent", "vm", "run", "--accel", "tcg", "--memory", "8Mi",
         "--port", str(_free_port())],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 1
    assert "cannot build the guest firmware" in done.stderr
    assert "gcc" in done.stderr
    assert "Traceback" not in done.stderr
