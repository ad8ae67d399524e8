"""Helpers shared by the benchmark scripts: ports, redis-server, redis-benchmark, results."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (there is a race; fine for benchmarks)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(host: str, port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f}s") from None
            time.sleep(0.05)


def require_tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise SystemExit(f"{name} is not installed: install the Debian package {package} (.ci/bootstrap)")
    return path


@contextlib.contextmanager
def redis_server(port: int | None = None) -> Iterator[int]:
    """A throwaway redis-server on a free loopback port, no persistence; yields its port."""
    binary = require_tool("redis-server", "redis-server")
    port = port or free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--daemonize", "no", "--logfile", ""],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port("127.0.0.1", port)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def redis_benchmark(
    port: int,
    tests: Sequence[str] = ("set", "get"),
    requests: int = 20000,
    clients: int = 10,
    extra: Sequence[str] = (),
    timeout: float = 600.0,
) -> dict[str, dict[str, float]]:
    """Run redis-benchmark --csv and return {test: {rps, avg_ms, p50_ms, p95_ms, p99_ms, ...}}."""
    binary = require_tool("redis-benchmark", "redis-tools")
    cmd = [binary, "-h", "127.0.0.1", "-p", str(port), "-t", ",".join(tests), "-n", str(requests),
           "-c", str(clients), "--csv", *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"redis-benchmark failed ({done.returncode}): {done.stderr.strip()[:500]}")
    return parse_benchmark_csv(done.stdout)


_CSV_FIELDS = {
    "rps": "rps",
    "avg_latency_ms": "avg_ms",
    "min_latency_ms": "min_ms",
    "p50_latency_ms": "p50_ms",
    "p95_latency_ms": "p95_ms",
    "p99_latency_ms": "p99_ms",
    "max_latency_ms": "max_ms",
}


def parse_benchmark_csv(text: str) -> dict[str, dict[str, float]]:
    """Parse redis-benchmark 7's CSV (a header row, then one row per test)."""
    rows = list(csv.DictReader(io.StringIO(text)))
    if not rows or "rps" not in rows[0]:
        raise ValueError(f"not redis-benchmark CSV output: {text[:200]!r}")
    out: dict[str, dict[str, float]] = {}
    for row in rows:
        out[row["test"]] = {ours: float(row[theirs]) for theirs, ours in _CSV_FIELDS.items() if theirs in row}
    return out


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "kvm": os.path.exists("/dev/kvm"),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError):
        info["memory_kib"] = int(Path("/proc/meminfo").read_text().split()[1])
    with contextlib.suppress(OSError):
        info["loadavg"] = Path("/proc/loadavg").read_text().split()[:3]
    return info


def write_results(name: str, results: dict[str, Any]) -> Path:
    """Write `results` plus machine info to benchmarks/results/<name>.json."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    document = {"benchmark": name, "machine": machine_info(), "results": results}
    path.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    return path
