"""Helpers shared by the benchmark scripts: a quiet environment and synthetic data."""

from __future__ import annotations

import csv
import os
import random
from pathlib import Path

POSITIVE = ["good", "great", "fine", "superb", "lovely", "bright"]
NEGATIVE = ["bad", "awful", "poor", "dull", "ugly", "grim"]
FILLER = ["the", "a", "movie", "plot", "was", "and"]


def bench_env() -> dict[str, str]:
    """This process's environment for a child simulation: offline, quiet, Ray on loopback."""
    env = dict(os.environ)
    env.update(
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_USAGE_STATS_ENABLED="0",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        PYTHONWARNINGS="ignore",
    )
    return env


def write_csv(path: Path, rows: int, seed: int = 0) -> Path:
    """Short synthetic sentiment rows, as ``tests/conftest.py::write_classification_csv``."""
    rng = random.Random(seed)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label", "domain"])
        for i in range(rows):
            label = rng.randint(0, 1)
            words = rng.choices(POSITIVE if label else NEGATIVE, k=3) + rng.choices(FILLER, k=3)
            rng.shuffle(words)
            writer.writerow([" ".join(words), label, f"d{i % 3}"])
    return path
