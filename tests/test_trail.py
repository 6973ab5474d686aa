"""The hash chain of audit trails (fedpeft.privacy.trail): every kind of damage is named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedpeft.privacy.trail import (
    BROKEN_LINK,
    GENESIS,
    NOT_JSON,
    SEQUENCE,
    TORN,
    AuditTrail,
    TrailError,
    line_sha256,
    read_trail,
)


def _trail(tmp_path: Path, lines: int = 5) -> Path:
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(path)
    for i in range(1, lines + 1):
        trail.append("round", {"round": i, "epsilon": 0.5 * i})
    return path


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines()


def _write(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in lines))


def test_an_untouched_trail_reads_whole_and_links_every_line(tmp_path: Path) -> None:
    path = _trail(tmp_path)
    check = read_trail(path)
    assert check.ok and [e["round"] for e in check.entries] == [1, 2, 3, 4, 5]
    lines = _lines(path)
    assert json.loads(lines[0])["prev"] == GENESIS
    for before, after in zip(lines, lines[1:], strict=False):
        assert json.loads(after)["prev"] == line_sha256(before)
    assert check.head == line_sha256(lines[-1])
    assert [e["seq"] for e in check.entries] == [1, 2, 3, 4, 5]


def test_an_edited_line_breaks_the_link_of_the_next(tmp_path: Path) -> None:
    path = _trail(tmp_path)
    lines = _lines(path)
    lines[1] = lines[1].replace(b'"epsilon":1.0', b'"epsilon":0.1')
    _write(path, lines)
    check = read_trail(path)
    assert check.problem is not None
    assert (check.problem.line, check.problem.kind) == (3, BROKEN_LINK)
    assert "line 2 was changed" in check.problem.detail
    assert len(check.entries) == 2


def test_a_deleted_line_is_found(tmp_path: Path) -> None:
    path = _trail(tmp_path)
    lines = _lines(path)
    del lines[2]
    _write(path, lines)
    check = read_trail(path)
    assert check.problem is not None and (check.problem.line, check.problem.kind) == (
        3,
        BROKEN_LINK,
    )


def test_reordered_lines_are_found(tmp_path: Path) -> None:
    path = _trail(tmp_path)
    lines = _lines(path)
    lines[1], lines[2] = lines[2], lines[1]
    _write(path, lines)
    check = read_trail(path)
    assert check.problem is not None and (check.problem.line, check.problem.kind) == (
        2,
        BROKEN_LINK,
    )


def test_a_deletion_with_relinked_lines_is_found_by_its_sequence(tmp_path: Path) -> None:
    path = _trail(tmp_path)
    lines = _lines(path)
    del lines[1]
    relinked, prev = [], GENESIS
    for line in lines:  # a forger who rewrites every link after the gap
        entry = json.loads(line)
        entry["prev"] = prev
        new = json.dumps(entry, sort_keys=True, separators=(",", ":")).encode()
        relinked.append(new)
        prev = line_sha256(new)
    _write(path, relinked)
    check = read_trail(path)
    assert check.problem is not None and (check.problem.line, check.problem.kind) == (
        2,
        SEQUENCE,
    )


def test_a_line_that_is_not_json(tmp_path: Path) -> None:
    path = _trail(tmp_path)
    lines = _lines(path)
    lines[3] = b"round 4 went fine"
    _write(path, lines)
    check = read_trail(path)
    assert check.problem is not None and (check.problem.line, check.problem.kind) == (4, NOT_JSON)


def test_a_truncated_file_reports_its_torn_last_line(tmp_path: Path) -> None:
    path = _trail(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:-20])
    check = read_trail(path)
    assert check.problem is not None and (check.problem.line, check.problem.kind) == (5, TORN)
    assert len(check.entries) == 4


def test_the_next_append_records_and_removes_a_torn_tail(tmp_path: Path) -> None:
    path = _trail(tmp_path, lines=2)
    with path.open("ab") as handle:
        handle.write(b'{"event":"round","rou')  # a crash mid-write
    AuditTrail(path).append("round", {"round": 3})
    check = read_trail(path)
    assert check.ok, check.problem
    assert [e["event"] for e in check.entries] == ["round", "round", "torn-tail", "round"]
    assert check.entries[2]["discarded_bytes"] == len(b'{"event":"round","rou')


def test_a_torn_first_line_is_repaired_from_the_genesis(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b'{"seq":1,"pre')
    AuditTrail(path).append("start", {})
    check = read_trail(path)
    assert check.ok and [e["event"] for e in check.entries] == ["torn-tail", "start"]


def test_a_damaged_last_line_is_not_extended(tmp_path: Path) -> None:
    path = _trail(tmp_path, lines=2)
    lines = _lines(path)
    lines[-1] = b"garbage"
    _write(path, lines)
    before = path.read_bytes()
    with pytest.raises(TrailError, match="not an entry this program wrote.*restore it"):
        AuditTrail(path).append("round", {"round": 3})
    assert path.read_bytes() == before


def test_long_lines_are_chained_across_read_chunks(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(path)
    for i in range(3):
        trail.append("round", {"round": i, "sampled": [str(n) for n in range(20_000)]})
    assert read_trail(path).ok and len(read_trail(path).entries) == 3


def test_reserved_names_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\['prev'\] are reserved"):
        AuditTrail(tmp_path / "a.jsonl").append("round", {"prev": "x"})
