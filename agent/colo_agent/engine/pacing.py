"""When the primary takes its next checkpoint, and whether the guest must wait for it (pure).

A checkpoint is due when the interval has elapsed, or, in checkpoint mode,
as soon as output waits for one and none is in flight (Remus's
output-triggered checkpoint): the interval then only bounds how far the
secondary's image lags. The guest runs while an epoch streams, so what an
output-triggered checkpoint costs it is the pause alone: the next one comes
no sooner than the guest has run, since its last resume, as long as that
pause held it (and at least `OUTPUT_MIN_RUN`), so a guest that answers all
the time keeps at least half of the time for itself. In checkpoint mode an
epoch must also fit the secondary's cache, which holds one epoch in flight:
the pacer estimates the guest's dirty rate from the epochs it has seen and
shortens the wait so that the expected dirty set stays below a fraction of
the cache. The guest cannot be asked how many pages it has dirtied without
collecting them, so the rate is the only cheap signal.
"""

from __future__ import annotations

from dataclasses import dataclass

# Aim for epochs of at most this share of the secondary's cache.
CACHE_HEADROOM = 0.5
# The shortest wait between two checkpoints, so a burst cannot turn the
# primary into a checkpoint loop that starves the guest.
MIN_INTERVAL = 0.005
# The least time the guest runs between a resume and an output-triggered pause.
OUTPUT_MIN_RUN = 0.001
# Weight of the newest epoch in the dirty-rate estimate.
RATE_SMOOTHING = 0.5


@dataclass
class CheckpointPacer:
    interval: float  # seconds, from --interval-ms
    cache_pages: int  # the secondary's cache, announced at pairing
    rate: float = 0.0  # estimated pages dirtied per second

    def observe(self, pages: int, seconds: float) -> None:
        """An epoch collected `pages` dirty pages over `seconds` of guest time."""
        if seconds <= 0:
            return
        sample = pages / seconds
        self.rate = sample if self.rate == 0 else RATE_SMOOTHING * sample + (1 - RATE_SMOOTHING) * self.rate

    def next_wait(self) -> float:
        """Seconds from the last pause to the next one."""
        if self.rate <= 0:
            return self.interval
        fits = CACHE_HEADROOM * self.cache_pages / self.rate
        return max(MIN_INTERVAL, min(self.interval, fits))

    def output_wait(self, paused: float, ran: float) -> float:
        """Seconds from now before output may trigger the next pause, given how long the
        last pause held the guest (until its resume) and how long it has run since."""
        return max(0.0, max(OUTPUT_MIN_RUN, paused) - ran)

    def fits(self, pages: int) -> bool:
        return pages <= self.cache_pages

    def hold_during_stream(self, stream_seconds: float) -> bool:
        """Whether the guest must stay paused until its epoch is acknowledged.

        The next pause cannot come before the acknowledgement, so a guest that
        dirties more pages while one epoch streams than the cache can take in
        the next would force a re-sync. Holding it still for the stream
        (auto-converge) trades its speed for staying protected."""
        return self.rate * stream_seconds > CACHE_HEADROOM * self.cache_pages
