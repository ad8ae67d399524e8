"""README's "Run on a cluster", run as written against the kind cluster: load the image, `helm
install` the chart pointing at it, apply the basic example and watch it become Protected."""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from operator_e2e import ROOT

BUILT = "colo-operator:dev"  # what .ci/docker builds from the same Dockerfile


def readme_commands() -> list[str]:
    """The shell commands of the README's "Run on a cluster" block, continuation lines joined."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Run on a cluster", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.DOTALL)
    assert block, "README's Run on a cluster has no sh block"
    joined = block.group(1).replace("\\\n", " ")
    return [
        " ".join(line.split("#", 1)[0].split())
        for line in joined.splitlines()
        if line.split("#", 1)[0].strip()
    ]


@pytest.fixture
def shell(cluster: Any, tmp_path: Path) -> Iterator[dict[str, str]]:
    """The environment a user would have: kind, kubectl and helm on PATH, the cluster current."""
    if cluster.kind is None:
        pytest.skip("the README's install is tested on --e2e-driver kind")
    from cluster import build as cluster_build
    from kindhost import build as kind_build

    tools = tmp_path / "bin"
    tools.mkdir()
    for source in (
        kind_build.kind_binary(),
        cluster_build.bin_dir() / "kubectl",
        cluster_build.bin_dir() / "helm",
    ):
        (tools / source.name).symlink_to(source)
    env = {
        **os.environ,
        **cluster.kind.engine.env,
        "PATH": f"{tools}:{os.environ['PATH']}",
        "KUBECONFIG": str(cluster.kubeconfig),
        "KIND_CLUSTER_NAME": cluster.kind.name,
        "KIND_EXPERIMENTAL_DOCKER_NETWORK": "colo-kind",
    }
    yield env
    for argv in (
        ["kubectl", "delete", "-f", "examples/colovm-basic.yaml", "--ignore-not-found", "--timeout=120s"],
        ["helm", "uninstall", "colo", "--namespace", "colo-system", "--wait"],
    ):
        subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, timeout=300, check=False)


def test_run_on_a_cluster_as_the_readme_says(cluster: Any, shell: dict[str, str]) -> None:
    commands = readme_commands()
    build, load, install, apply, watch = commands
    # The image: CI builds it with `bash .ci/docker` (the README's alternative, for machines
    # that cannot pull); here it gets the README's tag.
    assert build.startswith("docker build -t ") and build.endswith(" ."), build
    tag = build.split()[3]
    subprocess.run(["docker", "tag", BUILT, tag], env=shell, check=True, capture_output=True)
    for command in (load, install, apply):
        done = subprocess.run(["bash", "-c", command], cwd=ROOT, env=shell, capture_output=True, text=True,
                              timeout=600, check=False)  # fmt: skip
        assert done.returncode == 0, f"{command}: {done.stdout}{done.stderr}"
    assert watch.startswith("kubectl get cvm basic -w"), watch
    started = time.monotonic()
    with subprocess.Popen(
        ["bash", "-c", watch], cwd=ROOT, env=shell, stdout=subprocess.PIPE, text=True
    ) as proc:
        assert proc.stdout is not None
        seen: list[str] = []
        try:
            for line in proc.stdout:
                seen.append(line.rstrip())
                if " Protected " in f" {line} " or time.monotonic() - started > 300:
                    break
        finally:
            proc.kill()
    assert any("Protected" in line.split() for line in seen), "\n".join(seen)
    # The pods run the image the README loaded.
    pods = subprocess.run(["kubectl", "get", "pods", "-l", "colo.dev/vm=basic", "-o",
                           "jsonpath={.items[*].spec.containers[0].image}"], env=shell, capture_output=True,
                          text=True, check=True).stdout.split()  # fmt: skip
    assert pods and set(pods) == {tag}, pods
    print(f"\nREADME install: Protected {time.monotonic() - started:.0f}s after kubectl apply")
