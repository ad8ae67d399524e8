"""`colo-operator`: run the ColoVM operator (kopf) with its handlers, liveness endpoint and peering."""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from colo_agent.api import logs

from . import __version__
from .config import ConfigError, OperatorConfig

# Where a pod finds its service account token (in-cluster configuration).
SERVICE_ACCOUNT_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")


def _priority(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an integer; from --priority or COLO_PRIORITY"
        ) from None


def _port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a port (0-65535); from --metrics-port or COLO_METRICS_PORT"
        )
    return int(text)


def missing_credentials(
    kubeconfig: str | None, env: Mapping[str, str], token: Path = SERVICE_ACCOUNT_TOKEN
) -> str | None:
    """Why no Kubernetes credentials can be found, or None when some can.

    kopf would otherwise retry its login forever without saying why.
    """
    if kubeconfig:
        missing = [p for p in kubeconfig.split(os.pathsep) if p and not Path(p).is_file()]
        if missing:
            return f"kubeconfig {', '.join(missing)} does not exist (from --kubeconfig or KUBECONFIG)"
        return None
    if env.get("KUBERNETES_SERVICE_HOST") and token.is_file():
        return None
    home = Path(env.get("HOME") or Path.home())
    if (home / ".kube" / "config").is_file():
        return None
    return (
        "no Kubernetes credentials: not running in a pod (no KUBERNETES_SERVICE_HOST and service "
        f"account token) and no kubeconfig (--kubeconfig, KUBECONFIG or {home / '.kube' / 'config'})"
    )


def build_parser() -> argparse.ArgumentParser:
    env = os.environ
    parser = argparse.ArgumentParser(
        prog="colo-operator",
        description="Reconcile ColoVM resources: agent pods, fencing Lease, failover and re-protection.",
        epilog=(
            "Agent pods are configured from the environment: COLO_AGENT_IMAGE, "
            "COLO_AGENT_IMAGE_PULL_POLICY, COLO_KVM_MODE (resource|hostPath), COLO_KVM_RESOURCE, "
            "COLO_POLL_INTERVAL_S, COLO_AGENT_TIMEOUT_S."
        ),
    )
    parser.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[n for n in env.get("COLO_NAMESPACES", "").split(",") if n],
        help="watch only this namespace (repeatable; env COLO_NAMESPACES, comma-separated); default: all",
    )
    parser.add_argument(
        "--standalone",
        action="store_true",
        default=env.get("COLO_STANDALONE", "") in ("1", "true"),
        help="run without peering (only one replica may run then; env COLO_STANDALONE=1)",
    )
    parser.add_argument(
        "--peering",
        default=env.get("COLO_PEERING", "colo-operator"),
        help="name of the (Cluster)KopfPeering object replicas coordinate through (env COLO_PEERING)",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--priority",
        type=_priority,
        # A string default goes through `type` too: a bad COLO_PRIORITY is a usage error.
        default=env.get("COLO_PRIORITY") or None,
        help=(
            "peering priority; replicas must differ, the highest one is active "
            "(env COLO_PRIORITY; default: random)"
        ),
    )
    parser.add_argument(
        "--liveness",
        default=env.get("COLO_LIVENESS", "http://0.0.0.0:8080/healthz"),
        help="liveness endpoint URL served by kopf (env COLO_LIVENESS; empty: none)",
    )
    parser.add_argument(
        "--metrics-port",
        type=_port,
        default=env.get("COLO_METRICS_PORT") or "9090",
        help="port of the Prometheus /metrics endpoint; 0: none (env COLO_METRICS_PORT; default: 9090)",
    )
    parser.add_argument("--kubeconfig", default=env.get("KUBECONFIG") or None, help="default: in-cluster")
    logs.add_arguments(parser, env)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure(args.log_level, args.log_format)
    # kopf's liveness server logs every probe otherwise.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # kopf reports every watch-event handler's success at INFO (several per second per node).
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    try:
        config = OperatorConfig.from_env(os.environ)
    except ConfigError as exc:
        logging.getLogger("colo_operator").error("bad configuration: %s", exc)
        return 2
    problem = missing_credentials(args.kubeconfig, os.environ)
    if problem is not None:
        logging.getLogger("colo_operator").error("cannot start: %s", problem)
        return 2

    # Imported here: the handlers register themselves with kopf on import.
    import kopf

    from . import handlers

    if args.kubeconfig:
        # kopf's own login handlers read the kubeconfig from the environment.
        os.environ["KUBECONFIG"] = args.kubeconfig
    handlers.configure(
        config,
        args.kubeconfig,
        peering=None if args.standalone else args.peering,
        namespaces=tuple(args.namespace),
        metrics_port=args.metrics_port,
    )
    # Two replicas with equal priority would both freeze; a random one makes
    # them differ without per-pod configuration.
    priority = args.priority if args.priority is not None else random.SystemRandom().randint(1, 2**31 - 1)
    kopf.run(
        standalone=args.standalone,
        priority=priority,
        # Naming the peering makes it mandatory: two replicas never both act for want of one.
        peering_name=None if args.standalone else args.peering,
        liveness_endpoint=args.liveness or None,
        clusterwide=not args.namespace,
        namespaces=args.namespace,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
