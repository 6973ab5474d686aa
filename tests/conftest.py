"""Shared fixtures: small data files written per test, tiny configs, in-process federations."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest

from fedpeft.config import FedPeftConfig, compose_config

POSITIVE = ["good", "great", "fine", "superb", "lovely", "bright"]
NEGATIVE = ["bad", "awful", "poor", "dull", "ugly", "grim"]
FILLER = ["the", "a", "movie", "plot", "was", "and"]


def write_classification_csv(path: Path, n: int = 240, seed: int = 0) -> Path:
    """An easy sentiment task: the label is which word list the text draws from."""
    rng = random.Random(seed)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label", "domain"])
        for i in range(n):
            label = rng.randint(0, 1)
            words = rng.choices(POSITIVE if label else NEGATIVE, k=3) + rng.choices(FILLER, k=3)
            rng.shuffle(words)
            writer.writerow([" ".join(words), label, f"d{i % 3}"])
    return path


def write_causal_jsonl(path: Path, n: int = 120, seed: int = 0) -> Path:
    """Prompt/response pairs: the response repeats the prompt's first word."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as handle:
        for _ in range(n):
            words = rng.choices(POSITIVE + NEGATIVE, k=3)
            handle.write(
                json.dumps({"prompt": "say " + " ".join(words), "response": words[0]}) + "\n"
            )
    return path


@pytest.fixture
def cls_csv(tmp_path: Path) -> Path:
    return write_classification_csv(tmp_path / "cls.csv")


@pytest.fixture
def lm_jsonl(tmp_path: Path) -> Path:
    return write_causal_jsonl(tmp_path / "lm.jsonl")


def tiny_config(task: str, data_path: Path, *overrides: str) -> FedPeftConfig:
    experiment = "tiny_classification" if task == "classification" else "tiny_causal_lm"
    return compose_config([f"experiment={experiment}", f"data.path={data_path}", *overrides])
