"""The per-site privacy ledger: golden ε, budget refusal, restarts, idempotency, corruption."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest
from opacus.accountants import create_accountant

from fedpeft.privacy.calibration import compute_epsilon
from fedpeft.privacy.errors import (
    BudgetExceededError,
    EvaluationRefusedError,
    LedgerError,
    PrivacyConfigError,
    ReleaseMismatchError,
)
from fedpeft.privacy.ledger import LEDGER_FORMAT, PrivacyLedger

pytestmark = [
    # RDP notes when its best order is the largest one tried (loose bound at large ε).
    pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha:UserWarning"),
]

DELTA = 1e-5
# rounds of two runs; (σ, q) pairs repeat, so this is the MIXED history of test_calibration
MIXED_ROUNDS = [
    ("run-a", 1, 1.1, 0.01, 500),
    ("run-a", 2, 0.8, 0.02, 200),
    ("run-b", 1, 1.1, 0.01, 300),
]
# ε at δ = 1e-5 from Opacus 1.6.0 for these histories (see test_calibration.py)
GOLDEN = {
    ("single", "prv"): 1.838,  # [(1.0, 0.01, 1000)]: 1.838371637017295
    ("single", "rdp"): 2.101,  # 2.1013652716430564
    ("mixed", "prv"): 3.511,  # 3.5106822740444006
    ("mixed", "rdp"): 4.155,  # 4.155420195305427
}


def _record_all(ledger: PrivacyLedger, rounds: list[tuple[str, int, float, float, int]]) -> None:
    for run_id, round_, sigma, rate, steps in rounds:
        ledger.record(
            run_id=run_id, round=round_, noise_multiplier=sigma, sample_rate=rate, steps=steps
        )


def _opacus_epsilon(history: list[tuple[float, float, int]], accountant: str) -> float:
    acc = create_accountant(mechanism=accountant)
    acc.history = list(history)
    return float(acc.get_epsilon(delta=DELTA))


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_epsilon_equals_opacus_for_the_same_history(tmp_path: Path, accountant: str) -> None:
    single = PrivacyLedger(tmp_path / "single.json", delta=DELTA, accountant=accountant)
    # 1000 steps charged as four rounds of 250
    _record_all(single, [("r", i, 1.0, 0.01, 250) for i in range(4)])
    assert single.epsilon() == pytest.approx(GOLDEN[("single", accountant)], rel=5e-4)
    assert single.epsilon() == pytest.approx(
        _opacus_epsilon([(1.0, 0.01, 1000)], accountant), rel=1e-8
    )

    mixed = PrivacyLedger(tmp_path / "mixed.json", delta=DELTA, accountant=accountant)
    _record_all(mixed, MIXED_ROUNDS)
    assert mixed.epsilon() == pytest.approx(GOLDEN[("mixed", accountant)], rel=5e-4)
    raw = [(sigma, rate, steps) for _, _, sigma, rate, steps in MIXED_ROUNDS]
    assert mixed.history == raw
    assert mixed.epsilon() == pytest.approx(_opacus_epsilon(raw, accountant), rel=1e-8)


def test_budget_refusal_names_spent_and_ceiling_and_records_nothing(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.json", delta=DELTA, accountant="rdp")
    _record_all(ledger, [("run", 1, 1.0, 0.01, 1000)])
    spent = ledger.epsilon()
    before = ledger.path.read_bytes()

    projected = ledger.check_round(
        noise_multiplier=1.0, sample_rate=0.01, steps=100, ceiling_epsilon=8.0
    )
    assert spent < projected <= 8.0
    with pytest.raises(BudgetExceededError) as info:
        ledger.check_round(noise_multiplier=1.0, sample_rate=0.01, steps=5000, ceiling_epsilon=3.0)
    message = str(info.value)
    assert f"spent ε={spent:.4g}" in message
    assert "after this round ε=" in message and "ceiling ε=3" in message
    assert str(ledger.path) in message
    with pytest.raises(BudgetExceededError, match="Nothing was recorded"):
        ledger.record(
            run_id="run",
            round=2,
            noise_multiplier=1.0,
            sample_rate=0.01,
            steps=5000,
            ceiling_epsilon=3.0,
        )
    assert ledger.path.read_bytes() == before
    assert len(ledger.entries) == 1


def test_ledger_survives_restart_and_accumulates_across_runs(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    first = PrivacyLedger(path, delta=DELTA, accountant="rdp")
    _record_all(first, MIXED_ROUNDS[:2])
    del first  # "restart": a new process opens the same file
    second = PrivacyLedger(path, delta=DELTA, accountant="rdp")
    assert [e.key for e in second.entries] == [("run-a", 1, ""), ("run-a", 2, "")]
    _record_all(second, MIXED_ROUNDS[2:])
    third = PrivacyLedger(path, delta=DELTA, accountant="rdp")
    raw = [(sigma, rate, steps) for _, _, sigma, rate, steps in MIXED_ROUNDS]
    assert third.epsilon() == compute_epsilon(raw, delta=DELTA, accountant="rdp")
    assert third.epsilon() == pytest.approx(GOLDEN[("mixed", "rdp")], rel=5e-4)


def test_record_is_idempotent_and_conflicts_raise(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.json", delta=DELTA, accountant="rdp")
    entry = ledger.record(run_id="7", round=3, noise_multiplier=1.2, sample_rate=0.05, steps=40)
    before = ledger.path.read_bytes()
    # a retried round: same numbers, even with a ceiling it would now exceed, charges nothing
    again = PrivacyLedger(ledger.path, delta=DELTA, accountant="rdp").record(
        run_id="7", round=3, noise_multiplier=1.2, sample_rate=0.05, steps=40, ceiling_epsilon=1e-3
    )
    assert again == entry
    assert ledger.path.read_bytes() == before
    with pytest.raises(LedgerError, match="already recorded") as info:
        ledger.record(run_id="7", round=3, noise_multiplier=1.2, sample_rate=0.05, steps=41)
    assert str(ledger.path) in str(info.value)
    assert ledger.path.read_bytes() == before


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("", "not valid JSON"),
        ('{"format": "fedpeft.privacy_ledger", "version": 1, "accou', "not valid JSON"),
        ("[]", "expected a JSON object"),
        ('{"format": "other"}', "expected a JSON object"),
        ("ENTRY_STEPS_NEGATIVE", r"steps=-1 is not an integer >= 0"),
        ("ENTRY_MISSING_FIELD", "exactly the fields"),
        ("ENTRY_DUPLICATE", "repeats run"),
        ("ENTRY_BAD_RATE", "sample_rate=2.0"),
    ],
)
def test_corrupted_ledger_raises_naming_the_path_and_is_not_reset(
    tmp_path: Path, content: str, match: str
) -> None:
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger(path, delta=DELTA, accountant="rdp")
    ledger.record(run_id="r", round=1, noise_multiplier=1.0, sample_rate=0.01, steps=10)
    if content.startswith("ENTRY_"):
        document = json.loads(path.read_text())
        entry = document["entries"][0]
        if content == "ENTRY_STEPS_NEGATIVE":
            entry["steps"] = -1
        elif content == "ENTRY_MISSING_FIELD":
            del entry["sample_rate"]
        elif content == "ENTRY_DUPLICATE":
            document["entries"].append(dict(entry))
        else:
            entry["sample_rate"] = 2.0
        content = json.dumps(document)
    path.write_text(content)

    for action in (
        lambda: PrivacyLedger(path, delta=DELTA, accountant="rdp"),
        ledger.epsilon,
        lambda: ledger.record(
            run_id="r", round=2, noise_multiplier=1.0, sample_rate=0.01, steps=10
        ),
    ):
        with pytest.raises(LedgerError, match=match) as info:
            action()
        assert str(path) in str(info.value) and "Do not delete" in str(info.value)
    assert path.read_text() == content  # never silently reset


def test_ledger_settings_are_fixed_for_its_life(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    PrivacyLedger(path, delta=DELTA, accountant="rdp")
    with pytest.raises(LedgerError, match="accountant='rdp', delta=1e-05"):
        PrivacyLedger(path, delta=DELTA, accountant="prv")
    with pytest.raises(LedgerError, match="opened with accountant='rdp', delta=0.0001"):
        PrivacyLedger(path, delta=1e-4, accountant="rdp")
    with pytest.raises(LedgerError, match="does not exist"):
        PrivacyLedger(tmp_path / "missing" / "ledger.json", delta=DELTA)
    assert json.loads(path.read_text())["format"] == LEDGER_FORMAT


def test_invalid_arguments_are_named(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.json", delta=DELTA, accountant="rdp")
    with pytest.raises(PrivacyConfigError, match="noise_multiplier=-1.*steps=2.5"):
        ledger.record(run_id="r", round=1, noise_multiplier=-1.0, sample_rate=0.5, steps=2.5)  # type: ignore[arg-type]
    with pytest.raises(PrivacyConfigError, match="run_id=''"):
        ledger.record(run_id="", round=1, noise_multiplier=1.0, sample_rate=0.5, steps=1)
    with pytest.raises(PrivacyConfigError, match="round=-1"):
        ledger.record(run_id="r", round=-1, noise_multiplier=1.0, sample_rate=0.5, steps=1)
    with pytest.raises(PrivacyConfigError, match="loosen"):
        ledger.check_round(
            noise_multiplier=1.0, sample_rate=0.5, steps=1, ceiling_epsilon=8.0, delta=1e-3
        )
    with pytest.raises(PrivacyConfigError, match="ceiling_epsilon=0"):
        ledger.check_round(noise_multiplier=1.0, sample_rate=0.5, steps=1, ceiling_epsilon=0)
    with pytest.raises(PrivacyConfigError, match="delta=2"):
        PrivacyLedger(tmp_path / "other.json", delta=2)
    assert ledger.entries == ()


def test_summary_has_the_privacy_json_figures(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.json", delta=DELTA, accountant="rdp")
    assert ledger.summary().epsilon == 0.0
    _record_all(ledger, MIXED_ROUNDS)
    summary = ledger.summary().as_dict()
    assert summary == {
        "epsilon": pytest.approx(GOLDEN[("mixed", "rdp")], rel=5e-4),
        "delta": DELTA,
        "accountant": "rdp",
        "noise_multipliers": [1.1, 0.8],
        "sample_rates": [0.01, 0.02],
        "total_steps": 1000,
        "rounds": 3,
        "runs": ["run-a", "run-b"],
    }
    json.dumps(summary)  # JSON-ready


def test_no_temporary_files_are_left(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.json", delta=DELTA, accountant="rdp")
    _record_all(ledger, MIXED_ROUNDS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.json", "ledger.json.lock"]


def _record_rounds(path: str, run_id: str, count: int) -> None:
    ledger = PrivacyLedger(path, delta=DELTA, accountant="rdp")
    for round_ in range(count):
        ledger.record(run_id=run_id, round=round_, noise_multiplier=1.0, sample_rate=0.01, steps=1)


def test_concurrent_writers_do_not_lose_records(tmp_path: Path) -> None:
    path = str(tmp_path / "ledger.json")
    PrivacyLedger(path, delta=DELTA, accountant="rdp")
    context = multiprocessing.get_context("fork")  # no re-import of torch in the children
    workers = [
        context.Process(target=_record_rounds, args=(path, f"run-{i}", 15)) for i in range(3)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    entries = PrivacyLedger(path, delta=DELTA, accountant="rdp").entries
    assert len(entries) == 45
    assert {e.key for e in entries} == {(f"run-{i}", r, "") for i in range(3) for r in range(15)}


def test_a_round_with_another_binding_is_charged_again(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.json", delta=DELTA, accountant="rdp")
    args = {"run_id": "fed", "round": 1, "noise_multiplier": 1.0, "sample_rate": 0.01, "steps": 10}
    first = ledger.record(**args, binding="a" * 64)
    assert ledger.record(**args, binding="a" * 64) == first  # a retry: charged once
    assert len(ledger.entries) == 1
    ledger.record(**args, binding="b" * 64)  # changed inputs: another release, another charge
    assert [e.binding for e in ledger.entries] == ["a" * 64, "b" * 64]
    assert ledger.epsilon() == pytest.approx(
        _opacus_epsilon([(1.0, 0.01, 10), (1.0, 0.01, 10)], "rdp"), rel=1e-9
    )


def test_a_retry_that_released_something_else_is_refused(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.json", delta=DELTA, accountant="rdp")
    key = {"run_id": "fed", "round": 1, "binding": "a" * 64}
    with pytest.raises(LedgerError, match="charge it first"):
        ledger.attach_release(**key, release="1" * 64)
    ledger.record(**key, noise_multiplier=1.0, sample_rate=0.01, steps=10)
    ledger.attach_release(**key, release="1" * 64)
    ledger.attach_release(**key, release="1" * 64)  # the identical retry
    before = ledger.path.read_bytes()
    with pytest.raises(ReleaseMismatchError, match="withheld"):
        ledger.attach_release(**key, release="2" * 64)
    assert ledger.path.read_bytes() == before
    assert ledger.entries[0].release == "1" * 64


def test_evaluation_is_once_per_charged_round(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.json", delta=DELTA, accountant="rdp")
    with pytest.raises(EvaluationRefusedError, match="not charged"):
        ledger.record_evaluation(run_id="fed", round=1, adapter="1" * 64)
    ledger.record(run_id="fed", round=1, noise_multiplier=1.0, sample_rate=0.01, steps=1)
    ledger.record_evaluation(run_id="fed", round=1, adapter="1" * 64)
    ledger.record_evaluation(run_id="fed", round=1, adapter="1" * 64)  # a retry
    with pytest.raises(EvaluationRefusedError, match="probe"):
        ledger.record_evaluation(run_id="fed", round=1, adapter="2" * 64)
    with pytest.raises(EvaluationRefusedError, match="not charged"):
        ledger.record_evaluation(run_id="fed", round=2, adapter="1" * 64)
    reopened = PrivacyLedger(ledger.path, delta=DELTA, accountant="rdp")
    assert [(e.run_id, e.round, e.adapter) for e in reopened.evaluations] == [("fed", 1, "1" * 64)]


def test_a_version_1_ledger_is_read_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    entry = {
        "run_id": "old",
        "round": 1,
        "noise_multiplier": 1.0,
        "sample_rate": 0.01,
        "steps": 10,
        "recorded_at": "2026-11-01T00:00:00+00:00",
    }
    path.write_text(
        json.dumps(
            {
                "format": "fedpeft.privacy_ledger",
                "version": 1,
                "accountant": "rdp",
                "delta": DELTA,
                "entries": [entry],
            }
        )
    )
    ledger = PrivacyLedger(path, delta=DELTA, accountant="rdp")
    assert ledger.history == [(1.0, 0.01, 10)] and ledger.entries[0].binding == ""
    ledger.record(
        run_id="new", round=1, noise_multiplier=1.0, sample_rate=0.01, steps=10, binding="c" * 64
    )
    document = json.loads(path.read_text())
    assert document["version"] == 2 and len(document["entries"]) == 2
    assert document["entries"][0]["recorded_at"] == entry["recorded_at"]
