"""Samples per second of a DP-SGD round vs a plain round, side by side in one run.

Same model, adapter, batch size, data and number of steps; the variants run
interleaved (plain, DP hooks, DP ghost, plain, …) for ``--repeats`` rounds so that a
busy machine slows them alike, and the report gives medians and ratios to plain.
DP rounds use Poisson sampling, so their samples per second count the expected
batch size per step (what the accountant charges for).

Usage::

    python benchmarks/dp_throughput.py            # embedded MiniLM, LoRA r=8, batch 32
    python benchmarks/dp_throughput.py --quick    # tiny in-process BERT (smoke test)

Writes ``benchmarks/results/dp_throughput.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from fedpeft.client.train import DPSettings, train_local
from fedpeft.config import compose_config
from fedpeft.data import load_dataset, tokenize
from fedpeft.model import build_model, get_flat

DEFAULT_OUT = Path(__file__).parent / "results" / "dp_throughput.json"
VARIANTS: dict[str, DPSettings | None] = {
    "plain": None,
    "dp_hooks": DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, clipping="hooks"),
    "dp_ghost": DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, clipping="ghost"),
}


def run(*, quick: bool, repeats: int, steps: int, examples: int) -> dict[str, Any]:
    overrides = ["train.batch_size=32", f"train.local_steps={steps}"]
    if quick:
        overrides += ["model=tiny_bert", "train.batch_size=8"]
    config = compose_config(overrides)
    loaded = build_model(config.model, config.lora, seed=0)
    table = load_dataset(config.data, "classification", seed=0).select(range(examples))
    dataset = tokenize(
        table,
        loaded.tokenizer,
        config=config.data,
        task="classification",
        max_length=config.model.max_length,
    )
    start = get_flat(loaded.peft_model, loaded.layout)
    device = torch.device("cpu")
    seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for repeat in range(repeats):
        for name, dp in VARIANTS.items():
            result = train_local(
                loaded,
                dataset,
                global_flat=start,
                trained_names=loaded.layout.names,
                config=config.train,
                device=device,
                seed=repeat,
                dp=dp,
            )
            seconds[name].append(result.seconds)
            print(f"repeat {repeat + 1}/{repeats} {name:9s} {result.seconds:6.2f} s", flush=True)
    samples = config.train.batch_size * config.train.local_steps
    rate = {name: samples / statistics.median(s) for name, s in seconds.items()}
    return {
        "benchmark": "dp_throughput",
        "model": config.model.loader,
        "adapter_floats": loaded.layout.size,
        "batch_size": config.train.batch_size,
        "steps_per_round": config.train.local_steps,
        "max_length": config.model.max_length,
        "repeats": repeats,
        "samples_per_second": rate,
        "slowdown_vs_plain": {name: rate["plain"] / r for name, r in rate.items()},
        "seconds": seconds,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.platform(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, one repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--examples", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    # Opacus's notes on torch's RNG and hooks, seen each round; the RNG note is the known limit
    # documented in fedpeft/privacy/dp.py (no torchcsprng). Both filters end with this block.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        report = run(
            quick=args.quick,
            repeats=1 if args.quick else args.repeats,
            steps=2 if args.quick else args.steps,
            examples=64 if args.quick else args.examples,
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for name, value in report["samples_per_second"].items():
        print(f"{name:9s} {value:7.1f} samples/s  ({report['slowdown_vs_plain'][name]:.2f}x plain)")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
