"""Exports and per-round adapters load right with plain transformers + peft, and carry a card.

"Plain" means a fresh Python process that never imports fedpeft (which registers the
mean-pooling head with the Auto classes on import): only what the folder holds decides which
head runs. Its logits are compared with fedpeft's own model rebuilt from the checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from fedpeft import constants as K
from fedpeft.cli import main
from fedpeft.client.app import make_client_app
from fedpeft.config import ConfigError, FedPeftConfig, compose_config
from fedpeft.export import BASE_DIR
from fedpeft.model import build_model, get_flat, is_bias, is_head, set_flat, split_flat
from fedpeft.model_card import parse_declaration
from fedpeft.server.federation import run_federation
from fedpeft.server.progress import Progress
from fedpeft.server.rundir import RunDir
from fedpeft.testing import InProcessGrid, offline_env, write_causal_jsonl, write_classification_csv

pytestmark = [
    pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning"),
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
    pytest.mark.filterwarnings("ignore:Optimal order is the:UserWarning"),
]
NODES = (11, 22, 33)
IDS = [[1, 40, 77, 120, 9, 55, 0, 0], [1, 200, 13, 99, 31, 0, 0, 0]]  # 0 = <pad>
MASK = [[1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]]
DESCRIPTION = "Tweets about products, collected by site 11 in 2024 with consent"

# Loads a folder with plain transformers + peft only and prints its logits on IDS/MASK.
PLAIN = """
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
mode, folder, task = sys.argv[1:4]
ids, mask = json.loads(sys.argv[4]), json.loads(sys.argv[5])
auto = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
if mode == "merged":
    model = auto.from_pretrained(folder, trust_remote_code=True)
    AutoTokenizer.from_pretrained(folder)
else:
    from peft import PeftModel
    base_dir = folder + ("/base" if mode == "export" else "/../base")
    base = auto.from_pretrained(base_dir, trust_remote_code=True)
    model = PeftModel.from_pretrained(base, folder)
    AutoTokenizer.from_pretrained(base_dir)
model.eval()
with torch.no_grad():
    logits = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
assert "fedpeft" not in sys.modules, "fedpeft was imported"
core = model.get_base_model() if hasattr(model, "get_base_model") else model
print("RESULT", json.dumps({"head": type(core).__name__, "logits": logits.tolist()}))
"""

# Loads a folder with plain transformers, without trust_remote_code; prints the error.
NO_REMOTE = """
import sys
from transformers import AutoModelForSequenceClassification
try:
    AutoModelForSequenceClassification.from_pretrained(sys.argv[1])
except ValueError as err:
    print("RESULT refused:", err)
else:
    print("RESULT loaded")
"""


def _plain(script: str, *args: str, cwd: Path) -> str:
    """Run ``script`` in a fresh interpreter that cannot see this checkout's fedpeft."""
    env = offline_env(HF_HOME=str(cwd / "hf-home"))
    env.pop("PYTHONPATH", None)
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,  # transformers asks on a terminal; here it must refuse
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = done.stdout.split("RESULT ", 1)
    assert len(found) == 2, done.stdout[-3000:] + done.stderr[-3000:]
    return found[1].strip()


def _node_configs(
    tmp_path: Path, task: str, declarations: dict[int, dict[str, Any]]
) -> dict[int, dict[str, Any]]:
    configs: dict[int, dict[str, Any]] = {}
    for node in NODES:
        if task == "classification":
            data = write_classification_csv(tmp_path / f"site{node}.csv", n=64, seed=node)
        else:
            data = write_causal_jsonl(tmp_path / f"site{node}.jsonl", n=40, seed=node)
        configs[node] = {
            K.NODE_DATA_PATH: str(data),
            K.NODE_PRIVACY_REQUIRED: "false",
            K.NODE_LEDGER_PATH: str(tmp_path / f"ledger{node}.json"),
            K.NODE_EPSILON_MAX: 100.0,
            K.NODE_DELTA: 1e-5,
            **declarations.get(node, {}),
        }
    return configs


def _run(
    tmp_path: Path,
    experiment: str,
    *overrides: str,
    declarations: dict[int, dict[str, Any]] | None = None,
    progress: Progress | None = None,
) -> tuple[FedPeftConfig, Path]:
    config = compose_config(
        [f"experiment={experiment}", f"data.path={tmp_path / 'unused'}", *overrides]
    )
    task = config.model.task
    grid = InProcessGrid(make_client_app(config), _node_configs(tmp_path, task, declarations or {}))
    run_federation(grid, config, run_dir=tmp_path / "run", progress=progress or Progress())
    return config, tmp_path / "run"


def _fedpeft_logits(config: FedPeftConfig, run_dir: Path) -> torch.Tensor:
    """fedpeft's own model: the base by its loader, the global adapter from the checkpoint."""
    loaded = build_model(config.model, config.lora, seed=config.seed)
    checkpoint = RunDir(run_dir).latest_checkpoint()
    assert checkpoint is not None
    set_flat(loaded.peft_model, loaded.layout, checkpoint.global_flat)
    loaded.peft_model.eval()
    with torch.no_grad():
        out = loaded.peft_model(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK))
    return out.logits


@pytest.fixture(scope="module")
def mean_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[FedPeftConfig, Path]:
    """A tiny mean-pooling classification federation whose site 11 declares its data."""
    declared = {
        11: {
            K.NODE_SITE_DESCRIPTION: DESCRIPTION,
            K.NODE_SITE_LICENSE: "CC-BY-4.0",
            K.NODE_SITE_ROWS: 5000,
        },
        22: {K.NODE_SITE_DESCRIPTION: "Product reviews (site 22)"},
    }
    return _run(
        tmp_path_factory.mktemp("mean"),
        "tiny_classification",
        "model.pooling=mean",
        declarations=declared,
    )


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[FedPeftConfig, Path]:
    return _run(tmp_path_factory.mktemp("llama"), "tiny_causal_lm", "federation.rounds=1")


@pytest.fixture(scope="module")
def bitfit_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[FedPeftConfig, Path]:
    """BitFit on the mean-pooling head: the biases and the head train, LoRA stays at zero."""
    return _run(
        tmp_path_factory.mktemp("bitfit"),
        "tiny_classification",
        "model.pooling=mean",
        "lora.bias=all",
        "train.trainable=[bias]",
        "federation.rounds=1",
    )


@pytest.mark.parametrize("which", ["mean", "llama", "bitfit"])
@pytest.mark.parametrize("mode", ["run", "export", "merged"])
def test_plain_libraries_load_every_adapter_with_fedpeft_logits(
    which: str,
    mode: str,
    mean_run: tuple[FedPeftConfig, Path],
    llama_run: tuple[FedPeftConfig, Path],
    bitfit_run: tuple[FedPeftConfig, Path],
    tmp_path: Path,
) -> None:
    config, run_dir = {"mean": mean_run, "llama": llama_run, "bitfit": bitfit_run}[which]
    folder = run_dir / "adapter"
    if mode != "run":
        folder = tmp_path / "out"
        argv = ["export", str(run_dir), "--out", str(folder)]
        assert main(argv + (["--merge"] if mode == "merged" else [])) == 0
        assert not any(p.is_symlink() for p in folder.rglob("*")), "an export holds real files"
    line = _plain(
        PLAIN, mode, str(folder), config.model.task, json.dumps(IDS), json.dumps(MASK), cwd=tmp_path
    )
    plain = json.loads(line)
    expected = _fedpeft_logits(config, run_dir)
    torch.testing.assert_close(torch.tensor(plain["logits"]), expected, rtol=1e-5, atol=1e-5)
    head = "LlamaForCausalLM" if which == "llama" else "BertMeanPoolingForSequenceClassification"
    assert plain["head"] == head


def test_a_bitfit_adapter_saves_the_trained_biases_in_peft_format(
    bitfit_run: tuple[FedPeftConfig, Path],
) -> None:
    config, run_dir = bitfit_run
    saved = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert saved["bias"] == "all"  # peft's LoraConfig.bias: PeftModel.from_pretrained reads it
    loaded = build_model(config.model, config.lora, seed=config.seed)
    start = split_flat(get_flat(loaded.peft_model, loaded.layout), loaded.layout)
    checkpoint = RunDir(run_dir).latest_checkpoint()
    assert checkpoint is not None
    trained = split_flat(checkpoint.global_flat, loaded.layout)
    moved = {n for n in loaded.layout.names if not np.array_equal(trained[n], start[n])}
    assert {n for n in moved if is_bias(n)} and all(is_bias(n) or is_head(n) for n in moved)
    weights = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    for name in sorted(n for n in moved if is_bias(n)):  # under its own name, byte for byte
        np.testing.assert_array_equal(weights[name].numpy(), trained[name])


def test_mean_pooling_base_names_its_head_and_code(mean_run: tuple[FedPeftConfig, Path]) -> None:
    _, run_dir = mean_run
    base = run_dir / BASE_DIR
    settings = json.loads((base / "config.json").read_text())
    assert settings["model_type"] == "fedpeft-bert-mean-pooling"
    assert settings["architectures"] == ["BertMeanPoolingForSequenceClassification"]
    assert settings["auto_map"]["AutoModelForSequenceClassification"] == (
        "modeling_fedpeft.BertMeanPoolingForSequenceClassification"
    )
    # the copied head is fedpeft's own single source, byte for byte
    source = Path(__file__).parents[1] / "fedpeft" / "modeling_fedpeft.py"
    assert (base / "modeling_fedpeft.py").read_bytes() == source.read_bytes()
    adapter = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "../base"


@pytest.mark.parametrize("mode", ["base", "merged"])
def test_plain_load_without_trust_remote_code_refuses_and_says_how(
    mode: str, mean_run: tuple[FedPeftConfig, Path], tmp_path: Path
) -> None:
    _, run_dir = mean_run
    folder = run_dir / BASE_DIR
    if mode == "merged":
        folder = tmp_path / "merged"
        assert main(["export", str(run_dir), "--merge", "--out", str(folder)]) == 0
    line = _plain(NO_REMOTE, str(folder), cwd=tmp_path)
    assert line.startswith("refused:") and "trust_remote_code=True" in line


def _card(folder: Path) -> tuple[dict[str, Any], str]:
    text = (folder / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n")
    front, body = text[4:].split("\n---\n", 1)
    meta = yaml.safe_load(front)
    assert isinstance(meta, dict)
    return meta, body


def test_card_front_matter_and_declared_provenance(
    mean_run: tuple[FedPeftConfig, Path], tmp_path: Path
) -> None:
    _, run_dir = mean_run
    assert main(["export", str(run_dir), "--out", str(tmp_path / "out")]) == 0
    for folder in (run_dir / "adapter", tmp_path / "out"):
        meta, body = _card(folder)
        assert meta["library_name"] == "peft"
        assert meta["base_model"] in ("../base", "base")
        assert {"federated-learning", "lora"} <= set(meta["tags"])
        assert meta["license"] == "other"  # a tiny in-process base has no recorded licence
        assert meta["data_licenses"] == ["CC-BY-4.0"]
        provenance = body.split("## Data provenance", 1)[1].split("\n## ", 1)[0]
        rows = {line.split(" | ")[0].strip("| "): line for line in provenance.splitlines()}
        assert DESCRIPTION in rows["11"] and "CC-BY-4.0" in rows["11"] and "5000" in rows["11"]
        assert "Product reviews (site 22)" in rows["22"]
        assert rows["22"].endswith("| not declared |")  # site 22 published no row count
        assert rows["33"].count("not declared") == 3
    # the sites' real example counts (plain aggregation reports them) appear nowhere
    metrics = RunDir(run_dir).read_metrics()
    counts = {r["site_metrics"][str(n)][K.MET_NUM_EXAMPLES] for r in metrics for n in NODES}
    assert counts and all(f"| {n} |" not in provenance for n in counts)


def test_card_is_written_beside_the_adapter_after_every_round(tmp_path: Path) -> None:
    seen: list[str] = []

    class Watch(Progress):
        def round_done(self, row: dict[str, Any]) -> None:
            seen.append((tmp_path / "run" / "adapter" / "README.md").read_text(encoding="utf-8"))

    _run(tmp_path, "tiny_classification", "federation.rounds=2", progress=Watch())
    assert len(seen) == 2
    assert "| 1 | 3 |" in seen[0] and "| 2 | 3 |" not in seen[0]
    assert "| 2 | 3 |" in seen[1]
    assert "No differential privacy" in seen[1]


def test_private_secure_card_states_the_guarantee_and_carries_declarations(
    tmp_path: Path,
) -> None:
    """Under DP and secure aggregation the declaration travels in the masked reply."""
    declared = {node: {K.NODE_SITE_DESCRIPTION: f"site {node} notes"} for node in NODES}
    config, run_dir = _run(
        tmp_path,
        "tiny_private",
        "privacy.accountant=rdp",
        "secagg.enabled=true",
        "federation.rounds=1",
        declarations=declared,
    )
    report = json.loads((run_dir / "privacy.json").read_text())
    epsilons = [s["epsilon"] for s in report["sites"].values()]
    meta, body = _card(run_dir / "adapter")
    assert "differential-privacy" in meta["tags"] and "secure-aggregation" in meta["tags"]
    assert f"(ε ≤ {max(epsilons):.3g}, δ ≤ 1e-05)-differential privacy" in body
    assert "Secure aggregation (SecAgg+)" in body
    # k and t as resolved for the 3 sampled sites (complete graph, t = 2), not "None"
    assert "neighbours k = 2, threshold t = 2 (as resolved in the rounds run)" in body
    for node in NODES:
        assert f"site {node} notes" in body
    assert json.loads((run_dir / "sites.json").read_text())["sites"]["11"]["declared"] == {
        K.NODE_SITE_DESCRIPTION: "site 11 notes"
    }


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        ({K.NODE_SITE_ROWS: "many"}, "site-rows='many'"),
        ({K.NODE_SITE_ROWS: -3}, "integer >= 0"),
        ({K.NODE_SITE_DESCRIPTION: "x" * (K.SITE_TEXT_MAX + 1)}, "1 to 2000 characters"),
        ({K.NODE_SITE_LICENSE: ""}, "site-license"),
    ],
)
def test_a_malformed_declaration_is_refused_naming_it(values: dict[str, Any], needle: str) -> None:
    from fedpeft.client.rules import site_declaration

    with pytest.raises(ConfigError, match="node config") as err:
        site_declaration(values)
    assert needle in str(err.value)


def test_only_declared_keys_are_kept() -> None:
    values = {K.NODE_DATA_PATH: "/secret/path.csv", K.NODE_SITE_ROWS: "12", "x": 1}
    assert parse_declaration(values, source="node config") == {K.NODE_SITE_ROWS: 12}


def test_export_refuses_a_non_empty_out(
    mean_run: tuple[FedPeftConfig, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, run_dir = mean_run
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert main(["export", str(run_dir), "--out", str(tmp_path / "out")]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert os.listdir(tmp_path / "out") == ["keep.txt"]
