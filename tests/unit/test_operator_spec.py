"""ColoVM spec parsing: defaults equal to the CRD's, bounds, quantities, clear errors."""

from __future__ import annotations

import pytest

from colo_operator.config import ConfigError, KvmMode, OperatorConfig
from colo_operator.spec import ColoVMSpec, SpecError


def test_defaults() -> None:
    spec = ColoVMSpec.from_dict({})
    assert spec.guest.memory_bytes == 64 << 20
    assert spec.replication.checkpoint_interval_ms == 100 and spec.replication.channels == 2
    assert spec.failover.heartbeat_timeout_ms == 500 and spec.failover.auto_reprotect is True
    assert spec.placement.topology_key == "kubernetes.io/hostname"
    assert spec.service.port == 6379
    assert ColoVMSpec.from_dict(None) == spec


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("64Mi", 64 << 20),
        ("0.5Gi", 512 << 20),
        ("1e9", None),  # not whole pages
        ("512M", 512 * 10**6),
        ("100M", None),  # 100,000,000 is not whole pages
        ("4194304", 4 << 20),
        ("4096Ki", 4 << 20),
        ("0.25Gi", 256 << 20),
        ("1073741824", 1 << 30),
    ],
)
def test_memory_is_a_kubernetes_quantity(text: str, value: int | None) -> None:
    if value is None:
        with pytest.raises(SpecError, match="4096-byte pages"):
            ColoVMSpec.from_dict({"guest": {"memory": text}})
    else:
        assert ColoVMSpec.from_dict({"guest": {"memory": text}}).guest.memory_bytes == value


@pytest.mark.parametrize(
    "text",
    ["", "Mi", "64 Mi", " 64Mi", "1.2.3", "64XB", "--1", "64mi", "NaN", "Infinity", "-Infinity", "100m"],
)
def test_memory_that_is_no_quantity_or_no_whole_byte_count_names_the_field(text: str) -> None:
    with pytest.raises(SpecError, match=r"guest\.memory") as err:
        ColoVMSpec.from_dict({"guest": {"memory": text}})
    assert repr(text) in str(err.value) or text == ""


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"guest": {"memory": "2Mi"}}, "guest.memory"),
        ({"guest": {"memory": "2Gi"}}, "guest.memory"),
        ({"guest": {"memory": "4097Ki"}}, "guest.memory"),
        ({"guest": {"memory": "lots"}}, "guest.memory"),
        ({"guest": {"accel": "hvf"}}, "guest.accel"),
        ({"replication": {"channels": 0}}, "replication.channels"),
        ({"replication": {"channels": 17}}, "replication.channels"),
        ({"replication": {"channels": True}}, "replication.channels"),
        (
            {"failover": {"heartbeatIntervalMs": 500, "heartbeatTimeoutMs": 500}},
            "failover.heartbeatTimeoutMs",
        ),
        (
            # Every agent would exit 2: --lease-duration-ms must be greater than --heartbeat-interval-ms.
            {"failover": {"heartbeatIntervalMs": 2000, "heartbeatTimeoutMs": 5000}},
            "failover.leaseDurationMs",
        ),
        ({"placement": {"nodeSelector": {"a": 1}}}, "placement.nodeSelector"),
        ({"placement": {"tolerations": [{"operator": "Maybe"}]}}, "placement.tolerations[0].operator"),
        ({"guest": "big"}, "guest"),
        ({"guest": {"backend": "qemu"}}, "guest.qemu"),
        ({"guest": {"qemu": {"disk": {"size": "1Gi"}}}}, "guest.qemu"),
        ({"guest": {"backend": "qemu", "qemu": {}}}, "guest.qemu.disk"),
        ({"guest": {"backend": "qemu", "qemu": {"disk": {"size": "1.5"}}}}, "guest.qemu.disk.size"),
        ({"guest": {"backend": "qemu", "qemu": {"disk": {"size": "4Ti"}}}}, "guest.qemu.disk.size"),
        ({"guest": {"backend": "qemu", "qemu": {"disk": {"size": "1Gi", "path": "../etc"}}}},
         "guest.qemu.disk.path"),
        ({"guest": {"backend": "qemu", "qemu": {"disk": {"size": "1Gi"}, "vcpus": 0}}}, "guest.qemu.vcpus"),
        ({"guest": {"backend": "qemu", "qemu": {"disk": {"size": "1Gi"}, "nic": "rtl8139"}}},
         "guest.qemu.nic"),
        ({"guest": {"backend": "qemu", "qemu": {"disk": {"size": "1Gi"}, "kernel": "vmlinuz"}}},
         "guest.qemu.kernel"),
        ({"guest": {"backend": "qemu", "memory": "4100Ki", "qemu": {"disk": {"size": "1Gi"}}}},
         "guest.memory"),
        ({"guest": {"backend": "qemu", "qemu": {"disk": {"size": "1Gi"}}},
          "replication": {"mode": "lockstep"}}, "replication.mode"),
        ({"service": {"port": 70000}}, "service.port"),
    ],
)
def test_invalid_specs_name_the_field(spec: dict, field: str) -> None:
    with pytest.raises(SpecError) as err:
        ColoVMSpec.from_dict(spec)
    assert err.value.field == field
    assert str(err.value).startswith(f"spec.{field}: ")


def test_operator_config_from_env() -> None:
    cfg = OperatorConfig.from_env(
        {"COLO_AGENT_IMAGE": "img:1", "COLO_KVM_MODE": "hostPath", "COLO_POLL_INTERVAL_S": "0.5"}
    )
    assert (cfg.agent_image, cfg.kvm_mode, cfg.poll_interval_s) == ("img:1", KvmMode.HOST_PATH, 0.5)
    assert OperatorConfig.from_env({}) == OperatorConfig()
    with pytest.raises(ConfigError, match="COLO_KVM_MODE"):
        OperatorConfig.from_env({"COLO_KVM_MODE": "magic"})
    with pytest.raises(ConfigError, match="COLO_POLL_INTERVAL_S"):
        OperatorConfig.from_env({"COLO_POLL_INTERVAL_S": "soon"})


def test_run_strategy_defaults_to_always_and_names_the_field_when_wrong() -> None:
    assert ColoVMSpec.from_dict({}).run_strategy == "Always"
    assert ColoVMSpec.from_dict({"runStrategy": "Halted"}).run_strategy == "Halted"
    with pytest.raises(SpecError, match=r"spec\.runStrategy: 'Paused' is not one of Always, Halted"):
        ColoVMSpec.from_dict({"runStrategy": "Paused"})


def test_a_qemu_guest_reads_its_disk_cpus_and_nic() -> None:
    spec = ColoVMSpec.from_dict({"guest": {"backend": "qemu", "memory": "256Mi", "qemu": {
        "disk": {"size": "2Gi", "claimName": "vm-disk"}, "vcpus": 2, "nic": "virtio-net-pci"}}})
    q = spec.guest.qemu
    assert q is not None and spec.guest.backend == "qemu"
    assert (q.disk.size_bytes, q.disk.claim_name, q.disk.path) == (2 << 30, "vm-disk", "disk.qcow2")
    assert (q.vcpus, q.nic) == (2, "virtio-net-pci")
    assert q.kernel.startswith("/") and q.initrd.startswith("/")
    assert ColoVMSpec.from_dict({}).guest.qemu is None


def test_the_operators_nic_models_are_the_backends() -> None:
    from colo_agent.qemu.command import NicModel
    from colo_operator.spec import QEMU_NICS

    assert set(QEMU_NICS) == {m.value for m in NicModel}
