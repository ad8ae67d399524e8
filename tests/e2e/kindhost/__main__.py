"""``cd tests/e2e && python -m kindhost {build,up,down}``: the offline kind cluster of the e2e suite.

``build`` builds (once, cached in ``~/.cache/colo-kind``) kind, the node
binaries and the node image, and prints the cold build's time and this
run's. ``up`` creates the cluster, loads ``colo-operator:dev`` and prints the
``KUBECONFIG`` to export; ``down`` deletes it and its host routes.
"""

from __future__ import annotations

import argparse
import sys

from dockerhost import engine

from . import build


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kindhost", description=__doc__.split("\n\n", 1)[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("build", help="build the kind binary and the node image (cached); print the times")
    up = sub.add_parser("up", help="create the cluster, load the image, print the KUBECONFIG to export")
    up.add_argument("--workers", type=int, default=3, help="worker nodes (default 3)")
    up.add_argument(
        "--image", default="colo-operator:dev", help="image to kind load (default colo-operator:dev)"
    )
    sub.add_parser("down", help="delete the cluster and its host routes")
    args = parser.parse_args(argv)
    try:
        eng = engine.ensure()
        if args.command == "build":
            done = build.ensure(eng)
            cold = done["cold"]
            cold_s = cold.get("seconds") if isinstance(cold, dict) else None
            steps = cold.get("steps") if isinstance(cold, dict) else None
            if done["cached"]:
                print(
                    f"kind-node: {build.node_image()} cached (warm: {done['seconds']:.1f}s; "
                    f"cold build was {cold_s}s: {steps})",
                    file=sys.stderr,
                )
            else:
                print(
                    f"kind-node: {build.node_image()} built cold in {done['seconds']:.0f}s: {steps}",
                    file=sys.stderr,
                )
            return 0
        from . import cluster

        if args.command == "up":
            kind = cluster.KindCluster(eng, workers=args.workers)
            kind.start()
            kind.load_image(args.image)
            print(f"export KUBECONFIG={kind.kubeconfig}")
            return 0
        cluster.KindCluster(eng).stop()
    except engine.EngineError as exc:
        print(f"kindhost: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
