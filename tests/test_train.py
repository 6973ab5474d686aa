"""The local optimiser: the head's own learning rate, SGD momentum, and their validation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedpeft.client.train import make_optimizer, prepare_trainable
from fedpeft.config import ConfigError, TrainConfig
from fedpeft.model import build_model, is_head
from tests.conftest import tiny_config

pytestmark = pytest.mark.filterwarnings(
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"
)


def _named(cls_csv: Path) -> list[tuple[str, torch.nn.Parameter]]:
    config = tiny_config("classification", cls_csv)
    loaded = build_model(config.model, config.lora, seed=0)
    return prepare_trainable(loaded, loaded.layout.names)


def _step(named: list[tuple[str, torch.nn.Parameter]], optimizer: torch.optim.Optimizer) -> None:
    for _, p in named:
        p.grad = torch.ones_like(p)
    optimizer.step()


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_head_steps_at_head_lr_and_lora_at_lr(cls_csv: Path, optimizer: str) -> None:
    named = _named(cls_csv)
    assert any(is_head(n) for n, _ in named) and any(not is_head(n) for n, _ in named)
    before = {n: p.detach().clone() for n, p in named}
    config = TrainConfig(lr=0.01, head_lr=0.5, optimizer=optimizer)
    _step(named, make_optimizer(named, config))
    for name, p in named:
        moved = (before[name] - p.detach()).abs()
        # SGD moves by lr·grad (grad = 1); AdamW's first step by lr per coordinate
        expected = 0.5 if is_head(name) else 0.01
        torch.testing.assert_close(moved, torch.full_like(moved, expected), rtol=1e-4, atol=1e-6)


def test_head_lr_defaults_to_lr_and_momentum_accumulates(cls_csv: Path) -> None:
    named = _named(cls_csv)
    before = {n: p.detach().clone() for n, p in named}
    config = TrainConfig(lr=0.1, head_lr=None, optimizer="sgd", momentum=0.9)
    optimizer = make_optimizer(named, config)
    _step(named, optimizer)
    _step(named, optimizer)
    for name, p in named:
        moved = before[name] - p.detach()  # 0.1·1 + 0.1·(0.9·1 + 1)
        torch.testing.assert_close(moved, torch.full_like(moved, 0.29), rtol=1e-5, atol=1e-6)


def test_optimizer_settings_are_validated(cls_csv: Path) -> None:
    with pytest.raises(ConfigError, match=r"train.momentum=0.9 with train.optimizer='adamw'"):
        tiny_config("classification", cls_csv, "train.momentum=0.9", "train.optimizer=adamw")
    with pytest.raises(ConfigError, match=r"train.head_lr=0.0: must be > 0 or null"):
        tiny_config("classification", cls_csv, "train.head_lr=0")
    config = tiny_config("classification", cls_csv, "train.optimizer=sgd", "train.head_lr=2.5")
    assert config.train.head_lr == 2.5
