"""Sweep: a thin wrapper over ``fedpeft simulate -m`` (:mod:`fedpeft.multirun`).

Kept so that existing scripts keep working; the grammar is Hydra's (``key=a,b``,
``range()``, ``choice()``, lists, quoted commas), each job gets its own run directory under
the sweep folder, and ``SWEEP_DIR/summary.json`` collects their final figures.

Usage::

    python simulations/sweep.py strategy=ffa,fedavg privacy.epsilon=1,8 federation.rounds=3
    # is the same as
    fedpeft simulate -m strategy=ffa,fedavg privacy.epsilon=1,8 federation.rounds=3
"""

from __future__ import annotations

import argparse
import sys

from fedpeft.cli import main as fedpeft_main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--out", default=None, help="sweep folder (default runs/multirun-<time>)")
    args = parser.parse_args(argv)
    extra = ["--sweep-dir", args.out] if args.out else []
    return fedpeft_main(["simulate", "-m", *extra, *args.overrides])


if __name__ == "__main__":
    sys.exit(main())
