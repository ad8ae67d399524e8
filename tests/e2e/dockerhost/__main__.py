"""``cd tests/e2e && python -m dockerhost {engine,image,stop}``: Docker for the image and kind.

``engine`` prints the ``DOCKER_HOST`` to export (nothing for the system
Docker), starting the private dockerd when one is needed. ``image`` also
makes the base image where it cannot be pulled, builds the project's image
and prints the build times: the build as found (cold on a fresh machine)
and a rebuild after a source edit (the warm path a developer takes).
``stop`` stops the private dockerd.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from . import base, engine, image


def _warm_rebuild(eng: engine.Engine, tag: str) -> float:
    """Rebuild from a copy of the tree with one agent source edited; returns the seconds."""
    with tempfile.TemporaryDirectory(prefix="colo-warm-") as tmp:
        context = Path(tmp) / "src"
        keep = ("pyproject.toml", "README.md", "Dockerfile", ".dockerignore", "agent", "operator", "crds")
        context.mkdir()
        for name in keep:
            src = image.ROOT / name
            if src.is_dir():
                shutil.copytree(src, context / name, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(src, context / name)
        run_py = context / "agent" / "colo_agent" / "run.py"
        run_py.write_text(run_py.read_text() + "\n# rebuild probe\n")
        probe = f"{tag.rsplit(':', 1)[0]}:warm-probe"
        try:
            return image.build(eng, probe, context=context, quiet=True)
        finally:
            eng.docker("image", "rm", "--force", probe, check=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dockerhost", description=__doc__.split("\n\n", 1)[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("engine", help="make sure an engine runs; print the DOCKER_HOST to export")
    build = sub.add_parser("image", help="make the base if needed, build the project's image, print times")
    build.add_argument("--tag", default=image.DEFAULT_TAG, help=f"image tag (default {image.DEFAULT_TAG})")
    build.add_argument("--warm", action="store_true", help="also time a rebuild after a source edit")
    sub.add_parser("stop", help="stop the private dockerd")
    args = parser.parse_args(argv)
    try:
        if args.command == "stop":
            engine.stop_private()
            return 0
        eng = engine.ensure()
        print(f"dockerhost: using {eng.describe()}", file=sys.stderr)
        if args.command == "engine":
            for key, value in eng.env.items():
                print(f"export {key}={value}")
            return 0
        print(f"dockerhost: base {base.PYTHON_SLIM.tag}: {base.ensure(eng)}", file=sys.stderr)
        seconds = image.build(eng, args.tag)
        print(f"dockerhost: image {args.tag}: built in {seconds:.1f}s", file=sys.stderr)
        # Each rebuild leaves the previous image untagged; drop those older than an hour
        # (a younger one may be a step of a build running now).
        eng.docker("image", "prune", "--force", "--filter", "until=1h", check=False)
        if args.warm:
            print(
                f"dockerhost: rebuild after a source edit: {_warm_rebuild(eng, args.tag):.1f}s",
                file=sys.stderr,
            )
    except engine.EngineError as exc:
        print(f"dockerhost: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
