"""`kubectl colo`: look at and steer ColoVMs from the command line.

    kubectl colo list [-A]                   every ColoVM of the namespace (or of all): phase, nodes, lag
    kubectl colo status NAME                 roles, nodes, term, epoch, checkpoints/s, pause, lag, failovers
                                             (backend qemu: QEMU's stream state, channels, mismatches)
    kubectl colo switchover NAME             planned, zero-loss move of the primary to the secondary
    kubectl colo upgrade NAME                start the rolling update to the current pod template
    kubectl colo restart NAME                replace both agent pods by a rolling update
    kubectl colo checkpoints NAME --watch    one line per acknowledged checkpoint the operator reports

`-o json` or `-o yaml` prints the ColoVM objects (list, status) or one object
per checkpoint (checkpoints) instead of tables; `--context` picks a kubeconfig
context as kubectl's does.

LAG is how far the secondary's committed image trailed the primary, i.e. how
much guest execution a failover would have rolled back: the primary agent's
time since its last acknowledged checkpoint, measured when the operator last
sampled it (`status.lastCheckpoint.ackAgeMs` at `status.checkpoints.sampledAt`,
shown with the sample's age). Without a synced secondary there is nothing to
fail over to, and LAG says `unprotected`.

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
import json
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import kubernetes
import yaml
from rich.console import Console
from rich.table import Table

from . import __version__
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


def lag(vm: Mapping[str, Any], now: dt.datetime) -> str:
    """The LAG figure: the primary's time since its last acknowledged checkpoint, as last sampled."""
    status = vm.get("status") or {}
    if status.get("phase") != "Protected":
        return "unprotected"
    ack_age = (status.get("lastCheckpoint") or {}).get("ackAgeMs")
    if not isinstance(ack_age, int | float) or isinstance(ack_age, bool):
        return "-"
    sampled = _age((status.get("checkpoints") or {}).get("sampledAt"), now)
    return f"{ack_age:.0f} ms ({sampled} ago)"


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
    stream = status.get("stream")
    columns = ("TERM", "LAST EPOCH", "CHECKPOINTS/S", "LAST PAUSE", "LAG", "FAILOVERS", "LAST FAILOVER")
    for column in (*columns, *(("STREAM",) if stream else ())):
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
        lag(vm, now),
        _num(status.get("failovers")),
        last_failover,
        *((stream_figure(stream),) if stream else ()),
    )
    return replicas, figures


def stream_figure(stream: Mapping[str, Any]) -> str:
    """`status.stream` of a backend that replicates itself (QEMU), in a few words."""
    channels = stream.get("channels")
    width = "single-stream" if channels == 1 else f"{_num(channels)} channels"
    return f"{stream.get('state', '-')}, {width}, {_num(stream.get('mismatches'))} mismatches"


LIST_COLUMNS = ("NAMESPACE", "NAME", "PHASE", "PRIMARY", "SECONDARY", "TERM", "EPOCH", "CKPT/S",
                "PAUSE", "LAG", "FAILOVERS", "AGE")  # fmt: skip


def list_table(vms: Sequence[Mapping[str, Any]], now: dt.datetime) -> Table:
    """`kubectl colo list`: one row per ColoVM."""
    table = Table(box=None, show_edge=False, pad_edge=False)
    for column in LIST_COLUMNS:
        table.add_column(column, no_wrap=True)
    for vm in sorted(vms, key=lambda v: ((v.get("metadata") or {}).get("namespace", ""),
                                         (v.get("metadata") or {}).get("name", ""))):  # fmt: skip
        meta = vm.get("metadata") or {}
        status = vm.get("status") or {}
        table.add_row(
            str(meta.get("namespace", "-")),
            str(meta.get("name", "-")),
            str(status.get("phase", "Unknown")),
            str((status.get("primary") or {}).get("node", "-")),
            str((status.get("secondary") or {}).get("node", "-")),
            _num(status.get("term")),
            _num(status.get("epoch")),
            _num((status.get("checkpoints") or {}).get("perSecond"), "{:.1f}"),
            _num((status.get("lastCheckpoint") or {}).get("pauseMs"), "{:.2f} ms"),
            lag(vm, now),
            _num(status.get("failovers")),
            _age(meta.get("creationTimestamp"), now),
        )
    return table


def dump(document: Any, output: str) -> str:
    """`document` as `-o json` or `-o yaml` prints it."""
    if output == "json":
        return json.dumps(document, indent=2, sort_keys=False)
    return yaml.safe_dump(document, sort_keys=False, default_flow_style=False).rstrip("\n")


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


async def cmd_list(kube: Kube, args: argparse.Namespace, console: Console) -> int:
    namespace = None if args.all_namespaces else args.namespace
    try:
        vms = await kube.list_vms(namespace)
    except KubeError as exc:
        raise _explain(exc, namespace or "all namespaces", "") from None
    if args.output:
        items = {"apiVersion": "v1", "kind": "List", "items": vms}
        console.print(dump(items, args.output), highlight=False, markup=False, soft_wrap=True)
        return EXIT_OK
    if not vms:
        where = "any namespace" if namespace is None else f"namespace {namespace}"
        console.print(f"no ColoVMs in {where}", highlight=False)
        return EXIT_OK
    console.print(list_table(vms, dt.datetime.now(dt.UTC)))
    return EXIT_OK


async def cmd_status(kube: Kube, args: argparse.Namespace, console: Console) -> int:
    vm = await _get(kube, args.namespace, args.name)
    if args.output:
        console.print(dump(vm, args.output), highlight=False, markup=False, soft_wrap=True)
        return EXIT_OK
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


async def cmd_upgrade(kube: Kube, args: argparse.Namespace, console: Console) -> int:
    """`upgrade` approves the rolling update to the pod template called for now (updateStrategy
    Manual); `restart` also changes the template (colo.dev/restartedAt), so both pods are
    replaced even when up to date. The operator replaces the secondary, switches over, then the
    old primary; nothing acknowledged is lost."""
    await _get(kube, args.namespace, args.name)
    requested = dt.datetime.now(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    try:
        if args.command == "restart":
            await kube.annotate_vm(args.namespace, args.name, c.ANNOTATION_RESTARTED_AT, requested)
        await kube.annotate_vm(args.namespace, args.name, c.ANNOTATION_UPGRADE, requested)
    except KubeError as exc:
        raise _explain(exc, args.namespace, args.name) from None
    console.print(
        f"{args.command} of {args.namespace}/{args.name} requested ({requested}); "
        f"follow it with: kubectl get cvm {args.name} -n {args.namespace} -w (UP-TO-DATE)",
        highlight=False,
    )
    return EXIT_OK


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
            if args.output:
                status = vm.get("status") or {}
                record = {"term": status.get("term"), **(status.get("lastCheckpoint") or {})}
                # One object per line in both formats, so --watch output can be streamed.
                text = json.dumps(record) if args.output == "json" else "---\n" + dump(record, "yaml")
                console.print(text, highlight=False, markup=False, soft_wrap=True)
            else:
                console.print(line, highlight=False)
            seen = epoch
        if not args.watch:
            return EXIT_OK
        await asyncio.sleep(args.interval)


def _default_namespace(kubeconfig: str | None, context: str | None = None) -> str:
    try:
        contexts, active = kubernetes.config.list_kube_config_contexts(config_file=kubeconfig)
        if context is not None:
            active = next((ctx for ctx in contexts if ctx.get("name") == context), None)
        return str((active or {}).get("context", {}).get("namespace") or "default")
    except Exception:  # no kubeconfig: in a pod, or not configured yet; the request will say more
        return "default"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubectl colo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-n", "--namespace", help="namespace of the ColoVM (default: the context's)")
    parser.add_argument(
        "--kubeconfig", default=None, help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config)"
    )
    parser.add_argument("--context", default=None, help="kubeconfig context (default: the current one)")
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument(
        "-o", "--output", choices=["json", "yaml"], default=None, help="print objects instead of tables"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    listing = sub.add_parser("list", parents=[output], help="every ColoVM of the namespace, or of all")
    listing.add_argument(
        "-A", "--all-namespaces", action="store_true", help="list the ColoVMs of every namespace"
    )
    status = sub.add_parser(
        "status", parents=[output], help="roles, nodes, term, epoch, checkpoint rate, pause, lag, failovers"
    )
    status.add_argument("name")
    switch = sub.add_parser("switchover", help="move the primary to the secondary after a final checkpoint")
    switch.add_argument("name")
    switch.add_argument("--no-wait", dest="wait", action="store_false", help="return once requested")
    switch.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the outcome")
    switch.add_argument("--force", action="store_true", help="ask even when the VM is not Protected")
    for command, text in (
        ("upgrade", "start the rolling update to the current pod template (updateStrategy Manual)"),
        ("restart", "replace both agent pods by a rolling update, secondary first"),
    ):
        sub.add_parser(command, help=text).add_argument("name")
    checkpoints = sub.add_parser(
        "checkpoints", parents=[output], help="the last acknowledged checkpoint, or every new one"
    )
    checkpoints.add_argument("name")
    checkpoints.add_argument("-w", "--watch", action="store_true", help="keep printing new checkpoints")
    checkpoints.add_argument("--interval", type=float, default=1.0, help="seconds between polls with --watch")
    return parser


COMMANDS = {
    "list": cmd_list,
    "status": cmd_status,
    "switchover": cmd_switchover,
    "upgrade": cmd_upgrade,
    "restart": cmd_upgrade,
    "checkpoints": cmd_checkpoints,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Piped output is not cut to 80 columns: scripts and `less -S` get whole rows.
    console = Console() if sys.stdout.isatty() else Console(width=1000)
    errors = Console(stderr=True)
    kubeconfig = args.kubeconfig
    args.namespace = args.namespace or _default_namespace(kubeconfig, args.context)
    args.output = getattr(args, "output", None)
    try:
        kube = Kube.connect(kubeconfig, context=args.context)
    except Exception as exc:
        errors.print(
            f"kubectl colo: no usable kubeconfig ({exc}): set KUBECONFIG, pass --kubeconfig, "
            "or name an existing --context (kubectl config get-contexts)",
            highlight=False,
        )
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
