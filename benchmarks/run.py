"""Run the benchmarks, then regenerate ``benchmarks/README.md`` and its plots.

``make bench`` runs the default set (meant to finish in under 20 minutes on 2 cores):
``dp_throughput`` (5 repeats), ``secagg_vs_flower`` (1 in-process repeat, one 5-round
simulation per variant), ``communication`` and ``scale``. ``--full`` runs the long versions
and adds ``secagg_primitives``, the quality sweep (``quality.py``, its full defaults) and
``deployment_latency`` (a real loopback deployment against the same simulated federation).
``--quick`` runs every benchmark on its tiny smoke setting. Each benchmark runs in its own
process (``python -m benchmarks.<name>`` from the repository root); the display shows which one
is running, for how long, and its latest output line.

Usage (from the repository root)::

    python -m benchmarks.run                  # default set, results in benchmarks/results/
    python -m benchmarks.run --full           # long versions + primitives, quality, deployment
    python -m benchmarks.run --quick          # smoke settings
    python -m benchmarks.run --only scale     # some benchmarks only
    python -m benchmarks.run --report-only    # README and plots from the JSON already there

Writes ``<results>/<name>.json`` per benchmark, ``<results>/run.json`` (wall times),
``<results>/*.png`` and ``benchmarks/README.md`` (assembled by :mod:`benchmarks.report`;
:func:`last_run` renders ``run.json`` as the page's line on the last run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent  # each benchmark runs here, so that ``benchmarks`` and ``fedpeft`` import
DEFAULT_RESULTS = HERE / "results"
DEFAULT_README = HERE / "README.md"


@dataclass(frozen=True)
class Bench:
    name: str
    default: list[str] | None  # arguments in the default set; None: only with --full
    full: list[str] = field(default_factory=list)
    out_is_folder: bool = False

    @property
    def script(self) -> Path:
        return HERE / f"{self.name}.py"

    @property
    def module(self) -> str:
        return f"benchmarks.{self.name}"


BENCHMARKS = [
    Bench("dp_throughput", ["--repeats", "5"], []),
    Bench(
        "secagg_vs_flower",
        ["--repeats", "1", "--sim-repeats", "1", "--rounds", "5"],
        ["--repeats", "3", "--sim-repeats", "2", "--rounds", "6"],
    ),
    Bench("communication", [], []),
    Bench("scale", [], ["--rounds", "6"]),
    Bench("secagg_primitives", None, []),
    Bench("quality", None, [], out_is_folder=True),
    Bench("deployment_latency", None, []),
    Bench("instruct", None, []),  # SmolLM2: ≈ 20 min on 2 cores (3 repeats, 3 seeds)
]


def _fmt_time(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _last_line(path: Path) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(max(0, path.stat().st_size - 4096))
            lines = handle.read().decode(errors="replace").replace("\r", "\n").splitlines()
    except OSError:
        return ""
    lines = [line.strip() for line in lines if line.strip()]
    return lines[-1] if lines else ""


def run_one(bench: Bench, args: list[str], log: Path, label: str) -> tuple[int, float]:
    """Run one benchmark, showing elapsed time and its latest line; returns (rc, seconds)."""
    cmd = [sys.executable, "-m", bench.module, *args]
    tty = sys.stdout.isatty()
    print(f"{label} {bench.name}: {' '.join(args) or '(defaults)'}", flush=True)
    start = time.perf_counter()
    last_print = start
    with log.open("wb") as handle:
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT)
        while proc.poll() is None:
            time.sleep(1.0)
            now = time.perf_counter()
            status = f"  {label} {bench.name} {_fmt_time(now - start):>7} | {_last_line(log)}"
            if tty:
                width = shutil.get_terminal_size().columns - 1
                print("\r" + status[:width].ljust(width), end="", flush=True)
            elif now - last_print >= 30:
                print(status[:160], flush=True)
                last_print = now
    seconds = time.perf_counter() - start
    if tty:
        print("\r" + " " * (shutil.get_terminal_size().columns - 1) + "\r", end="")
    if proc.returncode == 0:
        print(f"  {label} {bench.name} done in {_fmt_time(seconds)}", flush=True)
    else:
        tail = log.read_bytes()[-3000:].decode(errors="replace")
        print(
            f"  {label} {bench.name} FAILED (exit {proc.returncode}) after "
            f"{_fmt_time(seconds)}; log tail:\n{tail}",
            flush=True,
        )
    return proc.returncode, seconds


def select(mode: str, only: list[str] | None) -> list[tuple[Bench, list[str]]]:
    chosen = []
    for bench in BENCHMARKS:
        if only and bench.name not in only:
            continue
        if not bench.script.is_file():
            print(f"skipping {bench.name}: {bench.script.name} not found", flush=True)
            continue
        if mode == "quick":
            chosen.append((bench, ["--quick"]))
        elif mode == "full":
            chosen.append((bench, list(bench.full)))
        elif bench.default is not None or only:
            chosen.append((bench, list(bench.default or [])))
    return chosen


def run_all(mode: str, only: list[str] | None, results: Path, logs: Path) -> dict[str, Any]:
    chosen = select(mode, only)
    results.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"mode": mode, "benchmarks": {}}
    started = time.perf_counter()
    for index, (bench, args) in enumerate(chosen, start=1):
        out = results if bench.out_is_folder else results / f"{bench.name}.json"
        extra = ["--out", str(out)]
        if bench.name == "secagg_vs_flower":
            extra += ["--dp-json", str(results / "dp_throughput.json")]
        rc, seconds = run_one(
            bench, [*args, *extra], logs / f"{bench.name}.log", f"[{index}/{len(chosen)}]"
        )
        summary["benchmarks"][bench.name] = {"args": args, "exit": rc, "seconds": seconds}
    summary["total_seconds"] = time.perf_counter() - started
    previous = results / "run.json"
    if only and previous.is_file():  # a partial run: keep the other benchmarks' entries
        kept = json.loads(previous.read_text()).get("benchmarks", {})
        summary["benchmarks"] = {**kept, **summary["benchmarks"]}
        summary["mode"] = f"{mode} (partly re-run: {', '.join(only)})"
        summary["total_seconds"] = sum(b["seconds"] for b in summary["benchmarks"].values())
    summary["machine"] = platform.platform()
    summary["cpu_count"] = os.cpu_count()
    summary["when"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    (results / "run.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"all done in {_fmt_time(summary['total_seconds'])}", flush=True)
    return summary


def last_run(summary: dict[str, Any]) -> list[str]:
    """The README's line on the last run: its set, wall time and each benchmark's minutes."""
    took = ", ".join(f"{n} {b['seconds'] / 60:.1f} min" for n, b in summary["benchmarks"].items())
    return [
        f"Last run: `{summary['mode']}` set, {summary['total_seconds'] / 60:.1f} min on "
        f"{summary['cpu_count']} cores ({summary['when']}): {took}.",
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--full", action="store_true", help="long versions, plus quality sweep")
    mode.add_argument("--quick", action="store_true", help="every script on its smoke setting")
    mode.add_argument("--report-only", action="store_true", help="only regenerate README/plots")
    parser.add_argument("--only", nargs="+", help="run only these benchmarks (by name)")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="JSON/PNG folder")
    parser.add_argument("--readme", type=Path, default=DEFAULT_README, help="README to write")
    parser.add_argument("--logs", type=Path, help="keep each script's log here (default: temp)")
    args = parser.parse_args()

    failed = []
    if not args.report_only:
        mode_name = "full" if args.full else "quick" if args.quick else "default"
        with tempfile.TemporaryDirectory(prefix="fedpeft-bench-logs-") as tmp:
            logs = args.logs or Path(tmp)
            summary = run_all(mode_name, args.only, args.results, logs)
        failed = [n for n, b in summary["benchmarks"].items() if b["exit"] != 0]
    # Imported once the benchmarks have run: the report imports every benchmark module (torch,
    # Flower), which this process need not hold while they run in theirs.
    from benchmarks.report import write_report

    written = write_report(args.results, args.readme)
    print(f"wrote {args.readme} and {len(written)} plot(s) in {args.results}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
