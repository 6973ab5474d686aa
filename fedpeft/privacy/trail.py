"""Hash-chained, append-only audit trails (JSON Lines), written durably and checked line by line.

An *audit trail* is a ``.jsonl`` file of JSON objects, one per line. Each line carries

- ``seq``: its own 1-based line number;
- ``prev``: the hex SHA-256 of the previous line's bytes (without its newline), or
  :data:`GENESIS` on the first line;
- ``time`` (UTC, ISO 8601) and ``event`` (what the line records), then the event's fields.

Lines are canonical JSON (sorted keys, no spaces, ASCII, no NaN), so a line's hash is the hash
of exactly the bytes on disk. Changing, deleting, inserting or reordering any line but the
last breaks the link of the line after it; :func:`read_trail` names the first broken line. A
chain alone cannot show that lines were cut off its *end*, nor a rewrite of every line from
some point on: for that its head (last line number and hash) must be anchored elsewhere —
the coordinator stores it in every checkpoint, ``fedpeft verify`` compares the two — and the
facts it logs are cross-checked against the files they describe (adapter hash, ε).

Durability: a line is appended with one ``write`` on an ``O_APPEND`` descriptor and fsynced
(the directory too, when the file is new), under an exclusive ``flock`` so two processes of
one site cannot chain two lines to the same predecessor. A crash mid-write can leave a *torn*
last line (no newline). The reader reports it (:data:`TORN`) rather than skipping it; the
next writer cuts the torn bytes off and first appends a ``torn-tail`` line holding their
length and SHA-256, so the repair is itself on the record and the chain stays verifiable.

Why no library: the chain is SHA-256 over lines, which ``hashlib`` does; transparency-log
libraries (Merkle trees, signed tree heads, servers such as Trillian) solve inclusion proofs
for many readers, which one run directory and one site's disk do not need. This module is
pure (``hashlib``, ``json``, ``os``), with no Flower import.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

__all__ = [
    "BROKEN_LINK",
    "GENESIS",
    "NOT_JSON",
    "SEQUENCE",
    "TORN",
    "AuditTrail",
    "TrailCheck",
    "TrailError",
    "TrailProblem",
    "canonical_line",
    "line_sha256",
    "read_trail",
]

#: ``prev`` of the first line: no line comes before it.
GENESIS: Final[str] = "0" * 64

# Kinds of problem read_trail reports.
NOT_JSON: Final[str] = "not-json"
BROKEN_LINK: Final[str] = "broken-link"
SEQUENCE: Final[str] = "sequence"
TORN: Final[str] = "torn"

_RESERVED: Final[frozenset[str]] = frozenset({"seq", "prev", "time", "event"})
_TAIL_CHUNK: Final[int] = 1 << 16


class TrailError(Exception):
    """An audit trail cannot be extended: its last complete line is damaged."""


def line_sha256(line: bytes) -> str:
    """Hex SHA-256 of one line's bytes (without the newline)."""
    return hashlib.sha256(line).hexdigest()


def canonical_line(entry: dict[str, Any]) -> bytes:
    """``entry`` as one canonical JSON line (no newline): what is written and hashed."""
    return json.dumps(
        entry, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


@dataclass(frozen=True)
class TrailProblem:
    """The first thing wrong with a trail."""

    line: int  # 1-based line number
    kind: str  # NOT_JSON, BROKEN_LINK, SEQUENCE or TORN
    detail: str  # a sentence for a person: what is wrong and what it means


@dataclass(frozen=True)
class TrailCheck:
    """What :func:`read_trail` found.

    ``entries`` are the lines read before the first problem; ``head`` is the hash of the last
    of them (:data:`GENESIS` for none).
    """

    path: Path
    entries: tuple[dict[str, Any], ...]
    head: str
    problem: TrailProblem | None

    @property
    def ok(self) -> bool:
        return self.problem is None


def read_trail(path: Path) -> TrailCheck:
    """Read ``path`` and check every link; stop at the first problem.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    """
    data = Path(path).read_bytes()
    pieces = data.split(b"\n")
    complete, tail = pieces[:-1], pieces[-1]  # tail: bytes after the last newline
    entries: list[dict[str, Any]] = []
    expected = GENESIS
    for number, line in enumerate(complete, start=1):
        try:
            entry = json.loads(line)
        except ValueError:
            entry = None
        if not isinstance(entry, dict):
            problem = TrailProblem(
                number, NOT_JSON, f"line {number} is not a JSON object (it was edited by hand)"
            )
            return TrailCheck(Path(path), tuple(entries), expected, problem)
        if entry.get("prev") != expected:
            before = f"line {number - 1}" if number > 1 else "the start of the file"
            problem = TrailProblem(
                number,
                BROKEN_LINK,
                f"line {number} does not follow {before}: it records the previous line's "
                f"SHA-256 as {str(entry.get('prev'))[:12]}…, but {before} hashes to "
                f"{expected[:12]}…; {before} was changed, or lines were removed, inserted or "
                f"reordered just before line {number}",
            )
            return TrailCheck(Path(path), tuple(entries), expected, problem)
        if entry.get("seq") != number:
            problem = TrailProblem(
                number,
                SEQUENCE,
                f"line {number} carries seq={entry.get('seq')!r}: lines were removed, inserted "
                "or reordered before it, and the links rewritten to hide it",
            )
            return TrailCheck(Path(path), tuple(entries), expected, problem)
        entries.append(entry)
        expected = line_sha256(line)
    if tail:
        number = len(complete) + 1
        problem = TrailProblem(
            number,
            TORN,
            f"line {number} is incomplete ({len(tail)} bytes without a newline): a write was "
            "cut off (a crash) or the file was truncated; the next append records and removes "
            "it, or restore the file from a backup",
        )
        return TrailCheck(Path(path), tuple(entries), expected, problem)
    return TrailCheck(Path(path), tuple(entries), expected, None)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AuditTrail:
    """Appends to the hash-chained trail at ``path`` (created with mode ``mode`` if absent).

    Parameters
    ----------
    path : Path
        The ``.jsonl`` file; its folder must exist.
    mode : int, default 0o600
        Permissions of a new file (a site's trail is for its own operator).
    """

    def __init__(self, path: Path, *, mode: int = 0o600) -> None:
        self.path = Path(path)
        self.mode = mode

    def append(self, event: str, fields: dict[str, Any]) -> str:
        """Append one ``event`` line with ``fields``; return its SHA-256 (the new head).

        Raises
        ------
        ValueError
            If ``fields`` uses a reserved name (seq, prev, time, event) or holds NaN.
        TrailError
            If the last complete line is not one this module wrote (the file was damaged):
            extending it would hide the damage.
        """
        clash = _RESERVED & set(fields)
        if clash:
            raise ValueError(f"audit fields {sorted(clash)} are reserved; rename them")
        new = not self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, self.mode)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            seq, prev, torn = self._tail(fd)
            if torn:
                os.ftruncate(fd, os.fstat(fd).st_size - len(torn))
                repair = {
                    "seq": seq,
                    "prev": prev,
                    "time": _now(),
                    "event": "torn-tail",
                    "discarded_bytes": len(torn),
                    "discarded_sha256": hashlib.sha256(torn).hexdigest(),
                }
                line = canonical_line(repair)
                os.write(fd, line + b"\n")
                seq, prev = seq + 1, line_sha256(line)
            entry = {**fields, "seq": seq, "prev": prev, "time": _now(), "event": event}
            line = canonical_line(entry)
            os.write(fd, line + b"\n")  # one write on O_APPEND: never interleaved
            os.fsync(fd)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        if new:
            _fsync_dir(self.path.parent)
        return line_sha256(line)

    def _tail(self, fd: int) -> tuple[int, str, bytes]:
        """``(next seq, hash of the last complete line, torn bytes after it)``."""
        size = os.fstat(fd).st_size
        if size == 0:
            return 1, GENESIS, b""
        chunk = _TAIL_CHUNK
        while True:  # read back until the last complete line is whole in ``data``
            start = max(0, size - chunk)
            data = os.pread(fd, size - start, start)
            end = data.rfind(b"\n")  # the newline that ends the last complete line
            begin = data.rfind(b"\n", 0, end) if end >= 0 else -1  # the one before it
            if begin >= 0 or start == 0:
                break
            chunk *= 2
        if end < 0:  # no newline at all: the whole file is one torn line
            return 1, GENESIS, data
        last, torn = data[begin + 1 : end], data[end + 1 :]
        try:
            seq = int(json.loads(last)["seq"])
        except (ValueError, KeyError, TypeError) as err:
            raise TrailError(
                f"audit trail {str(self.path)!r}: its last complete line is not an entry this "
                f"program wrote ({err}); the file was damaged. Check it with 'fedpeft verify' "
                "and restore it from a backup; nothing was appended"
            ) from None
        return seq + 1, line_sha256(last), torn
