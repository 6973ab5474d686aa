"""What a DP-SGD round costs against a plain round and against bare Opacus, measured so it holds.

Same model, adapter, data, batch size (expected batch under Poisson sampling), steps and
thread count in every variant:

- ``plain``: fedpeft's local round without DP (:func:`fedpeft.client.train.train_local`);
- ``dp_hooks`` / ``dp_ghost``: fedpeft's DP round (:func:`fedpeft.privacy.dp.make_private`:
  Opacus' per-sample gradients and clipping, fedpeft's ChaCha20 noise and Poisson sampling,
  its checks for non-finite examples);
- ``opacus_hooks``: bare Opacus on the same model and adapter: ``PrivacyEngine.make_private``
  called directly (its own ``DPDataLoader`` and torch-generator noise), the same optimizer,
  loss and number of steps, written here as Opacus' tutorials write it;
- ``dp_hooks_torch_rng`` (``--rng-only``): ``dp_hooks`` with Opacus' torch-generator noise and
  sampling patched back in, *in this benchmark only*, for the CSPRNG's added cost.

How it is measured, so a busy 2-core machine does not decide the result:

- one untimed warm-up round per variant first (first-call allocations, thread pools);
- ``--repeats`` (≥ 5) repeats, each running every variant once, in an order that rotates by
  one each repeat (A B C D, B C D A, …), so no variant always runs first or after the same one;
- ``torch.set_num_threads(--threads)`` before every round (pinned, the same for all);
- every figure is per example actually processed (Poisson batches vary in size: counted at
  the forward pass), and each DP variant is compared with plain and Opacus *within the same
  repeat* (paired ratios), median and range over the repeats;
- setup is timed apart: ``make_private`` (wrapping, hooks, the keyed streams) per round, and
  once per repeat the σ calibration for ε = 8 (PRV) and one privacy-ledger charge (a file
  write under a lock), which a site does before it trains; rounds are long enough
  (``--steps``) that setup is a small share, and the round figure includes it.

Usage::

    python -m benchmarks.dp_throughput                 # MiniLM, LoRA r=8, batch 32, 5 repeats
    python -m benchmarks.dp_throughput --rng-only      # only the CSPRNG comparison
    python -m benchmarks.dp_throughput --quick         # tiny in-process BERT (smoke test)

Writes ``benchmarks/results/dp_throughput.json``; ``--rng-only`` replaces only its
``rng_cost`` entry. :func:`section` renders the JSON (this layout, or the single table of
older results) as this benchmark's part of ``benchmarks/README.md``, :func:`headline_rows`
as its row of the headline table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from opacus import PrivacyEngine
from opacus.optimizers import DPOptimizer

import fedpeft.client.train as train_module
import fedpeft.privacy.dp as dp_module
from benchmarks import markdown as md
from fedpeft.client.train import (
    DPSettings,
    make_loader,
    make_optimizer,
    prepare_trainable,
    train_local,
)
from fedpeft.config import compose_config
from fedpeft.data import TokenizedDataset, load_dataset, tokenize
from fedpeft.model import LoadedModel, build_model, get_flat, set_flat
from fedpeft.privacy.calibration import calibrate_noise_multiplier
from fedpeft.privacy.ledger import PrivacyLedger
from fedpeft.privacy.randomness import KeyedStream, PoissonBatchSampler

DEFAULT_OUT = Path(__file__).parent / "results" / "dp_throughput.json"
SIGMA, CLIP = 1.0, 1.0
HOOKS = DPSettings(noise_multiplier=SIGMA, max_grad_norm=CLIP, clipping="hooks")
GHOST = DPSettings(noise_multiplier=SIGMA, max_grad_norm=CLIP, clipping="ghost")
#: The variants of a full run, in their first repeat's order.
MAIN = ("plain", "dp_hooks", "dp_ghost", "opacus_hooks")
RNG_PAIR = ("dp_hooks", "dp_hooks_torch_rng")
TARGETS = {"dp_hooks_over_plain": 1.15, "dp_hooks_over_opacus": 1.05}


@dataclass
class Round:
    """One variant's round: seconds (whole, setup, steps), examples seen, RNG draws."""

    seconds: float
    setup_seconds: float
    examples: int
    rng_seconds: float = 0.0

    @property
    def steps_seconds(self) -> float:
        return self.seconds - self.setup_seconds


@dataclass
class Context:
    loaded: LoadedModel
    dataset: TokenizedDataset
    start: Any  # the adapter every round starts from
    config: Any
    threads: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


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


@contextlib.contextmanager
def counted(tally: list[int]) -> Iterator[None]:
    """Count the examples every forward pass of :mod:`fedpeft.client.train` sees."""
    forward = train_module.forward_losses

    def counting(loaded: LoadedModel, model: Any, batch: Any, device: Any, **kw: Any) -> Any:
        tally[0] += int(batch[0].shape[0])
        return forward(loaded, model, batch, device, **kw)

    with _patched(train_module, "forward_losses", counting):
        yield


@contextlib.contextmanager
def setup_timed(marks: dict[str, float]) -> Iterator[None]:
    """Record how long :func:`fedpeft.privacy.dp.make_private` takes (the round's setup)."""
    make_private = dp_module.make_private

    def timed(**kwargs: Any) -> Any:
        start = time.perf_counter()
        session = make_private(**kwargs)
        marks["setup"] = marks.get("setup", 0.0) + time.perf_counter() - start
        return session

    with _patched(dp_module, "make_private", timed):
        yield


def fedpeft_round(ctx: Context, name: str, *, seed: int, steps: int) -> Round:
    dp = {"plain": None, "dp_ghost": GHOST}.get(name, HOOKS)
    config = replace(ctx.config.train, local_steps=steps)
    timer, tally, marks = RngTimer(), [0], {"setup": 0.0}
    with (
        instrumented(timer, torch_rng=name == "dp_hooks_torch_rng", seed=seed),
        counted(tally),
        setup_timed(marks),
    ):
        result = train_local(
            ctx.loaded,
            ctx.dataset,
            global_flat=ctx.start,
            trained_names=ctx.loaded.layout.names,
            config=config,
            device=ctx.device,
            seed=seed,
            dp=dp,
        )
    return Round(result.seconds, marks["setup"], tally[0], timer.noise + timer.sampling)


def opacus_round(ctx: Context, *, seed: int, steps: int) -> Round:
    """Bare Opacus on the same model, adapter, optimizer, loss, batch and steps."""
    loaded, train = ctx.loaded, ctx.config.train
    start = time.perf_counter()  # as train_local's timer: from setting the adapter
    model = loaded.peft_model
    set_flat(model, loaded.layout, ctx.start)
    named = prepare_trainable(loaded, loaded.layout.names)
    model.train()
    optimizer = make_optimizer(named, train)
    torch.manual_seed(seed)  # LoRA dropout, and Opacus' own generators (secure_mode=False)
    loader = make_loader(
        ctx.dataset,
        batch_size=train.batch_size,
        pad_id=int(loaded.tokenizer.pad_token_id),
        shuffle=False,
        seed=seed,
    )
    begun = time.perf_counter()
    engine = PrivacyEngine(accountant="prv", secure_mode=False)
    module, dp_optimizer, dp_loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=SIGMA,
        max_grad_norm=CLIP,
        poisson_sampling=True,
        clipping="flat",
        grad_sample_mode="hooks",
    )
    setup = time.perf_counter() - begun
    examples, done = 0, 0
    try:
        while done < steps:
            for batch in dp_loader:
                if done >= steps:
                    break
                if batch[0].shape[0]:
                    per_example, _ = train_module.forward_losses(loaded, module, batch, ctx.device)
                    per_example.mean().backward()
                    examples += int(batch[0].shape[0])
                dp_optimizer.step()
                dp_optimizer.zero_grad()
                done += 1
        get_flat(model, loaded.layout)  # as train_local reads the delta back
    finally:
        module._close()  # Opacus' own cleanup of its hooks and attributes
        dp_module._strip_opacus(model)  # and what it leaves (fedpeft.privacy.dp)
    return Round(time.perf_counter() - start, setup, examples)


def one_round(ctx: Context, name: str, *, seed: int, steps: int) -> Round:
    torch.set_num_threads(ctx.threads)  # pinned: the same for every variant, every round
    if name == "opacus_hooks":
        return opacus_round(ctx, seed=seed, steps=steps)
    return fedpeft_round(ctx, name, seed=seed, steps=steps)


def site_setup_seconds(*, sample_rate: float, steps: int) -> dict[str, float]:
    """What a site does before it trains a round, timed apart: calibrate σ, charge the ledger."""
    begun = time.perf_counter()
    sigma = calibrate_noise_multiplier(
        target_epsilon=8.0, delta=1e-5, sample_rate=sample_rate, steps=3 * steps
    )
    calibrated = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        ledger = PrivacyLedger(Path(folder) / "ledger.json", delta=1e-5)
        charged = time.perf_counter()
        ledger.record(
            run_id="bench",
            round=1,
            noise_multiplier=sigma,
            sample_rate=sample_rate,
            steps=steps,
            ceiling_epsilon=8.0,
        )
        done = time.perf_counter()
    return {"calibration": calibrated - begun, "ledger_charge": done - charged}


def _spread(values: list[float]) -> dict[str, Any]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "per_repeat": values,
    }


def rotated(names: tuple[str, ...], repeat: int) -> list[str]:
    """``names`` rotated left by ``repeat``: each variant runs first once in len(names)."""
    k = repeat % len(names)
    return list(names[k:] + names[:k])


def rng_cost(rounds: dict[str, list[Round]]) -> dict[str, Any]:
    """The CSPRNG's added cost per round as a fraction of the torch-RNG DP round."""
    ours, theirs = (rounds[name] for name in RNG_PAIR)
    pairs = list(zip(ours, theirs, strict=True))
    by_timers = [(a.rng_seconds - b.rng_seconds) / b.seconds for a, b in pairs]
    by_rounds = [(a.seconds - b.seconds) / b.seconds for a, b in pairs]
    return {
        "compared": {"csprng": RNG_PAIR[0], "torch_rng": RNG_PAIR[1]},
        "repeats": len(ours),
        "round_seconds": {name: [r.seconds for r in rounds[name]] for name in RNG_PAIR},
        "rng_seconds_per_round": {name: [r.rng_seconds for r in rounds[name]] for name in RNG_PAIR},
        "added_fraction_by_rng_timers": _spread(by_timers),
        "added_fraction_by_round_time": _spread(by_rounds),
        "target": "added cost <= 0.05 of the DP round",
        "met": statistics.median(by_timers) <= 0.05,
    }


def per_example(r: Round, *, steps_only: bool = False) -> float:
    return (r.steps_seconds if steps_only else r.seconds) / max(r.examples, 1)


def paired(rounds: dict[str, list[Round]], a: str, b: str, *, steps_only: bool) -> dict[str, Any]:
    """``a`` ÷ ``b`` per example, repeat by repeat (the same repeat: the same machine load)."""
    ratios = [
        per_example(x, steps_only=steps_only) / per_example(y, steps_only=steps_only)
        for x, y in zip(rounds[a], rounds[b], strict=True)
    ]
    return _spread(ratios)


def run(
    *, quick: bool, repeats: int, steps: int, examples: int, threads: int, names: tuple[str, ...]
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
    ctx = Context(loaded, dataset, get_flat(loaded.peft_model, loaded.layout), config, threads)
    sample_rate = config.train.batch_size / examples  # Opacus' 1/len(loader), as fedpeft's
    for name in names:  # warm-up, untimed
        one_round(ctx, name, seed=10_000, steps=2)
    rounds: dict[str, list[Round]] = {name: [] for name in names}
    site_setup: list[dict[str, float]] = []
    for repeat in range(repeats):
        site_setup.append(site_setup_seconds(sample_rate=sample_rate, steps=steps))
        for name in rotated(names, repeat):
            r = one_round(ctx, name, seed=repeat, steps=steps)
            rounds[name].append(r)
            print(
                f"repeat {repeat + 1}/{repeats} {name:18s} {r.seconds:6.2f} s  (setup "
                f"{r.setup_seconds * 1e3:6.1f} ms, {r.examples} examples, "
                f"{per_example(r) * 1e3:6.1f} ms/example)",
                flush=True,
            )
    report: dict[str, Any] = {
        "benchmark": "dp_throughput",
        "model": config.model.loader,
        "adapter_floats": loaded.layout.size,
        "batch_size": config.train.batch_size,
        "expected_batch": sample_rate * examples,
        "steps_per_round": steps,
        "examples": examples,
        "max_length": config.model.max_length,
        "noise_multiplier": SIGMA,
        "max_grad_norm": CLIP,
        "repeats": repeats,
        "order": "rotating (repeat r starts with variant r mod k), one warm-up round each",
        "torch_threads": threads,
        "variants": list(names),
        "seconds": {name: [r.seconds for r in rs] for name, rs in rounds.items()},
        "setup_seconds": {name: [r.setup_seconds for r in rs] for name, rs in rounds.items()},
        "examples_seen": {name: [r.examples for r in rs] for name, rs in rounds.items()},
        "ms_per_example": {
            name: _spread([per_example(r) * 1e3 for r in rs]) for name, rs in rounds.items()
        },
        "site_setup_seconds": {
            key: _spread([s[key] for s in site_setup]) for key in ("calibration", "ledger_charge")
        },
        "machine": platform.platform(),
        "cpu_count": os.cpu_count(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    # samples / s at the median round, and each variant ÷ plain (kept for the headline table)
    report["samples_per_second"] = {
        name: 1e3 / report["ms_per_example"][name]["median"] for name in names
    }
    if "plain" in names:
        report["slowdown_vs_plain"] = {
            name: paired(rounds, name, "plain", steps_only=False)["median"] for name in names
        }
    ratios: dict[str, Any] = {}
    for a, b, key in (
        ("dp_hooks", "plain", "dp_hooks_over_plain"),
        ("dp_ghost", "plain", "dp_ghost_over_plain"),
        ("opacus_hooks", "plain", "opacus_hooks_over_plain"),
        ("dp_hooks", "opacus_hooks", "dp_hooks_over_opacus"),
        ("dp_ghost", "opacus_hooks", "dp_ghost_over_opacus"),
    ):
        if a in names and b in names:
            ratios[key] = {
                "round": paired(rounds, a, b, steps_only=False),
                "steps_only": paired(rounds, a, b, steps_only=True),
            }
    report["paired_ratios"] = ratios
    report["targets"] = {
        key: {"at_most": bound, "met": ratios[key]["round"]["median"] <= bound}
        for key, bound in TARGETS.items()
        if key in ratios
    }
    if all(name in names for name in RNG_PAIR):
        report["rng_cost"] = rng_cost(rounds) | {
            "steps_per_round": steps,
            "model": config.model.loader,
            "adapter_floats": loaded.layout.size,
            "when": report["when"],
        }
    return report


# --- README section: its part of benchmarks/README.md (benchmarks.report assembles it) ---


def section(report: dict[str, Any]) -> list[str]:
    """Time per example per variant, the paired ratios and targets, the setup apart."""
    out = ["## DP-SGD throughput (`dp_throughput.py`)", ""]
    if "paired_ratios" not in report:  # a run of the older layout: its one table
        return [*out, _legacy_table(report), ""]
    out.append(
        f"{report['model']}, adapter {report['adapter_floats']:,} floats, expected batch "
        f"{report['expected_batch']:g}, {report['steps_per_round']} steps per round, σ = "
        f"{report['noise_multiplier']:g}, C = {report['max_grad_norm']:g}, "
        f"{report['torch_threads']} torch threads in every round; {report['repeats']} repeats "
        "in rotating order after one warm-up round each. Time per example processed (Poisson "
        "batches vary), median (min–max); ratios are paired within a repeat."
    )
    out.append("")
    ms = report["ms_per_example"]
    rows = [
        [
            name,
            f"{ms[name]['median']:.1f} ({ms[name]['min']:.1f}–{ms[name]['max']:.1f})",
            f"{statistics.median(report['setup_seconds'][name]) * 1e3:.1f}",
            f"{report['slowdown_vs_plain'][name]:.3f}×",
        ]
        for name in report["variants"]
    ]
    out += [
        md.table(["variant", "ms / example", "setup ms / round", "÷ plain (paired)"], rows),
        "",
    ]
    labels = {
        "dp_hooks_over_plain": "fedpeft DP (hooks) ÷ plain",
        "dp_hooks_over_opacus": "fedpeft DP (hooks) ÷ bare Opacus",
        "opacus_hooks_over_plain": "bare Opacus ÷ plain",
        "dp_ghost_over_plain": "fedpeft DP (ghost) ÷ plain",
        "dp_ghost_over_opacus": "fedpeft DP (ghost) ÷ bare Opacus",
    }
    ratio_rows = []
    for key, label in labels.items():
        figure = report["paired_ratios"].get(key)
        if figure is None:
            continue
        r, st = figure["round"], figure["steps_only"]
        target = report["targets"].get(key)
        ratio_rows.append(
            [
                label,
                f"{r['median']:.3f} ({r['min']:.3f}–{r['max']:.3f})",
                f"{st['median']:.3f} ({st['min']:.3f}–{st['max']:.3f})",
                f"≤ {target['at_most']}: {md.verdict(target['met'])}" if target else "",
            ]
        )
    out += [md.table(["ratio", "whole round", "steps only", "target"], ratio_rows), ""]
    plain = ms.get("plain")
    if plain:
        out += [
            "A range that reaches below 1 is a repeat in which the other round met a slower "
            f"moment of the machine (plain alone took {plain['min']:.1f}–{plain['max']:.1f} ms "
            "per example over the run); no variant is faster than plain in the median.",
            "",
        ]
    site = report["site_setup_seconds"]
    out += [
        "Set up apart, once per round at a site before it trains: σ calibration for ε = 8 "
        f"(PRV) {site['calibration']['median'] * 1e3:.0f} ms, one ledger charge "
        f"{site['ledger_charge']['median'] * 1e3:.1f} ms (medians).",
        "",
    ]
    return out


def _legacy_table(report: dict[str, Any]) -> str:
    """The one table of results written before the paired layout (no ``paired_ratios``)."""
    table = [
        [name, f"{rate:.1f}", f"{report['slowdown_vs_plain'][name]:.2f}×"]
        for name, rate in report["samples_per_second"].items()
    ]
    return md.table(["variant", "samples / s", "time ÷ plain"], table)


def headline_rows(report: dict[str, Any]) -> list[list[str]]:
    """This benchmark's row of the README's headline table."""
    opacus = report.get("paired_ratios", {}).get("dp_hooks_over_opacus")
    return [
        [
            f"DP-SGD (hooks) time ÷ plain, {report['model']}",
            f"{report['slowdown_vs_plain'].get('dp_hooks', float('nan')):.2f}×",
            f"bare Opacus {report['slowdown_vs_plain']['opacus_hooks']:.2f}×"
            if "opacus_hooks" in report["slowdown_vs_plain"]
            else "",
            (f"hooks ÷ bare Opacus {opacus['round']['median']:.2f}×; " if opacus else "")
            + f"ghost {report['slowdown_vs_plain'].get('dp_ghost', float('nan')):.2f}× plain",
        ]
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 2 repeats, 2 steps")
    parser.add_argument(
        "--rng-only",
        action="store_true",
        help="run only dp_hooks and dp_hooks_torch_rng; update only rng_cost in --out",
    )
    parser.add_argument("--repeats", type=int, default=5, help="at least 5 for a result")
    parser.add_argument("--steps", type=int, default=16, help="DP-SGD steps per round")
    parser.add_argument("--examples", type=int, default=1024)
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="torch threads, every round"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    names = RNG_PAIR if args.rng_only else MAIN
    report = run(
        quick=args.quick,
        repeats=2 if args.quick else args.repeats,
        steps=2 if args.quick else args.steps,
        examples=64 if args.quick else args.examples,
        threads=args.threads,
        names=names,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.rng_only and args.out.exists():  # keep the last full run's throughput figures
        report = json.loads(args.out.read_text()) | {"rng_cost": report["rng_cost"]}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    if not args.rng_only:
        for name in names:
            ms = report["ms_per_example"][name]
            print(
                f"{name:14s} {ms['median']:7.1f} ms/example (range {ms['min']:.1f}–"
                f"{ms['max']:.1f}), {report['slowdown_vs_plain'][name]:.3f}× plain (paired)"
            )
        for key, figure in report["paired_ratios"].items():
            r, s = figure["round"], figure["steps_only"]
            print(
                f"{key:24s} round {r['median']:.3f} ({r['min']:.3f}–{r['max']:.3f}), steps only "
                f"{s['median']:.3f} ({s['min']:.3f}–{s['max']:.3f})"
            )
        for key, target in report["targets"].items():
            print(f"target {key} <= {target['at_most']}: {'met' if target['met'] else 'MISSED'}")
    else:
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
