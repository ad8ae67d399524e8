"""Typed, validated reading of one JSON-shaped object.

One reader serves the control API's documents (`models`) and the operator's
ColoVM spec: each gives the exception to raise, and every problem becomes
`error(path, reason)` with the dotted path of the culprit (`peer.state`,
`failover.heartbeatTimeoutMs`), never an AttributeError or KeyError deep in a
caller. A key without a default is required; with one, a missing key takes it.
Standard library only: the operator imports it.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping
from typing import Any, Final, NoReturn, TypeVar

_E = TypeVar("_E", bound=enum.Enum)
_T = TypeVar("_T")
ErrorFactory = Callable[[str, str], Exception]


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Final = _Required()


def kind_of(value: object) -> str:
    """How a JSON reader would name the type of `value`, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__


class Reader:
    """Typed access to one object at `path`, raising `error(path, reason)`."""

    def __init__(self, data: object, path: str, error: ErrorFactory) -> None:
        self._error = error
        self.path = path
        if not isinstance(data, Mapping):
            self.fail(path, f"expected an object, got {kind_of(data)}")
        self.data: Mapping[str, Any] = data

    def fail(self, path: str, reason: str) -> NoReturn:
        raise self._error(path, reason)

    def where(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def _get(self, key: str, default: object = REQUIRED) -> Any:
        if key in self.data:
            return self.data[key]
        if default is REQUIRED:
            self.fail(self.where(key), "is required")
        return default

    def has(self, key: str) -> bool:
        """Present and not null."""
        return self.data.get(key) is not None

    def _optional(self, key: str, read: Callable[[str], _T]) -> _T | None:
        return read(key) if self.has(key) else None

    def integer(
        self,
        key: str,
        default: int | _Required = REQUIRED,
        *,
        minimum: int | None = 0,
        maximum: int | None = None,
    ) -> int:
        """An integer (never a boolean) within the bounds; non-negative unless `minimum` says otherwise."""
        value = self._get(key, default)
        if not isinstance(value, int) or isinstance(value, bool):
            self.fail(self.where(key), f"expected an integer, got {kind_of(value)}")
        if minimum is not None and maximum is not None and not minimum <= value <= maximum:
            self.fail(self.where(key), f"must be between {minimum} and {maximum}, got {value}")
        if minimum is not None and value < minimum:
            self.fail(self.where(key), f"must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            self.fail(self.where(key), f"must be <= {maximum}, got {value}")
        return value

    def optional_integer(self, key: str, *, minimum: int | None = 0) -> int | None:
        return self._optional(key, lambda k: self.integer(k, minimum=minimum))

    def number(self, key: str) -> float:
        """A finite number >= 0 (a duration, a rate)."""
        value = self._get(key)
        if not isinstance(value, int | float) or isinstance(value, bool):
            self.fail(self.where(key), f"expected a number, got {kind_of(value)}")
        if not math.isfinite(value) or value < 0:
            self.fail(self.where(key), f"must be a finite number >= 0, got {value}")
        return float(value)

    def optional_number(self, key: str) -> float | None:
        return self._optional(key, self.number)

    def boolean(self, key: str, default: bool | _Required = REQUIRED) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            self.fail(self.where(key), f"expected true or false, got {kind_of(value)}")
        return value

    def string(self, key: str, default: str | _Required = REQUIRED) -> str:
        """A non-empty string."""
        value = self._get(key, default)
        if not isinstance(value, str):
            self.fail(self.where(key), f"expected a string, got {kind_of(value)}")
        if not value:
            self.fail(self.where(key), "must not be empty")
        return value

    def optional_string(self, key: str, *, empty_is_absent: bool = False) -> str | None:
        """None when absent or null (or, with `empty_is_absent`, ""); else a non-empty string."""
        if empty_is_absent and self.data.get(key) == "":
            return None
        return self._optional(key, self.string)

    def choice(self, key: str, kind: type[_E]) -> _E:
        """A member of the string enum `kind`."""
        value = self.string(key)
        try:
            return kind(value)
        except ValueError:
            allowed = ", ".join(str(member.value) for member in kind)
            self.fail(self.where(key), f"{value!r} is not one of {allowed}")

    def one_of(self, key: str, allowed: tuple[str, ...], default: str | _Required = REQUIRED) -> str:
        value = self._get(key, default)
        if not isinstance(value, str) or value not in allowed:
            self.fail(self.where(key), f"{value!r} is not one of {', '.join(allowed)}")
        return value

    def optional_one_of(self, key: str, allowed: tuple[str, ...]) -> str | None:
        return self._optional(key, lambda k: self.one_of(k, allowed))

    def child(self, key: str) -> Reader:
        """A required object."""
        return Reader(self._get(key), self.where(key), self._error)

    def optional_child(self, key: str) -> Reader | None:
        return self._optional(key, self.child)

    def section(self, key: str) -> Reader:
        """An object whose absence (or null) means empty: every field inside then takes its default."""
        value = self.data.get(key)
        return Reader({} if value is None else value, self.where(key), self._error)

    def children(self, key: str) -> list[Reader]:
        """A list of objects; absent or null is empty."""
        value = self.data.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            self.fail(self.where(key), f"expected an array, got {kind_of(value)}")
        return [Reader(item, f"{self.where(key)}[{i}]", self._error) for i, item in enumerate(value)]

    def strings(self, key: str) -> dict[str, str]:
        """An object of strings (labels, a node selector); absent or null is empty."""
        value = self.data.get(key)
        if value is None:
            return {}
        if not isinstance(value, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            self.fail(self.where(key), "expected an object of strings")
        return dict(value)

    def anything(self, key: str) -> dict[str, Any]:
        """An object taken as it is (e.g. resource requirements); absent or null is empty."""
        value = self.data.get(key)
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.fail(self.where(key), f"expected an object, got {kind_of(value)}")
        return dict(value)

    def counts(self, key: str) -> dict[str, int]:
        """An object of non-negative integer counts (`checkpointsByCause`)."""
        inner = self.child(key)
        for name in inner.data:
            if not isinstance(name, str) or not name:
                self.fail(inner.path, f"keys must be non-empty strings, got {name!r}")
        return {name: inner.integer(name) for name in inner.data}
