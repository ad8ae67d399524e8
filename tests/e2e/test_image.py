"""The project's image, run for real: the demo inside it, no compiler, guest RAM off /dev/shm.

``bash .ci/docker`` builds the image (``colo-operator:dev``, or
``$COLO_IMAGE``) first. Without an engine or the image the tests skip, and
fail under ``CI=true``, where that script has run.
"""

from __future__ import annotations

import os
import subprocess

import pytest
from dockerhost import engine as engines
from dockerhost import image as images

TAG = os.environ.get("COLO_IMAGE", images.DEFAULT_TAG)
RAM_DIR = "/var/lib/colo/ram"


def _need(message: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def engine() -> engines.Engine:
    found = engines.current()
    if found is None:
        _need("no Docker engine: run bash .ci/docker")
    assert found is not None
    if not images.exists(found, TAG):
        _need(f"image {TAG} not built: run bash .ci/docker")
    return found


def run(engine: engines.Engine, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    # No network but loopback: the demo runs both agents and its client inside.
    return engine.docker("run", "--rm", "--network", "none", *args, check=False, timeout=timeout)


def test_the_demo_runs_in_the_image_as_a_non_root_user_and_loses_nothing(engine: engines.Engine) -> None:
    # Two agents of 64 MiB each: more than a container's /dev/shm holds, so
    # their RAM goes to a tmpfs of its own, as in an agent pod.
    done = run(
        engine, "--read-only", "--tmpfs", "/tmp",
        "--tmpfs", f"{RAM_DIR}:size=200m", "--env", f"COLO_RAM_DIR={RAM_DIR}", TAG,
        "colo-agent", "demo", "--plain", "--accel", "tcg", "--writes-for", "2", "--clients", "2",
    )  # fmt: skip
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert "no acknowledged write was lost" in out
    who = run(engine, TAG, "id", "-u")
    assert who.stdout.strip() == "65532"


def test_the_runtime_image_has_no_compiler_and_its_firmware_is_prebuilt(engine: engines.Engine) -> None:
    probe = run(engine, TAG, "sh", "-c", "command -v gcc cc as ld; echo end")
    assert probe.stdout.split() == ["end"], f"a compiler or assembler is in the image: {probe.stdout}"
    loaded = run(
        engine, TAG, "python", "-c",
        "from colo_agent.microvm.machine import default_firmware; print(len(default_firmware().image))",
    )  # fmt: skip
    assert loaded.returncode == 0 and int(loaded.stdout) > 0, loaded.stderr[-2000:]
    # The chart's Deployment runs the other entry point of the same image.
    operator = run(engine, TAG, "colo-operator", "--help")
    assert operator.returncode == 0 and "--peering" in operator.stdout, operator.stderr[-2000:]


def test_guest_ram_larger_than_a_containers_dev_shm_needs_colo_ram_dir(engine: engines.Engine) -> None:
    """A container's /dev/shm is 64 MiB: a 96 MiB guest fails there and works on a sized tmpfs."""
    agent = ["colo-agent", "demo", "--plain", "--accel", "tcg", "--memory", "96Mi", "--writes-for", "1"]
    on_shm = run(engine, TAG, *agent, timeout=180)
    assert on_shm.returncode != 0
    # (rich wraps lines at 80 columns without a terminal)
    assert "cannot allocate 96 MiB" in " ".join((on_shm.stdout + on_shm.stderr).split())
    sized = run(engine, "--tmpfs", f"{RAM_DIR}:size=256m", "--env", f"COLO_RAM_DIR={RAM_DIR}", TAG, *agent)
    assert sized.returncode == 0, (sized.stdout + sized.stderr)[-3000:]
