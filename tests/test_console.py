"""The console of ``fedpeft simulate``: fedpeft's own lines live, everything else in log.txt,
and Flower's current simulation path (``flwr run``) behind it (fedpeft.console,
fedpeft.simulation)."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest

from fedpeft.config import ConfigError, compose_config
from fedpeft.console import PLAIN_EVERY_S, Console, shown_path
from fedpeft.server.progress import round_line
from fedpeft.server.rounds import RoundRecord
from fedpeft.simulation import APP_DIR, RunLog, last_error, transformers_log, write_flower_app
from fedpeft.testing import offline_env, round_record

BIN = Path(sys.executable).parent
#: What only Flower, Ray, transformers, Opacus or Python's warnings print.
LIBRARY_LINES = re.compile(
    r"ClientAppActor|Warning|INFO |WARNING |Starting Flower|SuperLink|Secure RNG turned off"
)
STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} \[[\w -]+\] ")


def _row(round_number: int, seconds: float) -> RoundRecord:
    return round_record(
        round=round_number,
        rounds=3,
        sites_sampled=2,
        sites_replied=2,
        sites_failed=0,
        train_loss=0.5,
        eval_loss=0.4,
        eval_accuracy=0.75,
        bytes_up=2000,
        bytes_down=1000,
        seconds=seconds,
        epsilon_max=1.25,
    )


def _events(path: Path, *events: dict[str, object]) -> None:
    with path.open("a", encoding="utf-8") as handle:
        for event in events:
            handle.write(json.dumps(event) + "\n")


def test_plain_output_shows_rounds_phases_and_an_estimate(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    t = 1000.0
    _events(
        events,
        {"event": "start", "time": t, "rounds": 3, "sites": 2, "run_dir": "R"}
        | {"adapter_floats": 10},
        {"event": "round_start", "time": t, "round": 1, "sampled": 2},
        {"event": "phase", "time": t, "round": 1, "phase": "training"},
        {"event": "exchange", "time": t, "stage": "", "replied": 0, "asked": 2},
        {"event": "exchange", "time": t + 5, "stage": "", "replied": 1, "asked": 2},
        {"event": "exchange", "time": t + 8, "stage": "", "replied": 2, "asked": 2},
        {"event": "round", "time": t + 20, "row": _row(1, 20.0).as_json()},
        {"event": "round_start", "time": t + 20, "round": 2, "sampled": 2},
        {"event": "phase", "time": t + 20, "round": 2, "phase": "training"},
        {"event": "exchange", "time": t + 20, "stage": "secagg_masked", "replied": 0, "asked": 2},
        {"event": "exchange", "time": t + 24, "stage": "secagg_masked", "replied": 2, "asked": 2},
        {"event": "round", "time": t + 30, "row": _row(2, 10.0).as_json()},
        {"event": "message", "time": t + 30, "text": "federation ended"},
    )
    out = io.StringIO()
    console = Console(out, live=False)
    offset = console.follow(events, 0, running=lambda: False)
    assert offset == events.stat().st_size
    assert out.getvalue().splitlines() == [
        "fedpeft: 3 round(s) over 2 site(s); adapter 10 floats; run directory R",
        # a plain line when an exchange completes (the one at 1/2 is within PLAIN_EVERY_S)
        "round 1/3 · training · sites 2/2 · 8 s · estimate after round 1",
        round_line(_row(1, 20.0)),
        # after round 1 (20 s): 20 s - 4 s elapsed of round 2, + 20 s for round 3
        "round 2/3 · training · secure aggregation: masked update · sites 2/2 · 4 s · "
        "about 36 s left",
        round_line(_row(2, 10.0)),
        "fedpeft: federation ended",
    ]
    # rounds after the first (which includes starting Ray) give the estimate from then on:
    # 4 s into round 3 of 3, with round 2 having taken 10 s
    console.round = 3
    assert console.estimate(4.0) == "about 6 s left"


def test_a_long_exchange_prints_a_plain_line_every_so_often(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    _events(
        events,
        {"event": "round_start", "time": 0.0, "round": 1, "sampled": 4},
        {"event": "phase", "time": 0.0, "round": 1, "phase": "evaluation"},
        {"event": "exchange", "time": 0.0, "stage": "", "replied": 0, "asked": 4},
        {"event": "exchange", "time": 1.0, "stage": "", "replied": 1, "asked": 4},
        {"event": "exchange", "time": PLAIN_EVERY_S + 1, "stage": "", "replied": 2, "asked": 4},
    )
    out = io.StringIO()
    Console(out, live=False).follow(events, 0, running=lambda: False)
    assert out.getvalue().splitlines() == [
        f"round 1/0 · evaluation · sites 2/4 · {PLAIN_EVERY_S + 1:.0f} s · estimate after round 1"
    ]


def test_paths_are_shown_relative_to_the_working_folder_when_inside_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inside, outside = tmp_path / "work", tmp_path / "elsewhere"
    (inside / "runs" / "r1").mkdir(parents=True)
    outside.mkdir()
    monkeypatch.chdir(inside)
    assert shown_path(inside / "runs" / "r1" / "log.txt") == os.path.join("runs", "r1", "log.txt")
    assert shown_path(outside / "r2") == str(outside / "r2")
    out = io.StringIO()
    Console(out, live=False).notices(
        compose_config(["experiment=tiny_classification", "data.path=x.csv"]),
        log_dir=inside / "runs" / "r1",
    )
    assert "output goes to runs/r1/log.txt (" in out.getvalue()


def test_transformers_log_records_go_to_a_list_not_the_console() -> None:
    import logging

    from transformers.utils import logging as hf_logging

    logger = hf_logging.get_logger("transformers.modeling_utils")
    library = logging.getLogger("transformers")
    before = list(library.handlers)
    logged: list[str] = []
    with transformers_log(logged):
        inside = list(library.handlers)
        logger.warning("BertModel LOAD REPORT from: /somewhere")  # what from_pretrained logs
    assert logged == ["BertModel LOAD REPORT from: /somewhere"]

    def console(handlers: list[logging.Handler]) -> list[logging.Handler]:
        return [h for h in handlers if type(h) is logging.StreamHandler]  # transformers' own

    assert console(before) and not console(inside)  # its console handler was off meanwhile
    assert set(library.handlers) == set(before)  # and is back


def test_only_whole_lines_are_read_and_the_rest_waits(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    whole = json.dumps({"event": "message", "time": 0.0, "text": "one"}) + "\n"
    events.write_text(whole + '{"event": "mess')  # the ServerApp is still writing it
    out = io.StringIO()
    offset = Console(out, live=False).follow(events, 0, running=lambda: False)
    assert offset == len(whole.encode()) and out.getvalue() == "fedpeft: one\n"


def test_on_a_terminal_the_status_is_redrawn_and_the_round_line_stays(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    _events(
        events,
        {"event": "round_start", "time": 0.0, "round": 1, "sampled": 2},
        {"event": "phase", "time": 0.0, "round": 1, "phase": "training"},
        {"event": "exchange", "time": 0.0, "stage": "secagg_setup", "replied": 1, "asked": 2},
        {"event": "round", "time": 3.0, "row": _row(1, 3.0).as_json()},
    )
    out = io.StringIO()
    console = Console(out, live=True)
    console.follow(events, 0, running=lambda: False)
    console.close()
    text = out.getvalue()
    assert "secure aggregation: keys · sites 1/2" in text  # drawn while the round ran
    assert "\x1b[" in text  # redrawn in place, with terminal control codes
    assert text.rstrip().endswith(round_line(_row(1, 3.0)))


def test_the_log_timestamps_every_line_and_drops_colour_codes(tmp_path: Path) -> None:
    log = RunLog(tmp_path / "log.txt")
    log.write("flwr run", "\x1b[92mINFO \x1b[0m:      Starting Flower Simulation")
    log.write("flwr run", "ValueError: something broke")
    log.close()
    lines = (tmp_path / "log.txt").read_text().splitlines()
    assert all(STAMP.match(line) for line in lines), lines
    assert lines[0].endswith("[flwr run] INFO :      Starting Flower Simulation")
    assert last_error(tmp_path / "log.txt") == "ValueError: something broke"


def test_the_flower_app_fedpeft_submits_is_fedpefts_own_declaration(tmp_path: Path) -> None:
    import tomllib

    from flwr.cli.config_utils import load_and_validate

    app = write_flower_app(tmp_path / "app")
    ours = tomllib.loads((APP_DIR / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    config, _ = load_and_validate(app / "pyproject.toml")  # Flower's own check, modules too
    assert config["tool"]["flwr"]["app"]["components"] == ours["components"]
    assert config["tool"]["flwr"]["app"]["config"] == ours["config"]
    assert sorted(p.name for p in app.iterdir()) == ["pyproject.toml"]  # no code: installed


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _simulate(cls_csv: Path, out: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    command = [str(BIN / "fedpeft"), "simulate", *flags, "experiment=tiny_private"]
    command += [f"data.path={cls_csv}", f"output_dir={out}"]
    return subprocess.run(
        command, env=offline_env(), capture_output=True, text=True, timeout=600, check=False
    )


def test_the_console_has_fedpefts_lines_and_the_log_has_the_libraries(
    cls_csv: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    done = _simulate(cls_csv, out)
    assert done.returncode == 0, done.stderr[-3000:]
    console = (done.stdout + done.stderr).splitlines()
    ours = ("fedpeft: ", "round ")  # fedpeft's own lines may name a library's warning
    foreign = [x for x in console if LIBRARY_LINES.search(x) and not x.startswith(ours)]
    assert not foreign, console
    assert sum("round 1/2 |" in line for line in console) == 1
    assert sum("round 2/2 |" in line for line in console) == 1
    assert any(line.startswith("round 1/2 · training · sites 3/3") for line in console)
    # Opacus's warning, stated once by fedpeft in its own words
    assert sum("'Secure RNG turned off' warning in the log" in line for line in console) == 1
    # fedpeft.plan's check of the DP noise: 8 examples a step cannot move 2,048 LoRA coordinates
    (advice,) = [line for line in console if line.startswith("fedpeft: warning: ")]
    assert "3 of 3 site(s) train LoRA under more DP noise" in advice
    assert "LoRA will not learn" in advice

    log = (out / "log.txt").read_text().splitlines()
    assert all(STAMP.match(line) for line in log), [x for x in log if not STAMP.match(x)][:5]
    text = "\n".join(log)
    for library in ("ClientAppActor", "Starting Flower Simulation", "Secure RNG turned off"):
        assert library in text, library
    assert "round 2/2 |" in text  # the ServerApp's own lines are in the log too
    # the SuperLink this run started (and its process group) ended with the run
    pids = [int(p) for p in re.findall(r"Started server process \[(\d+)\]", text)]
    assert pids and all(_gone(pid) for pid in pids)


@pytest.mark.slow
def test_verbose_shows_the_libraries_on_the_console_too(cls_csv: Path, tmp_path: Path) -> None:
    done = _simulate(cls_csv, tmp_path / "run", "-v")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ClientAppActor" in done.stderr and "Starting Flower Simulation" in done.stderr
    assert "ClientAppActor" in (tmp_path / "run" / "log.txt").read_text()


def _end_local_superlink(home: Path) -> None:
    """End the SuperLink ``flwr run`` started detached for ``home`` (found by its log path)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "flower-superlink" in cmdline and str(home) in cmdline:
            try:
                os.kill(int(proc.name), signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + 20
            while not _gone(int(proc.name)) and time.monotonic() < deadline:
                time.sleep(0.2)
            if not _gone(int(proc.name)):
                os.kill(int(proc.name), signal.SIGKILL)


@pytest.mark.slow
def test_flwr_run_from_the_repository_root_runs_the_same_app(cls_csv: Path, tmp_path: Path) -> None:
    from tests.deploy.harness import free_port

    home = tmp_path / "flwr-home"
    env = offline_env(
        FLWR_HOME=str(home),
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()),
        FLWR_LOCAL_CONTROL_API_PORT=str(free_port()),
    )
    out = tmp_path / "run"
    overrides = f"experiment=tiny_classification data.path={cls_csv} output_dir={out}"
    flwr = [str(BIN / "flwr"), "run", ".", "--stream", "--run-config", f'overrides="{overrides}"']
    try:
        # Flower's default is 2 SuperNodes; the tiny federation has 3 sites: refused, named
        mismatch = subprocess.run(
            flwr, cwd=APP_DIR, env=env, capture_output=True, text=True, timeout=600
        )
        said = mismatch.stdout + mismatch.stderr
        assert "started 2 SuperNode(s)" in said and "federation.num_sites=3" in said, said[-3000:]
        assert not (out / "metrics.jsonl").exists()

        done = subprocess.run(
            [*flwr, "--federation-config", "num-supernodes=3"],
            cwd=APP_DIR,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rows] == [1, 2]
        assert all(r["sites_replied"] == 3 and r["sites_failed"] == 0 for r in rows)
        assert (out / "adapter" / "adapter_model.safetensors").is_file()
    finally:
        _end_local_superlink(home)
    # flwr run left the repository's pyproject.toml as it was (no migration rewrote it)
    assert "CONFIGURATION MIGRATION NOTICE" not in (APP_DIR / "pyproject.toml").read_text()


def _warns_then(outcome: BaseException | None) -> Callable[[object], None]:
    def check(config: object) -> None:
        warnings.warn("a note from a library", UserWarning, stacklevel=1)
        if outcome is not None:
            raise outcome

    return check


def test_a_failed_check_raises_and_shows_its_warnings_once(
    monkeypatch: pytest.MonkeyPatch, cls_csv: Path, tmp_path: Path
) -> None:
    import fedpeft.simulation as simulation

    monkeypatch.setattr(simulation, "preflight", _warns_then(ConfigError("bad input")))
    config = compose_config(["experiment=tiny_classification", f"data.path={cls_csv}"])
    with (
        pytest.warns(UserWarning, match="a note from a library") as shown,
        pytest.raises(ConfigError, match="bad input"),
    ):
        simulation.simulate(config, run_dir=tmp_path / "run")
    assert sum("a note from a library" in str(w.message) for w in shown) == 1
    assert not (tmp_path / "run").exists()  # nothing was started or written


def test_the_checks_warnings_go_to_the_log(
    monkeypatch: pytest.MonkeyPatch, cls_csv: Path, tmp_path: Path
) -> None:
    import fedpeft.simulation as simulation

    def no_superlink(self: object) -> None:
        raise RuntimeError("not started in this test")

    monkeypatch.setattr(simulation, "preflight", _warns_then(None))
    monkeypatch.setattr(simulation.SuperLink, "start", no_superlink)
    config = compose_config(["experiment=tiny_classification", f"data.path={cls_csv}"])
    with pytest.raises(RuntimeError, match="not started in this test"):
        simulation.simulate(config, run_dir=tmp_path / "run", console=Console(io.StringIO()))
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "UserWarning: a note from a library" in log
