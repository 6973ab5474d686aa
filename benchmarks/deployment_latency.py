"""Seconds per round: a real deployment on loopback against the same federation simulated.

The deployment is Flower's own (``flower-superlink`` with TLS and SuperNode authentication,
three SuperNodes, ``flwr run``), started by :class:`tests.deploy.harness.LoopbackDeployment`
exactly as the README's "Run a real federation" section shows, in two ways:

- ``flower-default``: ``flower-supernode`` in its default ``--isolation subprocess``, which
  starts a fresh ClientApp process for every message (``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``
  0.2 s, Flower's only public poll setting);
- ``fedpeft-worker``: the README's way: ``fedpeft supernode`` (Flower's SuperNode with its
  fixed 3 s / 0.5 s waits capped at 0.1 s) with ``--isolation process`` and one
  ``fedpeft worker`` per site, which keeps torch and the model loaded across messages.

The simulation is ``fedpeft simulate`` with the same overrides (one CSV split IID into three
sites of the same size). All run the tiny classification experiment (random tiny BERT, LoRA,
3 local steps, evaluation every round), without and with secure aggregation. A round's
seconds are the ServerApp's own figure in ``metrics.jsonl`` (start-up excluded), with its
phases (train exchange(s), evaluation); round 1 also pays for the first model build, so
later rounds are reported apart. For the worker, the sites' own share of each task (pulling
the message, the app, pushing the reply) comes from the workers' logs: the rest of an
exchange is Flower's messaging (HTTP requests between ServerApp, SuperLink, SuperNode and
worker). The time a fresh ClientApp process needs to import fedpeft's code, light
(key-exchange stages) and full (training), is measured too: under Flower's default every
message pays one of them.

Usage::

    python -m benchmarks.deployment_latency              # 3 rounds, plain and secure, all engines
    python -m benchmarks.deployment_latency --rounds 2 --modes plain
    python -m benchmarks.deployment_latency --quick      # 2 rounds, plain, worker vs simulation

Writes ``benchmarks/results/deployment_latency.json``; :func:`section` renders it as this
benchmark's part of ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import markdown as md
from fedpeft.server.rounds import RoundRecord, read_rounds
from fedpeft.testing import offline_env, write_classification_csv
from tests.deploy.harness import LoopbackDeployment

ROOT = Path(__file__).resolve().parents[1]

SITES = ("site-1", "site-2", "site-3")
ROWS_PER_SITE = 64
OUT = ROOT / "benchmarks" / "results" / "deployment_latency.json"
ENV = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2"}
ENGINES = ("flower-default", "fedpeft-worker", "simulation")
TASK_LINE = re.compile(
    r"round (?P<round>\d+) \S+ task: (?P<task>[\d.]+) s \(pull (?P<pull>[\d.]+), "
    r"app (?P<app>[\d.]+), push (?P<push>[\d.]+)\)"
)


def _overrides(mode: str, rounds: int, data: Path, run_dir: Path) -> str:
    return (
        f"experiment=tiny_classification data.path={data} federation.rounds={rounds} "
        f"secagg.enabled={str(mode == 'secure').lower()} train.num_threads=1 "
        f"federation.round_timeout=600 secagg.stage_timeout=300 output_dir={run_dir}"
    )


def _rows(run_dir: Path) -> list[RoundRecord]:
    return read_rounds(run_dir / "metrics.jsonl")


def _task_seconds(logs: list[Path]) -> dict[str, float]:
    """Mean per-task seconds (pull, app, push) of rounds 2+ from the workers' logs."""
    parts: dict[str, list[float]] = {"task": [], "pull": [], "app": [], "push": []}
    for log in logs:
        for match in TASK_LINE.finditer(log.read_text(errors="replace")):
            if int(match["round"]) < 2:
                continue
            for key in parts:
                parts[key].append(float(match[key]))
    return {k: round(statistics.mean(v), 3) for k, v in parts.items() if v}


def deployed(mode: str, rounds: int, scratch: Path, *, worker: bool) -> dict[str, Any]:
    data = scratch / "data"
    data.mkdir(parents=True)
    files = [
        write_classification_csv(data / f"{n}.csv", n=ROWS_PER_SITE, seed=i)
        for i, n in enumerate(SITES)
    ]
    run_dir = scratch / "run"
    with LoopbackDeployment(scratch / "deployment", env=ENV, fast_polls=worker) as dep:
        dep.start_superlink()
        for site in dep.make_sites(list(SITES), files):
            # the runs are DP-off (tiny_classification): these sites waive DP
            dep.start_site(site, worker=worker, device="auto", **{"privacy-required": "false"})
        dep.wait_online(len(SITES), timeout=180)
        run_id = dep.submit(_overrides(mode, rounds, Path("/sites-own/data.csv"), run_dir))
        record = dep.wait_run(
            run_id,
            timeout=300 + 300 * rounds,
            ready=lambda: (run_dir / "metrics.jsonl").is_file() and len(_rows(run_dir)) == rounds,
        )
        if record["status"] != "finished:completed":
            raise RuntimeError(f"deployed {mode} run ended {record['status']}\n{dep.tail()}")
        logs = [p for n, p in dep.logs.items() if n.startswith("worker-")]
        tasks = _task_seconds(logs) if worker else {}
    return {**_summary(_rows(run_dir)), **({"site_task_s": tasks} if tasks else {})}


def simulated(mode: str, rounds: int, scratch: Path) -> dict[str, Any]:
    scratch.mkdir(parents=True)
    data = write_classification_csv(scratch / "all.csv", n=ROWS_PER_SITE * len(SITES), seed=0)
    run_dir = scratch / "run"
    command = [str(Path(sys.executable).parent / "fedpeft"), "simulate"]
    command += _overrides(mode, rounds, data, run_dir).split()
    env = offline_env()
    subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True, timeout=1800)
    return _summary(_rows(run_dir))


def import_seconds(code: str, repeats: int = 3) -> float:
    """Median wall time of a fresh interpreter that runs ``code`` (what a ClientApp pays)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, timeout=300, cwd=ROOT)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _summary(rows: list[RoundRecord]) -> dict[str, Any]:
    seconds = [r.seconds for r in rows]
    later = rows[1:]
    phases = {
        k: round(statistics.mean(r.phase_seconds[k] for r in later), 3)
        for k in (later[0].phase_seconds if later else {})
    }
    return {
        "round_seconds": [round(s, 2) for s in seconds],
        "first_round_s": round(seconds[0], 2),
        "later_rounds_mean_s": round(statistics.mean(seconds[1:]), 3) if later else None,
        "later_phase_s": phases,
    }


# --- README section: its part of benchmarks/README.md (benchmarks.report assembles it) ---


def section(report: dict[str, Any]) -> list[str]:
    """Seconds per round deployed against simulated per mode and engine, the worker's phases."""
    out = ["## A deployed round against the same round simulated (`deployment_latency.py`)", ""]
    out += [
        f"{report['experiment']}; deployment: {report['deployment']}. Seconds per round from "
        "the ServerApp's own `metrics.jsonl` (start-up excluded), mean of rounds 2+ (round 1 "
        "also builds the model).",
        "",
    ]
    by = {(r["mode"], r["engine"]): r for r in report["results"]}
    engines = [e for e in ("flower-default", "fedpeft-worker") if any(k[1] == e for k in by)]
    table, notes = [], []
    for mode in dict.fromkeys(r["mode"] for r in report["results"]):
        sim = by.get((mode, "simulation"))
        if not sim or not sim["later_rounds_mean_s"]:
            continue
        base = sim["later_rounds_mean_s"]
        cells = [mode, f"{base} s"]
        for engine in engines:
            dep = by.get((mode, engine))
            late = dep["later_rounds_mean_s"] if dep else None
            cells.append(f"{late} s ({late / base:.1f}×)" if late else "")
        table.append(cells)
        worker = by.get((mode, "fedpeft-worker"))
        if worker and worker.get("site_task_s"):
            phases = ", ".join(f"{k} {v:.2f} s" for k, v in worker["later_phase_s"].items())
            task = worker["site_task_s"]
            ratio = worker["later_rounds_mean_s"] / base
            notes.append(
                f"- {mode}, fedpeft worker: {ratio:.1f}× the simulated round, target ≤ 2× "
                f"{'met' if ratio <= 2 else 'not met'}. Round phases: {phases}. A site's task "
                f"takes {task['task']:.3f} s, of which the app itself {task['app']:.3f} s; "
                f"pulling the message {task['pull']:.3f} s (mostly waiting for its arrays to "
                f"reach the SuperNode) and pushing the reply {task['push']:.3f} s. The rest of "
                "each exchange is Flower's messaging: HTTP requests between ServerApp, "
                "SuperLink, SuperNode and worker, each a Python web service on the same cores."
            )
    header = ["mode", "simulated", *(f"deployed, {e}" for e in engines)]
    out.append(md.table(header, table))
    if notes:
        out += ["", *notes]
    imports = report.get("fresh_process_imports", {})
    if imports:
        out += [
            "",
            f"Under Flower's default every message starts a fresh ClientApp process, which "
            f"imports fedpeft's ClientApp in {imports['clientapp_module_s']} s and the training "
            f"stack in {imports['training_stack_s']} s; the fedpeft worker imports them once.",
        ]
    return [*out, ""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds per run (default 3)")
    parser.add_argument("--modes", nargs="+", default=["plain", "secure"])
    parser.add_argument(
        "--quick", action="store_true", help="2 rounds, plain, worker vs simulation (smoke)"
    )
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.modes = 2, ["plain"]
    if args.rounds < 2:
        parser.error("--rounds must be >= 2: round 1 also builds the model")
    load_before = os.getloadavg()
    engines = ENGINES[1:] if args.quick else ENGINES
    results = []
    with tempfile.TemporaryDirectory(prefix="fedpeft-latency-") as tmp:
        for mode in args.modes:
            for engine in engines:
                start = time.perf_counter()
                scratch = Path(tmp) / f"{mode}-{engine}"
                if engine == "simulation":
                    row = simulated(mode, args.rounds, scratch)
                else:
                    row = deployed(mode, args.rounds, scratch, worker=engine == "fedpeft-worker")
                row = {"mode": mode, "engine": engine, **row}
                row["wall_s"] = round(time.perf_counter() - start, 1)
                results.append(row)
                print(json.dumps(row), flush=True)
    imports = {
        "clientapp_module_s": import_seconds("import fedpeft.client.app"),
        "training_stack_s": import_seconds(
            "import fedpeft.client.app, fedpeft.client.site, fedpeft.client.train, "
            "fedpeft.client.budget, fedpeft.privacy.dp"
        ),
    }
    payload = {
        "what": "seconds per round, 3 tiny sites on loopback: Flower deployment vs simulation",
        "experiment": "tiny_classification (tiny BERT, LoRA, 3 local steps, evaluation on)",
        "deployment": "TLS + SuperNode auth, ServerApp pull every 0.1 s; flower-default: "
        "flower-supernode --isolation subprocess, FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.2; "
        "fedpeft-worker: fedpeft supernode (waits <= 0.1 s) --isolation process + fedpeft worker",
        "rounds": args.rounds,
        "results": results,
        "fresh_process_imports": {k: round(v, 2) for k, v in imports.items()},
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
