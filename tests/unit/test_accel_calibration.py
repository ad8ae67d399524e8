"""`--accel auto`: the faster accelerator by a short measured guest loop, both figures logged."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
from support.accel import assemble, needs_assembler

from colo_agent.microvm import calibrate
from colo_agent.microvm.calibrate import Figure, choose_auto, measure, pick, time_loop
from colo_agent.microvm.kvm import kvm_unavailable_reason

KVM_REASON = kvm_unavailable_reason()
MS = 1e-3


@pytest.mark.parametrize(
    ("kvm", "tcg", "chosen"),
    [
        # Nested virtualization as measured on a shared CI machine: kvm exists, 100x slower.
        (Figure(5 * MS), Figure(0.02 * MS), "tcg"),
        (Figure(0.01 * MS), Figure(0.2 * MS), "kvm"),
        (Figure(0.1 * MS), Figure(0.1 * MS), "kvm"),
        (Figure(None, "cannot open /dev/kvm: Permission denied"), Figure(0.2 * MS), "tcg"),
        (Figure(0.3 * MS), Figure(None, "No module named 'unicorn'"), "kvm"),
    ],
)
def test_pick_is_the_faster_usable_accelerator(kvm: Figure, tcg: Figure, chosen: str) -> None:
    assert pick({"kvm": kvm, "tcg": tcg}) == chosen
    assert pick({"tcg": tcg, "kvm": kvm}) == chosen


def test_no_usable_accelerator_names_every_reason() -> None:
    with pytest.raises(RuntimeError, match="kvm: no kvm here; tcg: no unicorn"):
        pick({"kvm": Figure(None, "no kvm here"), "tcg": Figure(None, "no unicorn")})


def test_auto_logs_both_figures(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="colo_agent.microvm.calibrate"):
        chosen = choose_auto(lambda: {"kvm": Figure(5 * MS), "tcg": Figure(0.02 * MS)})
    assert chosen == "tcg"
    assert "accelerator: tcg" in caplog.text
    assert "5.000 ms under kvm" in caplog.text and "0.020 ms under tcg" in caplog.text


def test_an_accelerator_that_cannot_start_is_reported_unusable(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(name: str) -> object:
        def create(ram: object, io: object) -> object:
            raise OSError(13, "Permission denied")

        return create

    monkeypatch.setattr(calibrate, "_factory", broken)
    figures = measure(("kvm",))
    assert figures["kvm"].seconds is None
    assert "Permission denied" in str(figures["kvm"].error)
    assert "unusable" in figures["kvm"].describe()


@needs_assembler
def test_the_hand_encoded_loop_is_its_source(tmp_path: Path) -> None:
    assert assemble(calibrate.LOOP_SOURCE, tmp_path) == calibrate.LOOP_CODE


ACCELS = [
    pytest.param("tcg"),
    pytest.param(
        "kvm",
        marks=[pytest.mark.kvm, pytest.mark.skipif(KVM_REASON is not None, reason=f"kvm: {KVM_REASON}")],
    ),
]


@pytest.mark.parametrize("name", ACCELS)
def test_the_real_loop_runs_and_takes_a_sane_time(name: str) -> None:
    # time_loop itself checks the guest's last store, so a loop that did not
    # really run cannot produce a figure. Sane: positive and far below a second.
    seconds = time_loop(name)  # type: ignore[arg-type]
    assert math.isfinite(seconds) and 0 < seconds < 1.0


def test_real_calibration_measures_every_accelerator_that_opens() -> None:
    figures = measure()
    assert set(figures) == {"kvm", "tcg"}
    assert figures["tcg"].seconds is not None
    if KVM_REASON is None:
        assert figures["kvm"].seconds is not None, figures["kvm"].error
    assert pick(figures) in ("kvm", "tcg")
