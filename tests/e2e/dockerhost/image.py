"""Build the project's image from its Dockerfile, timed.

The build uses the host's network (``--network host``): a private engine
has no NAT, and on a normal machine it changes nothing. The classic
builder is used because it needs no plugin (Debian's docker.io has no
buildx) and honours ``--network host`` without daemon entitlements.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from .engine import Engine, EngineError

ROOT = Path(__file__).resolve().parents[3]
DEFAULT_TAG = "colo-operator:dev"


def build(engine: Engine, tag: str = DEFAULT_TAG, context: Path = ROOT, quiet: bool = False) -> float:
    """``docker build`` the repository; returns the seconds it took."""
    argv = ["docker", "build", "--network", "host", "--tag", tag, str(context)]
    env = {**os.environ, **engine.env, "DOCKER_BUILDKIT": "0"}
    start = time.monotonic()
    out = subprocess.DEVNULL if quiet else sys.stderr
    done = subprocess.run(argv, env=env, stdout=out, stderr=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0:
        raise EngineError(f"docker build failed ({done.returncode}): {done.stderr.strip()[-3000:]}")
    return time.monotonic() - start


def exists(engine: Engine, tag: str) -> bool:
    return engine.docker("image", "inspect", tag, check=False).returncode == 0
