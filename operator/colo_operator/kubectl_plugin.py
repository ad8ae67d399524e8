"""`kubectl colo`: look at and steer ColoVMs from the command line.

    kubectl colo status NAME                 roles, nodes, term, epoch, checkpoints/s, pause, lag, failovers
    kubectl colo switchover NAME             planned, zero-loss move of the primary to the secondary
    kubectl colo checkpoints NAME --watch    one line per acknowledged checkpoint the operator reports

A switchover is requested by writing a fresh timestamp into the ColoVM's
`colo.dev/switchover` annotation; the operator acts on each value once (it
records it in `status.switchoverHandled`) and only while the VM is Protected:
final acknowledged checkpoint on the primary, the primary stops releasing
output, the secondary takes the Lease with term + 1 and promotes, the Service
follows, a new secondary is created. The plugin waits for the outcome.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import kubernetes
from rich.console import Console
from rich.table import Table

from . import constants as c
from .kube import Kube, KubeError
from .snapshot import parse_time

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class PluginError(Exception):
    """A failure with a message that says what to do about it."""


# --------------------------------------------------------------------------- formatting (pure)


def _age(when: object, now: dt.datetime) -> str:
    moment = parse_time(when)
    if moment is None:
        return "-"
    seconds = max(0.0, (now - moment).total_seconds())
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _num(value: object, fmt: str = "{}") -> str:
    return fmt.format(value) if isinstance(value, int | float) and not isinstance(value, bool) else "-"


def status_tables(vm: Mapping[str, Any], now: dt.datetime) -> tuple[Table, Table]:
    """The replicas table and the figures table of `kubectl colo status`."""
    meta = vm.get("metadata") or {}
    status = vm.get("status") or {}
    transition = status.get("transition") or {}
    replicas = Table(
        title=f"ColoVM {meta.get('namespace')}/{meta.get('name')}: {status.get('phase', 'Unknown')}"
    )
    for column in ("ROLE", "POD", "NODE", "ADDRESS", "STATE", "SYNCED"):
        replicas.add_column(column)
    for role in ("primary", "secondary"):
        replica = status.get(role) or {}
        if not replica:
            replicas.add_row(role, "-", "-", "-", "none", "-")
            continue
        label = role
        if role == "secondary" and transition.get("to") == replica.get("pod"):
            label = "secondary -> primary"
        synced = replica.get("synced")
        replicas.add_row(
            label,
            str(replica.get("pod", "-")),
            str(replica.get("node", "-")),
            str(replica.get("address", "-")),
            str(replica.get("state", "-")),
            "yes" if synced else ("no" if role == "secondary" else "-"),
        )
    last = status.get("lastCheckpoint") or {}
    checkpoints = status.get("checkpoints") or {}
    failover = status.get("lastFailover") or {}
    figures = Table(show_header=True)
    for column in ("TERM", "LAST EPOCH", "CHECKPOINTS/S", "LAST PAUSE", "LAG", "FAILOVERS", "LAST FAILOVER"):
        figures.add_column(column)
    last_failover = "-"
    if failover:
        last_failover = (
            f"{failover.get('kind', 'Failover')} {failover.get('cause', '')} "
            f"{_num(failover.get('durationMs'), '{:.0f}')} ms, {_age(failover.get('time'), now)} ago"
        )
    figures.add_row(
        _num(status.get("term")),
        _num(status.get("epoch")),
        _num(checkpoints.get("perSecond"), "{:.1f}"),
        _num(last.get("pauseMs"), "{:.2f} ms"),
        # Age of the newest acknowledged checkpoint the operator saw: the most a failover could roll back.
        _age(last.get("observedAt"), now),
        _num(status.get("failovers")),
        last_failover,
    )
    return replicas, figures


def condition_lines(vm: Mapping[str, Any]) -> list[str]:
    status = vm.get("status") or {}
    lines = []
    for cond in status.get("conditions") or ():
        message = f": {cond.get('message')}" if cond.get("message") else ""
        lines.append(f"{cond.get('type')}={cond.get('status')} ({cond.get('reason')}){message}")
    if status.get("transition"):
        t = status["transition"]
        lines.append(f"{t.get('kind')} in progress: {t.get('from')} -> {t.get('to')}, step {t.get('step')}")
    return lines


def checkpoint_line(vm: Mapping[str, Any]) -> str | None:
    status = vm.get("status") or {}
    last = status.get("lastCheckpoint")
    if not last:
        return None
    rate = (status.get("checkpoints") or {}).get("perSecond")
    return (
        f"{last.get('observedAt', '-')}  term {_num(status.get('term'))}  epoch {_num(last.get('epoch'))}  "
        f"pause {_num(last.get('pauseMs'), '{:.2f}')} ms  pages {_num(last.get('pages'))}  "
        f"bytes {_num(last.get('bytes'))}  duration {_num(last.get('durationMs'), '{:.1f}')} ms  "
        f"cause {last.get('cause', '-')}  rate {_num(rate, '{:.1f}')}/s"
    )


def switchover_outcome(vm: Mapping[str, Any], requested: str) -> tuple[bool, str] | None:
    """None while pending; else (succeeded, message)."""
    status = vm.get("status") or {}
    if status.get("switchoverHandled") != requested:
        return None
    if status.get("transition"):
        return None
    failover = status.get("lastFailover") or {}
    done_at, asked_at = parse_time(failover.get("time")), parse_time(requested)
    # The operator writes whole seconds.
    if asked_at is not None:
        asked_at = asked_at.replace(microsecond=0)
    if failover.get("kind") == "Switchover" and done_at and asked_at and done_at >= asked_at:
        return True, (
            f"switched over: {failover.get('from')} -> {failover.get('to')} "
            f"in {_num(failover.get('durationMs'), '{:.0f}')} ms, term {status.get('term')}"
        )
    why = status.get("message") or "no message"
    return False, (
        f"the operator did not switch over (phase {status.get('phase')}: {why}); a switchover needs "
        "a synced secondary: wait for phase Protected (kubectl get cvm) and retry"
    )


# --------------------------------------------------------------------------- commands


def _explain(exc: KubeError, namespace: str, name: str) -> PluginError:
    if exc.status == 404 and "colovms" in exc.reason.lower():
        return PluginError(
            "the ColoVM resource type is not installed: helm install colo-operator charts/colo-operator "
            "(or kubectl apply -f crds/colovm.yaml)"
        )
    if exc.status == 403:
        return PluginError(
            f"forbidden ({exc.reason}): your user needs get/patch on colovms.colo.dev in {namespace}"
        )
    if exc.status == 0:
        return PluginError(
            f"cannot reach the API server ({exc.reason}): "
            "check KUBECONFIG and `kubectl config current-context`"
        )
    return PluginError(f"{exc}")


async def _get(kube: Kube, namespace: str, name: str) -> dict[str, Any]:
    try:
        vm = await kube.get_vm(namespace, name)
    except KubeError as exc:
        raise _explain(exc, namespace, name) from None
    if vm is None:
        raise PluginError(f"ColoVM {namespace}/{name} not found: `kubectl get cvm -n {namespace}` lists them")
    return vm


async def cmd_status(kube: Kube, args: argparse.Namespace, console: Console) -> int:
    vm = await _get(kube, args.namespace, args.name)
    replicas, figures = status_tables(vm, dt.datetime.now(dt.UTC))
    console.print(replicas)
    console.print(figures)
    for line in condition_lines(vm):
        console.print(line, highlight=False)
    return EXIT_OK


async def cmd_switchover(kube: Kube, args: argparse.Namespace, console: Console) -> int:
    vm = await _get(kube, args.namespace, args.name)
    phase = (vm.get("status") or {}).get("phase")
    if phase != "Protected" and not args.force:
        raise PluginError(
            f"ColoVM {args.namespace}/{args.name} is {phase or 'not reconciled yet'}, not Protected: "
            "a switchover needs a synced secondary. Wait for Protected (kubectl get cvm -w), "
            "or pass --force to ask anyway"
        )
    # Microseconds: two requests within a second are still two requests.
    requested = dt.datetime.now(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    try:
        await kube.annotate_vm(args.namespace, args.name, c.ANNOTATION_SWITCHOVER, requested)
    except KubeError as exc:
        raise _explain(exc, args.namespace, args.name) from None
    console.print(f"switchover of {args.namespace}/{args.name} requested ({requested})", highlight=False)
    if not args.wait:
        return EXIT_OK
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        outcome = switchover_outcome(await _get(kube, args.namespace, args.name), requested)
        if outcome is not None:
            succeeded, message = outcome
            console.print(message, highlight=False)
            return EXIT_OK if succeeded else EXIT_FAILED
        await asyncio.sleep(0.2)
    raise PluginError(
        f"no outcome within {args.timeout:g}s: is the operator running? "
        f"(kubectl get pods -A -l app.kubernetes.io/name=colo-operator; kubectl describe cvm {args.name})"
    )


async def cmd_checkpoints(kube: Kube, args: argparse.Namespace, console: Console) -> int:
    seen: object = None
    while True:
        vm = await _get(kube, args.namespace, args.name)
        line = checkpoint_line(vm)
        epoch = ((vm.get("status") or {}).get("lastCheckpoint") or {}).get("epoch")
        if line is None and not args.watch:
            console.print(f"no checkpoint reported yet (phase {(vm.get('status') or {}).get('phase')})")
            return EXIT_OK
        if line is not None and epoch != seen:
            console.print(line, highlight=False)
            seen = epoch
        if not args.watch:
            return EXIT_OK
        await asyncio.sleep(args.interval)


def _default_namespace(kubeconfig: str | None) -> str:
    try:
        _, active = kubernetes.config.list_kube_config_contexts(config_file=kubeconfig)
        return str((active or {}).get("context", {}).get("namespace") or "default")
    except Exception:  # no kubeconfig: in a pod, or not configured yet; the request will say more
        return "default"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubectl colo", description="Inspect and steer ColoVMs.")
    parser.add_argument("-n", "--namespace", help="namespace of the ColoVM (default: the context's)")
    parser.add_argument(
        "--kubeconfig", default=None, help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    status = sub.add_parser(
        "status", help="roles, nodes, term, epoch, checkpoint rate, pause, lag, failovers"
    )
    status.add_argument("name")
    switch = sub.add_parser("switchover", help="move the primary to the secondary after a final checkpoint")
    switch.add_argument("name")
    switch.add_argument("--no-wait", dest="wait", action="store_false", help="return once requested")
    switch.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the outcome")
    switch.add_argument("--force", action="store_true", help="ask even when the VM is not Protected")
    checkpoints = sub.add_parser("checkpoints", help="the last acknowledged checkpoint, or every new one")
    checkpoints.add_argument("name")
    checkpoints.add_argument("-w", "--watch", action="store_true", help="keep printing new checkpoints")
    checkpoints.add_argument("--interval", type=float, default=1.0, help="seconds between polls with --watch")
    return parser


COMMANDS = {"status": cmd_status, "switchover": cmd_switchover, "checkpoints": cmd_checkpoints}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console, errors = Console(), Console(stderr=True)
    kubeconfig = args.kubeconfig
    args.namespace = args.namespace or _default_namespace(kubeconfig)
    try:
        kube = Kube.connect(kubeconfig)
    except Exception as exc:
        errors.print(f"kubectl colo: no usable kubeconfig ({exc}): set KUBECONFIG or pass --kubeconfig")
        return EXIT_USAGE
    try:
        return asyncio.run(COMMANDS[args.command](kube, args, console))
    except PluginError as exc:
        errors.print(f"kubectl colo: {exc}", highlight=False)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        kube.close()


if __name__ == "__main__":
    sys.exit(main())
