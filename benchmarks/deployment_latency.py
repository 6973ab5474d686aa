"""Seconds per round: a real deployment on loopback against the same federation simulated.

The deployment is Flower's own (``flower-superlink`` with TLS and SuperNode authentication,
three ``flower-supernode`` processes, ``flwr run``), started by
:class:`tests.deploy.harness.LoopbackDeployment` exactly as the README's "Run a real
federation" section shows; the simulation is ``fedpeft simulate`` with the same overrides
(one CSV split IID into three sites of the same size). Both run the tiny classification
experiment (random tiny BERT, LoRA, 3 local steps, evaluation every round), without and with
secure aggregation. A round's seconds are the ServerApp's own figure in ``metrics.jsonl``
(training exchange(s) plus evaluation), so start-up is excluded; round 1 also pays for the
first model build, so later rounds are reported apart.

Settings of the deployment: ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.2`` (Flower's only public
poll setting, default 1 s), the ServerApp's 0.1 s pull interval (``fedpeft.server.exchange``)
and the ClientApp's lazy imports are fedpeft's defaults. The time needed to import a
ClientApp process's code, light (key-exchange stages) and full (training), is measured too:
under ``--isolation subprocess`` every message pays one of them.

Usage::

    python benchmarks/deployment_latency.py              # 3 rounds, plain and secure
    python benchmarks/deployment_latency.py --rounds 2 --modes plain
    python benchmarks/deployment_latency.py --quick      # 2 rounds, plain only

Writes ``benchmarks/results/deployment_latency.json``.
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
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedpeft.testing import offline_env, write_classification_csv  # noqa: E402
from tests.deploy.harness import LoopbackDeployment  # noqa: E402

SITES = ("site-1", "site-2", "site-3")
ROWS_PER_SITE = 64
OUT = ROOT / "benchmarks" / "results" / "deployment_latency.json"
ENV = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2"}


def _overrides(mode: str, rounds: int, data: Path, run_dir: Path) -> str:
    return (
        f"experiment=tiny_classification data.path={data} federation.rounds={rounds} "
        f"secagg.enabled={str(mode == 'secure').lower()} train.num_threads=1 "
        f"federation.round_timeout=600 secagg.stage_timeout=300 output_dir={run_dir}"
    )


def _round_seconds(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [float(json.loads(line)["seconds"]) for line in lines if line.strip()]


def deployed(mode: str, rounds: int, scratch: Path) -> list[float]:
    data = scratch / "data"
    data.mkdir(parents=True)
    files = [
        write_classification_csv(data / f"{n}.csv", n=ROWS_PER_SITE, seed=i)
        for i, n in enumerate(SITES)
    ]
    run_dir = scratch / "run"
    with LoopbackDeployment(scratch / "deployment", env=ENV) as dep:
        dep.start_superlink()
        for site in dep.make_sites(list(SITES), files):
            dep.start_site(site, device="auto")
        dep.wait_online(len(SITES), timeout=180)
        run_id = dep.submit(_overrides(mode, rounds, Path("/sites-own/data.csv"), run_dir))
        record = dep.wait_run(
            run_id,
            timeout=300 + 300 * rounds,
            ready=lambda: (
                (run_dir / "metrics.jsonl").is_file() and len(_round_seconds(run_dir)) == rounds
            ),
        )
        if record["status"] != "finished:completed":
            raise RuntimeError(f"deployed {mode} run ended {record['status']}\n{dep.tail()}")
    return _round_seconds(run_dir)


def simulated(mode: str, rounds: int, scratch: Path) -> list[float]:
    scratch.mkdir(parents=True)
    data = write_classification_csv(scratch / "all.csv", n=ROWS_PER_SITE * len(SITES), seed=0)
    run_dir = scratch / "run"
    command = [str(Path(sys.executable).parent / "fedpeft"), "simulate"]
    command += _overrides(mode, rounds, data, run_dir).split()
    env = offline_env()
    subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True, timeout=1800)
    return _round_seconds(run_dir)


def import_seconds(code: str, repeats: int = 3) -> float:
    """Median wall time of a fresh interpreter that runs ``code`` (what a ClientApp pays)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, timeout=300, cwd=ROOT)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def summary(seconds: list[float]) -> dict[str, Any]:
    later = seconds[1:]
    return {
        "round_seconds": [round(s, 2) for s in seconds],
        "first_round_s": round(seconds[0], 2),
        "later_rounds_mean_s": round(statistics.mean(later), 2) if later else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds per run (default 3)")
    parser.add_argument("--modes", nargs="+", default=["plain", "secure"])
    parser.add_argument("--quick", action="store_true", help="2 rounds, plain only (smoke)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.modes = 2, ["plain"]
    if args.rounds < 2:
        parser.error("--rounds must be >= 2: round 1 also builds the model")
    load_before = os.getloadavg()
    results = []
    with tempfile.TemporaryDirectory(prefix="fedpeft-latency-") as tmp:
        for mode in args.modes:
            for engine, run in (("deployment", deployed), ("simulation", simulated)):
                start = time.perf_counter()
                seconds = run(mode, args.rounds, Path(tmp) / f"{mode}-{engine}")
                row = {"mode": mode, "engine": engine, **summary(seconds)}
                row["wall_s"] = round(time.perf_counter() - start, 1)
                results.append(row)
                print(json.dumps(row), flush=True)
    imports = {
        "clientapp_module_s": import_seconds("import fedpeft.client.app"),
        "training_stack_s": import_seconds(
            "import fedpeft.client.app, fedpeft.client.site, fedpeft.client.train, "
            "fedpeft.client.privacy, fedpeft.privacy.dp"
        ),
    }
    payload = {
        "what": "seconds per round, 3 tiny sites on loopback: Flower deployment vs simulation",
        "experiment": "tiny_classification (tiny BERT, LoRA, 3 local steps, evaluation on)",
        "deployment": "TLS + SuperNode auth, --isolation subprocess, "
        "FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.2, ServerApp pull every 0.1 s",
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
