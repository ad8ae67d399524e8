"""Build, once and offline, what a kind cluster needs, and cache it under ``~/.cache/colo-kind``.

kind's own ``build node-image`` pulls its base image and every Kubernetes
image from registries, so it cannot work where none is reachable. This
assembles the same node image from parts built here:

- Go builds (niced, sharing the Go build and module caches): ``kind``
  v0.33.0 and CoreDNS v1.12.1 with ``go install``; kubelet, kubeadm and
  kube-proxy from ``go/kubernetes-node`` here, a wrapper module like the
  local control plane's (same Kubernetes version, replaces and link flags),
  so the packages they share come from the build cache; ``pause`` is ``build/pause/linux/pause.c`` of that
  Kubernetes module, compiled with ``gcc -static``.
- The component images (``colo.local/kube-apiserver:v1.34.4``, ...,
  ``colo.local/etcd:3.6.16-0``, ``colo.local/coredns:v1.12.1``,
  ``colo.local/pause:3.10.1``): each binary on a Debian base made with
  mmdebstrap (iptables and conntrack for kube-proxy), pause on scratch. The
  control plane ones reuse the local driver's cached binaries; etcd is the
  same 3.6.16 the local driver runs, so the cluster configuration sets
  kubeadm's etcd image tag (``cluster.py``). Under their own registry name
  they never shadow an upstream image in the engine.
- The node image: a Debian bookworm base (systemd, Debian's containerd 1.6,
  runc and the reference CNI plugins, iptables) plus kind's base-image files
  from the kind module (entrypoint, systemd units, containerd config), the
  node binaries, and the component images imported into containerd's
  ``k8s.io`` namespace, as kind's builder does.

Everything lands in ``~/.cache/colo-kind/<kubernetes version>-<key>/`` and
the node image is tagged ``colo-kind/node:<kubernetes version>-<key>``,
where the key hashes the versions, the Dockerfiles, the package lists and the
node wrapper module (``BUILD_REVISION`` counts changes to the steps
themselves), so a change to any of them builds afresh and anything else
reuses the cache; older node images and cache directories are then removed.
``stamp.json`` there keeps the cold build's timings.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from cluster import build as cluster_build
from dockerhost import base
from dockerhost.engine import Engine, EngineError

KIND_VERSION = "v0.33.0"
COREDNS_VERSION = "v1.12.1"
PAUSE_VERSION = "3.10.1"
KUBERNETES_VERSION = cluster_build.KUBERNETES_VERSION
ETCD_IMAGE_TAG = cluster_build.ETCD_VERSION.lstrip("v") + "-0"
IMAGE_REPOSITORY = "colo.local"
NODE_MODULE = Path(__file__).resolve().parent / "go" / "kubernetes-node"

NODE_BINARIES = ("kubelet", "kubeadm", "kube-proxy")
BINARIES = ("kind", "coredns", "pause", *NODE_BINARIES)
CONTROL_PLANE = ("kube-apiserver", "kube-controller-manager", "kube-scheduler")

COMPONENT_BASE = base.BaseImage(
    tag="colo-kind/component-base:bookworm",
    packages=("iptables", "nftables", "conntrack", "ca-certificates"),
    changes=("ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",),
)
# kind's base image list, less what this cluster never uses (NFS, iSCSI,
# fuse-overlayfs for rootless, curl), plus containerd, runc and the CNI
# plugins from Debian rather than built from source.
NODE_BASE = base.BaseImage(
    tag="colo-kind/node-base:bookworm",
    packages=(
        "systemd",
        "dbus",
        "containerd",
        "runc",
        "containernetworking-plugins",
        "conntrack",
        "iptables",
        "nftables",
        "iproute2",
        "ethtool",
        "util-linux",
        "mount",
        "kmod",
        "libseccomp2",
        "pigz",
        "bash",
        "ca-certificates",
        "jq",
        "procps",
        "socat",
    ),
    changes=("ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",),
)


def say(message: str) -> None:
    print(f"kind-node: {message}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    root = os.environ.get("COLO_KIND_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "colo-kind"


# Bump when a build step changes in a way the key does not see.
BUILD_REVISION = 1

COMPONENT_DOCKERFILES = {
    "pause": 'FROM scratch\nCOPY pause /pause\nUSER 65535:65535\nENTRYPOINT ["/pause"]\n',
    "coredns": 'FROM {base}\nCOPY coredns /coredns\nENTRYPOINT ["/coredns"]\n',
    "default": "FROM {base}\nCOPY {name} /usr/local/bin/{name}\n",
}


def key() -> str:
    digest = hashlib.sha256()
    for item in (
        KIND_VERSION,
        COREDNS_VERSION,
        PAUSE_VERSION,
        KUBERNETES_VERSION,
        ETCD_IMAGE_TAG,
        IMAGE_REPOSITORY,
        str(BUILD_REVISION),
        NODE_DOCKERFILE,
        *COMPONENT_DOCKERFILES.values(),
    ):
        digest.update(item.encode() + b"\0")
    for name in ("go.mod", "go.sum"):
        digest.update((NODE_MODULE / name).read_bytes())
    digest.update(json.dumps([NODE_BASE.packages, COMPONENT_BASE.packages]).encode())
    return digest.hexdigest()[:12]


def cache_dir() -> Path:
    return cache_root() / f"{KUBERNETES_VERSION}-{key()}"


def bin_dir() -> Path:
    return cache_dir() / "bin"


def node_image() -> str:
    return f"colo-kind/node:{KUBERNETES_VERSION}-{key()}"


def kind_binary() -> Path:
    return bin_dir() / "kind"


def component_images() -> dict[str, str]:
    """Image reference -> the binary it runs, for every image the node preloads."""
    kube = {
        f"{IMAGE_REPOSITORY}/{name}:{KUBERNETES_VERSION}": name for name in (*CONTROL_PLANE, "kube-proxy")
    }
    return {
        **kube,
        f"{IMAGE_REPOSITORY}/etcd:{ETCD_IMAGE_TAG}": "etcd",
        f"{IMAGE_REPOSITORY}/coredns:{COREDNS_VERSION}": "coredns",
        f"{IMAGE_REPOSITORY}/pause:{PAUSE_VERSION}": "pause",
    }


def pause_image() -> str:
    return f"{IMAGE_REPOSITORY}/pause:{PAUSE_VERSION}"


# --------------------------------------------------------------------------- binaries


def _go_env(gobin: Path | None = None) -> dict[str, str]:
    env = cluster_build._go_env()
    if gobin is not None:
        env["GOBIN"] = str(gobin)
    return env


# Errors of the path to the module proxy, not of the build: worth another try.
_TRANSIENT = ("TLS handshake timeout", "i/o timeout", "connection reset by peer", "unexpected EOF",
              "Client.Timeout exceeded", "502 Bad Gateway", "503 Service Unavailable")  # fmt: skip
RETRIES = 3
RETRY_PAUSE_S = 5.0


def _run(argv: Sequence[str], what: str, **kw: object) -> subprocess.CompletedProcess[str]:
    for attempt in range(1, RETRIES + 1):
        done = subprocess.run(list(argv), capture_output=True, text=True, check=False, **kw)  # type: ignore[call-overload]
        output = done.stderr or done.stdout or ""
        if done.returncode == 0 or attempt == RETRIES or not any(t in output for t in _TRANSIENT):
            break
        say(f"{what}: a network error, trying again ({attempt}/{RETRIES - 1}): {output.strip()[-200:]}")
        time.sleep(RETRY_PAUSE_S)
    if done.returncode != 0:
        raise EngineError(
            f"{what} failed ({done.returncode}): {(done.stderr or done.stdout).strip()[-3000:]}"
        )
    return done  # type: ignore[no-any-return]


def _module_dir(module: str) -> Path:
    done = _run(
        ["go", "mod", "download", "-json", module],
        f"go mod download {module}",
        cwd=NODE_MODULE,
        env=_go_env(),
    )
    return Path(json.loads(done.stdout)["Dir"])


def build_binaries(out: Path) -> dict[str, float]:
    """Build every binary of ``BINARIES`` into ``out``; returns seconds per step."""
    timings: dict[str, float] = {}
    nice = ["nice", "-n", "10"]
    with tempfile.TemporaryDirectory(prefix="colo-kind-go-") as work:
        for module in (f"sigs.k8s.io/kind@{KIND_VERSION}", f"github.com/coredns/coredns@{COREDNS_VERSION}"):
            started = time.monotonic()
            say(f"go install {module}")
            _run(
                [*nice, "go", "install", "-trimpath", "-ldflags=-s -w", module],
                f"go install {module}",
                cwd=work,
                env=_go_env(out),
            )
            timings[module.split("/")[-1].split("@")[0]] = time.monotonic() - started
        started = time.monotonic()
        say(f"go build kubelet, kubeadm, kube-proxy {KUBERNETES_VERSION} (minutes on a cold build cache)")
        ldflags = " ".join(("-s", "-w", *cluster_build._kube_version_ldflags()))
        packages = [f"k8s.io/kubernetes/cmd/{name}" for name in NODE_BINARIES]
        _run(
            [*nice, "go", "build", "-p", "2", "-trimpath", "-ldflags", ldflags, "-o", f"{out}/", *packages],
            "go build of the node binaries",
            cwd=NODE_MODULE,
            env=_go_env(),
        )
        timings["kubelet+kubeadm+kube-proxy"] = time.monotonic() - started
    started = time.monotonic()
    pause_c = _module_dir(f"k8s.io/kubernetes@{KUBERNETES_VERSION}") / "build" / "pause" / "linux" / "pause.c"
    _run(
        [
            "gcc",
            "-Os",
            "-Wall",
            "-Werror",
            "-static",
            f"-DVERSION=v{PAUSE_VERSION}",
            "-o",
            str(out / "pause"),
            str(pause_c),
        ],
        "gcc pause.c",
    )
    timings["pause"] = time.monotonic() - started
    return timings


def ensure_binaries() -> dict[str, float]:
    if all(os.access(bin_dir() / name, os.X_OK) for name in BINARIES):
        return {}
    try:
        cluster_build.check_kubernetes_replaces(NODE_MODULE)
    except cluster_build.BuildError as exc:
        raise EngineError(str(exc)) from exc
    cache_dir().mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".bin-", dir=cache_dir()))
    try:
        timings = build_binaries(scratch)
        if bin_dir().exists():
            shutil.rmtree(bin_dir())
        os.replace(scratch, bin_dir())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return timings


# --------------------------------------------------------------------------- images


def _docker_build(engine: Engine, tag: str, context: Path) -> None:
    argv = ["docker", "build", "--network", "none", "--quiet", "--tag", tag, str(context)]
    env = {**os.environ, **engine.env, "DOCKER_BUILDKIT": "0"}
    _run(argv, f"docker build {tag}", env=env)


def build_component_images(engine: Engine, tarball: Path) -> None:
    """Build the images of ``component_images()`` and ``docker save`` them into ``tarball``."""
    say(f"base {COMPONENT_BASE.tag}: {base.ensure(engine, COMPONENT_BASE)}")
    sources = {**{n: cluster_build.bin_dir() / n for n in (*CONTROL_PLANE, "etcd")},
               **{n: bin_dir() / n for n in ("kube-proxy", "coredns", "pause")}}  # fmt: skip
    for ref, name in component_images().items():
        with tempfile.TemporaryDirectory(prefix="colo-kind-img-") as tmp:
            context = Path(tmp)
            shutil.copy2(sources[name], context / name)
            template = COMPONENT_DOCKERFILES.get(name, COMPONENT_DOCKERFILES["default"])
            (context / "Dockerfile").write_text(template.format(base=COMPONENT_BASE.tag, name=name))
            _docker_build(engine, ref, context)
    engine.docker("save", "--output", str(tarball), *component_images())
    # The tags served only to save the tarball; the node's containerd holds the images.
    engine.docker("image", "rm", *component_images(), check=False)


NODE_DOCKERFILE = """\
FROM {base}
COPY files/usr/local/bin/ /usr/local/bin/
COPY files/kind/ /kind/
COPY files/etc/ /etc/
COPY bin/ /usr/bin/
COPY containerd-config.toml /etc/containerd/config.toml
RUN ln -sf /usr/bin/containerd /usr/local/bin/containerd \\
 && mkdir -p /opt/cni && rm -rf /opt/cni/bin && ln -s /usr/lib/cni /opt/cni/bin \\
 && find /lib/systemd/system/sysinit.target.wants/ -name systemd-tmpfiles-setup.service -delete \\
 && rm -f /lib/systemd/system/multi-user.target.wants/* /etc/systemd/system/*.wants/* \\
          /lib/systemd/system/local-fs.target.wants/* /lib/systemd/system/sockets.target.wants/*udev* \\
          /lib/systemd/system/sockets.target.wants/*initctl* /lib/systemd/system/basic.target.wants/* \\
 && echo "ReadKMsg=no" >> /etc/systemd/journald.conf \\
 && ln -sf /usr/lib/systemd/systemd /sbin/init \\
 && systemctl enable kubelet.service containerd.service undo-mount-hacks.service \\
 && systemctl mask systemd-binfmt.service \\
 && mkdir -p /etc/kubernetes/manifests /kind/manifests \\
 && ctr oci spec \\
    | jq '.hooks.createContainer += [{{"path": "/kind/bin/mount-product-files.sh"}}]' \\
    | jq 'del(.process.rlimits)' > /etc/containerd/cri-base.json \\
 && echo {version} > /kind/version
ENV container=docker
STOPSIGNAL SIGRTMIN+3
ENTRYPOINT ["/usr/local/bin/entrypoint", "/sbin/init"]
"""


def containerd_config(kind_files: Path) -> str:
    """kind's containerd config for this node: our pause image, no fuse-overlayfs proxy (rootless only)."""
    text = (kind_files / "etc" / "containerd" / "config.toml").read_text()
    head, sep, rest = text.partition("[proxy_plugins]")
    if sep:
        rest = rest.split("\n[plugins.", 1)[1]
        text = head + "[plugins." + rest
    lines = []
    for line in text.splitlines():
        if line.strip().startswith("sandbox_image"):
            line = f'  sandbox_image = "{pause_image()}"'
        lines.append(line)
    return "\n".join(lines) + "\n"


def build_node_image(engine: Engine, images_tar: Path) -> None:
    say(f"base {NODE_BASE.tag}: {base.ensure(engine, NODE_BASE)}")
    kind_files = _module_dir(f"sigs.k8s.io/kind@{KIND_VERSION}") / "images" / "base" / "files"
    stage = f"colo-kind/node-stage:{key()}"
    with tempfile.TemporaryDirectory(prefix="colo-kind-node-") as tmp:
        context = Path(tmp)
        shutil.copytree(kind_files, context / "files")
        # Modes as kind's Dockerfile sets them (COPY keeps them; a chmod layer would copy the files).
        for path in (context / "files").rglob("*"):
            executable = path.is_dir() or path.parent.name == "bin"
            path.chmod(0o755 if executable else 0o644)
        (context / "bin").mkdir()
        for name in ("kubelet", "kubeadm"):
            shutil.copy2(bin_dir() / name, context / "bin" / name)
        shutil.copy2(cluster_build.bin_dir() / "kubectl", context / "bin" / "kubectl")
        (context / "containerd-config.toml").write_text(containerd_config(kind_files))
        (context / "Dockerfile").write_text(
            NODE_DOCKERFILE.format(base=NODE_BASE.tag, version=KUBERNETES_VERSION)
        )
        _docker_build(engine, stage, context)
    # The images go into containerd's store as kind's builder puts them: a
    # containerd of the node image's own, content only (unpacked on first use).
    name = f"colo-kind-build-{key()}"
    engine.docker("rm", "--force", name, check=False)
    engine.docker(
        "run",
        "--detach",
        "--privileged",
        "--network",
        "none",
        "--name",
        name,
        "--entrypoint",
        "sleep",
        stage,
        "infinity",
    )
    try:
        engine.docker("exec", name, "bash", "-c", "nohup containerd >/var/log/containerd-build.log 2>&1 &")
        engine.docker(
            "exec",
            name,
            "bash",
            "-c",
            "for i in $(seq 50); do [ -S /run/containerd/containerd.sock ] && ctr version >/dev/null "
            "&& exit 0; sleep 0.2; done; cat /var/log/containerd-build.log; exit 1",
        )
        with images_tar.open("rb") as f:
            _run(
                [
                    "docker",
                    "exec",
                    "-i",
                    name,
                    "ctr",
                    "--namespace=k8s.io",
                    "images",
                    "import",
                    "--label=io.cri-containerd.pinned=pinned",
                    "--all-platforms",
                    "--no-unpack",
                    "--digests",
                    "-",
                ],
                "ctr images import",
                stdin=f,
                env={**os.environ, **engine.env},
            )
        listed = engine.docker(
            "exec", name, "ctr", "--namespace=k8s.io", "images", "list", "-q"
        ).stdout.split()
        lacking = [ref for ref in component_images() if ref not in listed]
        if lacking:
            raise EngineError(f"the node's containerd lacks {lacking} after the import")
        engine.docker("exec", name, "pkill", "containerd")
        # (Its zombie stays: the build container's init is `sleep`, which reaps nothing.)
        engine.docker(
            "exec", name, "bash", "-c", "while ps -C containerd -o stat= | grep -qv Z; do sleep 0.1; done"
        )
        engine.docker(
            "commit",
            "--change",
            'ENTRYPOINT ["/usr/local/bin/entrypoint", "/sbin/init"]',
            "--change",
            "CMD []",
            name,
            node_image(),
        )
    finally:
        engine.docker("rm", "--force", name, check=False)
        engine.docker("image", "rm", stage, check=False)


def check_kubeadm_images() -> None:
    """Fail early if kubeadm wants an image the node does not preload (the cluster sets etcd's tag)."""
    done = _run(
        [
            str(bin_dir() / "kubeadm"),
            "config",
            "images",
            "list",
            "--kubernetes-version",
            KUBERNETES_VERSION,
            "--image-repository",
            IMAGE_REPOSITORY,
        ],
        "kubeadm config images list",
    )
    wanted = {ref for ref in done.stdout.split() if "/etcd:" not in ref}
    lacking = wanted - set(component_images())
    if lacking:
        raise EngineError(
            f"kubeadm {KUBERNETES_VERSION} wants images the node does not preload: {sorted(lacking)}"
        )


def ensure(engine: Engine) -> dict[str, object]:
    """Make the node image available in ``engine``; returns what was done and how long it took."""
    started = time.monotonic()
    missing_cp = cluster_build.missing()
    if missing_cp:
        raise EngineError(
            f"the control plane binaries are not built ({', '.join(missing_cp)}): run bash .ci/e2e-tools"
        )
    stamp_path = cache_dir() / "stamp.json"
    if engine.docker("image", "inspect", node_image(), check=False).returncode == 0 and all(
        os.access(bin_dir() / n, os.X_OK) for n in BINARIES
    ):
        stamp = json.loads(stamp_path.read_text()) if stamp_path.exists() else {}
        return {"cached": True, "seconds": time.monotonic() - started, "cold": stamp}
    timings: dict[str, float] = dict(ensure_binaries())
    check_kubeadm_images()
    step = time.monotonic()
    images_tar = cache_dir() / "images.tar"
    if not images_tar.exists():
        partial = images_tar.with_suffix(".partial")
        build_component_images(engine, partial)
        os.replace(partial, images_tar)
    timings["component images"] = time.monotonic() - step
    step = time.monotonic()
    build_node_image(engine, images_tar)
    timings["node image"] = time.monotonic() - step
    total = time.monotonic() - started
    stamp = {
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(total, 1),
        "steps": {k: round(v, 1) for k, v in timings.items()},
        "node_image": node_image(),
    }
    stamp_path.write_text(json.dumps(stamp, indent=2) + "\n")
    remove_stale(engine)
    return {"cached": False, "seconds": total, "cold": stamp}


def remove_stale(engine: Engine) -> None:
    """Drop node images and cache directories of other keys (earlier versions of this build)."""
    listed = engine.docker(
        "image", "ls", "--format", "{{.Repository}}:{{.Tag}}", "colo-kind/node"
    ).stdout.split()
    stale = [ref for ref in listed if ref != node_image()]
    if stale:
        engine.docker("image", "rm", *stale, check=False)
    for path in cache_root().glob(f"{KUBERNETES_VERSION}-*"):
        if path != cache_dir() and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
