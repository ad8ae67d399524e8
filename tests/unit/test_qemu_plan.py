"""The qemu backend's pure parts: command lines, QMP sequences, checkpoint trace."""

from __future__ import annotations

from pathlib import Path

import pytest

from colo_agent.qemu import plan
from colo_agent.qemu.checkpoints import Cause, CheckpointLog
from colo_agent.qemu.command import (
    GUEST_MAC,
    Endpoint,
    GuestSpec,
    NicModel,
    PrimaryPorts,
    RunDir,
    SecondaryPorts,
    primary_argv,
    secondary_argv,
)

SPEC = GuestSpec(kernel=Path("/k/vmlinuz"), initrd=Path("/k/initrd.img"), memory_mib=192, vcpus=2,
                 nic=NicModel.VIRTIO)
PRIMARY = PrimaryPorts(mirror=Endpoint("10.1.0.1", 9003), compare=Endpoint("10.1.0.1", 9004))
SECONDARY = SecondaryPorts(migration=Endpoint("10.1.0.2", 9998), nbd=Endpoint("10.1.0.2", 9999))


def _opt(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_both_sides_run_the_same_machine(tmp_path: Path) -> None:
    p = primary_argv("qemu", SPEC, RunDir(tmp_path / "p"), tmp_path / "disk.qcow2")
    s = secondary_argv("qemu", SPEC, RunDir(tmp_path / "s"), PRIMARY, SECONDARY)
    for flag in ("-m", "-smp", "-machine", "-cpu", "-kernel", "-initrd", "-append", "-accel"):
        assert _opt(p, flag) == _opt(s, flag), flag
    assert _opt(p, "-m") == ["192M"] and _opt(p, "-smp") == ["2"]
    nic = f"virtio-net-pci,netdev=hn0,mac={GUEST_MAC}"
    assert nic in _opt(p, "-device") and nic in _opt(s, "-device")


def test_guest_network_is_restricted_and_unserved_at_start(tmp_path: Path) -> None:
    for argv in (primary_argv("qemu", SPEC, RunDir(tmp_path), tmp_path / "d"),
                 secondary_argv("qemu", SPEC, RunDir(tmp_path), PRIMARY, SECONDARY)):
        (netdev,) = _opt(argv, "-netdev")
        assert netdev == "user,id=hn0,restrict=on"  # no hostfwd until the agent serves


def test_secondary_waits_for_its_primary(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    s = secondary_argv("qemu", SPEC, run, PRIMARY, SECONDARY)
    assert _opt(s, "-incoming") == ["tcp:10.1.0.2:9998"]
    chardevs = _opt(s, "-chardev")
    assert any("host=10.1.0.1,port=9003" in c for c in chardevs)
    assert any("host=10.1.0.1,port=9004" in c for c in chardevs)
    drives = " ".join(_opt(s, "-drive"))
    for disk in (run.parent_disk, run.hidden_disk, run.active_disk):
        assert str(disk) in drives
    assert "filter-rewriter,id=rew0" in " ".join(_opt(s, "-object"))


def test_long_run_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="too long"):
        RunDir(tmp_path / ("x" * 120)).check_paths()


@pytest.mark.parametrize(("field", "value", "named"),
                         [("memory_mib", 16, "memory"), ("vcpus", 0, "vCPUs"), ("guest_port", 70000, "port")])
def test_bad_spec_names_the_field(field: str, value: int, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        GuestSpec(kernel=Path("k"), initrd=Path("i"), **{field: value})  # type: ignore[arg-type]


def test_promoted_primary_puts_its_filters_before_the_rewriter(tmp_path: Path) -> None:
    fresh = plan.primary_proxy(PRIMARY, RunDir(tmp_path), before_rewriter=False)
    promoted = plan.primary_proxy(PRIMARY, RunDir(tmp_path), before_rewriter=True)
    filters = [c for c in promoted if c.name == "object-add" and str(c.args["qom-type"]).startswith("filter")]
    assert len(filters) == 3 and all(c.args["position"] == "id=rew0" for c in filters)
    assert not any("position" in c.args for c in fresh)
    # Every chardev a filter or colo-compare names is created before it.
    made: set[str] = set()
    for c in fresh:
        if c.name == "chardev-add":
            made.add(str(c.args["id"]))
        for key in ("outdev", "indev", "primary_in", "secondary_in"):
            if key in c.args:
                assert c.args[key] in made, (c, key)


def test_failovers_get_past_what_a_dead_peer_already_removed() -> None:
    primary = plan.primary_failover()
    assert [c.name for c in primary].index("x-colo-lost-heartbeat") > 0
    assert all(c.tolerant for c in primary)
    secondary = plan.secondary_failover()
    assert [c.name for c in secondary][:2] == ["nbd-server-stop", "x-colo-lost-heartbeat"]
    # Taking over is the one step a secondary's failover cannot skip.
    assert [c.tolerant for c in secondary if c.name == "x-colo-lost-heartbeat"] == [False]
    assert {c.args["id"] for c in secondary if c.name == "object-del"} == {"f1", "f2"}


def test_replication_attaches_after_the_disk_job_ends() -> None:
    nbd = SECONDARY.nbd
    assert plan.primary_disk_sync(nbd).args["target"] == "nbd://10.1.0.2:9999/parent0"
    steps = plan.primary_attach_replication(nbd)
    assert [c.name for c in steps] == ["block-job-cancel", "human-monitor-command", "x-blockdev-change"]
    assert "file.host=10.1.0.2,file.port=9999" in str(steps[1].args["command-line"])
    mig = plan.primary_migrate(SECONDARY.migration, 150)
    assert mig[-1].args == {"uri": "tcp:10.1.0.2:9998"}
    assert mig[1].args == {"x-checkpoint-delay": 150}


def test_serve_forwards_the_client_endpoint_to_the_guest_port() -> None:
    cmd = plan.serve(Endpoint("127.0.0.1", 16379), 6379)
    assert cmd.args["command-line"] == "hostfwd_add hn0 tcp:127.0.0.1:16379-:6379"
    assert plan.unserve(Endpoint("127.0.0.1", 16379)).tolerant


def _trace(at: float, old: str, new: str) -> str:
    return f"4242@{at:.6f}:colo_vm_state_change Change '{old}' => '{new}'\n"


def test_checkpoint_log_measures_pauses_and_tells_causes() -> None:
    log = CheckpointLog(delay=0.2)
    text = (
        _trace(100.000, "run", "stop") + _trace(100.050, "stop", "run")  # first: interval
        + _trace(100.200, "run", "stop") + _trace(100.270, "stop", "run")  # after the delay: interval
        + _trace(100.230 + 0.04, "run", "stop")  # 70 ms after the previous: forced by colo-compare
    )
    # Fed in two pieces split mid-line: nothing is lost or made up.
    done = log.feed(text[:100]) + log.feed(text[100:] + "noise line\n")
    assert [round(c.pause * 1000) for c in done] == [50, 70]
    assert [c.cause for c in done] == [Cause.INTERVAL, Cause.INTERVAL]
    done = log.feed(_trace(100.330, "stop", "run"))
    assert len(done) == 1 and done[0].cause is Cause.MISMATCH and round(done[0].pause * 1000) == 60
