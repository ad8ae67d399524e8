"""The Docker engine choice and the runc wrapper for VMs without CAP_SYS_RESOURCE."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from dockerhost import engine

FULL = "CapBnd:\t000001ffffffffff\n"
NO_SYS_RESOURCE = f"CapBnd:\t{0x1FFFFFFFFFF & ~(1 << 24):016x}\n"


def test_the_quirk_is_read_from_the_bounding_set() -> None:
    assert engine.lacks_cap_sys_resource("Name:\tx\n" + NO_SYS_RESOURCE)
    assert not engine.lacks_cap_sys_resource("Name:\tx\n" + FULL)


def test_the_private_engine_never_touches_the_firewall_and_wraps_runc_only_where_needed(
    tmp_path: Path,
) -> None:
    plain = engine.daemon_config(quirk=False, data_root=tmp_path)
    assert plain["iptables"] is False and plain["ip-masq"] is False and plain["bridge"] == "none"
    assert "default-runtime" not in plain
    wrapped = engine.daemon_config(quirk=True, data_root=tmp_path)
    assert wrapped["default-runtime"] == "colo-runc"
    assert wrapped["runtimes"] == {"colo-runc": {"path": str(engine.WRAPPER)}}


def _caps(names: list[str]) -> dict[str, list[str]]:
    return {kind: list(names) for kind in ("bounding", "effective", "permitted")}


def test_the_wrapper_removes_cap_sys_resource_and_nothing_else(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    spec = {
        "ociVersion": "1.0.2",
        "process": {"args": ["sh"], "capabilities": _caps(["CAP_CHOWN", "CAP_SYS_RESOURCE"])},
    }
    (bundle / "config.json").write_text(json.dumps(spec))
    process = tmp_path / "process.json"
    process.write_text(json.dumps({"args": ["ls"], "capabilities": _caps(["CAP_SYS_RESOURCE", "CAP_KILL"])}))
    env = {**os.environ, "COLO_REAL_RUNC": "/bin/true"}
    wrapper = str(engine.WRAPPER)
    subprocess.run(
        [wrapper, "--root", "/run/x", "create", "--bundle", str(bundle), "c1"], env=env, check=True
    )
    subprocess.run([wrapper, "exec", "--process", str(process), "c1"], env=env, check=True)
    after = json.loads((bundle / "config.json").read_text())
    assert after["process"]["capabilities"] == _caps(["CAP_CHOWN"])
    assert after["process"]["args"] == ["sh"] and after["ociVersion"] == "1.0.2"
    assert json.loads(process.read_text())["capabilities"] == _caps(["CAP_KILL"])
    # Anything else goes to runc untouched.
    assert subprocess.run([wrapper, "--version"], env={**env, "COLO_REAL_RUNC": "/bin/false"}).returncode == 1
