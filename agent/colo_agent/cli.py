"""The `colo-agent` command line.

Each subcommand lives in its own module and registers its flags through a
`register(subparsers)` function; it is imported only when the parser is built,
so `colo-agent --help` stays cheap and nothing connects at import time.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from colo_agent import __version__
from colo_agent.api import logs
from colo_agent.api.models import API_VERSION

# (module, summary) of every subcommand, in the order `--help` lists them.
SUBCOMMANDS: tuple[str, ...] = (
    "colo_agent.microvm.cli",
    "colo_agent.run",
    "colo_agent.demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="colo-agent",
        description=(
            "Run a guest VM and replicate it to a peer agent so that it survives the loss "
            "of its host (COLO-style fault tolerance)."
        ),
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {__version__} (control API {API_VERSION})"
    )
    logs.add_arguments(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logs.configure(args.log_level, args.log_format)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
