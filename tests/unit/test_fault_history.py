"""The fault campaigns' checker (`benchmarks/_history.py`): what it calls lost, a counter
out of bounds, an acknowledgement from a fenced primary, and the worst unavailability."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import pytest

_MODULE = Path(__file__).resolve().parents[2] / "benchmarks" / "_history.py"


@pytest.fixture(scope="module")
def history_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("colo_fault_history", _MODULE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["colo_fault_history"] = module
    spec.loader.exec_module(module)
    return module


class Store:
    """A guest as the checker reads it: MGET and GET."""

    def __init__(self, data: dict[str, bytes]) -> None:
        self.data = data

    def mget(self, keys: Sequence[str], window: int = 1) -> list[bytes | None]:
        return [self.data.get(k) for k in keys]

    def call(self, *args: str) -> bytes | None:
        assert args[0] == "GET"
        return self.data.get(args[1])


def test_a_missing_or_changed_key_is_lost_and_the_counter_is_bounded(history_module: ModuleType) -> None:
    h = history_module.History(acked={"a:1": 1, "a:2": 2, "b:1": 1}, acked_incr=3, attempted_incr=5)
    store = Store({"a:1": b"1", "a:2": b"9", "counter": b"4"})
    assert history_module.check(store, h) == (["a:2", "b:1"], None)
    store.data["counter"] = b"2"
    assert history_module.check(store, h)[1] == "counter 2 outside [3, 5]"
    store.data["counter"] = b"6"
    assert history_module.check(store, h)[1] == "counter 6 outside [3, 5]"
    del store.data["counter"]
    assert history_module.check(store, h)[1] == "counter 0 outside [3, 5]"


def test_only_a_request_sent_after_the_term_was_taken_is_a_fenced_acknowledgement(
    history_module: ModuleType,
) -> None:
    h = history_module.History(acks_by=[("old", 9.0), ("old", 10.5), ("new", 11.0)])
    found = history_module.fenced_acks(h, {"old": 10.0})
    assert len(found) == 1 and found[0].startswith("old acknowledged a request sent 0.500s after")


def test_worst_gap_counts_the_edges_of_the_window(history_module: ModuleType) -> None:
    assert history_module.worst_gap([1.0, 2.0, 2.5, 9.0], 0.0, 3.0) == 1.0
    assert history_module.worst_gap([1.0], 0.0, 5.0) == 4.0
    assert history_module.worst_gap([], 2.0, 5.0) == 3.0
