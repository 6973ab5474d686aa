"""Memory and seconds per round of a simulation as the number of *unsampled* sites grows.

Each setting runs ``fedpeft simulate`` in its own process: a tiny BERT, one IID dataset of
``--rows`` short synthetic rows split over ``N`` virtual sites, 10 sites sampled per round
(``federation.fraction=0.01``, ``federation.min_sites=10``) and 10 evaluated
(``federation.fraction_evaluate=10/N``), one torch thread per site. While it runs, a thread
samples the resident memory of the driver process and all its descendants (the Ray GCS,
raylet and workers): RSS summed every 0.25 s, and PSS (which splits shared pages such as Ray's
object store between the processes mapping them) every 2 s; and their CPU seconds (the last
sample before the process ends). Seconds per round are rounds 2..R
of ``metrics.jsonl`` (round 1 includes Ray's start). With sampling fixed at 10, both should stay
flat in ``N``.

Usage::

    python -m benchmarks.scale            # N in {100, 300, 1000}, 4 rounds, 20,000 rows
    python -m benchmarks.scale --quick    # N in {10, 30}, 2 rounds, 600 rows

Writes ``benchmarks/results/scale.json``; :func:`plots` draws ``scale.png`` from it,
:func:`section` renders it as this benchmark's part of ``benchmarks/README.md`` and
:func:`headline_rows` as its row of the headline table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from benchmarks import markdown as md
from fedpeft.server.rounds import read_rounds
from fedpeft.testing import offline_env, write_classification_csv

DEFAULT_OUT = Path(__file__).parent / "results" / "scale.json"
SAMPLED = 10


class TreeMemory:
    """Samples the memory of a process and its descendants in a background thread."""

    def __init__(self, pid: int, interval: float = 0.25, pss_every: int = 8) -> None:
        self.root = psutil.Process(pid)
        self.interval, self.pss_every = interval, pss_every
        self.peak_rss = self.peak_pss = self.peak_driver_rss = 0
        self.peak_processes = 0
        self.cpu: dict[int, float] = {}  # pid -> latest user + system seconds
        self.timeline: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._start = time.perf_counter()

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        tick = 0
        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                break
            rss = pss = 0
            for proc in procs:
                try:
                    if tick % self.pss_every == 0:
                        info = proc.memory_full_info()
                        rss += info.rss
                        pss += info.pss
                    else:
                        rss += proc.memory_info().rss
                    if proc is self.root:
                        self.peak_driver_rss = max(self.peak_driver_rss, proc.memory_info().rss)
                    times = proc.cpu_times()
                    self.cpu[proc.pid] = times.user + times.system
                except psutil.Error:
                    continue
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_pss = max(self.peak_pss, pss)
            self.peak_processes = max(self.peak_processes, len(procs))
            self.timeline.append((round(time.perf_counter() - self._start, 2), rss))
            tick += 1
            self._stop.wait(self.interval)


def run_setting(csv_path: Path, out: Path, num_sites: int, rounds: int) -> dict[str, Any]:
    overrides = [
        "experiment=tiny_classification",
        f"data.path={csv_path}",
        f"federation.num_sites={num_sites}",
        "federation.fraction=0.01",
        f"federation.min_sites={SAMPLED}",
        f"federation.fraction_evaluate={SAMPLED / num_sites}",
        f"federation.rounds={rounds}",
        "train.num_threads=1",
        f"output_dir={out}",
    ]
    cmd = [sys.executable, "-m", "fedpeft.cli", "simulate", *overrides]
    start = time.perf_counter()
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=offline_env())
        with TreeMemory(proc.pid) as memory:
            code = proc.wait(timeout=1800)
        wall = time.perf_counter() - start
        log.seek(0)
        tail = log.read()[-3000:].decode(errors="replace")
    metrics = out / "metrics.jsonl"
    if code != 0 or not metrics.is_file():
        raise RuntimeError(f"simulation with {num_sites} sites failed ({code}):\n{tail}")
    rows = read_rounds(metrics)
    later = [r.seconds for r in rows[1:]]
    return {
        "sites": num_sites,
        "sampled_per_round": rows[-1].sites_sampled,
        "evaluated_per_round": rows[-1].eval_sites,
        "rounds": rounds,
        "seconds_per_round": later,
        "median_seconds_per_round": statistics.median(later),
        "round1_seconds": rows[0].seconds,
        "process_seconds": wall,
        "peak_rss_mb": memory.peak_rss / 2**20,
        "peak_pss_mb": memory.peak_pss / 2**20,
        "peak_driver_rss_mb": memory.peak_driver_rss / 2**20,
        "peak_processes": memory.peak_processes,
        "driver_cpu_seconds": memory.cpu.get(proc.pid, 0.0),
        "all_cpu_seconds": sum(memory.cpu.values()),
        "rss_timeline_mb": [(t, round(v / 2**20, 1)) for t, v in memory.timeline[::8]],
    }


# --- README section: its part of benchmarks/README.md (benchmarks.report assembles it) ---

PLOT = "scale.png"


def plots(report: dict[str, Any], results: Path) -> list[Path]:
    """Draw ``results/scale.png``; the plots drawn."""
    plot(report, results / PLOT)
    return [results / PLOT]


def plot(report: dict[str, Any], path: Path) -> None:
    """Peak memory and seconds per round against the number of sites."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    sites = [r["sites"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].plot(sites, [r["peak_rss_mb"] for r in rows], "-o", label="peak RSS, all processes")
    axes[0].plot(sites, [r["peak_pss_mb"] for r in rows], "-s", label="peak PSS, all processes")
    axes[0].plot(sites, [r["peak_driver_rss_mb"] for r in rows], "-^", label="peak RSS, driver")
    axes[0].set_ylabel("MB")
    axes[0].set_ylim(bottom=0)
    axes[0].set_title("memory of the simulation", fontsize=10)
    axes[0].legend(fontsize=8)
    axes[1].plot(
        sites, [r["median_seconds_per_round"] for r in rows], "-o", label="median, rounds 2..R"
    )
    for r in rows:
        axes[1].scatter(
            [r["sites"]] * len(r["seconds_per_round"]), r["seconds_per_round"], s=10, color="grey"
        )
    axes[1].set_ylabel("seconds per round")
    axes[1].set_ylim(bottom=0)
    axes[1].set_title(f"{report['sampled_per_round']} sites sampled per round", fontsize=10)
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xticks(sites, [str(s) for s in sites])
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        ax.set_xlabel("virtual sites in the federation")
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def section(report: dict[str, Any], results: Path, readme: Path) -> list[str]:
    """Memory and seconds per round per N and their growth; the plot linked from ``readme``."""
    img = os.path.relpath(results / PLOT, readme.parent)
    out = ["## Scale: unsampled sites cost nothing (`scale.py`)", ""]
    out.append(
        f"`fedpeft simulate` with {report['model']}, {report['rows']:,} IID rows, "
        f"{report['sampled_per_round']} sites sampled and evaluated per round; memory of the "
        "driver and all Ray processes sampled every 0.25 s (RSS) and 2 s (PSS)."
    )
    out.append("")
    table = [
        [
            f"{r['sites']:,}",
            f"{r['sampled_per_round']}",
            f"{r['median_seconds_per_round']:.2f}",
            f"{r['round1_seconds']:.1f}",
            f"{r['peak_rss_mb']:,.0f}",
            f"{r['peak_pss_mb']:,.0f}",
            f"{r['peak_driver_rss_mb']:,.0f}",
            f"{r.get('driver_cpu_seconds', float('nan')):,.0f} / "
            f"{r.get('all_cpu_seconds', float('nan')):,.0f}",
            f"{r.get('process_seconds', float('nan')):,.0f}",
        ]
        for r in report["results"]
    ]
    out.append(
        md.table(
            [
                "sites",
                "sampled",
                "s / round (2..R)",
                "round 1 s",
                "peak RSS MB",
                "peak PSS MB",
                "driver RSS MB",
                "CPU s, driver / all",
                "wall s",
            ],
            table,
        )
    )
    g = report["growth_first_to_last"]
    out += [
        "",
        f"From {g['sites'][0]:,} to {g['sites'][1]:,} sites: peak RSS ×{g['peak_rss']:.2f}, "
        f"peak PSS ×{g['peak_pss']:.2f}, seconds per round ×{g['seconds_per_round']:.2f}.",
        "",
    ]
    first, last = report["results"][0], report["results"][-1]
    if "driver_cpu_seconds" in first:
        out += [
            f"The driver's CPU time goes from {first['driver_cpu_seconds']:.0f} s to "
            f"{last['driver_cpu_seconds']:.0f} s for the same work: Flower's "
            "simulation engine polls the message store for *every* node every 0.1 s "
            "(`flwr/server/superlink/fleet/vce/vce_api.py`, `add_messages_to_queue`), and each "
            "poll scans all stored messages (`InMemoryLinkState.get_message_ins`). That is "
            "Flower's cost, outside fedpeft; fedpeft's per-site caches are bounded.",
            "",
        ]
    out += [f"![memory and seconds per round vs sites]({img})", ""]
    return out


def headline_rows(report: dict[str, Any]) -> list[list[str]]:
    """This benchmark's row of the README's headline table: the first and last N."""
    first, last = report["results"][0], report["results"][-1]
    return [
        [
            f"simulation, {first['sites']:,} → {last['sites']:,} sites (10 sampled)",
            f"{first['median_seconds_per_round']:.2f} → {last['median_seconds_per_round']:.2f}"
            " s/round",
            f"{first['peak_pss_mb']:,.0f} → {last['peak_pss_mb']:,.0f} MB PSS",
            f"×{report['growth_first_to_last']['seconds_per_round']:.2f} time, "
            f"×{report['growth_first_to_last']['peak_pss']:.2f} memory",
        ]
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N in {10, 30}, 2 rounds")
    parser.add_argument("--sites", type=int, nargs="*", help="numbers of sites to run")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    sites = args.sites or ([10, 30] if args.quick else [100, 300, 1000])
    rounds = 2 if args.quick else args.rounds
    rows_n = 600 if args.quick else args.rows
    started = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="fedpeft-scale-") as tmp:
        csv_path = write_classification_csv(Path(tmp) / "data.csv", n=rows_n)
        for num_sites in sites:
            row = run_setting(csv_path, Path(tmp) / f"run-{num_sites}", num_sites, rounds)
            results.append(row)
            print(
                f"{num_sites:>5} sites ({row['sampled_per_round']} sampled): "
                f"{row['median_seconds_per_round']:.2f} s/round (rounds 2..{rounds}), round 1 "
                f"{row['round1_seconds']:.1f} s, peak RSS {row['peak_rss_mb']:.0f} MB "
                f"(PSS {row['peak_pss_mb']:.0f} MB, driver {row['peak_driver_rss_mb']:.0f} MB, "
                f"{row['peak_processes']} processes)",
                flush=True,
            )
    first, last = results[0], results[-1]
    report = {
        "benchmark": "scale",
        "quick": args.quick,
        "rows": rows_n,
        "sampled_per_round": SAMPLED,
        "model": "experiment=tiny_classification (tiny BERT)",
        "results": results,
        "growth_first_to_last": {
            "sites": [first["sites"], last["sites"]],
            "peak_rss": last["peak_rss_mb"] / first["peak_rss_mb"],
            "peak_pss": last["peak_pss_mb"] / first["peak_pss_mb"],
            "seconds_per_round": last["median_seconds_per_round"]
            / first["median_seconds_per_round"],
        },
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "seconds": time.perf_counter() - started,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["growth_first_to_last"]))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
