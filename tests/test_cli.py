"""The ``fedpeft`` command: errors before work, simulate → export round trip."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from fedpeft.cli import main
from fedpeft.config import from_yaml
from fedpeft.model import MODEL_LOADERS, build_model, set_flat
from fedpeft.server.federation import run_federation
from fedpeft.server.rundir import RunDir
from tests.conftest import tiny_config
from tests.test_federation import _grid


def test_unknown_key_exits_2_naming_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "federation.num_sitez=3"]) == 2
    assert "federation.num_sitez" in capsys.readouterr().err


def test_bad_value_exits_2_before_any_work(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["simulate", "federation.rounds=0", f"output_dir={tmp_path / 'run'}"]) == 2
    assert "federation.rounds=0: must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.fixture
def finished_run(cls_csv: Path, tmp_path: Path) -> Path:
    config = tiny_config("classification", cls_csv, "federation.rounds=1")
    run_federation(_grid(config, tmp_path), config, run_dir=tmp_path / "run")
    return tmp_path / "run"


def test_export_copies_the_peft_adapter(finished_run: Path, tmp_path: Path) -> None:
    assert main(["export", str(finished_run), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    config = from_yaml((finished_run / "config.yaml").read_text())
    base, _ = MODEL_LOADERS[config.model.loader](config.model)
    PeftModel.from_pretrained(base, str(tmp_path / "out"))


def test_export_merge_gives_the_adapted_model(finished_run: Path, tmp_path: Path) -> None:
    assert main(["export", str(finished_run), "--merge", "--out", str(tmp_path / "merged")]) == 0
    config = from_yaml((finished_run / "config.yaml").read_text())
    loaded = build_model(config.model, config.lora, seed=config.seed)
    checkpoint = RunDir(finished_run).latest_checkpoint()
    assert checkpoint is not None
    set_flat(loaded.peft_model, loaded.layout, checkpoint.global_flat)
    merged = type(MODEL_LOADERS[config.model.loader](config.model)[0]).from_pretrained(
        str(tmp_path / "merged")
    )
    ids = torch.randint(5, 200, (2, 10))
    loaded.peft_model.eval()
    merged.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            merged(input_ids=ids).logits,
            loaded.peft_model(input_ids=ids).logits,
            rtol=1e-4,
            atol=1e-5,
        )


def test_export_refuses_a_folder_that_is_not_a_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "not a finished fedpeft run directory" in capsys.readouterr().err


def test_sweep_wrapper_refuses_a_bad_override_before_running(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from simulations.sweep import main as sweep_main

    out = tmp_path / "sweep"
    assert sweep_main(["--out", str(out), "federation.rounds=1,2", "federation.nope=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedpeft: error:") and "federation.nope" in err
    assert not out.exists()


def test_a_causal_lm_round_line_shows_its_perplexity() -> None:
    import io

    from fedpeft.server.progress import Progress
    from fedpeft.testing import round_record

    row = round_record(
        round=2,
        rounds=3,
        sites_replied=3,
        sites_sampled=3,
        sites_failed=0,
        train_loss=None,
        eval_loss=3.203,
        eval_accuracy=0.407,
        bytes_up=2_200_000,
        bytes_down=2_200_000,
        seconds=38.3,
        epsilon_max=8.0,
    )
    plain, causal = io.StringIO(), io.StringIO()
    Progress(stream=plain).round_done(row)
    Progress(stream=causal).round_done(replace(row, eval_perplexity=24.605))
    assert "eval loss 3.203 acc 0.407" in plain.getvalue()  # classification: unchanged
    assert "eval loss 3.203 ppl 24.61 acc 0.407" in causal.getvalue()
