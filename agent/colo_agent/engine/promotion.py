"""The promote rules, in one place.

- A retry of a promotion that already happened (the first reply was lost)
  gets the first answer again, or a plain one if this agent reached the
  term another way (it booted as primary with it).
- A term not above the current one is refused (409 StaleTerm).
- The arbiter decides the rest: a term it already passed is StaleTerm, an
  image below its epoch floor or a holder whose lease has not run out is a
  Conflict, an unusable store is 503 Unavailable.
- Role changes run one at a time, so a retry sees the first one's result.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

from colo_agent.api.models import ArbiterConflict, PromoteResult, Role, StaleTerm, Unavailable
from colo_agent.arbiter.base import ArbiterError, StaleImage, TermTooLow

T = TypeVar("T")


@contextlib.contextmanager
def arbiter_refusals() -> Iterator[None]:
    """Turn the arbiter's refusals into control API errors."""
    try:
        yield
    except TermTooLow as exc:
        raise StaleTerm(str(exc)) from exc
    except StaleImage as exc:
        raise ArbiterConflict(str(exc)) from exc
    except ArbiterError as exc:
        raise Unavailable(f"the arbiter cannot be used: {exc}") from exc


class RoleChanges:
    """Serialises promotions and demotions and applies the promote rules around them."""

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self._last_promotion: PromoteResult | None = None

    async def promote(
        self,
        current: Callable[[], tuple[Role, int]],
        term: int,
        promote: Callable[[], Awaitable[PromoteResult]],
    ) -> PromoteResult:
        """`current()`: this agent's role and term, read once the previous role change is over."""
        async with self._lock:
            role, current_term = current()
            if role is Role.PRIMARY and term == current_term:
                last = self._last_promotion
                if last is not None and last.term == term:
                    return last
                return PromoteResult(role=Role.PRIMARY, term=term)
            if term <= current_term:
                raise StaleTerm(f"term {term} is not above the current term {current_term}")
            with arbiter_refusals():
                result = await promote()
            self._last_promotion = result
            return result

    async def run(self, change: Callable[[], Awaitable[T]]) -> T:
        async with self._lock:
            return await change()
