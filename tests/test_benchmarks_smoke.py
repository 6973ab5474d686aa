"""The benchmark scripts run on their tiny settings and write the JSON the README is built from.

Each script runs as a user would run it (its own process, ``--quick``) into a temporary folder,
never into ``benchmarks/results``. Only the shape of the results is checked, never a timing.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"


def run_script(name: str, *args: str, timeout: int = 900) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{name}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, (
        f"{name} {args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc


def load(path: Path) -> dict[str, Any]:
    assert path.is_file(), f"{path} was not written"
    data = json.loads(path.read_text())
    assert isinstance(data, dict)
    return data


def check_secagg_row(row: dict[str, Any]) -> None:
    assert {"sites", "vector_length", "num_neighbours", "threshold", "flower_over_ours"} <= set(row)
    for name in ("ours", "flower"):
        side = row[name]
        for key in (
            "client_masking_s",
            "client_total_s",
            "server_sum_s",
            "server_unmask_s",
            "upload_bytes_per_site",
            "download_bytes_per_site",
            "masked_vector_bytes",
            "upload_vs_plain",
        ):
            assert side[key] > 0, (name, key)
        # both decode to the plain mean within quantisation error
        assert side["max_abs_error_of_mean"] < 1e-5
    # the masked vectors' bytes are what the frameworks really send: uint32 vs int64 (+ header)
    assert row["ours"]["masked_vector_dtype"] == "uint32"
    assert row["ours"]["masked_vector_bytes"] == 4 * row["vector_length"]
    assert row["flower"]["masked_vector_dtype"] == "int64"
    assert row["flower"]["masked_vector_bytes"] > 8 * row["vector_length"]


def test_secagg_vs_flower_in_process(tmp_path: Path) -> None:
    out = tmp_path / "secagg_vs_flower.json"
    run_script("secagg_vs_flower", "--quick", "--no-sim", "--out", str(out))
    report = load(out)
    assert report["benchmark"] == "secagg_vs_flower"
    assert {"in_process", "dp_round", "simulation", "targets"} <= set(report)
    assert len(report["in_process"]) == 1
    check_secagg_row(report["in_process"][0])
    assert report["dp_round"]["seconds"] > 0
    assert set(report["targets"]) == {
        "bytes_per_site_vs_plain",
        "client_cost_vs_dp_round",
        "faster_than_flower",
        "simulated_round_vs_plain",
    }
    assert report["targets"]["simulated_round_vs_plain"]["met"] is None  # not run


@pytest.mark.slow
def test_secagg_vs_flower_with_simulations(tmp_path: Path) -> None:
    out = tmp_path / "secagg_vs_flower.json"
    run_script("secagg_vs_flower", "--quick", "--out", str(out))
    sim = load(out)["simulation"]
    assert sim["errors"] == {}
    assert set(sim["median_seconds_per_round"]) == {
        "ours_plain",
        "ours_secure",
        "flower_plain",
        "flower_secure",
    }
    assert all(v > 0 for v in sim["median_seconds_per_round"].values())
    assert sim["ours_secure_over_plain"] > 0 and sim["flower_secure_over_plain"] > 0


@pytest.fixture(scope="module")
def communication_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A results folder holding a quick communication.json (run once for this module)."""
    results = tmp_path_factory.mktemp("results")
    run_script("communication", "--quick", "--out", str(results / "communication.json"))
    return results


def test_communication(communication_results: Path) -> None:
    report = load(communication_results / "communication.json")
    assert report["benchmark"] == "communication"
    smol = report["models"]["smollm2_135m"]
    assert smol["base_parameters"] == 134_515_008 and smol["meta_count_matches_gguf"]
    assert smol["adapter_floats"] == 30 * 8 * ((576 + 576) + (576 + 192))
    keys = {"model", "strategy", "secure", "up_bytes", "down_bytes", "up_fraction"}
    for row in report["rows"]:
        assert keys <= set(row)
        assert 0 < row["up_fraction"] < 0.05 and row["down_bytes"] > 0
        if row["strategy"] == "ffa":  # FFA-LoRA sends B (and the head) only, both ways
            assert row["trained_floats"] < row["adapter_floats"]
            assert row["down_floats"] == row["trained_floats"]
        else:  # FedAvg moves A too: after round 1 everything differs from the start
            assert row["down_floats"] == row["adapter_floats"]
        if row["secure"]:
            assert row["secagg_extra_up_bytes"] > 0 and row["secagg_extra_down_bytes"] > 0
    assert {(r["model"], r["strategy"], r["secure"]) for r in report["rows"]} == {
        (m, s, secure)
        for m in ("minilm", "smollm2_135m")
        for s in ("fedavg", "ffa")
        for secure in (False, True)
    }


def test_report_from_results(communication_results: Path, tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    run_script(
        "run", "--report-only", "--results", str(communication_results), "--readme", str(readme)
    )
    text = readme.read_text()
    assert text.startswith("# Benchmarks")
    assert "## Headline figures" in text and "## Communication per site per round" in text


@pytest.mark.slow
def test_scale(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    run_script("scale", "--quick", "--out", str(out))
    report = load(out)
    assert [r["sites"] for r in report["results"]] == [10, 30]
    for row in report["results"]:
        assert row["sampled_per_round"] == 10
        assert row["peak_rss_mb"] > 0 and row["peak_pss_mb"] > 0 and row["peak_processes"] >= 2
        assert row["median_seconds_per_round"] > 0
    assert set(report["growth_first_to_last"]) == {
        "sites",
        "peak_rss",
        "peak_pss",
        "seconds_per_round",
    }


@pytest.mark.slow
def test_runner_runs_and_writes_readme(tmp_path: Path) -> None:
    results, readme = tmp_path / "results", tmp_path / "README.md"
    proc = run_script(
        "run",
        "--quick",
        "--only",
        "communication",
        "--results",
        str(results),
        "--readme",
        str(readme),
    )
    assert "[1/1] communication" in proc.stdout
    run = load(results / "run.json")
    assert run["mode"] == "quick" and run["benchmarks"]["communication"]["exit"] == 0
    load(results / "communication.json")
    text = readme.read_text()
    assert text.startswith("# Benchmarks")
    assert "## Headline figures" in text and "## Communication per site per round" in text


@pytest.mark.slow
def test_runner_report_from_all_quick_results(tmp_path: Path) -> None:
    results, readme = tmp_path / "results", tmp_path / "README.md"
    results.mkdir()
    run_script("secagg_vs_flower", "--quick", "--out", str(results / "secagg_vs_flower.json"))
    run_script("scale", "--quick", "--out", str(results / "scale.json"))
    shutil.copy(BENCH / "results" / "deployment_latency.json", results)  # a measured run
    run_script("run", "--report-only", "--results", str(results), "--readme", str(readme))
    text = readme.read_text()
    assert "## Secure aggregation" in text and "## Scale" in text and "### Targets" in text
    assert "## A deployed round against the same round simulated" in text
    assert (results / "scale.png").is_file()
    assert "results/scale.png" in text


@pytest.mark.slow
def test_deployment_latency(tmp_path: Path) -> None:
    out = tmp_path / "deployment_latency.json"
    run_script("deployment_latency", "--quick", "--out", str(out), timeout=1200)
    report = load(out)
    assert [(r["mode"], r["engine"]) for r in report["results"]] == [
        ("plain", "fedpeft-worker"),
        ("plain", "simulation"),
    ]
    for row in report["results"]:
        assert len(row["round_seconds"]) == 2 and all(s > 0 for s in row["round_seconds"])
        assert set(row["later_phase_s"]) == {"nodes", "train", "evaluate"}
    task = report["results"][0]["site_task_s"]  # parsed from the workers' logs
    assert 0 < task["app"] < task["task"]
    assert report["fresh_process_imports"]["training_stack_s"] > 0


@pytest.mark.slow
def test_instruct(tmp_path: Path) -> None:
    out = tmp_path / "instruct.json"
    run_script("instruct", "--quick", "--out", str(out))
    report = load(out)
    assert report["benchmark"] == "instruct"
    t = report["throughput"]
    assert t["tokens_per_second"]["dp"]["median"] > 0
    assert t["tokens_per_second"]["plain"]["median"] > 0
    q = report["quality"]
    (row,) = q["per_seed"]
    for name in ("dp_federation", "nonprivate_federation", "centralised"):
        assert math.isfinite(row[name]["perplexity"]) and row[name]["perplexity"] > 1
    assert row["held_out_examples"] > 0
    assert q["dp_over_nonprivate"]["median"] == pytest.approx(row["dp_over_nonprivate"])


def test_dp_throughput_measures_bare_opacus_beside_ours_in_rotating_order(
    tmp_path: Path,
) -> None:
    out = tmp_path / "dp_throughput.json"
    proc = run_script("dp_throughput", "--quick", "--out", str(out))
    report = load(out)
    names = ["plain", "dp_hooks", "dp_ghost", "opacus_hooks"]
    assert report["variants"] == names
    assert all(len(report["seconds"][n]) == report["repeats"] == 2 for n in names)
    # the order rotates: repeat 2 starts with the second variant, not the first
    order = [line.split()[2] for line in proc.stdout.splitlines() if line.startswith("repeat")]
    assert order[: len(names)] == names and order[len(names) : 2 * len(names)] == [
        *names[1:],
        names[0],
    ]
    assert all(s > 0 for s in report["setup_seconds"]["opacus_hooks"])
    assert report["setup_seconds"]["plain"] == [0.0, 0.0]
    assert set(report["paired_ratios"]) >= {"dp_hooks_over_plain", "dp_hooks_over_opacus"}
    assert set(report["targets"]) == {"dp_hooks_over_plain", "dp_hooks_over_opacus"}
    assert set(report["site_setup_seconds"]) == {"calibration", "ledger_charge"}
    for name in names:  # per example actually processed: the counts are the forward passes'
        assert all(n > 0 for n in report["examples_seen"][name])


@pytest.mark.slow
def test_dp_choices_pairs_dp_with_no_dp_by_seed_and_renders_its_section(tmp_path: Path) -> None:
    run_script(
        "dp_choices",
        "--quick",
        "--seeds",
        "2",
        "--settings",
        "large",
        "--choice",
        "lora.r=1 train.trainable=[head,lora]",
        "--out",
        str(tmp_path),
    )
    report = load(tmp_path / "dp_choices.json")
    assert list(report["settings"]) == ["large"] and report["setting"]["seeds"] == [0, 1]
    large = report["settings"]["large"]
    assert len(large["runs"]) == 2 * 3 * 2  # strategies × kinds × seeds
    for strategy in ("fedavg", "ffa"):
        by_kind = large["figures"][strategy]
        plain = [large["runs"][f"{strategy}-no_dp@{s}"]["accuracy"] for s in (0, 1)]
        for kind in ("no_dp", "dp", "dp_choice"):
            runs = [large["runs"][f"{strategy}-{kind}@{s}"] for s in (0, 1)]
            figure = by_kind[kind]
            assert figure["accuracy"]["per_seed"] == [round(r["accuracy"], 4) for r in runs]
            ratios = [r["accuracy"] / p for r, p in zip(runs, plain, strict=True)]
            assert figure["of_no_dp"]["mean"] == pytest.approx(np.mean(ratios), abs=1e-4)
            gains = [r["accuracy"] - r["accuracy_without_lora"] for r in runs]
            assert figure["lora_gain"]["per_seed"] == [round(g, 4) for g in gains]
            assert figure["lora_gain"]["min"] == round(min(gains), 4)
        # the DP runs spent the budget; the runs without DP spent none
        for s in (0, 1):
            assert large["runs"][f"{strategy}-no_dp@{s}"]["epsilon_spent"] is None
            for kind in ("dp", "dp_choice"):
                spent = large["runs"][f"{strategy}-{kind}@{s}"]["epsilon_spent"]
                assert 7.9 < spent <= 8.0
    every_seed = report["targets"]["large_dp_choice_lora_gain_every_seed"]
    assert set(every_seed) == {"fedavg", "ffa"}
    for strategy, met in every_seed.items():
        assert met == all(
            g > 0 for g in large["figures"][strategy]["dp_choice"]["lora_gain"]["per_seed"]
        )
    from benchmarks.dp_choices import section

    text = "\n".join(section(report))
    assert text.startswith("## DP training choices (`dp_choices.py`)")
    assert (
        "Baseline: `privacy.sample_rate=0.03`; choice: `lora.r=1 train.trainable=[head,lora]`"
        in text
    )
    assert report["setting"]["baseline"] == "privacy.sample_rate=0.03"  # the DP runs it beats
    assert text.count("| ffa | DP, the choice |") == 1
    # the reader is told why DP ÷ no DP can pass 1: without DP a batch is train.batch_size,
    # under DP it is q·N expected (the largest site's, at the recorded rate)
    batch, q, n = (
        report["setting"]["batch_size"],
        report["setting"]["sample_rate"],
        max(large["site_sizes"]),
    )
    assert f"`train.batch_size` = {batch};" in text
    assert f"({q * n:,.0f} at q = {q:g} and N = {n:,})" in text
