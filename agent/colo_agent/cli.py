"""The `colo-agent` command line.

Each subcommand lives in its own module and registers its flags through a
`register(subparsers)` function; it is imported only when the parser is built,
so `colo-agent --help` stays cheap and nothing connects at import time.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

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
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log verbosity (default: %(default)s; env COLO_LOG_LEVEL)",
    )
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
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
