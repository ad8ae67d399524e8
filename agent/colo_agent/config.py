"""The agent's configuration: flags, their environment equivalents, validation.

Every flag of `colo-agent run` can be given as an environment variable so a
pod spec can configure the agent without building an argument list; a flag
given on the command line wins over the environment.
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass
from pathlib import Path

_QUANTITY = re.compile(r"^(\d+)(Ki|Mi|Gi|K|M|G)?$")
_UNITS = {None: 1, "K": 10**3, "M": 10**6, "G": 10**9, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}


def parse_quantity(text: str) -> int:
    """`64Mi` -> 67108864. Kubernetes-style binary and decimal suffixes."""
    m = _QUANTITY.match(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not a memory size such as 64Mi, 1Gi or 512M")
    return int(m.group(1)) * _UNITS[m.group(2)]


def parse_address(text: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """`HOST:PORT` or `:PORT` -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not an address of the form HOST:PORT")
    return (host.strip("[]") or default_host), int(port)


class EnvDefault(argparse.Action):
    """An argparse action whose default comes from an environment variable."""

    def __init__(self, env: str, required: bool = False, default: object = None, **kwargs: object) -> None:
        if env in os.environ:
            default = os.environ[env]
            required = False
        help_ = kwargs.get("help")
        if isinstance(help_, str):
            kwargs["help"] = f"{help_} [env {env}]"
        super().__init__(default=default, required=required, **kwargs)  # type: ignore[arg-type]

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)


def env_arg(parser: argparse.ArgumentParser | argparse._ArgumentGroup, flag: str, env: str,
            **kwargs: object) -> None:
    parser.add_argument(flag, action=EnvDefault, env=env, **kwargs)  # type: ignore[arg-type]


def read_secret(secret_file: str | None, env: str = "COLO_SECRET") -> bytes:
    """The per-VM key, from a file (pods mount the Secret) or the environment."""
    if secret_file:
        data = Path(secret_file).read_bytes().strip()
    else:
        data = os.environ.get(env, "").encode()
    if len(data) < 16:
        raise ValueError(
            "the per-VM secret is missing or shorter than 16 bytes: give --secret-file PATH "
            f"or set {env}"
        )
    return data


@dataclass(frozen=True)
class FailoverTimings:
    heartbeat_interval: float
    heartbeat_timeout: float
    lease_duration: float

    def __post_init__(self) -> None:
        if self.heartbeat_interval <= 0:
            raise ValueError("--heartbeat-interval-ms must be positive")
        if self.heartbeat_timeout <= self.heartbeat_interval:
            raise ValueError("--heartbeat-timeout-ms must be greater than --heartbeat-interval-ms")
        if self.lease_duration <= self.heartbeat_interval:
            raise ValueError("--lease-duration-ms must be greater than --heartbeat-interval-ms")
