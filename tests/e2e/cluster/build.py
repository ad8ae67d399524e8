"""Build, once, the binaries of the local end-to-end cluster and cache them.

etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl and
helm are compiled from Go modules through the wrapper modules in
``tests/e2e/cluster/go/`` and kept in ``~/.cache/colo-e2e/<k8s version>/bin``
(``$COLO_E2E_CACHE`` overrides the root), outside the repository. A build
is skipped when the cached binaries carry a stamp that matches the wrapper
module (go.mod, go.sum) and the link flags they were built with, so the
second run costs a few file reads.

Each group is built into a scratch directory and moved into place only when
it is complete, so an interrupted build never leaves a cache that looks
usable. Progress is the number of packages compiled out of the group's
dependency count (``go build -v`` names each package as it compiles it).

Run as ``python tests/e2e/cluster/build.py`` (what ``.ci/e2e-tools`` does);
``--check`` only reports whether the cache is complete.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

KUBERNETES_VERSION = "v1.34.4"
ETCD_VERSION = "v3.6.16"
HELM_VERSION = "v3.19.5"

GO_DIR = Path(__file__).resolve().parent / "go"

# The staging modules are published as v0.<minor>.<patch> of the release.
_STAGING_VERSION = "v0" + KUBERNETES_VERSION[2:]


def _kube_version_ldflags() -> list[str]:
    major, minor = KUBERNETES_VERSION[1:].split(".")[:2]
    flags = []
    # The servers report component-base's version; kubectl's client half
    # reports client-go's. Both must say the release, or `kubectl version`
    # shows v0.0.0-master and warns about skew.
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        for key, value in (
            ("gitVersion", KUBERNETES_VERSION),
            ("gitMajor", major),
            ("gitMinor", minor),
            ("gitTreeState", "clean"),
        ):
            flags.append(f"-X {pkg}.{key}={value}")
    return flags


def _helm_ldflags() -> list[str]:
    major, minor = KUBERNETES_VERSION[1:].split(".")[:2]
    flags = [
        f"-X helm.sh/helm/v3/internal/version.version={HELM_VERSION}",
        "-X helm.sh/helm/v3/internal/version.gitTreeState=clean",
    ]
    # The Kubernetes version helm assumes when it has no server to ask
    # (`helm template`, `helm lint`), as helm's own Makefile sets it.
    for pkg in ("helm.sh/helm/v3/pkg/chartutil", "helm.sh/helm/v3/pkg/lint/rules"):
        flags += [f"-X {pkg}.k8sVersionMajor={major}", f"-X {pkg}.k8sVersionMinor={minor}"]
    return flags


@dataclass(frozen=True)
class BuildGroup:
    """Commands built together from one wrapper module."""

    name: str
    module_dir: Path
    packages: tuple[str, ...]
    ldflags: tuple[str, ...] = ()
    binaries: tuple[str, ...] = field(default=())

    def outputs(self) -> tuple[str, ...]:
        return self.binaries or tuple(p.rsplit("/", 1)[-1] for p in self.packages)

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for name in ("go.mod", "go.sum"):
            digest.update((self.module_dir / name).read_bytes())
        digest.update("\0".join((*self.packages, *self.ldflags, *self.outputs())).encode())
        return digest.hexdigest()


GROUPS: tuple[BuildGroup, ...] = (
    BuildGroup(
        name="etcd",
        module_dir=GO_DIR / "etcd",
        packages=("go.etcd.io/etcd/server/v3",),
        binaries=("etcd",),
    ),
    BuildGroup(
        name="kubernetes",
        module_dir=GO_DIR / "kubernetes",
        packages=(
            "k8s.io/kubernetes/cmd/kube-apiserver",
            "k8s.io/kubernetes/cmd/kube-controller-manager",
            "k8s.io/kubernetes/cmd/kube-scheduler",
            "k8s.io/kubernetes/cmd/kubectl",
        ),
        ldflags=tuple(_kube_version_ldflags()),
    ),
    BuildGroup(
        name="helm",
        module_dir=GO_DIR / "helm",
        packages=("helm.sh/helm/v3/cmd/helm",),
        ldflags=tuple(_helm_ldflags()),
    ),
)

ALL_BINARIES: tuple[str, ...] = tuple(b for g in GROUPS for b in g.outputs())


class BuildError(RuntimeError):
    """A build step failed; the message says which and how."""


def cache_dir() -> Path:
    root = os.environ.get("COLO_E2E_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "colo-e2e"
    return base / KUBERNETES_VERSION


def bin_dir() -> Path:
    return cache_dir() / "bin"


def _stamp_path(group: BuildGroup) -> Path:
    return cache_dir() / "stamps" / f"{group.name}.json"


def is_current(group: BuildGroup) -> bool:
    try:
        stamp = json.loads(_stamp_path(group).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(stamp, dict) or stamp.get("fingerprint") != group.fingerprint():
        return False
    return all(os.access(bin_dir() / b, os.X_OK) for b in group.outputs())


def missing() -> list[str]:
    """Binaries the cache does not hold in their current build."""
    return [b for g in GROUPS if not is_current(g) for b in g.outputs()]


def _go_env() -> dict[str, str]:
    env = dict(os.environ)
    # The wrapper modules carry go.sum but no vendor tree; -mod=mod lets the
    # go command fill in what it needs from the module cache or the proxy.
    # -buildvcs=false: the binaries are not this repository's code, so its
    # commit must not be stamped into them (nor its git state matter).
    env["GOFLAGS"] = (env.get("GOFLAGS", "") + " -mod=mod -buildvcs=false").strip()
    # Never let a toolchain line in a dependency trigger a toolchain download.
    env.setdefault("GOTOOLCHAIN", "local")
    return env


def _go(args: Sequence[str], cwd: Path) -> str:
    try:
        done = subprocess.run(
            ["go", *args], cwd=cwd, env=_go_env(), capture_output=True, text=True, check=False
        )
    except FileNotFoundError as exc:
        raise BuildError("the go command is not on PATH; install Go 1.24 or newer") from exc
    if done.returncode != 0:
        raise BuildError(f"go {' '.join(args)} (in {cwd}) failed:\n{done.stderr.strip()}")
    return done.stdout


def check_kubernetes_replaces(module_dir: Path = GO_DIR / "kubernetes") -> None:
    """Fail early if a wrapper's replace block and k8s.io/kubernetes's differ.

    A staging module missing from the wrapper would resolve to v0.0.0 and
    fail deep inside the build with an unhelpful message.
    """
    module = f"k8s.io/kubernetes@{KUBERNETES_VERSION}"
    info = json.loads(_go(["mod", "download", "-json", module], module_dir))
    upstream = _replaced_paths(Path(info["GoMod"]).read_text())
    ours_text = (module_dir / "go.mod").read_text()
    ours = _replaced_paths(ours_text)
    if upstream != ours:
        raise BuildError(
            f"{module_dir}/go.mod does not replace the same staging modules as "
            f"k8s.io/kubernetes {KUBERNETES_VERSION}: missing {sorted(upstream - ours)}, "
            f"extra {sorted(ours - upstream)}"
        )
    wrong = [
        line.strip()
        for line in ours_text.splitlines()
        if "=>" in line and not line.strip().endswith(" " + _STAGING_VERSION)
    ]
    if wrong:
        raise BuildError(f"staging replaces must all point at {_STAGING_VERSION}: {wrong}")


def _replaced_paths(go_mod: str) -> set[str]:
    paths: set[str] = set()
    block = False
    for raw in go_mod.splitlines():
        line = raw.split("//", 1)[0].strip()
        if line.startswith("replace ("):
            block = True
            continue
        if block and line == ")":
            block = False
            continue
        if line.startswith("replace ") and "=>" in line:
            line = line[len("replace ") :]
        elif not block or "=>" not in line:
            continue
        paths.add(line.split()[0])
    return paths


class _Reporter:
    """Progress for a terminal (rich bar) or a log (a line every 10%)."""

    def __init__(self) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)
        self.live = self.console.is_terminal

    def run(self, group: BuildGroup, total: int, lines: Iterable[str]) -> None:
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            columns = (
                TextColumn(f"[bold]{group.name}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.description}"),
            )
            with Progress(*columns, console=self.console, transient=False) as progress:
                task = progress.add_task("", total=total)
                for line in lines:
                    progress.update(task, advance=1, description=line[-50:])
                progress.update(task, completed=total, description="linked")
            return
        step = max(total // 10, 1)
        for count, _ in enumerate(lines, start=1):
            if count % step == 0:
                self.say(f"{group.name}: compiled {count} of at most {total} packages")

    def say(self, message: str) -> None:
        print(f"e2e-tools: {message}", file=sys.stderr, flush=True)


def _package_count(group: BuildGroup) -> int:
    out = _go(["list", "-deps", *group.packages], group.module_dir)
    return len(out.split())


def build_group(group: BuildGroup, reporter: _Reporter) -> float:
    """Build one group into the cache; returns the seconds it took."""
    started = time.monotonic()
    total = _package_count(group)
    reporter.say(f"building {', '.join(group.outputs())} ({total} packages, first build takes minutes)")
    bin_dir().mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{group.name}-", dir=cache_dir()))
    try:
        ldflags = " ".join(("-s", "-w", *group.ldflags))
        args = ["go", "build", "-v", "-p", "2", "-trimpath", "-ldflags", ldflags]
        if len(group.packages) == 1:
            args += ["-o", str(scratch / group.outputs()[0])]
        else:
            args += ["-o", str(scratch) + "/"]
        args += list(group.packages)
        proc = subprocess.Popen(
            args,
            cwd=group.module_dir,
            env=_go_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stderr is not None
        errors: list[str] = []

        def compiled() -> Iterable[str]:
            assert proc.stderr is not None
            for raw in proc.stderr:
                line = raw.rstrip()
                # -v names packages as bare import paths; anything else is a
                # diagnostic worth keeping for the error message.
                if re.fullmatch(r"[\w.\-/~+]+", line):
                    yield line
                else:
                    errors.append(line)

        reporter.run(group, total, compiled())
        if proc.wait() != 0:
            tail = "\n".join(errors[-40:])
            raise BuildError(f"building {group.name} failed (go build exited {proc.returncode}):\n{tail}")
        for name in group.outputs():
            os.replace(scratch / name, bin_dir() / name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    seconds = time.monotonic() - started
    stamp = {
        "fingerprint": group.fingerprint(),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(seconds, 1),
        "versions": {"kubernetes": KUBERNETES_VERSION, "etcd": ETCD_VERSION, "helm": HELM_VERSION},
    }
    _stamp_path(group).parent.mkdir(parents=True, exist_ok=True)
    _stamp_path(group).write_text(json.dumps(stamp, indent=2) + "\n")
    reporter.say(f"{group.name}: done in {seconds:.0f}s")
    return seconds


def ensure_built(reporter: _Reporter | None = None) -> Path:
    """Build whatever the cache lacks; returns the bin directory."""
    reporter = reporter or _Reporter()
    todo = [g for g in GROUPS if not is_current(g)]
    if not todo:
        return bin_dir()
    if any(g.name == "kubernetes" for g in todo):
        check_kubernetes_replaces()
    cache_dir().mkdir(parents=True, exist_ok=True)
    for group in todo:
        build_group(group, reporter)
    return bin_dir()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--check", action="store_true", help="only report whether the cache is complete")
    args = parser.parse_args(argv)
    reporter = _Reporter()
    started = time.monotonic()
    lacking = missing()
    if args.check:
        reporter.say(f"missing: {' '.join(lacking)}" if lacking else f"complete in {bin_dir()}")
        return 1 if lacking else 0
    if not lacking:
        reporter.say(f"cached in {bin_dir()} (nothing to build)")
        return 0
    try:
        ensure_built(reporter)
    except BuildError as exc:
        reporter.say(str(exc))
        return 1
    reporter.say(f"all binaries in {bin_dir()} after {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
