"""The timeout of the next request to an API server that may be loaded.

One rule for the agent's Lease client and the operator's Kubernetes client:
doubled after a request timed out, twice the last answer's time after an
answer, always within [floor, ceiling]. A slow API server then costs a
client time, not a failure; a fast one gets short timeouts back. Standard
library only (the operator imports it).
"""

from __future__ import annotations


class RequestTimeout:
    """Updated from one thread at a time or, racing, from several: a lost update only
    makes one request's timeout a little off."""

    def __init__(self, floor: float, ceiling: float) -> None:
        if not 0 < floor <= ceiling:
            raise ValueError(f"request timeouts need 0 < floor <= ceiling, got {floor!r}, {ceiling!r}")
        self.floor = floor
        self.ceiling = ceiling
        self.current = floor

    def timed_out(self) -> None:
        self.current = min(self.ceiling, self.current * 2)

    def answered(self, elapsed: float) -> None:
        self.current = min(self.ceiling, max(self.floor, 2 * elapsed))
