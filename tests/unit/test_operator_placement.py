"""Placement: which nodes may take a replica, and why not."""

from __future__ import annotations

from support.operator_world import node, nodes

from colo_operator.placement import NoSpareNode, Place, place_replica, why_not_eligible
from colo_operator.snapshot import NodeHealth, Taint
from colo_operator.spec import PlacementSpec, Toleration

ZONE = "topology.kubernetes.io/zone"


def test_excludes_the_domain_of_every_occupied_node() -> None:
    world = nodes(
        node("a1", labels={ZONE: "a"}),
        node("a2", labels={ZONE: "a"}),
        node("b1", labels={ZONE: "b"}),
    )
    verdict = place_replica(PlacementSpec(topology_key=ZONE), world, ["a1"])
    assert isinstance(verdict, Place)
    assert verdict.candidates == ("b1",)
    assert verdict.excluded_domains == ("a",)
    assert verdict.excluded_nodes == ("a1",)


def test_same_zone_only_is_no_spare_node_and_says_why() -> None:
    world = nodes(node("a1", labels={ZONE: "a"}), node("a2", labels={ZONE: "a"}))
    verdict = place_replica(PlacementSpec(topology_key=ZONE), world, ["a1"])
    assert isinstance(verdict, NoSpareNode)
    assert "a1: holds a replica" in verdict.message
    assert f"a2: shares {ZONE}=a with a replica" in verdict.message


def test_lost_node_domain_stays_excluded() -> None:
    world = nodes(node("n1", NodeHealth.UNKNOWN), node("n2"), node("n3"))
    verdict = place_replica(PlacementSpec(), world, ["n2", "n1"])
    assert isinstance(verdict, Place) and verdict.candidates == ("n3",)


def test_node_selector_taints_and_tolerations() -> None:
    spec = PlacementSpec(node_selector={"colo": "yes"})
    assert why_not_eligible(node("x"), spec) == "does not match nodeSelector colo=yes"
    assert why_not_eligible(node("x", labels={"colo": "yes"}), spec) is None
    tainted = node("t", taints=(Taint("dedicated", "vm", "NoSchedule"),))
    assert why_not_eligible(tainted, PlacementSpec()) == "taint dedicated=vm:NoSchedule not tolerated"
    equal = PlacementSpec(tolerations=(Toleration(key="dedicated", operator="Equal", value="vm"),))
    assert why_not_eligible(tainted, equal) is None
    wrong_value = PlacementSpec(tolerations=(Toleration(key="dedicated", operator="Equal", value="db"),))
    assert why_not_eligible(tainted, wrong_value) is not None
    exists_all = PlacementSpec(tolerations=(Toleration(operator="Exists"),))
    assert why_not_eligible(tainted, exists_all) is None
    other_effect = PlacementSpec(
        tolerations=(Toleration(key="dedicated", operator="Exists", effect="NoExecute"),)
    )
    assert why_not_eligible(tainted, other_effect) is not None
    soft = node("s", taints=(Taint("hint", None, "PreferNoSchedule"),))
    assert why_not_eligible(soft, PlacementSpec()) is None


def test_missing_topology_label_and_health() -> None:
    assert why_not_eligible(node("x"), PlacementSpec(topology_key=ZONE)) == f"no {ZONE} label"
    assert why_not_eligible(node("x", NodeHealth.NOT_READY), PlacementSpec()) == "NotReady"
    assert why_not_eligible(node("x", unschedulable=True), PlacementSpec()) == "cordoned"


def test_empty_cluster() -> None:
    verdict = place_replica(PlacementSpec(), {}, [])
    assert isinstance(verdict, NoSpareNode) and "no nodes" in verdict.message
