from __future__ import annotations

import pytest

from colo_agent.engine.pacing import MIN_INTERVAL, OUTPUT_MIN_RUN, CheckpointPacer


def test_idle_guest_waits_the_interval() -> None:
    p = CheckpointPacer(interval=0.1, cache_pages=2048)
    assert p.next_wait() == 0.1
    p.observe(pages=10, seconds=0.1)
    assert p.next_wait() == 0.1


def test_busy_guest_checkpoints_before_the_cache_would_overflow() -> None:
    p = CheckpointPacer(interval=0.1, cache_pages=2048)
    p.observe(pages=4000, seconds=0.1)  # 40k pages/s: 0.1 s would dirty twice the cache
    wait = p.next_wait()
    assert wait < 0.1
    assert wait * p.rate <= 0.5 * 2048 + 1e-9


def test_wait_never_drops_below_the_floor() -> None:
    p = CheckpointPacer(interval=0.1, cache_pages=16)
    p.observe(pages=10**6, seconds=0.01)
    assert p.next_wait() == pytest.approx(MIN_INTERVAL)


def test_rate_follows_the_guest_back_down() -> None:
    p = CheckpointPacer(interval=0.1, cache_pages=2048)
    p.observe(pages=4000, seconds=0.1)
    for _ in range(20):
        p.observe(pages=1, seconds=0.1)
    assert p.next_wait() == 0.1
    assert p.fits(2048) and not p.fits(2049)


def test_a_guest_that_outruns_the_stream_is_held_until_the_acknowledgement() -> None:
    p = CheckpointPacer(interval=0.1, cache_pages=2048)
    assert not p.hold_during_stream(0.5)  # nothing known yet
    p.observe(pages=1000, seconds=0.1)  # 10k pages/s
    assert not p.hold_during_stream(0.05)  # 500 pages while streaming: fits
    assert p.hold_during_stream(0.2)  # 2000 pages while streaming: would overflow the next epoch


def test_output_lets_the_guest_run_as_long_as_the_last_pause_held_it() -> None:
    pacer = CheckpointPacer(interval=0.1, cache_pages=1000)
    assert pacer.output_wait(paused=0.004, ran=0.0) == 0.004
    assert pacer.output_wait(paused=0.004, ran=0.001) == pytest.approx(0.003)
    assert pacer.output_wait(paused=0.0, ran=0.0) == OUTPUT_MIN_RUN > 0


def test_output_after_a_stream_the_guest_ran_through_starts_the_next_epoch_at_once() -> None:
    # The guest ran while the last epoch streamed, longer than its pause held it:
    # output waiting at the acknowledgement needs no further wait.
    pacer = CheckpointPacer(interval=0.1, cache_pages=1000)
    assert pacer.output_wait(paused=0.0005, ran=0.002) == 0.0
    assert pacer.output_wait(paused=0.0005, ran=OUTPUT_MIN_RUN) == 0.0
