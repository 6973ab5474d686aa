"""``fedpeft simulate -m``: one simulated federation per combination of swept overrides.

The sweep grammar is Hydra's own, not a copy: :class:`OverridesParser` parses the
overrides and Hydra's :class:`BasicSweeper` expands them (``key=a,b``, ``range(1,4)``,
``choice(ffa,fedavg)``, lists such as ``lora.target_modules=[query,value]`` that are one
value, quoted values with commas), exactly as ``hydra.main`` with ``--multirun`` would.
``hydra.main`` itself is not used because fedpeft composes its configuration with the
compose API (:func:`fedpeft.config.compose_config`) and owns its run directories.

Every job's configuration is composed and checked (:func:`fedpeft.preflight.preflight`)
before the first one starts, so a bad value in the last job fails at once. Jobs then run
one after another, each in ``SWEEP_DIR/<index>-<swept overrides>/`` (Hydra's
``hydra.sweep.dir`` / ``hydra.sweep.subdir`` layout); ``SWEEP_DIR/summary.json`` is
rewritten after every job, and :func:`summary_table` prints it. A job whose federation
ends early is recorded as failed and the sweep goes on with the next.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from fedpeft.config import ConfigError, FedPeftConfig, compose_config

__all__ = ["Job", "JobResult", "default_sweep_dir", "expand", "run_multirun", "summary_table"]

SLUG_CHARS = 60  # a job folder's name stays readable and well under any path limit


@dataclass(frozen=True)
class Job:
    """One combination: its index, all its overrides and those that vary across the sweep."""

    index: int
    overrides: tuple[str, ...]
    swept: tuple[str, ...]

    @property
    def folder(self) -> str:
        slug = re.sub(r"[^A-Za-z0-9._=+-]+", "_", ",".join(self.swept))[:SLUG_CHARS]
        return f"{self.index}-{slug}" if slug else str(self.index)


@dataclass
class JobResult:
    """What ``summary.json`` holds for one job."""

    index: int
    overrides: list[str]
    run_dir: str
    status: str  # "ok" or "failed: <reason>"
    rounds: int | None = None
    eval_accuracy: float | None = None
    eval_perplexity: float | None = None
    epsilon_max: float | None = None
    seconds: float | None = None


def expand(overrides: Sequence[str]) -> list[Job]:
    """The jobs of a sweep, in Hydra's order (the last swept key varies fastest).

    Raises
    ------
    ConfigError
        For an override Hydra cannot parse, or a sweep BasicSweeper cannot expand
        (``interval()``, which only a search sweeper such as Optuna can sample).
    """
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
        (combos,) = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    except HydraException as err:
        raise ConfigError(
            f"cannot expand the sweep {' '.join(overrides)!r}: {err}. Allowed: key=a,b, "
            "key=range(1,4), key=choice(a,b), lists as key=[a,b]; quote a value holding a "
            "comma: 'key=\"a,b\"'"
        ) from None
    swept = {o.get_key_element() for o in parsed if o.is_sweep_override()}
    return [
        Job(
            index=i,
            overrides=tuple(combo),
            swept=tuple(o for o in combo if o.split("=", 1)[0] in swept),
        )
        for i, combo in enumerate(combos)
    ]


def default_sweep_dir() -> Path:
    return Path("runs") / f"multirun-{datetime.now():%Y%m%d-%H%M%S}"


def _compose(job: Job) -> FedPeftConfig:
    try:
        return compose_config(list(job.overrides))
    except ConfigError as err:
        raise ConfigError(f"job {job.index} ({' '.join(job.overrides)}): {err}") from None


def run_multirun(
    overrides: Sequence[str], sweep_dir: Path, *, verbose: bool = False
) -> list[JobResult]:
    """Run every job of the sweep; return (and write to ``summary.json``) their results.

    Raises
    ------
    ConfigError
        Before any job runs: an override that cannot be parsed or composed, ``output_dir``
        among the overrides (a multirun gives each job its own), or a job that fails its
        preflight (every such problem of every job, one per job).
    """
    from fedpeft.preflight import preflight
    from fedpeft.server.federation import FederationAborted
    from fedpeft.simulation import simulate, simulation_config

    if any(o.lstrip("+~").split("=", 1)[0] == "output_dir" for o in overrides):
        raise ConfigError(
            "output_dir cannot be set in a multirun: each job writes to its own folder under "
            "the sweep folder; choose that with --sweep-dir"
        )
    jobs = expand(overrides)
    configs = [_compose(job) for job in jobs]  # every bad override fails first
    problems = []
    for job, config in zip(jobs, configs, strict=True):
        try:
            preflight(simulation_config(config, sweep_dir / job.folder))
        except ConfigError as err:
            problems.append(f"job {job.index} ({' '.join(job.swept) or 'no sweep'}): {err}")
    if problems:
        raise ConfigError("; ".join(problems))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    results: list[JobResult] = []
    for job, config in zip(jobs, configs, strict=True):
        print(f"[{job.index + 1}/{len(jobs)}] {' '.join(job.overrides)}", flush=True)
        out = sweep_dir / job.folder
        start = time.perf_counter()
        result = JobResult(job.index, list(job.overrides), str(out), status="ok")
        try:
            records = simulate(config, run_dir=out, check=False, verbose=verbose).records
        except (FederationAborted, ConfigError, RuntimeError) as err:  # the next job may run
            result.status = f"failed: {err}"
        else:
            last = records[-1]
            result.rounds = last.round
            result.eval_accuracy = last.eval_accuracy
            result.eval_perplexity = last.eval_perplexity
            result.epsilon_max = last.epsilon_max
        result.seconds = round(time.perf_counter() - start, 2)
        results.append(result)
        write_summary(sweep_dir, results)
    return results


def write_summary(sweep_dir: Path, results: Sequence[JobResult]) -> Path:
    path = sweep_dir / "summary.json"
    path.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n", encoding="utf-8")
    return path


def _cell(value: Any, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def summary_table(results: Sequence[JobResult], jobs: Sequence[Job] | None = None) -> str:
    """One line per job: swept overrides, accuracy, perplexity, ε max, seconds, status."""
    names = {j.index: " ".join(j.swept) for j in jobs or ()}
    labels = [names.get(r.index) or " ".join(r.overrides) or "(defaults)" for r in results]
    width = max([len("job"), *map(len, labels)])
    head = f"{'#':>3} {'job':<{width}} {'accuracy':>8} {'ppl':>8} {'ε max':>7} {'s':>7}  status"
    lines = [head, "-" * len(head)]
    for r, label in zip(results, labels, strict=True):
        lines.append(
            f"{r.index:>3} {label:<{width}} {_cell(r.eval_accuracy, 3):>8} "
            f"{_cell(r.eval_perplexity, 2):>8} {_cell(r.epsilon_max, 2):>7} "
            f"{_cell(r.seconds, 1):>7}  {r.status}"
        )
    return "\n".join(lines)
