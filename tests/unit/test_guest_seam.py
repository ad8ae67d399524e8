"""The backend seam: capabilities checked once, backends chosen by name, `--backend` parsed."""

from __future__ import annotations

from typing import Any

import pytest

from colo_agent.backends import BACKENDS, create_guest
from colo_agent.cli import build_parser
from colo_agent.guest import Capabilities, GuestOptions


class _Offers:
    """A guest that offers what it is told to (the capability methods only)."""

    def __init__(self, **offers: Any) -> None:
        self._offers = offers

    def page_log(self) -> Any:
        return self._offers.get("pages")

    def migration_stream(self) -> Any:
        return self._offers.get("stream")

    def client_nic(self) -> Any:
        return self._offers.get("clients")

    def mirrored_nic(self) -> Any:
        return self._offers.get("mirror")


def test_a_backend_offers_exactly_one_way_to_replicate() -> None:
    with pytest.raises(ValueError, match="exactly one of page_log"):
        Capabilities.of(_Offers(clients=object()))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="exactly one of page_log"):
        Capabilities.of(_Offers(pages=object(), stream=object(), clients=object()))  # type: ignore[arg-type]


def test_a_page_log_backend_needs_a_client_nic() -> None:
    with pytest.raises(ValueError, match="needs client_nic"):
        Capabilities.of(_Offers(pages=object()))  # type: ignore[arg-type]


def test_a_stream_backend_may_serve_clients_itself() -> None:
    stream = object()
    caps = Capabilities.of(_Offers(stream=stream))  # type: ignore[arg-type]
    assert caps.stream is stream and caps.pages is None and caps.clients is None


def test_unknown_backend_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown backend 'vmware'; known: microvm, qemu"):
        create_guest("vmware", GuestOptions(4 << 20))


def test_the_micro_vm_offers_pages_clients_and_a_mirrored_nic() -> None:
    guest = create_guest("microvm", GuestOptions(4 << 20, accel="tcg"))
    try:
        caps = Capabilities.of(guest)
        assert caps.pages is not None and caps.clients is not None and caps.mirror is not None
        assert caps.stream is None
        assert caps.pages.page_count * 4096 == guest.ram_size == 4 << 20
        assert not guest.running
    finally:
        guest.stop()


def _run_args(*extra: str) -> Any:
    return build_parser().parse_args(["run", "--role", "primary", "--arbiter", "file:/x", *extra])


def test_backend_flag_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _run_args().backend == "microvm"
    assert set(BACKENDS) >= {"microvm"}
    with pytest.raises(SystemExit):
        _run_args("--backend", "vmware")
    monkeypatch.setenv("COLO_BACKEND", "from-env")
    assert _run_args().backend == "from-env"  # checked by create_guest, which names the known ones
    assert _run_args("--backend", "microvm").backend == "microvm"
