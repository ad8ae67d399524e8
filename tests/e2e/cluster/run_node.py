"""Entry point of a process node's runner: ``python -m cluster.run_node SPEC.json``.

Kept apart from :mod:`cluster.noderunner` so that ``-m`` does not execute a
module the package has already imported.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from .noderunner import NodeRunner, NodeSpec


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1:
        print("usage: python -m cluster.run_node SPEC.json", file=sys.stderr)
        return 2
    spec = NodeSpec.load(Path(args[0]))
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s {spec.name} %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    NodeRunner(spec).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
