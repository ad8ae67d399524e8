"""The qemu backend's settings and its place behind the guest seam (no QEMU started)."""

from __future__ import annotations

from pathlib import Path

import pytest

from colo_agent.backends import create_guest
from colo_agent.guest import Capabilities, GuestOptions
from colo_agent.qemu.backend import QemuGuest, QemuSettings, parse_secondary
from colo_agent.qemu.command import NicModel

BASE = {
    "COLO_QEMU_KERNEL": "/k/vmlinuz", "COLO_QEMU_INITRD": "/k/initrd.img", "COLO_QEMU_DISK": "/d/disk.qcow2",
}
OPTIONS = GuestOptions(memory=256 * 1024 * 1024, accel="tcg")


def test_settings_from_the_environment() -> None:
    s = QemuSettings.from_env(OPTIONS, {**BASE, "COLO_QEMU_NIC": "virtio-net-pci", "COLO_QEMU_VCPUS": "2",
                                        "COLO_PEER": "10.0.0.7:7700", "COLO_QEMU_SERVE": "127.0.0.1:16379"})
    assert s.spec.memory_mib == 256 and s.spec.vcpus == 2 and s.spec.nic is NicModel.VIRTIO
    assert s.peer_host == "10.0.0.7" and str(s.serve) == "127.0.0.1:16379"
    assert s.disk == Path("/d/disk.qcow2") and s.ports == (7711, 7712, 7713, 7714)
    assert str(s.primary_ports("10.0.0.7").compare) == "10.0.0.7:7712"


@pytest.mark.parametrize(("env", "named"), [
    ({"COLO_QEMU_KERNEL": ""}, "COLO_QEMU_KERNEL"),
    ({"COLO_QEMU_NIC": "rtl8139"}, "COLO_QEMU_NIC"),
    ({"COLO_QEMU_VCPUS": "two"}, "COLO_QEMU_VCPUS"),
    ({"COLO_QEMU_PORTS": "1,2,3"}, "COLO_QEMU_PORTS"),
    ({"COLO_QEMU_SERVE": "localhost"}, "COLO_QEMU_SERVE"),
])
def test_bad_settings_name_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        QemuSettings.from_env(OPTIONS, {**BASE, **env})


def test_secondary_address_round_trip() -> None:
    ports = parse_secondary("10.0.0.8:7713:7714")
    assert str(ports.migration) == "10.0.0.8:7713" and str(ports.nbd) == "10.0.0.8:7714"
    with pytest.raises(ValueError, match="HOST:MIGRATION_PORT:NBD_PORT"):
        parse_secondary("10.0.0.8:7713")


def test_the_seam_sees_a_stream_backend_without_a_client_nic() -> None:
    guest = QemuGuest(QemuSettings.from_env(OPTIONS, BASE))
    caps = Capabilities.of(guest)
    assert caps.stream is guest and caps.pages is None and caps.clients is None and caps.mirror is None
    assert guest.ram_size == 256 * 1024 * 1024 and guest.accelerator == "tcg" and not guest.running


def test_chosen_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in BASE.items():
        monkeypatch.setenv(name, value)
    guest = create_guest("qemu", OPTIONS)
    assert isinstance(guest, QemuGuest) and guest.settings.disk == Path(BASE["COLO_QEMU_DISK"])
    monkeypatch.delenv("COLO_QEMU_KERNEL")
    with pytest.raises(ValueError, match="COLO_QEMU_KERNEL"):
        create_guest("qemu", OPTIONS)
