"""A round's record: what metrics.jsonl holds, written with asdict and read back typed."""

from __future__ import annotations

import json
from dataclasses import fields, replace
from pathlib import Path

import pytest

from fedpeft.server.rounds import RoundRecord, read_rounds
from fedpeft.server.rundir import RunDir
from fedpeft.testing import round_record


def test_a_line_leaves_out_only_the_figures_that_do_not_apply() -> None:
    plain = round_record().as_json()
    assert list(plain) == [
        f.name
        for f in fields(RoundRecord)
        if f.name not in ("eval_failures", "eval_perplexity", "eval_generations")
    ]
    causal = replace(round_record(), eval_perplexity=24.6, eval_generations=4).as_json()
    assert causal["eval_perplexity"] == 24.6 and causal["eval_generations"] == 4
    assert "eval_failures" not in causal
    # a null figure that always applies stays in the line as null
    assert round_record(train_loss=None).as_json()["train_loss"] is None


def test_the_file_round_trips_and_a_rerun_round_replaces_its_line(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    first, second = round_record(round=1), round_record(round=2, eval_failures={"7": "x: y"})
    run.append_metrics(first)
    run.append_metrics(second)
    again = replace(first, seconds=9.5)
    run.append_metrics(again)  # round 1 trained again after a crash
    assert run.read_rounds() == [second, again]
    assert [json.loads(line)["round"] for line in run.metrics_path.open()] == [2, 1]


def test_a_line_with_a_missing_or_unknown_field_is_refused_by_name(tmp_path: Path) -> None:
    line = round_record(round=4).as_json()
    del line["bytes_up"]
    with pytest.raises(ValueError, match=r"round 4 lacks \['bytes_up'\]"):
        RoundRecord.from_json(line)
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({**round_record().as_json(), "bogus": 1}) + "\n")
    with pytest.raises(ValueError, match=r"fields this fedpeft does not know: \['bogus'\]"):
        read_rounds(path)
    assert read_rounds(tmp_path / "none.jsonl") == []
