"""Run a local cluster by hand: ``cd tests/e2e && sudo ../../.venv/bin/python -m cluster``.

Prints the kubeconfig to use and keeps the cluster up until Ctrl-C (or
SIGTERM), then tears it down and keeps its logs. Handy for trying the
operator or a chart with kubectl while the suite is not running.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading

from . import build
from .cluster import LocalCluster


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster", description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--nodes", type=int, default=3, help="process nodes (1-9, default 3)")
    parser.add_argument("--grace", type=int, default=6, help="node-monitor grace period in seconds")
    args = parser.parse_args(argv)
    build.ensure_built()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with LocalCluster(args.nodes, node_monitor_grace_seconds=args.grace, keep_logs=True) as cluster:
        print(f"export KUBECONFIG={cluster.kubeconfig}")
        print(f"kubectl: {build.bin_dir() / 'kubectl'}   nodes: {', '.join(cluster.node_names)}")
        print(f"logs: {cluster.workdir}   Ctrl-C to stop", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
