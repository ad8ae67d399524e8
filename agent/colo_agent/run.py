"""`colo-agent run`: one agent of a protected VM, primary or secondary.

Every flag has an environment equivalent (shown in `--help`) so a pod spec
can configure the agent with `env:` alone; a flag on the command line wins.

Exit status: 0 stopped on request; 1 failed; 2 usage error; 3 failed before
any client reached the guest it booted (a fresh primary: nothing a client saw
is lost, and the operator starts a new primary rather than failing the VM).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys

from colo_agent.api.identity import OPERATOR_IDENTITY
from colo_agent.api.models import ReplicationMode, Role
from colo_agent.arbiter import parse_spec as parse_arbiter
from colo_agent.backends import BACKENDS, DEFAULT_BACKEND
from colo_agent.config import FailoverTimings, env_arg, parse_address, read_secret
from colo_agent.constants import (
    CHANNELS,
    CHECKPOINT_INTERVAL_MS,
    CLIENT_PORT,
    CONTROL_PORT,
    EXIT_NEVER_SERVED,
    HEARTBEAT_INTERVAL_MS,
    HEARTBEAT_TIMEOUT_MS,
    LOCKSTEP_CHECKPOINT_INTERVAL_MS,
    MAX_CHANNELS,
    REPLICATION_PORT,
)
from colo_agent.microvm.cli import _accel, _arg_type, _port
from colo_agent.microvm.config import parse_memory, validate_dirty_rate
from colo_agent.tls import PeerTls, TlsFiles

log = logging.getLogger(__name__)


def _positive_ms(text: str) -> float:
    if not text.isdigit() or int(text) <= 0:
        raise ValueError(f"{text!r} is not a positive number of milliseconds")
    return int(text) / 1000.0


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) <= 0:
        raise ValueError(f"{text!r} is not a positive integer")
    return int(text)


def _channels(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= MAX_CHANNELS:
        raise ValueError(f"channels must be between 1 and {MAX_CHANNELS}, got {text!r}")
    return int(text)


def _flag(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no", ""):
        return False
    raise ValueError(f"{text!r} is not true or false")


def _tls(args: argparse.Namespace) -> TlsFiles | None:
    """The certificate directory, or None for the explicit clear opt-out."""
    if args.tls_dir and args.insecure_clear:
        raise ValueError("give --tls-dir or --insecure-clear, not both")
    if args.tls_dir:
        return TlsFiles(args.tls_dir)
    if not args.insecure_clear:
        raise ValueError(
            "TLS is required: give --tls-dir DIR (tls.crt, tls.key, ca.crt), or --insecure-clear true "
            "to send guest memory in clear"
        )
    log.warning("TLS is off (--insecure-clear): guest memory and control requests cross the network in clear")
    return None


def _vm(text: str) -> str:
    ns, slash, name = text.partition("/")
    if not slash or not ns or not name or "/" in name:
        raise ValueError(f"{text!r} is not NAMESPACE/NAME")
    return text


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "run",
        help="run one agent of a protected VM (primary or secondary)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _identity_flags(p.add_argument_group("identity"))
    _guest_flags(p.add_argument_group("guest"))
    _replication_flags(p.add_argument_group("replication"))
    _failover_flags(p.add_argument_group("failover"))
    _serving_flags(p.add_argument_group("serving"))
    p.set_defaults(func=run_command)


def _identity_flags(who: argparse._ArgumentGroup) -> None:
    env_arg(who, "--role", "COLO_ROLE", required=True, choices=["primary", "secondary"],
            help="role at start; a secondary becomes primary when promoted")
    env_arg(who, "--vm", "COLO_VM", default="default/colo-vm", type=_arg_type(_vm),
            help="NAMESPACE/NAME of the protected VM; both agents must agree (default: %(default)s)")
    env_arg(who, "--identity", "COLO_IDENTITY", default=None,
            help="this agent's name in the arbiter (the pod name; default: HOSTNAME)")
    env_arg(who, "--secret-file", "COLO_SECRET_FILE", default=None, metavar="PATH",
            help="file holding the per-VM secret (agent authentication and control API token); "
            "else the secret is read from COLO_SECRET")
    env_arg(who, "--tls-dir", "COLO_TLS_DIR", default=None, metavar="DIR",
            help="directory holding tls.crt, tls.key and ca.crt (the VM's certificate Secret): mutual "
            "TLS 1.3 on the replication and control ports; read again at every pairing, so a renewed "
            "certificate is used without a restart. Required unless --insecure-clear")
    env_arg(who, "--insecure-clear", "COLO_INSECURE_CLEAR", default="false", type=_arg_type(_flag),
            metavar="{true,false}", help="explicit opt-out: replicate guest memory and serve the control "
            "API without TLS, readable by anyone on the path (default: false)")


def _guest_flags(guest: argparse._ArgumentGroup) -> None:
    env_arg(guest, "--backend", "COLO_BACKEND", default=DEFAULT_BACKEND, choices=sorted(BACKENDS),
            help="what runs the guest: microvm is the agent's own monitor; qemu is your Linux VM under "
            "QEMU's COLO, configured by COLO_QEMU_* (docs/qemu-backend.md) (default: %(default)s)")
    env_arg(guest, "--memory", "COLO_MEMORY", default="64Mi", type=_arg_type(parse_memory),
            help="guest RAM, e.g. 64Mi or 1Gi (default: 64Mi)")
    env_arg(guest, "--accel", "COLO_ACCEL", default="auto", type=_arg_type(_accel), metavar="{auto,kvm,tcg}",
            help="kvm, tcg (software) or auto: measure both at start, take the faster (default: auto)")
    env_arg(guest, "--dirty-rate", "COLO_DIRTY_RATE", default="0", type=_arg_type(validate_dirty_rate),
            metavar="PAGES_PER_S", help="pages per second the firmware dirties while idle (default: 0)")


def _replication_flags(rep: argparse._ArgumentGroup) -> None:
    env_arg(rep, "--mode", "COLO_MODE", default="checkpoint", choices=["checkpoint", "lockstep"],
            help="checkpoint: output waits for its epoch's acknowledgement; lockstep: both guests run "
            "and matching output leaves at once (default: checkpoint)")
    env_arg(rep, "--interval-ms", "COLO_INTERVAL_MS", default=None, type=_arg_type(_positive_ms),
            help=f"checkpoint interval (default: {CHECKPOINT_INTERVAL_MS} in checkpoint mode, "
            f"{LOCKSTEP_CHECKPOINT_INTERVAL_MS} in lockstep mode, where "
            "checkpoints only bound the divergence of state that produces no output)")
    env_arg(rep, "--compare-timeout-ms", "COLO_COMPARE_TIMEOUT_MS", default="100",
            type=_arg_type(_positive_ms),
            help="lockstep: output the secondary has not matched within this time forces a checkpoint "
            "(default: 100)")
    env_arg(rep, "--max-queue", "COLO_MAX_QUEUE", default="1048576", type=_arg_type(_positive_int),
            metavar="BYTES", help="lockstep: more unmatched output than this forces a checkpoint "
            "(default: 1048576)")
    env_arg(rep, "--channels", "COLO_CHANNELS", default=str(CHANNELS), type=_arg_type(_channels),
            help=f"parallel data connections for pages, 1-{MAX_CHANNELS} (default: %(default)s)")
    env_arg(rep, "--listen", "COLO_LISTEN", default="0.0.0.0",
            help="address the replication and control ports listen on (default: 0.0.0.0)")
    env_arg(rep, "--replication-port", "COLO_REPLICATION_PORT", default=str(REPLICATION_PORT),
            type=_arg_type(_port),
            help="replication port; a secondary connects to its primary's (default: %(default)s)")
    env_arg(rep, "--peer", "COLO_PEER", default=None, type=_arg_type(parse_address), metavar="HOST:PORT",
            help="the primary's replication address (secondary only)")


def _failover_flags(fo: argparse._ArgumentGroup) -> None:
    env_arg(fo, "--heartbeat-interval-ms", "COLO_HEARTBEAT_INTERVAL_MS", default=str(HEARTBEAT_INTERVAL_MS),
            type=_arg_type(_positive_ms), help="heartbeat period (default: %(default)s)")
    env_arg(fo, "--heartbeat-timeout-ms", "COLO_HEARTBEAT_TIMEOUT_MS", default=str(HEARTBEAT_TIMEOUT_MS),
            type=_arg_type(_positive_ms), help="peer declared lost after this silence (default: %(default)s)")
    env_arg(fo, "--arbiter", "COLO_ARBITER", required=True, metavar="lease:NS/NAME|file:PATH",
            help="fencing lock: a Kubernetes Lease, or a file for runs without a cluster")
    env_arg(fo, "--lease-duration-ms", "COLO_LEASE_DURATION_MS", default="2000", type=_arg_type(_positive_ms),
            help="how long a renewal of the arbiter is valid (default: 2000)")


def _serving_flags(srv: argparse._ArgumentGroup) -> None:
    env_arg(srv, "--host", "COLO_HOST", default="0.0.0.0",
            help="address the client port listens on (default: 0.0.0.0)")
    env_arg(srv, "--port", "COLO_PORT", default=str(CLIENT_PORT), type=_arg_type(_port),
            help="client port, open on the primary only (default: %(default)s)")
    env_arg(srv, "--control-port", "COLO_CONTROL_PORT", default=str(CONTROL_PORT), type=_arg_type(_port),
            help="control API: /v1/status, /v1/promote, /metrics, probes (default: %(default)s)")


def run_command(args: argparse.Namespace) -> int:
    try:
        secret = read_secret(args.secret_file)
        tls = _tls(args)
        FailoverTimings(args.heartbeat_interval_ms, args.heartbeat_timeout_ms, args.lease_duration_ms)
        parse_arbiter(args.arbiter)
        if args.role == "secondary" and args.peer is None:
            raise ValueError("a secondary needs --peer HOST:PORT, its primary's replication address")
    except (ValueError, OSError) as exc:
        print(f"colo-agent run: {exc}", file=sys.stderr)
        return 2
    identity = args.identity or os.environ.get("HOSTNAME") or socket.gethostname()
    return asyncio.run(_main(args, secret, identity, tls))


async def _main(args: argparse.Namespace, secret: bytes, identity: str, tls: TlsFiles | None) -> int:
    from prometheus_client import CollectorRegistry

    from colo_agent import arbiter as arbiters
    from colo_agent.api.server import bound_port, create_app, serve
    from colo_agent.backends import BackendError, create_guest
    from colo_agent.engine.agent import Agent, AgentSettings
    from colo_agent.guest import GuestOptions

    settings = AgentSettings(
        vm=args.vm, identity=identity, role=Role(args.role),
        mode=ReplicationMode(args.mode), channels=args.channels,
        interval=args.interval_ms or (
            (LOCKSTEP_CHECKPOINT_INTERVAL_MS if args.mode == "lockstep" else CHECKPOINT_INTERVAL_MS) / 1000
        ),
        listen_host=args.listen, replication_port=args.replication_port, peer=args.peer, secret=secret,
        heartbeat_interval=args.heartbeat_interval_ms, heartbeat_timeout=args.heartbeat_timeout_ms,
        client_host=args.host, client_port=args.port,
        debug_digests=os.environ.get("COLO_DEBUG_DIGESTS") == "1",
        compare_timeout=args.compare_timeout_ms, max_queue=args.max_queue,
        tls=None if tls is None else PeerTls.for_vm(tls, args.vm),
    )
    try:
        arbiter = arbiters.from_spec(args.arbiter, identity, args.lease_duration_ms)
        # In the main thread: a backend may install signal handlers (the micro-VM's kvm kick).
        peer_host = args.peer[0] if args.peer is not None else None
        guest = create_guest(args.backend, GuestOptions(args.memory, args.accel, args.dirty_rate, peer_host))
    except (ValueError, BackendError, OSError) as exc:
        log.error("cannot start: %s", exc)
        return 1
    registry = CollectorRegistry()
    try:
        agent = Agent(settings, guest, arbiter, registry)
    except ValueError as exc:
        log.error("cannot start: %s", exc)
        guest.stop()
        return 1
    if tls is None:
        app = create_app(agent, secret, registry)
        runner = await serve(app, args.listen, args.control_port)
    else:
        app = create_app(agent, secret, registry, peers=frozenset({OPERATOR_IDENTITY}))
        runner = await serve(app, args.listen, args.control_port, ssl_context=tls.http_server_context())
    log.info("%s agent %s of %s; control API on %s:%d", args.role, identity, args.vm, args.listen,
             bound_port(runner))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, agent.stop)
    try:
        await agent.run()
    except Exception as exc:
        log.exception("agent failed")
        agent.failed = agent.failed or str(exc)
    finally:
        await runner.cleanup()
        await agent.close()
    if agent.failed:
        log.error("agent stopped: %s", agent.failed)
        if agent.never_served():
            log.error("no client ever reached this agent's guest (exit status %d)", EXIT_NEVER_SERVED)
            return EXIT_NEVER_SERVED
        return 1
    log.info("agent stopped on request")
    return 0
