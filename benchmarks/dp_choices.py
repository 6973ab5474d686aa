"""Private fine-tuning that adapts the model: a DP training choice against a baseline.

The quality table of the DP-training issue, on :mod:`benchmarks.quality`'s machinery (one split
into a pooled held-out set and Dirichlet sites, the real ClientApp and round loop on the
in-process grid, site randomness paired across the runs of one seed). Two settings:

- ``default``: 10 sites, Dirichlet α = 0.3 (the quality sweep's);
- ``large``: 3 sites of about 3,400 examples each (Dirichlet α = 1000: near-IID, near-equal
  sizes), where LoRA has the examples per step that its coordinates need.

For each setting, strategy (``fedavg``, ``ffa``) and training seed it runs: no DP, DP at
ε = 8 with ``--baseline`` (Hydra overrides; default ``privacy.sample_rate=0.03``, the embedded
default before the DP-training issue) and DP at ε = 8 with ``--choice`` (default: none, the
embedded default, ``privacy.sample_rate=0.2`` since that issue). Reported,
means over the seeds with their range: accuracy; DP ÷ no DP of the same strategy; and LoRA's
gain under DP — accuracy minus the same run with ΔW = B·A = 0 (the trained head kept) — per
seed, so a gain that holds in every seed shows as such. No floor and no ceiling are run (the
quality sweep has them): what is compared is DP against no DP, paired by seed.

Usage::

    python -m benchmarks.dp_choices                       # q = 0.03 against the default q = 0.2
    python -m benchmarks.dp_choices --choice "lora.r=1 train.trainable=[head,lora]"
    python -m benchmarks.dp_choices --quick      # tiny in-process BERT, 1 seed (the smoke test)

Writes ``benchmarks/results/dp_choices.json``; :func:`section` renders it as its part of
``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from benchmarks import markdown as md
from benchmarks import quality
from fedpeft.config import compose_config

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
STRATEGIES = ("fedavg", "ffa")
EPSILON = 8.0
#: name → (sites, Dirichlet α)
SETTINGS = {"default": (10, 0.3), "large": (3, 1000.0)}
#: name of each kind of run (the baseline's and the choice's overrides come from the command)
KINDS = ("no_dp", "dp", "dp_choice")
#: the embedded default's sampling rate before the DP-training issue: what --baseline names
BASELINE = "privacy.sample_rate=0.03"


def _setting(args: argparse.Namespace, sites: int, alpha: float) -> quality.Setting:
    quick = bool(args.quick)
    overrides = ["model=tiny_bert", "data.max_examples=600", "train.num_threads=1"] if quick else []
    overrides.append(f"privacy.accountant={'rdp' if quick else 'prv'}")
    return quality.Setting(
        overrides=tuple(overrides),
        sites=3 if quick else sites,
        rounds=2 if quick else args.rounds,
        steps=args.steps,
        alpha=alpha,
        epsilons=(EPSILON,),
        strategies=STRATEGIES,
        eval_examples=200 if quick else 1000,
        secagg=False,
        quick=quick,
        seeds=args.seeds,
    )


def _runs(choice: Sequence[str], baseline: Sequence[str]) -> dict[str, list[str]]:
    return {
        "no_dp": ["privacy.enabled=false"],
        "dp": ["privacy.enabled=true", f"privacy.epsilon={EPSILON}", *baseline],
        "dp_choice": ["privacy.enabled=true", f"privacy.epsilon={EPSILON}", *choice],
    }


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Mean, lowest and highest of ``values`` (one per seed), and the values."""
    return {
        "mean": round(float(np.mean(values)), 4),
        "min": round(float(min(values)), 4),
        "max": round(float(max(values)), 4),
        "per_seed": [round(float(v), 4) for v in values],
    }


def run_setting(
    name: str,
    setting: quality.Setting,
    choice: Sequence[str],
    work: Path,
    baseline: Sequence[str] = (),
) -> dict[str, Any]:
    """Every strategy × kind × seed of one setting; figures per strategy and kind."""
    pool = quality.make_pool(setting, work / "data")
    federated = [
        f"federation.num_sites={setting.sites}",
        f"federation.min_sites={min(2, setting.sites)}",
        f"train.local_steps={setting.steps}",
        "secagg.enabled=false",
    ]
    seeds = [compose_config([]).seed + j for j in range(setting.seeds)]
    runs: dict[str, dict[str, Any]] = {}
    total = len(STRATEGIES) * len(KINDS) * len(seeds)
    index = 0
    for seed in seeds:  # seed outermost: a cut run still has whole seeds
        for strategy in STRATEGIES:
            for kind, extra in _runs(choice, baseline).items():
                index += 1
                key = f"{strategy}-{kind}@{seed}"
                config = quality.compose(
                    setting, *federated, f"strategy={strategy}", *extra, f"seed={seed}"
                )
                result = quality.run_federation(config, pool.site_files, work / key, pool)
                runs[key] = {"strategy": strategy, "kind": kind, "seed": seed, **result}
                print(
                    f"[{name} {index:>2}/{total}] {key:<22} accuracy {result['accuracy']:.3f} "
                    f"without LoRA {result['accuracy_without_lora']:.3f} "
                    f"({result['seconds']:.0f} s)",
                    flush=True,
                )
    figures: dict[str, dict[str, Any]] = {}
    for strategy in STRATEGIES:
        by_kind = {kind: [runs[f"{strategy}-{kind}@{s}"] for s in seeds] for kind in KINDS}
        plain = [r["accuracy"] for r in by_kind["no_dp"]]
        figures[strategy] = {
            kind: {
                "accuracy": spread([r["accuracy"] for r in rs]),
                "of_no_dp": spread([r["accuracy"] / p for r, p in zip(rs, plain, strict=True)]),
                "lora_gain": spread([r["accuracy"] - r["accuracy_without_lora"] for r in rs]),
            }
            for kind, rs in by_kind.items()
        }
    return {
        "dataset": pool.dataset,
        "sites": setting.sites,
        "alpha": setting.alpha,
        "site_sizes": pool.site_sizes,
        "test_examples": len(pool.test_table),
        "seeds": seeds,
        "figures": figures,
        "runs": runs,
    }


def targets(report: dict[str, Any]) -> dict[str, Any]:
    """The issue's two targets, checked on the choice (and, for comparison, on today's DP)."""
    out: dict[str, Any] = {}
    default, large = report["settings"].get("default"), report["settings"].get("large")
    for kind in ("dp", "dp_choice"):
        if default is not None:
            out[f"default_{kind}_at_least_95pct"] = {
                s: default["figures"][s][kind]["accuracy"]["mean"]
                >= 0.95 * default["figures"][s]["no_dp"]["accuracy"]["mean"]
                for s in STRATEGIES
            }
        if large is not None:
            out[f"large_{kind}_lora_gain_every_seed"] = {
                s: all(g > 0 for g in large["figures"][s][kind]["lora_gain"]["per_seed"])
                for s in STRATEGIES
            }
    return out


# --- README section: its part of benchmarks/README.md (benchmarks.report assembles it) ---


def _cell(figure: dict[str, Any], fmt: str) -> str:
    return (
        f"{format(figure['mean'], fmt)} ({format(figure['min'], fmt)} – "
        f"{format(figure['max'], fmt)})"
    )


def section(report: dict[str, Any]) -> list[str]:
    """Accuracy, DP ÷ no DP and LoRA's gain under DP, per setting, strategy and training."""
    s = report["setting"]
    out = [
        "## DP training choices (`dp_choices.py`)",
        "",
        f"{s['model']} on {s['dataset']}, {s['rounds']} rounds × {s['local_steps']} steps, "
        f"ε = {s['epsilon']:g} per site, {len(s['seeds'])} training seeds (site randomness "
        f"paired by seed); mean (min – max over seeds). Baseline: "
        f"`{s.get('baseline') or 'the embedded default'}`; choice: "
        f"`{s['choice'] or 'the embedded default'}`"
        + ("" if s["choice"] else f" (`privacy.sample_rate={s['sample_rate']:g}`)")
        + ".",
        "",
    ]
    if "batch_size" in s:
        n = max(max(setting["site_sizes"]) for setting in report["settings"].values())
        out += [
            f"Without DP a site trains batches of `train.batch_size` = {s['batch_size']}; "
            "under DP it draws Poisson batches of q·N expected examples "
            f"({s['sample_rate'] * n:,.0f} at q = {s['sample_rate']:g} and N = {n:,}), so in "
            "the same steps a DP run reads more examples and ÷ no DP can exceed 1: that is "
            "the batch, not a gain from the noise.",
            "",
        ]
    labels = {"no_dp": "no DP", "dp": "DP, the baseline", "dp_choice": "DP, the choice"}
    for name, setting in report["settings"].items():
        sizes = setting["site_sizes"]
        out += [
            f"**{name}**: {setting['sites']} sites (Dirichlet α = {setting['alpha']:g}; "
            f"{min(sizes):,}–{max(sizes):,} training examples each)"
            + (f". {setting['note']}" if setting.get("note") else ""),
            "",
        ]
        rows = []
        for strategy in STRATEGIES:
            for kind in KINDS:
                f = setting["figures"][strategy][kind]
                rows.append(
                    [
                        strategy,
                        labels[kind],
                        _cell(f["accuracy"], ".3f"),
                        _cell(f["of_no_dp"], ".3f") if kind != "no_dp" else "1",
                        _cell(f["lora_gain"], "+.3f"),
                        " ".join(f"{g:+.3f}" for g in f["lora_gain"]["per_seed"]),
                    ]
                )
        out.append(
            md.table(
                ["strategy", "training", "accuracy", "÷ no DP", "LoRA's gain", "gain per seed"],
                rows,
            )
        )
        out.append("")
    met = report.get("targets", {})
    if met:
        out.append(
            "Targets: "
            + "; ".join(
                f"{key}: " + ", ".join(f"{s} {md.verdict(v)}" for s, v in by.items())
                for key, by in met.items()
            )
            + "."
        )
        out.append("")
    return out


def write(
    report: dict[str, Any], args: argparse.Namespace, setting: quality.Setting, *, seconds: float
) -> Path:
    """Write the JSON with the settings done so far (a cut run keeps its whole settings)."""
    config = quality.compose(setting)
    first = next(iter(report["settings"].values()))
    report["setting"] = {
        "model": config.model.loader,
        "dataset": first["dataset"],
        "rounds": setting.rounds,
        "local_steps": setting.steps,
        "epsilon": EPSILON,
        "delta": config.privacy.delta,
        "sample_rate": config.privacy.sample_rate,
        "batch_size": config.train.batch_size,
        "accountant": config.privacy.accountant,
        "choice": args.choice,
        "baseline": args.baseline,
        "seeds": first["seeds"],
        "quick": bool(args.quick),
    }
    report["targets"] = targets(report)
    report["seconds"] = round(seconds, 1)
    report["machine"] = platform.platform()
    report["when"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "dp_choices.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 3 sites, 2 rounds")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds (default 3)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--steps", type=int, default=3, help="local steps per round (default 3)")
    parser.add_argument(
        "--choice",
        default="",
        help="Hydra overrides of the DP training choice, one string (default: none)",
    )
    parser.add_argument(
        "--baseline",
        default=BASELINE,
        help=f"Hydra overrides of the DP run it is compared with (default {BASELINE!r})",
    )
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the JSON")
    args = parser.parse_args(argv)
    choice, baseline = shlex.split(args.choice), shlex.split(args.baseline)
    for overrides in (choice, baseline):
        compose_config(overrides)  # a bad one fails here, before any work
    datasets.disable_progress_bars()
    report: dict[str, Any] = {"benchmark": "dp_choices", "settings": {}}
    with (
        tempfile.TemporaryDirectory(prefix="fedpeft-dp-choices-") as work,
        warnings.catch_warnings(),
    ):
        # Opacus's notes on torch's RNG, hooks and RDP orders and transformers' deprecation
        # note, repeated by every DP round; each filter matches one message and ends with
        # this block (as in benchmarks.quality).
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        warnings.filterwarnings("ignore", message="Optimal order is the")
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
        start = time.perf_counter()
        for name in args.settings:
            sites, alpha = SETTINGS[name]
            setting = _setting(args, sites, alpha)
            report["settings"][name] = {
                **run_setting(name, setting, choice, Path(work) / name, baseline),
                "choice": args.choice,  # per setting too: a merged report may mix runs
            }
            path = write(report, args, setting, seconds=time.perf_counter() - start)
    print("\n".join(section(report)))
    print(f"wrote {path} ({report['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
