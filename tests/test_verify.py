"""``fedpeft verify`` on a real tiny federation: an untouched run verifies, each tampering fails.

The federation (3 deployed sites, tiny BERT, DP on, 2 rounds, in process) runs once per
module; every tamper test works on its own copy of the run directory and ledgers, changes one
thing, and expects exactly the check that guards it to fail.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from fedpeft import constants as K
from fedpeft.cli import main
from fedpeft.client.app import make_client_app
from fedpeft.config import compose_config
from fedpeft.server.federation import run_federation
from fedpeft.testing import InProcessGrid, write_classification_csv

pytestmark = [
    pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning"),
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
    pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha:UserWarning"),
    pytest.mark.filterwarnings("ignore:Optimal order is the smallest alpha:UserWarning"),
]
NODES = (11, 22, 33)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished federation: ``run/``, ``sites/ledger<node>.json`` and their audit trails."""
    root = tmp_path_factory.mktemp("federation")
    config = compose_config(
        [
            "experiment=tiny_private",
            f"data.path={root / 'unused.csv'}",
            "privacy.accountant=rdp",  # fast; the verifier recomputes with the same one
        ]
    )
    (root / "sites").mkdir()
    nodes: dict[int, dict[str, Any]] = {
        node: {
            K.NODE_DATA_PATH: str(
                write_classification_csv(root / f"site{node}.csv", n=64, seed=node)
            ),
            K.NODE_LEDGER_PATH: str(root / "sites" / f"ledger{node}.json"),
            K.NODE_EPSILON_MAX: 100.0,
            K.NODE_DELTA: 1e-5,
        }
        for node in NODES
    }
    run_federation(InProcessGrid(make_client_app(config), nodes), config, run_dir=root / "run")
    return root


@pytest.fixture
def copy(finished: Path, tmp_path: Path) -> Path:
    shutil.copytree(finished / "run", tmp_path / "run")
    shutil.copytree(finished / "sites", tmp_path / "sites")
    return tmp_path


def _args(root: Path, *, ledgers: bool = True, trails: bool = True) -> list[str]:
    args = ["verify", str(root / "run")]
    for node in NODES:
        if ledgers:
            args += ["--ledger", str(root / "sites" / f"ledger{node}.json")]
        if trails:
            args += ["--site-audit", str(root / "sites" / f"ledger{node}.json.audit.jsonl")]
    return args


def _verify(capsys: pytest.CaptureFixture[str], args: list[str]) -> tuple[int, list[str]]:
    code = main(args)
    lines = capsys.readouterr().out.splitlines()
    return code, [line for line in lines if line.startswith("FAIL")]


def test_an_untouched_run_verifies(copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(_args(copy))
    out = capsys.readouterr().out
    assert code == 0, out
    assert "FAIL" not in out
    # coordinator chain + anchor, 3 site chains, 3 sites against the coordinator's log,
    # reported ε, 3 ledgers, ceilings, adapter
    assert sum(line.startswith("ok") for line in out.splitlines()) == 14
    assert out.count("the site released updates in round(s) [1, 2]") == len(NODES)
    assert "every line links to the one before" in out
    assert "is the adapter logged after round 2" in out
    code = main(_args(copy, ledgers=False, trails=False))  # privacy.json alone
    out = capsys.readouterr().out
    assert code == 0, out
    assert "from privacy.json's σ, q, steps" in out
    # one flag before several files, as a shell glob gives them
    ledgers = [str(root) for root in sorted((copy / "sites").glob("ledger*.json"))]
    assert main(["verify", str(copy / "run"), "--ledger", *ledgers]) == 0
    assert capsys.readouterr().out.count("recomputed with Opacus") == len(NODES)


def test_an_edited_audit_line_fails_the_chain(
    copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = copy / "run" / "audit.jsonl"
    lines = path.read_text().splitlines()
    entry = json.loads(lines[1])  # round 1
    assert entry["event"] == "round"
    entry["sampled"] = entry["sampled"][:1]
    lines[1] = json.dumps(entry, sort_keys=True, separators=(",", ":"))
    path.write_text("\n".join(lines) + "\n")
    code, fails = _verify(capsys, _args(copy))
    assert code == 1
    assert len(fails) == 1 and "audit.jsonl: line 3 does not follow line 2" in fails[0]


def test_a_deleted_audit_line_fails_the_chain(
    copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = copy / "run" / "audit.jsonl"
    lines = path.read_text().splitlines()
    del lines[1]
    path.write_text("\n".join(lines) + "\n")
    code, fails = _verify(capsys, _args(copy))
    assert code == 1
    assert any("line 2 does not follow line 1" in f for f in fails), fails


def test_a_removed_last_audit_line_fails_the_anchor(
    copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = copy / "run" / "audit.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n")
    code, fails = _verify(capsys, _args(copy))
    assert code == 1
    assert any("were removed from its end" in f for f in fails), fails


def test_a_changed_epsilon_in_privacy_json_fails(
    copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = copy / "run" / "privacy.json"
    privacy = json.loads(path.read_text())
    privacy["sites"]["22"]["epsilon"] *= 0.5
    path.write_text(json.dumps(privacy))
    code, fails = _verify(capsys, _args(copy, trails=False))
    assert code == 1
    assert any("privacy.json and audit.jsonl differ (site 22" in f for f in fails), fails
    assert any("ledger22.json: site 22 reported" in f and "recomputes" in f for f in fails), fails
    code, fails = _verify(capsys, _args(copy, ledgers=False, trails=False))
    assert code == 1
    assert any("site 22 (from privacy.json" in f and "states" in f for f in fails), fails


def test_a_changed_ledger_fails_its_recomputed_epsilon(
    copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = copy / "sites" / "ledger33.json"
    ledger = json.loads(path.read_text())
    ledger["entries"][0]["noise_multiplier"] *= 2  # round 1 "had more noise": a smaller ε
    path.write_text(json.dumps(ledger))
    code, fails = _verify(capsys, _args(copy, trails=False))
    assert code == 1
    assert len(fails) == 1 and "ledger33.json: site 33 reported" in fails[0]
    assert "recomputes" in fails[0]


def test_a_swapped_adapter_fails(copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    weights = copy / "run" / "adapter" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    code, fails = _verify(capsys, _args(copy))
    assert code == 1
    assert len(fails) == 1 and "is not the adapter the federation produced" in fails[0]


def test_an_edited_site_trail_fails(copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = copy / "sites" / "ledger11.json.audit.jsonl"
    lines = path.read_text().splitlines()
    lines[0] = lines[0].replace('"round":1', '"round":7')
    path.write_text("\n".join(lines) + "\n")
    code, fails = _verify(capsys, _args(copy))
    assert code == 1
    assert (
        len(fails) == 1 and "ledger11.json.audit.jsonl: line 2 does not follow line 1" in fails[0]
    )


def test_a_folder_that_is_no_run_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["verify", str(tmp_path)]) == 2
    assert "is not a fedpeft run directory" in capsys.readouterr().err


def _rewrite_coordinator_log(run: Path, edit: Any) -> None:
    """Play a coordinator who rewrites audit.jsonl whole: ``edit`` changes the round lines,
    every hash is recomputed and the last checkpoint's anchor moved to the new head, so the
    chain and the anchor both verify; only the sites' own trails can contradict it."""
    from fedpeft.privacy.trail import GENESIS, canonical_line, line_sha256

    lines = [json.loads(x) for x in (run / "audit.jsonl").read_text().splitlines()]
    prev, out = GENESIS, []
    for entry in lines:
        if entry["event"] == "round":
            edit(entry)
        entry["prev"] = prev
        raw = canonical_line(entry)
        prev = line_sha256(raw)
        out.append(raw.decode())
    (run / "audit.jsonl").write_text("\n".join(out) + "\n")
    state_file = sorted((run / "checkpoints").glob("round-*"))[-1] / "state.json"
    state = json.loads(state_file.read_text())
    state["audit_head"] = {"lines": len(out), "sha256": prev}
    state_file.write_text(json.dumps(state))


def test_a_rewritten_coordinator_log_is_caught_by_the_sites_trails(
    copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hidden = str(NODES[0])

    def hide(entry: dict[str, Any]) -> None:  # round 2's instruction to site 11 "never sent"
        if entry["round"] == 2:
            entry["sampled"] = [n for n in entry["sampled"] if n != hidden]
            entry["replied"] = [n for n in entry["replied"] if n != hidden]

    _rewrite_coordinator_log(copy / "run", hide)
    code, fails = _verify(capsys, _args(copy, ledgers=False, trails=False))
    assert code == 0 and fails == []  # the rewritten log alone is self-consistent
    code, fails = _verify(capsys, _args(copy, ledgers=False))
    assert code == 1 and len(fails) == 1, fails
    assert f"site {hidden}" in fails[0]
    assert "released an update in round(s) [2], which audit.jsonl does not list" in fails[0]


def test_a_coordinator_log_that_claims_an_update_the_site_never_sent_fails(
    copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ghost = str(NODES[1])
    trail = copy / "sites" / f"ledger{ghost}.json.audit.jsonl"
    entries = [json.loads(x) for x in trail.read_text().splitlines()]
    # the site's own trail ends after round 1: as if it never took part in round 2
    first = [e for e in entries if str(e.get("round")) != "2"]
    from fedpeft.privacy.trail import GENESIS, canonical_line, line_sha256

    prev, out = GENESIS, []
    for entry in first:
        entry["prev"], entry["seq"] = prev, len(out) + 1
        raw = canonical_line(entry)
        prev = line_sha256(raw)
        out.append(raw.decode())
    trail.write_text("\n".join(out) + "\n")
    code, fails = _verify(capsys, _args(copy, ledgers=False))
    assert code == 1 and len(fails) == 1, fails
    assert "counts its update in round(s) [2], which its own trail shows no update for" in fails[0]
