"""Atomic writes of files and folders (fedpeft.files): the old version or the new, never half."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fedpeft.files import atomic_write_text, replace_dir


def test_a_write_replaces_the_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    path.write_text("old")
    atomic_write_text(path, "néw\n")
    assert path.read_text(encoding="utf-8") == "néw\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.json"]


def test_a_failed_write_leaves_the_old_file_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text("old\n")

    def crash(src: str, dst: str) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        atomic_write_text(path, "new\n")
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temporary


def test_a_folder_is_replaced_whole(tmp_path: Path) -> None:
    final, tmp = tmp_path / "adapter", tmp_path / ".build"
    final.mkdir()
    (final / "old.bin").write_text("old")
    tmp.mkdir()
    (tmp / "new.bin").write_text("new")
    replace_dir(tmp, final)
    assert sorted(p.name for p in final.iterdir()) == ["new.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no .adapter.old left

    fresh = tmp_path / ".fresh"
    fresh.mkdir()
    replace_dir(fresh, tmp_path / "absent")  # nothing to replace: a plain rename
    assert (tmp_path / "absent").is_dir() and not fresh.exists()
