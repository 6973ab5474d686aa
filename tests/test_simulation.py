"""Whole federations through Flower's simulation engine (Ray), both task types."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from peft import PeftModel

from fedpeft.config import compose_config, from_yaml
from fedpeft.model import MODEL_LOADERS, build_model, get_flat, set_flat
from fedpeft.simulation import simulate
from tests.conftest import tiny_config


@pytest.mark.parametrize("task", ["classification", "causal_lm"])
def test_three_sites_two_rounds(task: str, cls_csv: Path, lm_jsonl: Path, tmp_path: Path) -> None:
    data = cls_csv if task == "classification" else lm_jsonl
    extra = ("data.eval_prompts=2", "train.eval_max_new_tokens=4") if task == "causal_lm" else ()
    config = tiny_config(task, data, f"output_dir={tmp_path / 'run'}", *extra)
    result = simulate(config)
    run_dir = tmp_path / "run"
    assert result.run_dir == run_dir

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    layout = build_model(config.model, config.lora, seed=config.seed).layout
    adapter_floats = layout.size
    head_floats = sum(
        n for name, n in zip(layout.names, layout.numels, strict=True) if ".lora_" not in name
    )
    # FedAvg: round 1 sends down only the head (the LoRA factors are at the start every site
    # rebuilds, fedpeft.broadcast); from round 2 on every tensor has moved
    assert [r["bytes_down"] for r in rows] == [3 * 4 * head_floats, 3 * 4 * adapter_floats]
    for row in rows:
        assert row["sites_sampled"] == row["sites_replied"] == 3 and row["sites_failed"] == 0
        assert row["bytes_up"] == 3 * 4 * adapter_floats
        assert np.isfinite(row["train_loss"]) and np.isfinite(row["eval_loss"])
        assert 0.0 <= row["eval_accuracy"] <= 1.0 and row["seconds"] > 0
    if task == "causal_lm":
        assert rows[-1]["eval_perplexity"] == pytest.approx(np.exp(rows[-1]["eval_loss"]))
        # data.eval_prompts=2: every virtual site answers its first two held-out prompts
        answers = (run_dir / "generations.jsonl").read_text().splitlines()
        per_round = [sum(json.loads(a)["round"] == n for a in answers) for n in (1, 2)]
        assert per_round == [3 * 2, 3 * 2]

    # config.yaml is the resolved configuration and parses back to the same one
    assert from_yaml((run_dir / "config.yaml").read_text()) == config
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["federation"]["num_sites"] == 3

    # adapter/ loads with PEFT onto a fresh base and equals the last checkpoint
    base, _ = MODEL_LOADERS[config.model.loader](config.model)
    peft_model = PeftModel.from_pretrained(base, str(run_dir / "adapter"))
    loaded = build_model(config.model, config.lora, seed=config.seed)
    checkpoint = np.load(sorted((run_dir / "checkpoints").glob("round-*"))[-1] / "global.npy")
    params = dict(peft_model.named_parameters())
    set_flat(loaded.peft_model, loaded.layout, checkpoint)
    for name in loaded.layout.names:
        torch.testing.assert_close(params[name], dict(loaded.peft_model.named_parameters())[name])
    initial = get_flat(
        build_model(config.model, config.lora, seed=config.seed).peft_model, loaded.layout
    )
    assert not np.allclose(checkpoint, initial)  # the federation trained something


@pytest.mark.slow
def test_the_same_configuration_and_seed_give_the_same_adapter_on_minilm(tmp_path: Path) -> None:
    """Two plain runs of one configuration on the real MiniLM (2 sites × 1 round) write the
    same adapter, byte for byte: nothing in a site's start or training is left unseeded."""
    overrides = [
        "federation.num_sites=2",
        "federation.rounds=1",
        "federation.partition=iid",
        "privacy.enabled=false",  # DP noise comes from a key only the site knows, by design
        "secagg.enabled=false",
        "data.max_eval_examples=64",
    ]
    adapters = []
    for run in ("first", "second"):
        config = compose_config([*overrides, f"output_dir={tmp_path / run}"])
        simulate(config)
        adapters.append((tmp_path / run / "adapter" / "adapter_model.safetensors").read_bytes())
    assert adapters[0] == adapters[1]
