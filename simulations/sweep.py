"""Sweep: run one simulated federation per combination of override values.

Comma-separated values expand like Hydra's multirun (``key=a,b``): every combination runs
as its own ``fedpeft simulate`` with its own run directory, one after another, and the
final round of each is collected into ``SWEEP_DIR/summary.json`` and printed as a table.

Usage::

    python simulations/sweep.py strategy=ffa,fedavg privacy.epsilon=1,8 federation.rounds=3
    python simulations/sweep.py --out runs/sweep-eps experiment=tiny_private data.path=x.csv \
        privacy.epsilon=2,4,8
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from fedpeft.config import ConfigError, compose_config


def expand(overrides: list[str]) -> list[list[str]]:
    """All combinations of ``key=v1,v2`` overrides (list values in brackets are kept whole)."""
    axes: list[list[str]] = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or value.startswith("["):
            axes.append([item])
        else:
            axes.append([f"{key}={v}" for v in value.split(",")])
    return [list(combo) for combo in itertools.product(*axes)]


def run(overrides: list[str], out: Path) -> list[dict[str, Any]]:
    from fedpeft.simulation import simulate

    combos = expand(overrides)
    configs = [compose_config(combo) for combo in combos]  # every bad override fails first
    summary = []
    for index, (combo, config) in enumerate(zip(combos, configs, strict=True)):
        print(f"[{index + 1}/{len(combos)}] {' '.join(combo)}", flush=True)
        result = simulate(config, run_dir=out / f"run-{index:03d}")
        last = result.rows[-1]
        summary.append(
            {
                "overrides": combo,
                "run_dir": str(result.run_dir),
                "rounds": last["round"],
                "eval_accuracy": last.get("eval_accuracy"),
                "eval_loss": last.get("eval_loss"),
                "epsilon_max": last.get("epsilon_max"),
            }
        )
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--out", type=Path, default=None, help="sweep folder (default runs/)")
    args = parser.parse_args()
    out = args.out or Path("runs") / f"sweep-{datetime.now():%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)
    try:
        summary = run(args.overrides, out)
    except ConfigError as err:
        print(f"sweep: error: {err}", file=sys.stderr)
        return 2
    for row in summary:
        acc, eps = row["eval_accuracy"], row["epsilon_max"]
        print(
            f"{' '.join(row['overrides']):60s} acc {acc if acc is None else round(acc, 3)} "
            f"ε {eps if eps is None else round(eps, 2)}"
        )
    print(f"summary: {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
