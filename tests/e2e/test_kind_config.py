"""The kind driver's generated configuration: what the offline node image and cluster rely on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kindhost import build, cluster


def test_cluster_config_uses_the_preloaded_images_and_patches_containerd_only_under_the_quirk() -> None:
    plain = json.loads(cluster.config(workers=3, quirk=False))
    assert [n["role"] for n in plain["nodes"]] == ["control-plane", "worker", "worker", "worker"]
    assert plain["networking"] == {
        "disableDefaultCNI": True,
        "podSubnet": cluster.POD_CIDR,
        "serviceSubnet": cluster.SERVICE_CIDR,
    }
    kubeadm = plain["kubeadmConfigPatches"][0]
    assert f"imageRepository: {build.IMAGE_REPOSITORY}\n" in kubeadm
    assert f"imageTag: {build.ETCD_IMAGE_TAG}\n" in kubeadm
    assert "containerdConfigPatches" not in plain
    quirk = json.loads(cluster.config(workers=3, quirk=True))
    assert quirk["containerdConfigPatches"] == [
        '[plugins."io.containerd.grpc.v1.cri"]\n  restrict_oom_score_adj = true\n'
    ]


def test_containerd_config_runs_our_pause_and_drops_the_rootless_snapshotter(tmp_path: object) -> None:
    from pathlib import Path

    files = Path(str(tmp_path))
    (files / "etc" / "containerd").mkdir(parents=True)
    (files / "etc" / "containerd" / "config.toml").write_text(
        'version = 2\n\n[proxy_plugins]\n[proxy_plugins."fuse-overlayfs"]\n  type = "snapshot"\n\n'
        '[plugins."io.containerd.grpc.v1.cri"]\n  sandbox_image = "registry.k8s.io/pause:3.10"\n'
        "  restrict_oom_score_adj = false\n"
    )
    text = build.containerd_config(files)
    assert "proxy_plugins" not in text and "fuse-overlayfs" not in text
    assert f'sandbox_image = "{build.pause_image()}"' in text
    assert text.startswith("version = 2\n")
    assert "restrict_oom_score_adj = false" in text


def test_every_component_image_is_under_our_registry_name() -> None:
    images = build.component_images()
    assert all(ref.startswith(f"{build.IMAGE_REPOSITORY}/") for ref in images)
    assert set(images.values()) == {*build.CONTROL_PLANE, "kube-proxy", "etcd", "coredns", "pause"}


def test_a_build_step_is_tried_again_after_a_network_error_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(build, "RETRY_PAUSE_S", 0.0)
    count = tmp_path / "count"
    flaky = (
        f'n=$(cat {count} 2>/dev/null || echo 0); echo $((n+1)) > {count}; '
        '[ "$n" -ge 1 ] || { echo "net/http: TLS handshake timeout" >&2; exit 1; }'
    )
    assert build._run(["sh", "-c", flaky], "flaky").returncode == 0
    assert count.read_text().strip() == "2"
    count.unlink()
    counted = f"n=$(cat {count} 2>/dev/null || echo 0); echo $((n+1)) > {count}; "
    broken = counted + 'echo "undefined: x" >&2; false'
    with pytest.raises(build.EngineError, match="undefined: x"):
        build._run(["sh", "-c", broken], "broken")
    assert count.read_text().strip() == "1"  # a build error is not retried
