"""How both binaries log: level and format flags with environment defaults, and JSON lines.

Standard library only: `colo-operator` uses it too. `--log-format json` writes
one JSON object per line (`time`, `level`, `logger`, `message`, and
`exception` when there is one; kopf's per-object messages add `object`), the
shape log pipelines (Loki, Elasticsearch, Cloud Logging) parse without rules.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import sys
from collections.abc import Mapping
from typing import IO, Any

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def _choice(what: str, env: str, allowed: tuple[str, ...], normalize: Any = str) -> Any:
    def parse(text: str) -> str:
        value = normalize(text.strip())
        if value not in allowed:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a {what} ({', '.join(allowed)}); from --{what.replace(' ', '-')} or {env}"
            )
        return str(value)

    parse.__name__ = what
    return parse


def add_arguments(parser: argparse.ArgumentParser, env: Mapping[str, str] | None = None) -> None:
    """`--log-level` and `--log-format`, defaulting to COLO_LOG_LEVEL and COLO_LOG_FORMAT.

    The defaults go through the same check as the flags (argparse converts a
    string default with `type`), so a bad environment value is a usage error
    (exit 2) naming the variable, not a traceback.
    """
    env = os.environ if env is None else env
    parser.add_argument(
        "--log-level",
        default=env.get("COLO_LOG_LEVEL") or "INFO",
        type=_choice("log level", "COLO_LOG_LEVEL", LEVELS, str.upper),
        metavar="{" + ",".join(LEVELS) + "}",
        help="log verbosity (env COLO_LOG_LEVEL; default: INFO)",
    )
    parser.add_argument(
        "--log-format",
        default=env.get("COLO_LOG_FORMAT") or "text",
        type=_choice("log format", "COLO_LOG_FORMAT", FORMATS, str.lower),
        metavar="{" + ",".join(FORMATS) + "}",
        help="text lines, or one JSON object per line for log pipelines (env COLO_LOG_FORMAT; default: text)",
    )


class JsonFormatter(logging.Formatter):
    """One JSON object per record, time in UTC with milliseconds."""

    def format(self, record: logging.LogRecord) -> str:
        moment = dt.datetime.fromtimestamp(record.created, dt.UTC)
        out: dict[str, Any] = {
            "time": moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        ref = getattr(record, "k8s_ref", None)  # kopf's per-object loggers
        if isinstance(ref, Mapping) and ref.get("name"):
            out["object"] = "/".join(str(p) for p in (ref.get("namespace"), ref.get("name")) if p)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        return json.dumps(out, ensure_ascii=False, default=str)


def configure(level: str, fmt: str = "text", stream: IO[str] | None = None) -> None:
    """Replace the root logger's handlers with one writing `fmt` to `stream` (stderr)."""
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
