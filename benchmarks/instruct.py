"""Instruction tuning of SmolLM2-135M-Instruct: DP vs non-DP speed, and what DP costs in quality.

Two measurements on the ``experiment=instruct`` federation (chatterbot conversations, one
site per category group):

- **throughput**: tokens per second of one site's local round, DP-SGD (Opacus hooks, Poisson
  sampling at the experiment's ``privacy.sample_rate``) against the same round without DP:
  same model, adapter, data, batch size and steps, in alternating order (AB, BA, …) over
  ``--repeats``. Tokens are counted as the loader reads them (non-padding tokens of every
  example fetched), so Poisson batches of varying size are counted as they came. σ does not
  change the cost of a step, so it is fixed at 1. Target: DP ≥ 0.85× non-DP.
- **quality**: held-out perplexity (response tokens) of the final global adapter of (a) the
  DP federation (ε = 8 per site, secure aggregation: ``experiment=instruct`` as shipped),
  (b) the same federation with ``privacy.enabled=false``, (c) centralised training: one
  model, the union of the sites' training splits, the same optimiser and batch for
  rounds × local steps, no DP. For each seed all three are scored on one set, the union of
  the sites' own held-out splits; the variants run in rotating order over ``--seeds``.
  Target: DP perplexity within 10% of the non-private federation.

Usage::

    python -m benchmarks.instruct                  # both parts: 3 repeats, 3 seeds
    python -m benchmarks.instruct --part throughput --repeats 5
    python -m benchmarks.instruct --quick          # tiny in-process Llama (smoke test)

Writes ``benchmarks/results/instruct.json`` (a part run alone keeps the other's figures);
:func:`section` renders it as this benchmark's part of ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from benchmarks import markdown as md
from fedpeft import constants as K
from fedpeft.client.site import Site, load_site
from fedpeft.client.train import DPSettings, evaluate_local, train_local
from fedpeft.config import FedPeftConfig, compose_config
from fedpeft.console import Console
from fedpeft.data import TokenizedDataset
from fedpeft.model import get_flat
from fedpeft.server.rundir import RunDir
from fedpeft.server.strategies import make_strategy

DEFAULT_OUT = Path(__file__).parent / "results" / "instruct.json"
VARIANTS = ("dp_federation", "nonprivate_federation", "centralised")


class CountingDataset(TokenizedDataset):
    """A tokenised split that counts the non-padding tokens of every example fetched."""

    def __init__(self, items: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
        super().__init__(items)
        self.tokens = 0

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        item = self.items[index]
        self.tokens += int(item[1].sum())
        return item


def _spread(values: list[float]) -> dict[str, Any]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "per_repeat": values,
    }


def _sites(config: FedPeftConfig) -> list[Site]:
    n = config.federation.num_sites
    return [load_site(config, {K.NODE_PARTITION_ID: i, K.NODE_NUM_PARTITIONS: n}) for i in range(n)]


def _trained_names(site: Site, config: FedPeftConfig) -> tuple[str, ...]:
    return make_strategy(config.strategy, site.loaded.layout).trained_layout().names


def throughput(config: FedPeftConfig, *, repeats: int, steps: int) -> dict[str, Any]:
    """Tokens per second of site 0's local round with and without DP-SGD, interleaved."""
    site = _sites(config)[0]
    train_config = replace(config.train, local_steps=steps)
    data = CountingDataset(site.data.train.items)
    start = get_flat(site.loaded.peft_model, site.loaded.layout)
    names = _trained_names(site, config)
    dp = DPSettings(
        noise_multiplier=1.0,
        max_grad_norm=config.privacy.max_grad_norm,
        clipping=config.privacy.clipping,
        sample_rate=config.privacy.sample_rate,
    )
    rates: dict[str, list[float]] = {"dp": [], "plain": []}
    seconds: dict[str, list[float]] = {"dp": [], "plain": []}
    for repeat in range(repeats):
        order = ("plain", "dp") if repeat % 2 == 0 else ("dp", "plain")
        for name in order:
            data.tokens = 0
            result = train_local(
                site.loaded,
                data,
                global_flat=start,
                trained_names=names,
                config=train_config,
                device=site.device,
                seed=repeat,
                dp=dp if name == "dp" else None,
            )
            rates[name].append(data.tokens / result.seconds)
            seconds[name].append(result.seconds)
            print(
                f"throughput repeat {repeat + 1}/{repeats} {name:5s} {result.seconds:6.1f} s "
                f"{data.tokens:6d} tokens  {data.tokens / result.seconds:6.1f} tokens/s",
                flush=True,
            )
    ratios = [d / p for d, p in zip(rates["dp"], rates["plain"], strict=True)]
    return {
        "site": site.name,
        "site_train_examples": site.data.num_train,
        "steps": steps,
        "batch_size": config.train.batch_size,
        "sample_rate": config.privacy.sample_rate,
        "expected_dp_batch": config.privacy.sample_rate * site.data.num_train,
        "clipping": config.privacy.clipping,
        "repeats": repeats,
        "tokens_per_second": {name: _spread(values) for name, values in rates.items()},
        "round_seconds": {name: _spread(values) for name, values in seconds.items()},
        "dp_over_plain": _spread(ratios),
        "target": "DP tokens/s >= 0.85x non-DP",
        "met": statistics.median(ratios) >= 0.85,
    }


def _perplexity(sites: list[Site], flat: Any, config: FedPeftConfig) -> float:
    """exp(mean response-token loss per example) over the union of the sites' held-out splits."""
    union = TokenizedDataset([item for s in sites for item in s.data.test.items])
    result = evaluate_local(
        sites[0].loaded,
        union,
        global_flat=flat,
        batch_size=config.train.eval_batch_size,
        device=sites[0].device,
    )
    return math.exp(result.loss)


def _federation(config: FedPeftConfig, out: Path) -> tuple[Any, float]:
    from fedpeft.simulation import simulate

    start = time.perf_counter()
    simulate(config, run_dir=out, console=Console(sys.stdout))
    checkpoint = RunDir(out).latest_checkpoint()
    if checkpoint is None or checkpoint.round != config.federation.rounds:
        raise RuntimeError(f"the federation in {out} did not finish its rounds")
    return checkpoint.global_flat, time.perf_counter() - start


def _centralised(config: FedPeftConfig, sites: list[Site]) -> tuple[Any, float]:
    start = time.perf_counter()
    union = TokenizedDataset([item for s in sites for item in s.data.train.items])
    site = sites[0]
    initial = get_flat(site.loaded.peft_model, site.loaded.layout)
    steps = config.federation.rounds * config.train.local_steps
    result = train_local(
        site.loaded,
        union,
        global_flat=initial,
        trained_names=_trained_names(site, config),
        config=replace(config.train, local_steps=steps),
        device=site.device,
        seed=config.seed,
        dp=None,
    )
    # the centralised model's update applied as the federation's strategy applies one
    flat = make_strategy(config.strategy, site.loaded.layout).apply(initial, result.delta)
    return flat, time.perf_counter() - start


def quality(config: FedPeftConfig, *, seeds: int, base: list[str]) -> dict[str, Any]:
    """Held-out perplexity of the three variants per seed, rotating their order."""
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fedpeft-instruct-") as tmp:
        for seed in range(seeds):
            dp_config = compose_config([*base, f"seed={seed}"])
            plain_config = compose_config([*base, f"seed={seed}", "privacy.enabled=false"])
            sites = _sites(plain_config)  # the split depends on the seed, not on DP
            untrained = get_flat(sites[0].loaded.peft_model, sites[0].loaded.layout)
            row: dict[str, Any] = {
                "seed": seed,
                "held_out_examples": sum(s.data.num_test for s in sites),
                "base_perplexity": _perplexity(sites, untrained, plain_config),
            }
            order = VARIANTS[seed % 3 :] + VARIANTS[: seed % 3]
            for name in order:
                if name == "dp_federation":
                    flat, took = _federation(dp_config, Path(tmp) / f"dp-{seed}")
                elif name == "nonprivate_federation":
                    flat, took = _federation(plain_config, Path(tmp) / f"plain-{seed}")
                else:
                    flat, took = _centralised(plain_config, sites)
                row[name] = {"perplexity": _perplexity(sites, flat, plain_config), "seconds": took}
                print(
                    f"quality seed {seed} {name:22s} perplexity {row[name]['perplexity']:7.3f} "
                    f"({took:.0f} s)",
                    flush=True,
                )
            row["dp_over_nonprivate"] = (
                row["dp_federation"]["perplexity"] / row["nonprivate_federation"]["perplexity"]
            )
            rows.append(row)
    ratio = [r["dp_over_nonprivate"] for r in rows]
    return {
        "seeds": seeds,
        "rounds": config.federation.rounds,
        "local_steps": config.train.local_steps,
        "sites": config.federation.num_sites,
        "epsilon": config.privacy.epsilon,
        "per_seed": rows,
        "perplexity": {name: _spread([r[name]["perplexity"] for r in rows]) for name in VARIANTS}
        | {"untrained": _spread([r["base_perplexity"] for r in rows])},
        "dp_over_nonprivate": _spread(ratio),
        "target": "DP perplexity within 10% of the non-private federation (ratio <= 1.10)",
        "met": statistics.mean(ratio) <= 1.10,
    }


# --- README section: its part of benchmarks/README.md (benchmarks.report assembles it) ---


def section(report: dict[str, Any]) -> list[str]:
    """Tokens per second DP vs non-DP, then held-out perplexity per variant and seed."""
    out = ["## Instruction tuning SmolLM2-135M-Instruct (`instruct.py`)", ""]
    t = report.get("throughput")
    if t:
        tps = t["tokens_per_second"]
        ratio = t["dp_over_plain"]
        out += [
            f"Tokens per second of one site's local round ({t['site']}, "
            f"{t['site_train_examples']} training conversations, {t['steps']} steps, batch "
            f"{t['batch_size']}; DP: Poisson q = {t['sample_rate']}, expected batch "
            f"{t['expected_dp_batch']:.1f}, {t['clipping']} clipping), {t['repeats']} "
            "interleaved repeats: median (min–max).",
            "",
            md.table(
                ["variant", "tokens / s", "round seconds"],
                [
                    [
                        name,
                        f"{v['median']:.1f} ({v['min']:.1f}–{v['max']:.1f})",
                        f"{sec['median']:.1f} ({sec['min']:.1f}–{sec['max']:.1f})",
                    ]
                    for name, v, sec in (
                        ("non-DP", tps["plain"], t["round_seconds"]["plain"]),
                        ("DP-SGD", tps["dp"], t["round_seconds"]["dp"]),
                    )
                ],
            ),
            "",
            "Tokens are those the round read: a DP round's Poisson batches vary in size (and "
            "their conversations in length), so it may read more tokens than the plain round's "
            "fixed batches in a longer round; tokens / s compares the work per second.",
            "",
            f"DP ÷ non-DP: {ratio['median']:.3f} ({ratio['min']:.3f}–{ratio['max']:.3f}); "
            f"target ≥ 0.85: {md.verdict(t['met'])}.",
            "",
        ]
    q = report.get("quality")
    if q:
        names = {
            "untrained": "untrained base",
            "centralised": "centralised, no DP",
            "nonprivate_federation": "federation, no DP",
            "dp_federation": f"federation, DP ε = {q['epsilon']:g} + SecAgg+",
        }
        rows = [
            [label, f"{q['perplexity'][key]['median']:.3f}", _per_seed(q, key)]
            for key, label in names.items()
        ]
        r = q["dp_over_nonprivate"]
        out += [
            f"Held-out perplexity (response tokens, the union of the {q['sites']} sites' own "
            f"held-out splits) after {q['rounds']} rounds × {q['local_steps']} local steps "
            f"(centralised: the same number of steps on the union of the training splits), "
            f"{q['seeds']} seeds.",
            "",
            md.table(["variant", "median", "per seed"], rows),
            "",
            f"DP ÷ non-private federation: median {r['median']:.3f} ({r['min']:.3f}–"
            f"{r['max']:.3f}); target ≤ 1.10 (mean): {md.verdict(q['met'])}.",
            "",
        ]
    return out


def _per_seed(q: dict[str, Any], key: str) -> str:
    if key == "untrained":
        return ", ".join(f"{r['base_perplexity']:.3f}" for r in q["per_seed"])
    return ", ".join(f"{r[key]['perplexity']:.3f}" for r in q["per_seed"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["throughput", "quality", "both"], default="both")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="steps per throughput round")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny in-process Llama, 1 repeat")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    base = ["experiment=instruct"]
    if args.quick:
        base += ["model=tiny_llama", "lora=llama", "federation.rounds=1", "train.local_steps=2"]
    config = compose_config(base)
    report: dict[str, Any] = {}
    if args.out.exists() and args.part != "both":
        report = json.loads(args.out.read_text())
    report |= {
        "benchmark": "instruct",
        "model": config.model.loader,
        "machine": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    # Opacus's note about torch generators fedpeft does not use, and torch's about hooks on
    # LoRA layers, once per round; both filters end with this block.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        if args.part in ("throughput", "both"):
            report["throughput"] = throughput(
                config,
                repeats=1 if args.quick else args.repeats,
                steps=2 if args.quick else args.steps,
            )
        if args.part in ("quality", "both"):
            report["quality"] = quality(config, seeds=1 if args.quick else args.seeds, base=base)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    if "throughput" in report:
        t = report["throughput"]
        print(
            f"tokens/s: DP {t['tokens_per_second']['dp']['median']:.1f}, non-DP "
            f"{t['tokens_per_second']['plain']['median']:.1f}; DP/non-DP median "
            f"{t['dp_over_plain']['median']:.3f} (range {t['dp_over_plain']['min']:.3f}.."
            f"{t['dp_over_plain']['max']:.3f}, {t['repeats']} repeats)"
        )
    if "quality" in report:
        q = report["quality"]
        for name, figure in q["perplexity"].items():
            print(
                f"perplexity {name:22s} median {figure['median']:.3f} "
                f"(range {figure['min']:.3f}..{figure['max']:.3f})"
            )
        r = q["dp_over_nonprivate"]
        print(
            f"DP / non-private perplexity: median {r['median']:.3f} "
            f"({r['min']:.3f}..{r['max']:.3f})"
        )


if __name__ == "__main__":
    main()
