"""A file arbiter, for two agents on one host without a cluster (the demo, tests, development).

The record is a small JSON document, replaced atomically (write a temporary
file, `os.replace`), so a reader never sees half of one and a writer killed
mid-write leaves the previous record. Writes are compare-and-swap: under an
exclusive `flock` on a separate lock file (the record's inode changes at every
replace, so it cannot carry the lock), the writer checks that the write
counter is still the one it read. The counter is the record's version:
observers time the lease from the moment they see it change.

The file is not fsync'd: it arbitrates between processes of one host, and a
host crash takes both agents with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import math
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from colo_agent.arbiter.base import Arbiter, ArbiterError, Clock, LeaseRecord

FORMAT = "colo-arbiter/v1"


class FileArbiter(Arbiter):
    def __init__(
        self,
        path: str | os.PathLike[str],
        identity: str,
        lease_duration: float,
        *,
        safety_margin: float | None = None,
        clock: Clock = time.monotonic,
        lock_timeout: float | None = None,
    ) -> None:
        super().__init__(identity, lease_duration, safety_margin=safety_margin, clock=clock)
        self.path = Path(path)
        self._lock_path = self.path.with_name(self.path.name + ".lock")
        # A writer holds the lock for microseconds; one stopped inside it (SIGSTOP)
        # must not stall everyone else past a renewal.
        self._lock_timeout = self.renew_interval / 2 if lock_timeout is None else lock_timeout

    async def _read(self) -> LeaseRecord | None:
        return await asyncio.to_thread(self._read_sync)

    async def _swap(
        self, expected: LeaseRecord | None, term: int, holder: str | None, floor: int = 0
    ) -> LeaseRecord | None:
        return await asyncio.to_thread(self._swap_sync, expected, term, holder, floor)

    async def close(self) -> None:
        pass

    # ------------------------------------------------------------------ blocking parts

    def _read_sync(self) -> LeaseRecord | None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ArbiterError(f"cannot read the arbiter record {self.path}: {exc.strerror}") from exc
        return parse_record(data, self.path)

    def _swap_sync(
        self, expected: LeaseRecord | None, term: int, holder: str | None, floor: int = 0
    ) -> LeaseRecord | None:
        with self._locked():
            current = self._read_sync()
            current_version = None if current is None else current.version
            expected_version = None if expected is None else expected.version
            if current_version != expected_version:
                return None
            writes = 0 if current is None else int(current.version)
            record = LeaseRecord(
                term=term, holder=holder, version=str(writes + 1), duration=self.lease_duration, floor=floor
            )
            self._write_sync(record)
            return record

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ArbiterError(f"cannot open the arbiter lock {self._lock_path}: {exc.strerror}") from exc
        try:
            deadline = time.monotonic() + self._lock_timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                        raise ArbiterError(f"cannot lock {self._lock_path}: {exc.strerror}") from exc
                    if time.monotonic() >= deadline:
                        raise ArbiterError(
                            f"{self._lock_path} stayed locked for {self._lock_timeout:.3f} s "
                            "(is another agent stopped while writing?)"
                        ) from None
                    time.sleep(0.0005)
            yield
        finally:
            os.close(fd)  # closing the descriptor drops the lock

    def _write_sync(self, record: LeaseRecord) -> None:
        payload = json.dumps(
            {
                "format": FORMAT,
                "term": record.term,
                "holder": record.holder,
                "writes": int(record.version),
                "leaseDurationMs": round((record.duration or self.lease_duration) * 1000, 3),
                "epochFloor": record.floor,
            }
        ).encode()
        try:
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name + ".", suffix=".tmp")
        except OSError as exc:
            raise ArbiterError(f"cannot write beside {self.path}: {exc.strerror}") from exc
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(payload)
            os.replace(tmp, self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise ArbiterError(f"cannot write the arbiter record {self.path}: {exc.strerror}") from exc


def parse_record(data: bytes, where: object = "arbiter record") -> LeaseRecord:
    """Decode a record file. A malformed record is an error, never "no record": treating it
    as free would let a taker skip the wait and break fencing."""

    def bad(reason: str) -> ArbiterError:
        return ArbiterError(f"{where} is not a valid arbiter record: {reason}")

    try:
        doc: Any = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise bad(f"not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise bad("not a JSON object")
    if doc.get("format") != FORMAT:
        raise bad(f"format is {doc.get('format')!r}, expected {FORMAT!r}")
    term, holder, writes, duration_ms = (doc.get(k) for k in ("term", "holder", "writes", "leaseDurationMs"))
    if not isinstance(term, int) or isinstance(term, bool) or term < 0:
        raise bad(f"term must be an integer >= 0, got {term!r}")
    if holder is not None and (not isinstance(holder, str) or not holder):
        raise bad(f"holder must be a non-empty string or null, got {holder!r}")
    if not isinstance(writes, int) or isinstance(writes, bool) or writes < 1:
        raise bad(f"writes must be an integer >= 1, got {writes!r}")
    if (
        not isinstance(duration_ms, int | float)
        or isinstance(duration_ms, bool)
        or not 0 < duration_ms < math.inf
    ):
        raise bad(f"leaseDurationMs must be a positive number, got {duration_ms!r}")
    floor = doc.get("epochFloor", 0)
    if not isinstance(floor, int) or isinstance(floor, bool) or floor < 0:
        raise bad(f"epochFloor must be an integer >= 0, got {floor!r}")
    return LeaseRecord(
        term=term, holder=holder, version=str(writes), duration=duration_ms / 1000, floor=floor
    )
