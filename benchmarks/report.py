"""``benchmarks/README.md`` and its plots, assembled from the results JSON files.

Used by :mod:`benchmarks.run` after a run (or with ``--report-only``). This module only
assembles: it finds each benchmark's JSON in the results folder, asks the module that wrote it
for its part (``section``, ``headline_rows``, ``plots``; :mod:`benchmarks.run` for the line on
the last run) and puts the parts together in a fixed order under the introduction and the
headline table. What a JSON holds and how it reads is its benchmark's business. Each part
appears only when its JSON file is there; figures are read, never recomputed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks import (
    communication,
    deployment_latency,
    dp_choices,
    dp_throughput,
    instruct,
    quality,
    scale,
    secagg_primitives,
    secagg_vs_flower,
)
from benchmarks import markdown as md
from benchmarks import run as runner

INTRO = """\
# Benchmarks

Measured comparisons for fedpeft, each a script in this folder that writes a JSON file (and
sometimes a plot) to `results/`. `make bench` runs the default set and regenerates this page
(`python -m benchmarks.run`; `--full` for the long versions plus the quality sweep, `--quick`
for smoke settings, `--report-only` to rebuild this page from the JSON already there).
Variants that are compared run side by side in one process or interleaved, so a busy machine
slows them alike; the ratios are the figures to read, the absolute times depend on the machine.
"""

#: The headline table's rows come from these benchmarks, in this order.
HEADLINE = (
    ("secagg_vs_flower", secagg_vs_flower.headline_rows),
    ("communication", communication.headline_rows),
    ("scale", scale.headline_rows),
    ("dp_throughput", dp_throughput.headline_rows),
)


def load(results: Path, name: str) -> dict[str, Any] | None:
    """``results/<name>.json`` as a dict; None when it is missing, not JSON or not an object."""
    path = results / f"{name}.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def headline(results: Path) -> list[str]:
    """The headline table: the rows each benchmark picks from its results (none: no table)."""
    rows: list[list[str]] = []
    for name, pick in HEADLINE:
        if report := load(results, name):
            rows += pick(report)
    if not rows:
        return []
    return [
        "## Headline figures",
        "",
        md.table(["figure", "fedpeft", "Flower / reference", "note"], rows),
        "",
    ]


def sweeps(results: Path) -> list[str]:
    """The quality sweeps' stems: the default one first, then named ones (``--name quality_…``)."""
    stems = (p.stem for p in results.glob("quality*.json"))
    return sorted(stems, key=lambda s: (s != "quality", s))


def write_report(results: Path, readme: Path) -> list[Path]:
    """Write ``readme`` and the plots in ``results``; returns the plots written."""
    plots: list[Path] = []
    lines = [INTRO]
    if summary := load(results, "run"):
        lines += runner.last_run(summary)
    lines += headline(results)
    if report := load(results, "secagg_vs_flower"):
        plots += secagg_vs_flower.plots(report, results)
        lines += secagg_vs_flower.section(report, results, readme)
    if report := load(results, "communication"):
        lines += communication.section(report)
    if report := load(results, "scale"):
        plots += scale.plots(report, results)
        lines += scale.section(report, results, readme)
    if report := load(results, "dp_throughput"):
        lines += dp_throughput.section(report)
    if report := load(results, "instruct"):
        lines += instruct.section(report)
    if report := load(results, "secagg_primitives"):
        lines += secagg_primitives.section(report)
    for stem in sweeps(results):
        if report := load(results, stem):
            lines += quality.section(report, results, readme, stem)
    if report := load(results, "dp_choices"):
        lines += dp_choices.section(report)
    if report := load(results, "deployment_latency"):
        lines += deployment_latency.section(report)
    readme.parent.mkdir(parents=True, exist_ok=True)
    readme.write_text("\n".join(lines).rstrip() + "\n")
    return plots
