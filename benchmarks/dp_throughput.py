"""Samples per second of a DP-SGD round vs a plain round, and what the CSPRNG adds to it.

Same model, adapter, batch size, data and number of steps; the variants run
interleaved (plain, DP hooks, DP hooks on torch's generator, DP ghost, …) for
``--repeats`` rounds so that a busy machine slows them alike, and the report gives
medians and ratios to plain. DP rounds use Poisson sampling, so their samples per
second count the expected batch size per step (what the accountant charges for).

CSPRNG cost: fedpeft draws DP noise and Poisson sampling from ChaCha20
(:mod:`fedpeft.privacy.randomness`). ``dp_hooks_torch_rng`` is the same DP round with,
*in this benchmark only*, Opacus' torch-generator path patched back in (the optimizer's
own ``add_noise`` with a seeded ``torch.Generator``, and Opacus'
``UniformWithReplacementSampler`` drawing), so ``dp_hooks`` vs ``dp_hooks_torch_rng`` is
the CSPRNG's added cost. It is reported two ways, both as a fraction of the torch-RNG
round's time, median and range over the repeats: from timers around the noise and
sampling draws of each variant (precise), and from the paired round times (noisy on a
shared machine: the difference is far below the round-to-round spread). The two run in
alternating order (AB, BA, …) to cancel drift.

Usage::

    python benchmarks/dp_throughput.py            # embedded MiniLM, LoRA r=8, batch 32
    python benchmarks/dp_throughput.py --rng-only --repeats 5   # only the CSPRNG comparison
    python benchmarks/dp_throughput.py --quick    # tiny in-process BERT (smoke test)

Writes ``benchmarks/results/dp_throughput.json``; ``--rng-only`` replaces only its
``rng_cost`` entry and leaves the throughput figures of the last full run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from opacus.optimizers import DPOptimizer

import fedpeft.privacy.dp as dp_module
from fedpeft.client.train import DPSettings, train_local
from fedpeft.config import compose_config
from fedpeft.data import load_dataset, tokenize
from fedpeft.model import build_model, get_flat
from fedpeft.privacy.randomness import KeyedStream, PoissonBatchSampler

DEFAULT_OUT = Path(__file__).parent / "results" / "dp_throughput.json"
HOOKS = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, clipping="hooks")


@dataclass(frozen=True)
class Variant:
    dp: DPSettings | None
    torch_rng: bool = False  # Opacus' torch-generator noise and sampling instead of ChaCha20


VARIANTS: dict[str, Variant] = {
    "plain": Variant(None),
    "dp_hooks": Variant(HOOKS),
    "dp_hooks_torch_rng": Variant(HOOKS, torch_rng=True),
    "dp_ghost": Variant(DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, clipping="ghost")),
}
RNG_PAIR = ("dp_hooks", "dp_hooks_torch_rng")


class RngTimer:
    """Seconds spent drawing noise and Poisson batches in one round, whichever generator."""

    def __init__(self) -> None:
        self.noise = 0.0
        self.sampling = 0.0

    @contextlib.contextmanager
    def measure(self, what: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            setattr(self, what, getattr(self, what) + time.perf_counter() - start)


@contextlib.contextmanager
def _patched(target: object, name: str, value: object) -> Iterator[None]:
    original = getattr(target, name)
    setattr(target, name, value)
    try:
        yield
    finally:
        setattr(target, name, original)


@contextlib.contextmanager
def instrumented(timer: RngTimer, *, torch_rng: bool, seed: int) -> Iterator[None]:
    """Time fedpeft's draws, or (``torch_rng``) swap in Opacus' torch path and time that.

    Both replace what :func:`fedpeft.privacy.dp.make_private` looks up when it builds a
    session (``_add_keyed_noise`` and ``PoissonBatchSampler``), for the ``with`` block only.
    """
    keyed_noise: Callable[[DPOptimizer, KeyedStream], None] = dp_module._add_keyed_noise
    noise_generator = torch.Generator().manual_seed(seed)
    sampling_generator = torch.Generator().manual_seed(seed + 1)

    def torch_noise(optimizer: DPOptimizer, stream: KeyedStream) -> None:
        with timer.measure("noise"):
            optimizer.generator = noise_generator
            type(optimizer).add_noise(optimizer)  # Opacus' own: torch.normal(generator=...)

    def timed_keyed_noise(optimizer: DPOptimizer, stream: KeyedStream) -> None:
        with timer.measure("noise"):
            keyed_noise(optimizer, stream)

    class TorchSampler(PoissonBatchSampler):
        def __iter__(self) -> Iterator[list[int]]:
            for _ in range(self.steps):
                with timer.measure("sampling"):  # UniformWithReplacementSampler.__iter__
                    mask = (
                        torch.rand(self.num_samples, generator=sampling_generator)
                        < self.sample_rate
                    )
                    indices = mask.nonzero(as_tuple=False).reshape(-1).tolist()
                yield indices

    class TimedSampler(PoissonBatchSampler):
        def __iter__(self) -> Iterator[list[int]]:
            for _ in range(self.steps):
                with timer.measure("sampling"):  # PoissonBatchSampler.__iter__
                    indices = self.stream.poisson_subsample(
                        self.num_samples, self.sample_rate
                    ).tolist()
                yield indices

    with (
        _patched(dp_module, "_add_keyed_noise", torch_noise if torch_rng else timed_keyed_noise),
        _patched(dp_module, "PoissonBatchSampler", TorchSampler if torch_rng else TimedSampler),
    ):
        yield


def _spread(values: list[float]) -> dict[str, Any]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "per_repeat": values,
    }


def rng_cost(
    seconds: dict[str, list[float]], rng_seconds: dict[str, list[float]]
) -> dict[str, Any]:
    """The CSPRNG's added cost per round as a fraction of the torch-RNG DP round."""
    ours, theirs = RNG_PAIR
    by_timers = [
        (a - b) / t
        for a, b, t in zip(rng_seconds[ours], rng_seconds[theirs], seconds[theirs], strict=True)
    ]
    by_rounds = [(a - t) / t for a, t in zip(seconds[ours], seconds[theirs], strict=True)]
    return {
        "compared": {"csprng": ours, "torch_rng": theirs},
        "repeats": len(seconds[ours]),
        "round_seconds": {name: seconds[name] for name in RNG_PAIR},
        "rng_seconds_per_round": {name: rng_seconds[name] for name in RNG_PAIR},
        "added_fraction_by_rng_timers": _spread(by_timers),
        "added_fraction_by_round_time": _spread(by_rounds),
        "target": "added cost <= 0.05 of the DP round",
        "met": statistics.median(by_timers) <= 0.05,
    }


def run(
    *, quick: bool, repeats: int, steps: int, examples: int, names: list[str]
) -> dict[str, Any]:
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
    seconds: dict[str, list[float]] = {name: [] for name in names}
    rng_seconds: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        order = names if repeat % 2 == 0 else names[::-1]  # AB, BA, … cancels drift
        for name in order:
            variant = VARIANTS[name]
            timer = RngTimer()
            with instrumented(timer, torch_rng=variant.torch_rng, seed=repeat):
                result = train_local(
                    loaded,
                    dataset,
                    global_flat=start,
                    trained_names=loaded.layout.names,
                    config=config.train,
                    device=device,
                    seed=repeat,
                    dp=variant.dp,
                )
            seconds[name].append(result.seconds)
            rng_seconds[name].append(timer.noise + timer.sampling)
            print(
                f"repeat {repeat + 1}/{repeats} {name:18s} {result.seconds:6.2f} s"
                f"  (noise {timer.noise * 1e3:6.1f} ms, sampling {timer.sampling * 1e3:5.1f} ms)",
                flush=True,
            )
    samples = config.train.batch_size * config.train.local_steps
    rate = {name: samples / statistics.median(s) for name, s in seconds.items()}
    report: dict[str, Any] = {
        "benchmark": "dp_throughput",
        "model": config.model.loader,
        "adapter_floats": loaded.layout.size,
        "batch_size": config.train.batch_size,
        "steps_per_round": config.train.local_steps,
        "max_length": config.model.max_length,
        "repeats": repeats,
        "samples_per_second": rate,
        "seconds": seconds,
        "rng_seconds": rng_seconds,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.platform(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if "plain" in rate:
        report["slowdown_vs_plain"] = {name: rate["plain"] / r for name, r in rate.items()}
    if all(name in names for name in RNG_PAIR):
        report["rng_cost"] = rng_cost(seconds, rng_seconds) | {
            "steps_per_round": config.train.local_steps,
            "model": config.model.loader,
            "adapter_floats": loaded.layout.size,
            "when": report["when"],
        }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, one repeat")
    parser.add_argument(
        "--rng-only",
        action="store_true",
        help="run only dp_hooks and dp_hooks_torch_rng; update only rng_cost in --out",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--examples", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    names = list(RNG_PAIR) if args.rng_only else list(VARIANTS)
    # Opacus's notes seen each round: PrivacyEngine(secure_mode=False) warns about torch
    # generators that fedpeft no longer uses (fedpeft/privacy/dp.py, "Randomness"), and torch
    # about hooks on LoRA layers. Both filters end with this block.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        report = run(
            quick=args.quick,
            repeats=1 if args.quick else args.repeats,
            steps=2 if args.quick else args.steps,
            examples=64 if args.quick else args.examples,
            names=names,
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.rng_only and args.out.exists():  # keep the last full run's throughput figures
        report = json.loads(args.out.read_text()) | {"rng_cost": report["rng_cost"]}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    if not args.rng_only:
        for name, value in report["samples_per_second"].items():
            slowdown = report["slowdown_vs_plain"][name]
            print(f"{name:18s} {value:7.1f} samples/s  ({slowdown:.2f}x plain)")
    cost = report["rng_cost"]
    for how in ("added_fraction_by_rng_timers", "added_fraction_by_round_time"):
        figure = cost[how]
        print(
            f"CSPRNG {how}: median {figure['median']:+.4%} "
            f"(range {figure['min']:+.4%} .. {figure['max']:+.4%}, {cost['repeats']} repeats)"
        )
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
