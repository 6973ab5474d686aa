"""Shared fixtures: small data files written per test, tiny configs, in-process federations."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedpeft.config import FedPeftConfig, compose_config
from fedpeft.testing import write_causal_jsonl, write_classification_csv


@pytest.fixture
def cls_csv(tmp_path: Path) -> Path:
    return write_classification_csv(tmp_path / "cls.csv")


@pytest.fixture
def lm_jsonl(tmp_path: Path) -> Path:
    return write_causal_jsonl(tmp_path / "lm.jsonl")


def tiny_config(task: str, data_path: Path, *overrides: str) -> FedPeftConfig:
    experiment = "tiny_classification" if task == "classification" else "tiny_causal_lm"
    return compose_config([f"experiment={experiment}", f"data.path={data_path}", *overrides])
