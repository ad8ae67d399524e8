#!/usr/bin/env python3
"""Fault campaign on the local cluster: a seeded random schedule of node kills, node
partitions, API server outages and operator kills in the middle of a transition, against one
ColoVM under load, and a checker over what its clients saw.

The local control plane and three process nodes (`tests/e2e/cluster`: needs root and the
binaries `bash .ci/e2e-tools` builds), the chart installed, one ColoVM. Clients write unique
keys and one INCRs a counter through the ready endpoint of the VM's Service (endpoint
addresses, never the service CIDR; while the API server is down they keep the last one they
saw). Before each fault the VM is Protected and its secondary commits epochs; after it, once
Protected again, the history is checked as in `faults.py` (`_history.py`): every acknowledged
write present on the primary, the counter between the acknowledged and attempted INCRs, and no
acknowledgement of a request sent after its primary's term was taken (the promoted agent's
`arbiter: took term`).

Faults:

- `node_kill`: the primary's or the secondary's node killed; once Protected again on the
  other two, it is revived (the replacement for the next fault).
- `node_partition`: the primary isolated from every node and the API server (failover; two
  probes stay attached to the old primary until after the heal), the primary cut from the
  secondary only, the primary cut from the API server only, or the secondary isolated; healed
  after a few seconds.
- `apiserver_stop`: kube-apiserver killed for 10-40 s and started again; the data plane must
  keep serving meanwhile (acknowledgements during the outage are counted).
- `operator_kill`: the primary's (failover) or the secondary's (re-protection) node killed,
  and every operator pod's processes SIGKILLed while the transition is in progress; their
  runners restart them.

    sudo .venv/bin/python benchmarks/faults_cluster.py [--faults 30] [--seed 1] [--mode checkpoint]
        [--kinds node_kill,node_partition,apiserver_stop,operator_kill]

Prints a summary line and writes benchmarks/results/faults-cluster.json (with `--kinds`, a
subset: faults-cluster-<kinds>.json).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import kubernetes
from _cluster import with_operator
from _common import write_results
from _history import History, Tally, client_loop, failed, summary
from cluster import LocalCluster
from operator_e2e import RELEASE, RELEASE_NAMESPACE, colovm, kubectl_apply, logged_at, wait_for
from support.resp import RespClient

KINDS = ("node_kill", "node_partition", "apiserver_stop", "operator_kill")
PARTITIONS = ("primary_isolated", "primary_from_secondary", "primary_from_apiserver", "secondary_isolated")
NAMESPACE, VM = "colo-chaos", "chaos"
CLIENT_PORT = 6379
WRITERS = 3
PROTECTED_TIMEOUT = 300.0
MEMORY = "64Mi"
# Seconds between a writer's requests: an unprotected primary answers at once, and unpaced
# writers would fill the guest within a campaign.
PACE = 0.01


@dataclass(frozen=True)
class Endpoint:
    """The Service's one ready endpoint: the primary's pod and its client address."""

    name: str
    address: tuple[str, int]

    def client(self, timeout: float = 5.0) -> RespClient:
        return RespClient.connect(*self.address, timeout=timeout)


@dataclass
class World:
    """The cluster, the VM's status and Service as the campaign sees them, and who was fenced."""

    local: LocalCluster
    api: Any
    current: Endpoint | None = None
    fenced: dict[str, float] = field(default_factory=dict)  # pod -> when its term was taken (monotonic)
    both_ready: int = 0  # polls that saw two ready endpoints
    stop: threading.Event = field(default_factory=threading.Event)

    def status(self) -> dict[str, Any]:
        """The ColoVM's status ({} while the API server does not answer)."""
        try:
            vm = kubernetes.client.CustomObjectsApi(self.api).get_namespaced_custom_object(
                "colo.dev", "v1alpha1", NAMESPACE, "colovms", VM, _request_timeout=3)
        except Exception:  # an API server outage or a slow one: nothing known now
            return {}
        return dict(vm.get("status") or {})

    def endpoint(self) -> Endpoint | None:
        return self.current

    def poll_endpoints(self) -> None:
        """Follow the Service's ready endpoint; keep the last one while the API server is away."""
        discovery = kubernetes.client.DiscoveryV1Api(self.api)
        while not self.stop.wait(0.1):
            try:
                slices = discovery.list_namespaced_endpoint_slice(
                    NAMESPACE, label_selector=f"kubernetes.io/service-name={VM}", _request_timeout=2)
            except Exception:  # an outage: clients keep the address they have
                continue
            ready = [Endpoint(e.target_ref.name if e.target_ref else a, (a, CLIENT_PORT))
                     for s in slices.items for e in s.endpoints or []
                     if e.conditions is not None and e.conditions.ready for a in e.addresses or []]
            if len(ready) > 1:
                self.both_ready += 1
                continue
            found = ready[0] if ready else None
            if found != self.current:
                self.current = found

    def protected(self, avoid: Collection[str] = ()) -> dict[str, Any] | None:
        s = self.status()
        primary, secondary = s.get("primary") or {}, s.get("secondary") or {}
        ok = (s.get("phase") == "Protected" and not s.get("transition") and secondary.get("synced")
              and primary.get("node") not in avoid and secondary.get("node") not in avoid)
        return s if ok else None

    def wait_protected(self, avoid: Collection[str] = ()) -> dict[str, Any]:
        """Protected (on nodes outside `avoid`), the secondary committing epochs, and the
        clients' endpoint on the primary."""
        seen = int(wait_for(lambda: self.protected(avoid), PROTECTED_TIMEOUT, "Protected").get("epoch") or 0)
        s = wait_for(lambda: (n := self.protected(avoid)) and int(n.get("epoch") or 0) > seen and n,
                     PROTECTED_TIMEOUT, "the secondary committing epochs")
        wait_for(lambda: self.current is not None and self.current.name == s["currentPrimary"], 60,
                 "the Service on the primary")
        return s

    def nodes_ready(self) -> None:
        wait_for(lambda: all(self._node_ready(n) for n in self.local.node_names), 180, "every node Ready")

    def _node_ready(self, name: str) -> bool:
        try:
            return self.local.node_ready(name) == "True"
        except Exception:
            return False

    def note_promotion(self, before: dict[str, Any], after: dict[str, Any]) -> bool:
        """Fence the old primary at the moment its successor took the term; True if there was one."""
        old, new = before.get("currentPrimary"), after.get("currentPrimary")
        if not old or old == new:
            return False
        took = logged_at(self.local.pod_log(NAMESPACE, new, "agent"), "arbiter: took term")
        # An agent that logs no such line: the fence is when the campaign first saw the promotion.
        self.fenced[old] = time.monotonic() - (time.time() - took) if took else time.monotonic()
        return True

    def operator_pods(self) -> list[tuple[str, str, str]]:
        """(pod, node, address) of each operator replica."""
        pods = kubernetes.client.CoreV1Api(self.api).list_namespaced_pod(
            RELEASE_NAMESPACE, label_selector=f"app.kubernetes.io/instance={RELEASE}", _request_timeout=5)
        return [(p.metadata.name, p.spec.node_name, p.status.pod_ip) for p in pods.items
                if p.status is not None and p.status.pod_ip]


@dataclass
class Figures:
    """What the faults themselves showed, beyond the history."""

    partitions: Counter[str] = field(default_factory=Counter)
    operator_kills: list[dict[str, Any]] = field(default_factory=list)
    outages: list[dict[str, Any]] = field(default_factory=list)
    promotions: int = 0
    recovery_s: dict[str, list[float]] = field(default_factory=dict)
    interrupted: str | None = None


@contextlib.contextmanager
def _probes(world: World, history: History, target: Endpoint) -> Iterator[None]:
    """Two clients that stay on `target` (a primary about to be cut off) whatever the Service
    says, reconnecting until the block ends; each connection writes keys of its own."""
    stop = threading.Event()

    def probe(i: int) -> None:
        for attempt in range(10**6):
            if stop.is_set():
                return
            client_loop(world.endpoint, f"probe-{target.name}-{i}-{attempt}", history, stop, False,
                        pinned=target, reply_timeout=1.0)
            stop.wait(0.2)

    threads = [threading.Thread(target=probe, args=(i,), daemon=True) for i in range(2)]
    for t in threads:
        t.start()
    try:
        yield
    finally:
        stop.set()
        for t in threads:
            t.join(30)


def _say(what: str) -> None:
    print(f"    {time.strftime('%H:%M:%S')} {what}", flush=True)


def _node_kill(world: World, rng: random.Random, st: dict[str, Any]) -> None:
    victim = rng.choice([st["primary"]["node"], st["secondary"]["node"]])
    _say(f"node_kill: {victim}, the {'primary' if victim == st['primary']['node'] else 'secondary'}'s node")
    world.local.kill_node(victim)
    try:
        world.wait_protected(avoid={victim})
    finally:
        world.local.revive_node(victim)


def _node_partition(world: World, rng: random.Random, st: dict[str, Any], history: History,
                    figures: Figures) -> None:
    variant = rng.choice(PARTITIONS)
    figures.partitions[variant] += 1
    _say(f"node_partition: {variant}")
    local = world.local
    p, s = st["primary"]["node"], st["secondary"]["node"]
    try:
        if variant == "primary_isolated":
            assert world.current is not None
            with _probes(world, history, world.current):
                for n in local.node_names:
                    if n != p:
                        local.partition(p, n)
                local.partition_from_apiserver(p)
                old = st["currentPrimary"]
                wait_for(lambda: (n := world.status()).get("currentPrimary") not in (None, old)
                         and not n.get("transition"), PROTECTED_TIMEOUT, "the failover from the primary")
                time.sleep(rng.uniform(1, 5))
                local.heal()
                time.sleep(2)  # the old primary, reachable again, must stay silent
        elif variant == "secondary_isolated":
            for n in local.node_names:
                if n != s:
                    local.partition(s, n)
            local.partition_from_apiserver(s)
            time.sleep(rng.uniform(2, 15))
        elif variant == "primary_from_secondary":
            local.partition(p, s)
            time.sleep(rng.uniform(2, 15))
        else:
            local.partition_from_apiserver(p)
            time.sleep(rng.uniform(5, 20))
    finally:
        local.heal()
    world.wait_protected()


def _apiserver_stop(world: World, rng: random.Random, st: dict[str, Any], history: History,
                    figures: Figures) -> None:
    seconds = rng.uniform(10, 40)
    _say(f"apiserver_stop: {seconds:.0f} s")
    stopped = time.monotonic()
    world.local.stop_apiserver()
    try:
        time.sleep(seconds)
    finally:
        back = time.monotonic()
        world.local.start_apiserver()
    with history.lock:
        during = [t for t in history.ack_times if stopped <= t <= back]
    after = world.wait_protected()
    figures.outages.append({
        "seconds": round(back - stopped, 1), "acknowledged": len(during),
        "worst_gap_s": round(max((b - a for a, b in zip([stopped, *during], [*during, back], strict=True)),
                                 default=back - stopped), 3),
        "term_changed": after.get("term") != st.get("term"),
    })


def _operator_kill(world: World, rng: random.Random, st: dict[str, Any], figures: Figures) -> None:
    failover = rng.random() < 0.5
    victim = st["primary"]["node"] if failover else st["secondary"]["node"]
    _say(f"operator_kill: during the {'failover' if failover else 're-protection'} after killing {victim}")
    pods = world.operator_pods()
    world.local.kill_node(victim)
    try:
        if failover:
            mid = wait_for(lambda: (s := world.status()).get("transition") and s, 120, "a failover", 0.05)
        else:
            mid = wait_for(lambda: (s := world.status()).get("secondary", {}).get("node")
                           not in (None, victim) and s, 180, "a new secondary", 0.05)
        time.sleep(rng.uniform(0, 1.0))
        killed = [pod for pod, node, ip in pods if node != victim and _kill_quietly(world, ip)]
        late = world.status()
        step = (mid.get("transition") or {}).get("step") or mid.get("phase")
        _say(f"operator pods killed at {step}: {killed}")
        figures.operator_kills.append({
            "during": "failover" if failover else "reprotection", "step": step,
            "still_in_progress": (bool(late.get("transition")) if failover
                                  else not (late.get("secondary") or {}).get("synced")),
            "killed": killed,
        })
        world.wait_protected(avoid={victim})
    finally:
        world.local.revive_node(victim)


def _kill_quietly(world: World, ip: str) -> bool:
    try:
        world.local.kill_pod(ip)
    except ValueError:
        return False
    return True


def _inject(kind: str, world: World, rng: random.Random, st: dict[str, Any], history: History,
            figures: Figures) -> None:
    if kind == "node_kill":
        _node_kill(world, rng, st)
    elif kind == "node_partition":
        _node_partition(world, rng, st, history, figures)
    elif kind == "apiserver_stop":
        _apiserver_stop(world, rng, st, history, figures)
    else:
        _operator_kill(world, rng, st, figures)


def schedule(seed: int, faults: int, kinds: tuple[str, ...] = KINDS) -> list[str]:
    """The seeded order of fault kinds."""
    rng = random.Random(seed)
    return [rng.choice(kinds) for _ in range(faults)]


def run_campaign(local: LocalCluster, faults: int, seed: int, mode: str,
                 kinds: tuple[str, ...] = KINDS) -> dict[str, Any]:
    """One seeded campaign on a started cluster; returns its figures."""
    planned = schedule(seed, faults, kinds)
    rng = random.Random(seed + 1)  # timings and victims
    cluster = with_operator(local, NAMESPACE, "--set-json", "operator.pollIntervalSeconds=0.5")
    kubectl_apply(cluster, NAMESPACE, colovm(VM, guest={"memory": MEMORY}, replication={"mode": mode}))
    world = World(local, kubernetes.config.new_client_from_config(config_file=str(local.kubeconfig)))
    history, figures, tally = History(), Figures(), Tally(f"cluster ({mode})", faults)
    threading.Thread(target=world.poll_endpoints, daemon=True).start()
    clients = [threading.Thread(target=client_loop, args=(world.endpoint, name, history, world.stop, counter),
                                kwargs={"reply_timeout": 2.0, "pause": PACE})
               for name, counter in [*((f"w{i}", False) for i in range(WRITERS)), ("incr", True)]]
    started = time.monotonic()
    try:
        world.wait_protected()
        for t in clients:
            t.start()
        for i, kind in enumerate(planned):
            if stopping.is_set():
                figures.interrupted = f"before fault {i + 1}"
                break
            try:
                world.nodes_ready()
                before = world.wait_protected()
                time.sleep(rng.uniform(0.5, 2.0))
                t0 = time.monotonic()
                _inject(kind, world, rng, before, history, figures)
                after = world.wait_protected()
            except Exception as exc:  # not recovered in time, or the harness failed: a finding
                tally.failed(i, kind, exc)
                print(f"  NOT RECOVERED after fault {i + 1} ({kind}): {exc!r}; status {world.status()}",
                      flush=True)
                break
            figures.recovery_s.setdefault(kind, []).append(round(time.monotonic() - t0, 1))
            figures.promotions += world.note_promotion(before, after)
            if not tally.after_fault(i, kind, t0, history, lambda: _primary_client(world)):
                break
    finally:
        world.stop.set()
        for t in clients:
            t.join(30)
        world.api.close()
    return _figures(seed, mode, tally, history, world, figures, time.monotonic() - started)


def _primary_client(world: World) -> RespClient:
    endpoint = world.current
    if endpoint is None:
        raise ConnectionError("no ready endpoint")
    return endpoint.client(timeout=60.0)


def _figures(seed: int, mode: str, tally: Tally, history: History, world: World, figures: Figures,
             seconds: float) -> dict[str, Any]:
    recovery = {k: {"min": min(v), "median": statistics.median(v), "max": max(v)}
                for k, v in sorted(figures.recovery_s.items())}
    return {
        "mode": mode, "seed": seed, **tally.figures(history, world.fenced),
        "promotions": figures.promotions, "partitions": dict(sorted(figures.partitions.items())),
        "operator_kills": figures.operator_kills, "apiserver_outages": figures.outages,
        "two_ready_endpoints_seen": world.both_ready, "recovery_s": recovery,
        "interrupted": figures.interrupted,
        "seconds": round(seconds, 1),
    }


def summary_line(r: dict[str, Any]) -> str:
    outages = r["apiserver_outages"]
    served = sum(1 for o in outages if o["acknowledged"])
    kills = r["operator_kills"]
    mid = sum(1 for k in kills if k["still_in_progress"])
    label = f"cluster ({r['mode']}{', interrupted ' + r['interrupted'] if r.get('interrupted') else ''})"
    return summary(label, r,
                   f"{r['promotions']} promotions; API server outages served through "
                   f"{served}/{len(outages)}; "
                   f"operator kills mid-transition {mid}/{len(kills)}; ")


# Set by SIGTERM or SIGINT: the campaign ends after the fault in progress, with its figures.
stopping = threading.Event()


def _interrupted(signum: int, frame: object) -> None:
    if stopping.is_set():
        raise KeyboardInterrupt
    stopping.set()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--faults", type=int, default=30, help="faults (default: %(default)s)")
    p.add_argument("--seed", type=int, default=1, help="schedule seed (default: %(default)s)")
    p.add_argument("--mode", choices=["checkpoint", "lockstep"], default="checkpoint")
    p.add_argument("--kinds", default=",".join(KINDS), help="fault kinds to draw from (default: %(default)s)")
    p.add_argument("--keep-logs", action="store_true", help="keep the cluster's logs")
    args = p.parse_args()
    if os.geteuid() != 0:
        p.error("the local cluster needs root (network namespaces)")
    kinds = tuple(args.kinds.split(","))
    if not kinds or set(kinds) - set(KINDS):
        p.error(f"--kinds: a comma-separated subset of {','.join(KINDS)}")
    # SIGTERM (or SIGINT, which a shell's background job ignores) ends the campaign after the
    # fault in progress; a second one at once, and the cluster is torn down.
    signal.signal(signal.SIGTERM, _interrupted)
    signal.signal(signal.SIGINT, _interrupted)
    local = LocalCluster(3, keep_logs=args.keep_logs)
    local.start()
    result: dict[str, Any] | None = None
    try:
        result = run_campaign(local, args.faults, args.seed, args.mode, kinds)
    finally:
        local.stop(failed=result is None or failed(result))
    print(summary_line(result))
    load = os.getloadavg()
    name = "faults-cluster" if kinds == KINDS else "faults-cluster-" + "-".join(kinds)
    write_results(name, {"load_average": load, "kinds": list(kinds), "runs": [result]})
    print(f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    return 1 if failed(result) else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
