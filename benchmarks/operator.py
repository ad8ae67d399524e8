"""Operator benchmark: `kubectl apply` to `Protected` for 1 and for N ColoVMs at once.

Starts the local control plane with three process nodes (tests/e2e/cluster;
needs root and `bash .ci/e2e-tools`), installs the CRD, runs `colo-operator`
as a process of its own (standalone, admin kubeconfig, so its CPU time and
peak RSS can be read from /proc), then for each batch size applies that many
ColoVMs at once and records when each first reaches every phase. Agent pods
are real `colo-agent run` processes on the nodes, so the figures include the
agents' start-up and first sync, not only the operator.

    sudo .venv/bin/python benchmarks/operator.py                 # batches 1 and 20
    sudo .venv/bin/python benchmarks/operator.py --batches 1,5 --memory 16Mi

Writes benchmarks/results/operator.json and prints a summary table. A batch
that does not reach Protected within --timeout is reported with the phases it
did reach (and the operator's status message), never silently dropped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "e2e"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _common import percentile, write_results
from support.crd import install_crd

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("Pending", "Syncing", "Protected", "Degraded", "Failed")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Kubectl:
    def __init__(self, kubeconfig: Path) -> None:
        from cluster import build

        binary = build.bin_dir() / "kubectl"
        self.argv = [str(binary) if binary.exists() else "kubectl", f"--kubeconfig={kubeconfig}"]

    def __call__(self, *args: str, stdin: str | None = None, check: bool = True, timeout: float = 300) -> str:
        result = subprocess.run(
            [*self.argv, *args], input=stdin, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout


def colovm(name: str, memory: str) -> dict[str, Any]:
    return {"apiVersion": "colo.dev/v1alpha1", "kind": "ColoVM", "metadata": {"name": name},
            "spec": {"guest": {"memory": memory}}}  # fmt: skip


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def list_colovms(api: Any, namespace: str) -> dict[str, Any] | None:
    """In-process (no kubectl per poll: forty forks a second would be load of the benchmark's own)."""
    try:
        listing: dict[str, Any] = api.get(f"/apis/colo.dev/v1alpha1/namespaces/{namespace}/colovms",
                                          timeout=10.0)
    except (OSError, RuntimeError):  # a loaded API server may time out one poll: the next one counts
        return None
    return listing


def run_batch(kubectl: Kubectl, api: Any, operator_pid: int, size: int, memory: str,
              timeout: float) -> dict[str, Any]:
    namespace = f"bench-{size}"
    kubectl("create", "namespace", namespace, check=False)
    names = [f"vm-{i:02d}" for i in range(size)]
    documents = "\n---\n".join(json.dumps(colovm(n, memory)) for n in names)
    cpu_before = cpu_seconds(operator_pid)
    load_before = loadavg()
    peak_load = load_before[0]
    started = time.monotonic()
    kubectl("apply", "-n", namespace, "-f", "-", stdin=documents)
    reached: dict[str, dict[str, float]] = {n: {} for n in names}
    last: dict[str, Any] = {}
    while time.monotonic() - started < timeout:
        listing = list_colovms(api, namespace)
        now = time.monotonic() - started
        peak_load = max(peak_load, loadavg()[0])
        if listing is None:
            time.sleep(0.25)
            continue
        for item in listing["items"]:
            name, status = item["metadata"]["name"], item.get("status") or {}
            last[name] = status
            phase = status.get("phase")
            if phase and phase not in reached[name]:
                reached[name][phase] = round(now, 3)
        if all("Protected" in r or "Failed" in r for r in reached.values()):
            break
        time.sleep(0.25)
    cpu_used = cpu_seconds(operator_pid) - cpu_before
    elapsed = time.monotonic() - started
    protected = [r["Protected"] for r in reached.values() if "Protected" in r]
    result: dict[str, Any] = {
        "colovms": size,
        "memory": memory,
        "protected": len(protected),
        "seconds_to_protected": {
            "p50": round(percentile(protected, 50), 3) if protected else None,
            "max": round(max(protected), 3) if protected else None,
        },
        "seconds_to_phase_p50": {
            phase: round(percentile(times, 50), 3)
            for phase in PHASES
            if (times := [r[phase] for r in reached.values() if phase in r])
        },
        "operator_cpu_seconds": round(cpu_used, 3),
        "wall_seconds": round(elapsed, 3),
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "loadavg_1m_peak": peak_load,
        "primary_restarts": sum(int((last.get(n) or {}).get("primaryRestarts") or 0) for n in names),
        "not_protected": {
            n: {
                "phases": sorted(reached[n], key=lambda p, n=n: reached[n][p]),
                "message": (last.get(n) or {}).get("message"),
            }
            for n in names
            if "Protected" not in reached[n]
        },
    }
    print(json.dumps(result, indent=2), flush=True)
    started = time.monotonic()
    try:
        # Forty or a hundred agents wind down on a loaded machine: this can take minutes.
        kubectl("delete", "namespace", namespace, "--timeout=600s", check=False, timeout=660)
    except subprocess.TimeoutExpired:
        print(f"namespace {namespace} still terminating after 660 s", file=sys.stderr)
    result["teardown_seconds"] = round(time.monotonic() - started, 1)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--batches", default="1,20", help="comma-separated batch sizes (default: %(default)s)"
    )
    parser.add_argument("--memory", default="16Mi", help="guest RAM of every ColoVM (default: %(default)s)")
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="seconds per batch (default: %(default)s)"
    )
    parser.add_argument(
        "--poll", type=float, default=0.5, help="operator poll interval, s (default: %(default)s)"
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        print(
            "benchmarks/operator.py needs root (the local cluster uses network namespaces)", file=sys.stderr
        )
        return 2
    from cluster import LocalCluster, build
    from cluster.rest import Kube

    lacking = build.missing()
    if lacking:
        print(
            f"control plane binaries missing ({', '.join(lacking)}): run bash .ci/e2e-tools", file=sys.stderr
        )
        return 2
    sizes = [int(s) for s in args.batches.split(",") if s]
    cluster = LocalCluster(3).start()
    operator: subprocess.Popen[bytes] | None = None
    results: dict[str, Any] = {"batches": [], "poll_interval_s": args.poll}
    try:
        kubectl = Kubectl(cluster.kubeconfig)
        api = Kube.from_kubeconfig(cluster.kubeconfig)
        install_crd(kubectl.argv)  # polls Established: `kubectl wait` fails before any condition
        # The operator keeps the cluster CA in its own namespace (COLO_NAMESPACE, default colo-system).
        kubectl("create", "namespace", "colo-system", check=False)
        log = open(cluster.workdir / "operator.log", "wb")  # noqa: SIM115 - lives as long as the operator
        env = {**os.environ, "COLO_POLL_INTERVAL_S": str(args.poll)}
        operator = subprocess.Popen(
            [str(ROOT / ".venv" / "bin" / "colo-operator"), "--standalone", "--liveness=",
             f"--kubeconfig={cluster.kubeconfig}"],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
        time.sleep(3)
        if operator.poll() is not None:
            raise RuntimeError(f"colo-operator exited at start; see {cluster.workdir / 'operator.log'}")
        for size in sizes:
            batch = run_batch(kubectl, api, operator.pid, size, args.memory, args.timeout)
            results["batches"].append(batch)
        results["operator_peak_rss_mib"] = round(peak_rss_mib(operator.pid), 1)
        results["operator_cpu_seconds_total"] = round(cpu_seconds(operator.pid), 3)
    finally:
        if operator is not None:
            operator.terminate()
            try:
                operator.wait(20)
            except subprocess.TimeoutExpired:
                operator.kill()
        cluster.stop(failed=True)
        print(f"logs: {cluster.workdir}", file=sys.stderr)
    path = write_results("operator", results)
    print(f"\n{'ColoVMs':>8} {'protected':>10} {'p50 s':>8} {'max s':>8} {'operator CPU s':>15}")
    for b in results["batches"]:
        s = b["seconds_to_protected"]
        print(f"{b['colovms']:>8} {b['protected']:>10} {s['p50'] or '-':>8} {s['max'] or '-':>8} "
              f"{b['operator_cpu_seconds']:>15}")  # fmt: skip
    print(f"operator peak RSS {results.get('operator_peak_rss_mib')} MiB; results in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
