"""`colo-agent vm run`: boot the micro-VM and serve it to Redis clients, unreplicated."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable
from typing import Any

from colo_agent.config import env_arg
from colo_agent.constants import CLIENT_PORT
from colo_agent.microvm.config import ACCEL_CHOICES, parse_memory, validate_dirty_rate

log = logging.getLogger(__name__)


def _arg_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """Turn a validator's ValueError into argparse's one-line usage error."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except (TypeError, ValueError) as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parse.__name__
    return convert


def _port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) < 65536:
        raise ValueError(f"port {text!r} is not a number between 0 and 65535")
    return int(text)


def _accel(text: str) -> str:
    if text not in ACCEL_CHOICES:
        raise ValueError(f"accelerator {text!r} is not one of {', '.join(ACCEL_CHOICES)}")
    return text


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    vm = subparsers.add_parser(
        "vm",
        help="run the micro-VM on its own (no replication)",
        description="Run the micro-VM guest on this host, without a peer.",
    )
    vm_sub = vm.add_subparsers(dest="vm_command", metavar="VM_COMMAND", required=True)
    run = vm_sub.add_parser(
        "run",
        help="boot the key-value firmware and serve Redis clients until interrupted",
        description=(
            "Boot the micro-VM's key-value firmware and bridge TCP clients on --host:--port to "
            "its network device, so redis-cli and redis-benchmark work against it. Runs until "
            "SIGINT or SIGTERM, then stops the guest and removes its RAM file."
        ),
    )
    env_arg(
        run, "--memory", "COLO_MEMORY", default="64Mi", type=_arg_type(parse_memory),
        help="guest RAM, e.g. 64Mi, 1Gi or 512M (4Mi..1Gi, rounded up to 4 KiB) (default: 64Mi)",
    )
    env_arg(
        run, "--accel", "COLO_ACCEL", default="auto", type=_arg_type(_accel), metavar="{auto,kvm,tcg}",
        help="accelerator: kvm (/dev/kvm), tcg (software emulation) or auto, which runs a short "
        "guest loop under both at start and takes the faster (default: auto)",
    )
    env_arg(
        run, "--host", "COLO_HOST", default="127.0.0.1",
        help="address to listen on for clients (default: 127.0.0.1)",
    )
    env_arg(
        run, "--port", "COLO_PORT", default=str(CLIENT_PORT), type=_arg_type(_port),
        help="TCP port to listen on for clients; 0 picks a free one (default: %(default)s)",
    )
    env_arg(
        run, "--dirty-rate", "COLO_DIRTY_RATE", default="0", type=_arg_type(validate_dirty_rate),
        metavar="PAGES_PER_S",
        help="pages per second the firmware writes while idle, to exercise checkpoints (default: 0, off)",
    )
    env_arg(
        run, "--ram-path", "COLO_RAM_PATH", default=None, metavar="PATH",
        help="file to hold guest RAM; must not exist yet (default: a new file under /dev/shm)",
    )
    run.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    from colo_agent.microvm.machine import Machine, MachineError

    try:
        machine = Machine.create(
            args.memory, accel=args.accel, dirty_rate=args.dirty_rate, ram_path=args.ram_path
        )
    except (MachineError, ValueError, OSError) as exc:
        print(f"colo-agent vm run: cannot create the VM: {exc}", file=sys.stderr)
        return 1
    try:
        return asyncio.run(_serve(machine, args.host, args.port))
    except (MachineError, OSError) as exc:
        print(f"colo-agent vm run: {exc}", file=sys.stderr)
        return 1
    finally:
        machine.stop()


async def _serve(machine: Any, host: str, port: int) -> int:
    from colo_agent.bridge import ClientBridge

    loop = asyncio.get_running_loop()
    bridge = ClientBridge(machine)
    try:
        await bridge.start(host, port)
    except OSError as exc:
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    machine.start()
    log.info("micro-VM serving on %s:%d (%s); Ctrl-C stops it", host, bridge.port, machine.accelerator)

    interrupted = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, interrupted.set)
    guest_stopped = loop.run_in_executor(None, machine.wait_stopped)
    interrupt_wait = asyncio.ensure_future(interrupted.wait())
    try:
        await asyncio.wait({guest_stopped, interrupt_wait}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        interrupt_wait.cancel()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await bridge.close()
        # Unblocks the executor thread waiting in wait_stopped.
        machine.stop()
        await guest_stopped
    if interrupted.is_set():
        log.info("micro-VM stopped on request")
        return 0
    log.error("micro-VM stopped: %s", machine.exit_reason or "unknown reason")
    return 1
