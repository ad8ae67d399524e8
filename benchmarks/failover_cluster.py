#!/usr/bin/env python3
"""Failover on the local cluster: from a node kill to the first write the new primary acknowledges.

Starts the local control plane and three process nodes (`tests/e2e/cluster`: needs root and the
binaries `bash .ci/e2e-tools` builds), installs the chart, and per run applies a ColoVM, waits
until it is Protected with a client writing through the Service's ready endpoint, kills the
primary's node and times where the seconds go:

- detection: the kill -> the operator's decision (the failover transition starts;
  `status.lastFailover.time - durationMs`),
- decision -> lease: the operator's steps, its promote call and the target's wait for the Lease
  (the agent logs `arbiter: took term`),
- promotion: the Lease taken -> the agent serves as primary (it logs `promoted with term`),
- service: the kill -> the Service's only ready endpoint is the new primary,
- first write: the kill -> the first write acknowledged once every process of the old node is
  dead (only the new primary can acknowledge it),

then checks that every acknowledged write is on the new primary, revives the node and deletes the
VM. Each run also records the 1-minute load average at the kill and whether the kill took the
active operator replica with it (`operator_on_killed_node`): then the decision waits for a
standby replica to take over through kopf peering, about 10 s. Prints min/median/max of each
over the runs and writes benchmarks/results/failover_cluster.json.

    sudo .venv/bin/python benchmarks/failover_cluster.py [--runs 5] [--grace 40]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import kubernetes
from _cluster import with_operator
from _common import write_results
from cluster import LocalCluster
from cluster.testing import ClusterHandle, ready_endpoints
from operator_e2e import (
    RELEASE_NAMESPACE,
    Writer,
    colovm,
    cvm_status,
    kubectl_apply,
    logged_at,
    missing,
    wait_for,
    wall_time,
)

NAMESPACE = "colo-failover-bench"
CLIENT_PORT = 6379
PHASES = ("detection_s", "decision_to_lease_s", "promotion_s", "service_s", "first_write_s")


def _status(cluster: ClusterHandle, name: str) -> dict[str, Any]:
    return cvm_status(cluster, NAMESPACE, name)


def _operator_on(cluster: ClusterHandle, node: str) -> str:
    """Which operator replica the kill of `node` takes with it: "active", "standby" or "none".
    When it is the active one, the decision waits for a standby to take over (kopf peering)."""
    pods = json.loads(cluster.kubectl("get", "pods", "-n", RELEASE_NAMESPACE, "-o", "json").stdout)["items"]
    here = [p["metadata"]["name"] for p in pods if p["spec"].get("nodeName") == node]
    if not here:
        return "none"  # no operator replica ran there
    found = cluster.kubectl("get", "clusterkopfpeering", "-o", "json", check=False)
    peers: dict[str, Any] = {}
    if found.returncode == 0:
        for item in json.loads(found.stdout)["items"]:
            peers.update(item.get("status") or {})
    names = [p["metadata"]["name"] for p in pods]
    if not any(pod in who for who in peers for pod in names):
        return "unknown"  # kopf's identities do not name the pods (no POD_ID): cannot tell
    active = max(peers, key=lambda who: peers[who].get("priority", 0))
    return "active" if any(pod in active for pod in here) else "standby"


def one_run(cluster: ClusterHandle, api: Any, name: str) -> dict[str, Any]:
    kubectl_apply(cluster, NAMESPACE, colovm(name))
    before = wait_for(lambda: (s := _status(cluster, name)).get("phase") == "Protected"
                      and not s.get("transition") and s, 300, "Protected")
    primary, secondary = before["primary"], before["secondary"]
    new = (secondary["address"], CLIENT_PORT)

    def endpoint() -> tuple[str, int] | None:
        try:
            found = ready_endpoints(api, NAMESPACE, name)
        except Exception:  # a busy API server: the next try will do
            return None
        return found[0] if len(found) == 1 else None

    wait_for(lambda: endpoint() == (primary["address"], CLIENT_PORT), 60, "the Service on the primary")
    writer = Writer("k", endpoint, reply_timeout=1.0).start()
    try:
        wait_for(lambda: len(writer.acknowledged) >= 50, 60, "writes acknowledged by the primary")
        operator = _operator_on(cluster, primary["node"])
        load = round(os.getloadavg()[0], 1)
        kill_wall, kill_mono = time.time(), time.monotonic()
        cluster.kill_node(primary["node"])
        dead = time.monotonic()  # from here on no process of the old node can answer
        try:
            service_s = wait_for(lambda: endpoint() == new and time.monotonic() - kill_mono, 120,
                                 "the Service on the new primary", interval=0.05)
            first = wait_for(lambda: next((t for t in list(writer.ack_times) if t > dead), None), 60,
                             "a write acknowledged by the new primary", interval=0.05)
            after = wait_for(lambda: (s := _status(cluster, name)).get("currentPrimary") == secondary["pod"]
                             and not s.get("transition") and s, 120, "the promotion recorded")
        finally:
            writer.finish()
            cluster.revive_node(primary["node"])
        record = after["lastFailover"]
        recorded = wall_time(record["time"])
        decided = recorded - record["durationMs"] / 1000
        log = cluster.pod_log(NAMESPACE, secondary["pod"], "agent")
        leased = logged_at(log, "arbiter: took term")
        promoted = logged_at(log, "promoted with term")
        lost = missing(new, dict(writer.acknowledged))
    finally:
        writer.stop.set()
        cluster.kubectl("delete", "cvm", name, "-n", NAMESPACE, "--wait=true", "--timeout=120s", check=False)
    return {
        "vm": name, "cause": record["cause"], "acknowledged_writes": len(writer.acknowledged),
        "lost_writes": len(lost),
        "detection_s": round(decided - kill_wall, 3),
        "decision_to_lease_s": None if leased is None else round(leased - decided, 3),
        "promotion_s": None if leased is None or promoted is None else round(promoted - leased, 3),
        "recorded_s": round(recorded - kill_wall, 3),
        "service_s": round(service_s, 3),
        "first_write_s": round(first - kill_mono, 3),
        "load_1m": load,
        "operator_on_killed_node": operator,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5, help="failovers to time (default: %(default)s)")
    p.add_argument("--grace", type=int, default=40,
                   help="the controller manager's node-monitor grace period, s (default: %(default)s, "
                        "the Kubernetes default before 1.32)")
    args = p.parse_args()
    if os.geteuid() != 0:
        p.error("the local cluster needs root (network namespaces)")
    local = LocalCluster(3, node_monitor_grace_seconds=args.grace)
    local.start()
    runs: list[dict[str, Any]] = []
    try:
        cluster = with_operator(local, NAMESPACE)
        api = kubernetes.config.new_client_from_config(config_file=str(local.kubeconfig))
        for i in range(args.runs):
            wait_for(lambda: all(local.node_ready(n) == "True" for n in local.node_names), 120, "nodes Ready")
            run = one_run(cluster, api, f"fo-{i}")
            runs.append(run)
            print("  " + " ".join(f"{k}={v}" for k, v in run.items()), flush=True)
        api.close()
    finally:
        local.stop()
    summary = {}
    for key in (*PHASES, "recorded_s"):
        values = [r[key] for r in runs if r[key] is not None]
        if values:
            summary[key] = {"min": min(values), "median": statistics.median(values), "max": max(values)}
            print(f"{key:22s} min {min(values):6.2f}  median {statistics.median(values):6.2f}  "
                  f"max {max(values):6.2f}")
    survived = [r["first_write_s"] for r in runs if r["operator_on_killed_node"] in ("none", "standby")]
    if survived and len(survived) < len(runs):
        summary["first_write_s_operator_survived"] = {
            "runs": len(survived), "min": min(survived), "median": statistics.median(survived),
            "max": max(survived),
        }
        print(f"{'first_write_s':22s} min {min(survived):6.2f}  median {statistics.median(survived):6.2f}  "
              f"max {max(survived):6.2f}  ({len(survived)} runs known to leave the active operator alive)")
    load = os.getloadavg()
    print(f"lost writes {sum(r['lost_writes'] for r in runs)}; load average {load[0]:.1f} {load[1]:.1f} "
          f"{load[2]:.1f}")
    write_results("failover_cluster", {"grace_s": args.grace, "runs": runs, "summary": summary,
                                       "load_average": load})
    return 1 if any(r["lost_writes"] for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
