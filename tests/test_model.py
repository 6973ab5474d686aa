"""Models and adapters: flat layout, PEFT save format round trip, clear load errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel

from fedpeft.config import ConfigError, LoraSettings, ModelConfig
from fedpeft.model import (
    MODEL_LOADERS,
    build_model,
    get_flat,
    save_adapter,
    set_flat,
    split_flat,
)

TINY = {
    "classification": (
        ModelConfig(loader="tiny-bert", task="classification", max_length=32),
        LoraSettings(r=4, target_modules=["query", "value"]),
    ),
    "causal_lm": (
        ModelConfig(loader="tiny-llama", task="causal_lm", max_length=32),
        LoraSettings(r=4, target_modules=["q_proj", "v_proj"]),
    ),
}


@pytest.mark.parametrize("task", sorted(TINY))
def test_layout_is_exactly_the_trainable_adapter(task: str) -> None:
    model_config, lora = TINY[task]
    loaded = build_model(model_config, lora, seed=0)
    trainable = {n: p.numel() for n, p in loaded.peft_model.named_parameters() if p.requires_grad}
    assert set(loaded.layout.names) == set(trainable)
    assert loaded.layout.size == sum(trainable.values())
    assert all(".lora_" in n or ".modules_to_save." in n for n in loaded.layout.names)
    base = sum(p.numel() for p in loaded.peft_model.parameters())
    assert loaded.layout.size < 0.2 * base


def test_same_seed_same_initial_adapter() -> None:
    model_config, lora = TINY["classification"]
    a = get_flat(
        build_model(model_config, lora, seed=3).peft_model,
        build_model(model_config, lora, seed=3).layout,
    )
    b_loaded = build_model(model_config, lora, seed=3)
    assert np.array_equal(a, get_flat(b_loaded.peft_model, b_loaded.layout))


def test_flat_round_trip_and_split() -> None:
    loaded = build_model(*TINY["causal_lm"], seed=0)
    flat = np.random.default_rng(0).standard_normal(loaded.layout.size).astype(np.float32)
    set_flat(loaded.peft_model, loaded.layout, flat)
    assert np.array_equal(get_flat(loaded.peft_model, loaded.layout), flat)
    parts = split_flat(flat, loaded.layout)
    params = dict(loaded.peft_model.named_parameters())
    for name, array in parts.items():
        assert np.array_equal(params[name].detach().numpy(), array)
    with pytest.raises(ValueError, match="expected"):
        set_flat(loaded.peft_model, loaded.layout, flat[:-1])


@pytest.mark.parametrize("task", sorted(TINY))
def test_peft_export_round_trip_gives_same_logits(task: str, tmp_path: Path) -> None:
    model_config, lora = TINY[task]
    loaded = build_model(model_config, lora, seed=0)
    flat = 0.05 * np.random.default_rng(1).standard_normal(loaded.layout.size).astype(np.float32)
    save_adapter(loaded, flat, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    ids = torch.randint(5, 200, (2, 12))
    loaded.peft_model.eval()
    with torch.no_grad():
        expected = loaded.peft_model(input_ids=ids).logits

    base, _ = MODEL_LOADERS[model_config.loader](model_config)  # same seeded tiny weights
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    reloaded.eval()
    with torch.no_grad():
        got = reloaded(input_ids=ids).logits
    torch.testing.assert_close(got, expected)
    with torch.no_grad():
        plain = MODEL_LOADERS[model_config.loader](model_config)[0](input_ids=ids).logits
    assert not torch.allclose(plain, expected)  # the adapter is what the round trip carried


def test_unknown_local_model_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        build_model(
            ModelConfig(loader="local", path=str(tmp_path / "missing")), LoraSettings(), seed=0
        )
    with pytest.raises(ConfigError, match="no config.json"):
        build_model(ModelConfig(loader="local", path=str(tmp_path)), LoraSettings(), seed=0)


def test_target_modules_that_do_not_exist() -> None:
    with pytest.raises(ConfigError, match="lora.target_modules"):
        build_model(
            ModelConfig(loader="tiny-bert"), LoraSettings(target_modules=["q_proj"]), seed=0
        )
