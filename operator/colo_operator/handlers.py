"""kopf wiring: thin handlers that read the world, call `decide`, and apply the plan.

One daemon per ColoVM loops: read a snapshot (the ColoVM, its pods, the
Lease, the node cache, every agent's `/v1/status`), `decide`, apply the
actions in order, write the status, post the events. It runs again at once
when a transition step advanced, when a pod or node of interest changed (the
pod and node watches "kick" it), or after `COLO_POLL_INTERVAL_S`.

Nothing connects at import time: `configure()` (called by `__main__`) records
the settings and the startup handler creates the clients.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import logging
import secrets
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf

from colo_agent.api.identity import vm_identity
from colo_agent.api.models import PeerState, Role

from . import constants as c
from . import manifests, pki
from .agent_client import SUSPECT_TIMEOUT_S, AgentClient, AgentError
from .config import OperatorConfig
from .decide import (
    Action,
    CheckpointAgent,
    CreatePod,
    DeletePod,
    DemoteAgent,
    EnsureObjects,
    LabelPod,
    Plan,
    PromoteAgent,
    TransitionKind,
    decide,
)
from .failover import peer_hears
from .kube import Kube, KubeError, merge_patch
from .metrics import OperatorMetrics, ReconcileError
from .snapshot import (
    UNPOLLED,
    AgentReport,
    NodeHealth,
    NodeView,
    PodView,
    Snapshot,
    VMView,
    lease_view,
    node_view,
    pod_view,
    vm_view,
)
from .spec import SpecError
from .status import ConditionType, EventNote, Reason, false, merge_conditions, should_write

log = logging.getLogger("colo_operator")

# At most this many immediate re-runs in a row, so a decision that keeps
# asking for one can never spin.
MAX_IMMEDIATE_RUNS = 8

VMKey = tuple[str, str]
EventPoster = Callable[[Mapping[str, Any], EventNote], None]


def _kopf_event(body: Mapping[str, Any], note: EventNote) -> None:
    kopf.event(body, type=note.type, reason=note.reason, message=note.message[:1024])  # type: ignore[arg-type]


@dataclass
class Runtime:
    """What the handlers share: clients, caches and the per-VM wake-up events."""

    config: OperatorConfig
    kube: Kube
    agents: AgentClient
    post_event: EventPoster = _kopf_event
    control_port: int = c.CONTROL_PORT
    nodes: dict[str, NodeView] = field(default_factory=dict)
    nodes_listed: bool = False
    kicks: dict[VMKey, asyncio.Event] = field(default_factory=dict)
    tokens: dict[VMKey, str] = field(default_factory=dict)
    summaries: dict[VMKey, str] = field(default_factory=dict)
    failures: dict[VMKey, str] = field(default_factory=dict)
    metrics: OperatorMetrics = field(default_factory=OperatorMetrics)
    # The cluster CA (None with a cert-manager issuer), when its Secret is next read,
    # the operator's own client certificate, and when each VM's certificate is next checked.
    ca: pki.ClusterCa | None = None
    ca_checked: float = 0.0
    credentials: pki.OperatorCredentials | None = None
    tls_checked: dict[VMKey, float] = field(default_factory=dict)
    warned_clear: set[VMKey] = field(default_factory=set)
    # Per VM: the secondary's address and the long poll that kicks the VM when it loses its primary.
    watches: dict[VMKey, tuple[str, asyncio.Task[None]]] = field(default_factory=dict)

    def kick_event(self, key: VMKey) -> asyncio.Event:
        return self.kicks.setdefault(key, asyncio.Event())

    def kick(self, key: VMKey) -> None:
        event = self.kicks.get(key)
        if event is not None:
            event.set()

    def forget(self, key: VMKey) -> None:
        for cache in (self.kicks, self.tokens, self.summaries, self.failures, self.tls_checked):
            cache.pop(key, None)
        self.warned_clear.discard(key)
        self.metrics.forget(key)
        self.unwatch(key)

    def unwatch(self, key: VMKey) -> None:
        watch = self.watches.pop(key, None)
        if watch is not None:
            watch[1].cancel()

    async def close(self) -> None:
        for key in list(self.watches):
            self.unwatch(key)
        await self.agents.aclose()
        self.kube.close()


_settings: dict[str, Any] = {
    "config": OperatorConfig(),
    "kubeconfig": None,
    "peering": None,
    "namespaces": (),
    "metrics_port": 0,
}
_runtime: Runtime | None = None
_metrics_server: Any = None


def configure(
    config: OperatorConfig,
    kubeconfig: str | None = None,
    *,
    peering: str | None = None,
    namespaces: tuple[str, ...] = (),
    metrics_port: int = 0,
) -> None:
    """Record settings for the startup handler (called before kopf runs).

    `peering`: the name of the peering object replicas coordinate through
    (None: standalone); `namespaces`: the watched ones (empty: all);
    `metrics_port`: where /metrics is served (0: nowhere).
    """
    _settings.update(
        config=config,
        kubeconfig=kubeconfig,
        peering=peering,
        namespaces=namespaces,
        metrics_port=metrics_port,
    )


async def ensure_peering(kube: Kube, name: str, namespaces: tuple[str, ...]) -> None:
    """Create the peering object(s) kopf needs before it starts, so a fresh install needs no manual step."""
    if not namespaces:
        body = {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": name}}
        path = "/apis/kopf.dev/v1/clusterkopfpeerings"
        targets = [(path, body)]
    else:
        targets = [
            (
                f"/apis/kopf.dev/v1/namespaces/{ns}/kopfpeerings",
                {
                    "apiVersion": "kopf.dev/v1",
                    "kind": "KopfPeering",
                    "metadata": {"name": name, "namespace": ns},
                },
            )
            for ns in namespaces
        ]
    for path, body in targets:
        try:
            await kube.request(f"create peering {name}", "POST", path, body=body)
        except KubeError as exc:
            if exc.status != 409:
                raise


def runtime() -> Runtime:
    if _runtime is None:
        raise kopf.TemporaryError("the operator is still starting", delay=1)
    return _runtime


# --------------------------------------------------------------------------- one reconcile


async def _nodes(rt: Runtime, pods: tuple[PodView, ...]) -> dict[str, NodeView]:
    # The node watch keeps the cache current; a list fills it before the
    # first events arrive or when a pod names a node the cache lacks.
    if not rt.nodes_listed or any(p.node and p.node not in rt.nodes for p in pods):
        rt.nodes = {view.name: view for view in map(node_view, await rt.kube.list_nodes())}
        rt.nodes_listed = True
    return dict(rt.nodes)


async def _token(rt: Runtime, vm: VMView) -> str:
    key = (vm.namespace, vm.name)
    if key not in rt.tokens:
        value = await rt.kube.get_secret_value(vm.namespace, manifests.Names(vm.name).secret, c.SECRET_KEY)
        if value is None:
            raise KubeError(f"read secret of {vm.namespace}/{vm.name}", 404, "agent key missing")
        rt.tokens[key] = value.decode()
    return rt.tokens[key]


def _failing_over_from(body: Mapping[str, Any]) -> str | None:
    """The pod an unplanned failover in progress moves away from (found lost already)."""
    transition = (body.get("status") or {}).get("transition") or {}
    if TransitionKind.parse(transition.get("kind")) is TransitionKind.FAILOVER:
        frm = transition.get("from")
        return frm if isinstance(frm, str) else None
    return None


async def _poll(
    rt: Runtime, pods: tuple[PodView, ...], nodes: Mapping[str, NodeView], peer: str | None,
    lost: str | None = None, *, heartbeat_timeout_ms: int,
) -> dict[str, AgentReport]:
    """Every running agent's report. `lost`: the pod a failover moves away from; it is asked
    once, briefly (whether it answers again matters, but a dead agent on a node that is
    still Ready must not cost each pass of the failover two full timeouts)."""
    live = [p for p in pods if p.ip and p.phase == "Running" and not p.deleting]

    def suspect(pod: PodView) -> bool:
        node = nodes.get(pod.node or "")
        return node is None or node.health is not NodeHealth.READY or pod.name == lost

    reports = await _ask_all(
        [rt.agents.status(p.ip or "", rt.control_port, peer=peer, suspect=suspect(p)) for p in live],
        heartbeat_timeout_ms,
    )
    if any(r.status is None for r in reports):
        # A silent agent kept this poll waiting for its timeouts, and what its peers said
        # (the age of its last heartbeat) is as old as the start of the poll: ask them again,
        # so a dead primary is judged on a peer's view of now, not of a second ago.
        answered = [i for i, r in enumerate(reports) if r.status is not None]
        fresh = await asyncio.gather(
            *(rt.agents.status(live[i].ip or "", rt.control_port, peer=peer) for i in answered)
        )
        for i, r in zip(answered, fresh, strict=True):
            if r.status is not None:
                reports[i] = r
    out = {p.name: UNPOLLED for p in pods}
    out.update({p.name: r for p, r in zip(live, reports, strict=True)})
    return out


def _lost_its_peer(report: AgentReport, heartbeat_timeout_ms: int) -> bool:
    """The agent answered and says the heartbeat of the peer it had is gone."""
    status = report.status
    return status is not None and status.peer.state is not PeerState.NONE and (
        peer_hears(report, heartbeat_timeout_ms) is False
    )


async def _ask_all(
    polls: list[Coroutine[Any, Any, AgentReport]], heartbeat_timeout_ms: int
) -> list[AgentReport]:
    """Run the polls at once. When an answer says the peer's heartbeat is gone, an agent that
    has not answered is given SUSPECT_TIMEOUT_S more, not its full retries: the two signals
    already agree, and a dead primary would otherwise hold the verdict for seconds of
    timeouts (a wrong verdict costs a needless failover, never two primaries: the Lease)."""
    tasks = [asyncio.ensure_future(poll) for poll in polls]
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Future[AgentReport]] = set(tasks)
    deadline: float | None = None
    while pending:
        wait = None if deadline is None else max(0.0, deadline - loop.time())
        done, pending = await asyncio.wait(pending, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
        if not done:
            break
        if deadline is None and any(_lost_its_peer(t.result(), heartbeat_timeout_ms) for t in done):
            deadline = loop.time() + SUSPECT_TIMEOUT_S
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    cut = AgentReport(
        status=None,
        error=f"no answer within {SUSPECT_TIMEOUT_S:g} s of its peer reporting the heartbeat lost",
    )
    return [cut if t.cancelled() else t.result() for t in tasks]


def _peer(vm: VMView) -> str | None:
    """The name the VM's agents' certificates carry; None when the VM opted out of TLS."""
    return None if vm.spec.replication.insecure_clear else vm_identity(vm.namespace, vm.name)


async def read_world(rt: Runtime, namespace: str, name: str) -> tuple[dict[str, Any], Snapshot] | None:
    body = await rt.kube.get_vm(namespace, name)
    if body is None:
        return None
    vm = vm_view(body)
    raw_pods, raw_lease = await asyncio.gather(
        rt.kube.list_pods(namespace, name), rt.kube.get_lease(namespace, manifests.Names(name).lease)
    )
    pods = tuple(pod_view(p) for p in raw_pods)
    nodes = await _nodes(rt, pods)  # the watch cache, listed only when it lacks a node
    agents = await _poll(rt, pods, nodes, _peer(vm), _failing_over_from(body),
                         heartbeat_timeout_ms=vm.spec.failover.heartbeat_timeout_ms)
    snapshot = Snapshot(
        vm=vm,
        pods=pods,
        nodes=nodes,
        agents=agents,
        lease=None if raw_lease is None else lease_view(raw_lease),
        now=dt.datetime.now(dt.UTC),
        template=manifests.template_hash(vm, rt.config),
    )
    return body, snapshot


async def ensure_objects(rt: Runtime, vm: VMView) -> None:
    """Create (or bring up to date) every object of the VM but its pods. They do not depend on
    one another, so they are written at once: a dozen API calls in a row cost a loaded API
    server's latency a dozen times over, for every ColoVM of a batch applied together."""
    names = manifests.Names(vm.name)

    async def key() -> None:
        if await rt.kube.get("Secret", vm.namespace, names.secret) is None:
            await rt.kube.create(manifests.secret(vm, secrets.token_urlsafe(32)))

    async def create(obj: Mapping[str, Any]) -> None:
        created = await rt.kube.create(obj)
        if not created and obj["kind"] == "Service":
            current = await rt.kube.get("Service", vm.namespace, names.service)
            if current is not None:
                patch = manifests.service_update(vm, current)
                await rt.kube.patch("Service", vm.namespace, names.service, patch, missing_ok=True)

    objects = [manifests.network_policy(vm, rt.config.namespace, rt.config.operator_labels),
               *manifests.base_objects(vm)]  # fmt: skip
    results = await asyncio.gather(
        key(), _ensure_tls(rt, vm, force=True), *map(create, objects), return_exceptions=True
    )
    for result in results:
        if isinstance(result, BaseException):
            raise result


INSECURE_CLEAR_WARNING = (
    "spec.replication.insecureClear is set: guest memory and control requests cross the pod "
    "network in clear, readable and alterable by anyone on the path"
)

# How often a VM's certificate is checked for renewal (it is renewed with a third of its life left).
TLS_CHECK_S = 600.0
# How often the CA Secret is read again (a rotation step reaches every VM within this plus a poll).
CA_CHECK_S = 30.0


async def _refresh_ca(rt: Runtime) -> None:
    """Pick up an edited CA Secret: a rotation step staged, switched or retired."""
    now = asyncio.get_running_loop().time()
    if rt.ca is None or rt.ca_checked > now:
        return
    rt.ca_checked = now + CA_CHECK_S
    ca = await pki.load_ca(rt.kube, rt.config.namespace)
    if ca is None:
        # Deleted: a new CA at once (the emergency rotation of docs/security.md).
        ca = await pki.load_or_create_ca(rt.kube, rt.config.namespace)
    if ca == rt.ca:
        return
    signer = "a new signing CA" if ca.signer != rt.ca.signer else "the same signing CA"
    log.info("the cluster CA Secret changed (%s); updating every VM's certificate Secret", signer)
    rt.ca = ca
    if rt.credentials is not None:
        rt.credentials.update_ca(ca)
    rt.tls_checked.clear()  # every VM is checked again at its next pass


async def _ensure_tls(rt: Runtime, vm: VMView, *, force: bool = False) -> None:
    if vm.spec.replication.insecure_clear:
        return
    await _refresh_ca(rt)
    key = (vm.namespace, vm.name)
    now = asyncio.get_running_loop().time()
    if not force and rt.tls_checked.get(key, 0.0) > now:
        return
    await pki.ensure_vm_tls(rt.kube, rt.config, rt.ca, vm)
    rt.tls_checked[key] = now + TLS_CHECK_S


async def apply(rt: Runtime, s: Snapshot, action: Action) -> None:
    vm = s.vm
    ns = vm.namespace
    if isinstance(action, EnsureObjects):
        await ensure_objects(rt, vm)
    elif isinstance(action, CreatePod):
        await rt.kube.create(manifests.agent_pod(vm, rt.config, action))
    elif isinstance(action, DeletePod):
        await rt.kube.delete_pod(ns, action.name, force=action.force)
    elif isinstance(action, LabelPod):
        await rt.kube.label_pod(ns, action.name, action.role)
    else:
        pod = s.pod(action.pod)
        if pod is None or pod.ip is None:
            raise AgentError(f"pod {action.pod} has no address")
        token = await _token(rt, vm)
        peer = _peer(vm)
        if isinstance(action, PromoteAgent):
            await rt.agents.promote(pod.ip, rt.control_port, token, action.term, peer=peer)
        elif isinstance(action, CheckpointAgent):
            await rt.agents.checkpoint(pod.ip, rt.control_port, token, peer=peer)
        elif isinstance(action, DemoteAgent):
            await rt.agents.demote(pod.ip, rt.control_port, token, peer=peer)


async def reconcile(rt: Runtime, namespace: str, name: str, logger: Any = log) -> bool:
    """One pass; returns True when the plan asks to run again at once."""
    key = (namespace, name)
    try:
        world = await read_world(rt, namespace, name)
    except SpecError as exc:
        rt.metrics.reconcile_failed(ReconcileError.INVALID_SPEC)
        await _report_invalid_spec(rt, namespace, name, exc)
        return False
    if world is None:
        return False
    body, snapshot = world
    if snapshot.vm.deleting:
        return False
    if snapshot.vm.spec.replication.insecure_clear and key not in rt.warned_clear:
        rt.post_event(body, EventNote("Warning", "InsecureClear", INSECURE_CLEAR_WARNING))
        rt.warned_clear.add(key)
    try:
        await _ensure_tls(rt, snapshot.vm)
    except KubeError as exc:
        logger.warning("%s/%s: certificate renewal failed, retried later: %s", namespace, name, exc)
    plan = decide(snapshot)
    if rt.summaries.get(key) != plan.summary:
        logger.info("%s/%s: %s", namespace, name, plan.summary)
        rt.summaries[key] = plan.summary
    for action in plan.actions:
        try:
            await apply(rt, snapshot, action)
        except (KubeError, AgentError) as exc:
            rt.metrics.reconcile_failed(ReconcileError.ACTION)
            failure = f"{type(action).__name__}: {exc}"
            # Retried every poll: report a failure once, not once per retry.
            if rt.failures.get(key) != failure:
                logger.warning("%s/%s: %s", namespace, name, failure)
                rt.post_event(body, EventNote("Warning", "ActionFailed", failure))
                rt.failures[key] = failure
            return False
    rt.failures.pop(key, None)
    await _write_status(rt, snapshot, plan)
    rt.metrics.observe_status(key, snapshot.vm.status, plan.status)
    for note in plan.events:
        rt.post_event(body, note)
    timeout_ms = snapshot.vm.spec.failover.heartbeat_timeout_ms
    watch(rt, key, _watch_target(snapshot, plan), _peer(snapshot.vm), timeout_ms)
    return plan.again


# --------------------------------------------------------------------------- the secondary's long poll

# How long one long poll of the secondary lasts; it is renewed at once.
WATCH_S = 10.0


def _watch_target(s: Snapshot, plan: Plan) -> str | None:
    """The address of the secondary while it hears the primary: it is the first to know when the
    primary is lost (a heartbeat timeout), long before the operator's next poll would ask."""
    if plan.status.get("transition"):
        return None
    current = plan.status.get("currentPrimary")
    for pod in s.pods:
        status = s.agent(pod).status
        if pod.name != current and pod.ip and not pod.deleting and status is not None and (
            status.role is Role.SECONDARY and status.peer.state is PeerState.CONNECTED
        ):
            return pod.ip
    return None


def watch(rt: Runtime, key: VMKey, target: str | None, peer: str | None, timeout_ms: int) -> None:
    """Keep one long poll on `target` (None: none) for the VM `key`."""
    current = rt.watches.get(key)
    if current is not None and current[0] == target and not current[1].done():
        return
    rt.unwatch(key)
    if target is not None:
        task = asyncio.get_running_loop().create_task(_watch_secondary(rt, key, target, peer, timeout_ms))
        rt.watches[key] = (target, task)


async def _watch_secondary(rt: Runtime, key: VMKey, ip: str, peer: str | None, timeout_ms: int) -> None:
    """Long-poll the secondary; kick the VM's reconcile as soon as it stops hearing the primary
    (or cannot be asked), so a failover starts a heartbeat timeout after the loss, not a poll later."""
    loop = asyncio.get_running_loop()
    while True:
        started = loop.time()
        report = await rt.agents.status(
            ip, rt.control_port, peer=peer, wait_s=WATCH_S, heartbeat_within_ms=timeout_ms
        )
        status = report.status
        age = None if status is None else status.peer.last_heartbeat_age_ms
        if status is None or status.peer.state is not PeerState.CONNECTED or (age or 0.0) > timeout_ms:
            rt.kick(key)
            # Until the next reconcile replaces this watch: a failing long poll kicks at most
            # once per poll interval.
            await asyncio.sleep(rt.config.poll_interval_s)
            return
        if loop.time() - started < WATCH_S / 2:
            # Answered at once although nothing changed: an agent that predates the long poll.
            await asyncio.sleep(rt.config.poll_interval_s)


async def _write_status(rt: Runtime, s: Snapshot, plan: Plan) -> None:
    previous = dict(s.vm.status)
    if should_write(previous, plan.status, s.now):
        patch = merge_patch(previous, plan.status)
        if patch:
            await rt.kube.patch_vm_status(s.vm.namespace, s.vm.name, patch)


async def _report_invalid_spec(rt: Runtime, namespace: str, name: str, exc: SpecError) -> None:
    body = await rt.kube.get_vm(namespace, name)
    if body is None:
        return
    status = body.get("status") or {}
    if status.get("message") == str(exc):
        return  # already reported; the poll would otherwise rewrite it every cycle
    now = dt.datetime.now(dt.UTC)
    conditions = merge_conditions(
        status.get("conditions"),
        [false(ConditionType.READY, Reason.INVALID_SPEC, str(exc))],
        now,
        int(body["metadata"].get("generation") or 0),
    )
    await rt.kube.patch_vm_status(namespace, name, {"message": str(exc), "conditions": conditions})
    rt.post_event(body, EventNote("Warning", Reason.INVALID_SPEC.value, str(exc)))


# --------------------------------------------------------------------------- kopf handlers


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    global _runtime, _metrics_server
    config: OperatorConfig = _settings["config"]
    settings.persistence.finalizer = c.FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="operator.colo.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="operator.colo.dev", key="last-handled-configuration"
    )
    settings.posting.level = logging.INFO
    # A standby replica takes over this long after the active one stopped renewing.
    settings.peering.lifetime = 10
    # Kubernetes calls run in worker threads, many ColoVMs at once.
    asyncio.get_running_loop().set_default_executor(concurrent.futures.ThreadPoolExecutor(max_workers=32))
    kube = await asyncio.to_thread(Kube.connect, _settings["kubeconfig"])
    if _settings["peering"]:
        await ensure_peering(kube, _settings["peering"], _settings["namespaces"])
    ca = None if config.cert_issuer else await pki.load_or_create_ca(kube, config.namespace)
    credentials = pki.OperatorCredentials(config, ca)
    _runtime = Runtime(
        config=config,
        kube=kube,
        agents=AgentClient(timeout_s=config.agent_timeout_s, tls=credentials.context),
        ca=ca,
        credentials=credentials,
    )
    if _settings["metrics_port"]:
        from prometheus_client import start_http_server

        port = _settings["metrics_port"]
        _metrics_server, _thread = start_http_server(port, registry=_runtime.metrics.registry)
        log.info("metrics on :%d/metrics", _settings["metrics_port"])


@kopf.on.cleanup()
async def cleanup(**_: Any) -> None:
    global _runtime, _metrics_server
    if _metrics_server is not None:
        await asyncio.to_thread(_metrics_server.shutdown)
        _metrics_server = None
    if _runtime is not None:
        await _runtime.close()
        _runtime = None


@kopf.daemon(c.GROUP, c.VERSION, c.PLURAL, cancellation_timeout=10.0)
async def run_vm(
    namespace: str | None, name: str, stopped: kopf.DaemonStopped, logger: Any, **_: Any
) -> None:
    if namespace is None:  # ColoVMs are namespaced; kopf types it for every resource
        return
    rt = runtime()
    key = (namespace, name)
    kick = rt.kick_event(key)
    immediate = 0
    while not stopped:
        kick.clear()
        started = time.perf_counter()
        try:
            # The operator's own logger: kopf's per-object logger would also turn
            # every decision line into a Kubernetes Event (events are posted explicitly).
            again = await reconcile(rt, namespace, name)
        except Exception:
            rt.metrics.reconcile_failed(ReconcileError.EXCEPTION)
            log.exception("%s/%s: reconcile failed", namespace, name)
            again = False
        rt.metrics.reconcile_seconds.observe(time.perf_counter() - started)
        if again and immediate < MAX_IMMEDIATE_RUNS:
            immediate += 1
            continue
        immediate = 0
        # Sleep until kicked, stopped or the poll interval is over, whichever first.
        waiters = [asyncio.ensure_future(kick.wait()), asyncio.ensure_future(stopped.wait())]
        _done, pending = await asyncio.wait(
            waiters, timeout=rt.config.poll_interval_s, return_when=asyncio.FIRST_COMPLETED
        )
        for waiter in pending:
            waiter.cancel()
    rt.unwatch(key)


@kopf.on.update(c.GROUP, c.VERSION, c.PLURAL)
async def vm_changed(namespace: str | None, name: str, **_: Any) -> None:
    # Spec or annotation changes (a switchover request) are acted on at once.
    runtime().kick((namespace or "", name))


@kopf.on.delete(c.GROUP, c.VERSION, c.PLURAL)
async def vm_deleted(namespace: str | None, name: str, logger: Any, **_: Any) -> None:
    if namespace is None:
        return
    rt = runtime()
    remaining = await rt.kube.delete_vm_objects(namespace, name)
    if remaining:
        # Pods on a lost node never confirm their deletion: do not wait for them.
        pods = tuple(pod_view(raw) for raw in await rt.kube.list_pods(namespace, name))
        nodes = await _nodes(rt, pods)
        for pod in pods:
            node = nodes.get(pod.node or "")
            if pod.deleting and (node is None or node.health is not NodeHealth.READY):
                await rt.kube.delete_pod(namespace, pod.name, force=True)
        raise kopf.TemporaryError(f"waiting for {remaining} agent pod(s) to terminate", delay=1)
    logger.info("%s/%s: everything removed", namespace, name)
    rt.forget((namespace, name))
    await rt.agents.forget(vm_identity(namespace, name))


@kopf.on.event("", "v1", "pods", labels={c.LABEL_MANAGED_BY: c.MANAGED_BY})
async def pod_event(body: Mapping[str, Any], namespace: str | None, **_: Any) -> None:
    vm = (body.get("metadata", {}).get("labels") or {}).get(c.LABEL_VM)
    if vm and namespace and _runtime is not None:
        _runtime.kick((namespace, vm))


@kopf.on.event("", "v1", "nodes")
async def node_event(event: Mapping[str, Any], body: Mapping[str, Any], **_: Any) -> None:
    rt = _runtime
    if rt is None:
        return
    view = node_view(body)
    before = rt.nodes.get(view.name)
    if event.get("type") == "DELETED":
        rt.nodes.pop(view.name, None)
        changed = True
    else:
        rt.nodes[view.name] = view
        changed = before is None or (before.health, before.unschedulable) != (view.health, view.unschedulable)
    if changed:
        for key in list(rt.kicks):
            rt.kick(key)
