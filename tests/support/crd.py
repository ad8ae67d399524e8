"""Install the ColoVM CRD into a test API server and wait until it serves."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

CRD = Path(__file__).resolve().parents[2] / "crds" / "colovm.yaml"
NAME = "colovms.colo.dev"


def install_crd(kubectl: Sequence[str], timeout: float = 60.0) -> None:
    """Apply the CRD and poll until its Established condition is True.

    ``kubectl wait --for=condition=...`` fails at once ("status.conditions accessor error")
    when it reads the CRD before the API server wrote any condition, so poll instead.
    """
    subprocess.run([*kubectl, "apply", "-f", str(CRD)], check=True, capture_output=True, timeout=60)
    query = [*kubectl, "get", "crd", NAME, "-o",
             'jsonpath={.status.conditions[?(@.type=="Established")].status}']  # fmt: skip
    deadline = time.monotonic() + timeout
    while True:
        done = subprocess.run(query, capture_output=True, text=True, timeout=60, check=False)
        if done.returncode == 0 and done.stdout.strip() == "True":
            return
        if time.monotonic() > deadline:
            raise AssertionError(
                f"CRD {NAME} not Established after {timeout:.0f} s: {done.stdout}{done.stderr}"
            )
        time.sleep(0.2)
