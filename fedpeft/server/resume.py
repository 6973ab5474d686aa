"""Continuing a federation after a crash: where it stands, and whether it may go on.

A restarted ServerApp (run config ``resume-from``) continues the federation whose run
directory that is, after its latest checkpoint (global adapter, strategy, sampling RNG,
privacy report) and under the federation id of its ``federation.json``, so the sites go on
charging the same ledger entries. It may do so only with the configuration the federation
started with: another one would make the sites calibrate and train differently than the
rounds already charged. :func:`resume_point` checks all of it before anything is sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedpeft.config import ConfigError, FedPeftConfig, as_dict, from_yaml
from fedpeft.server.rundir import FEDERATION_FILE, Checkpoint, RunDir


@dataclass(frozen=True)
class ResumePoint:
    """Where a federation resumes: its id, and its latest checkpoint (None: no round done)."""

    federation_id: str
    checkpoint: Checkpoint | None


def resume_point(run_dir: RunDir, config: FedPeftConfig, *, adapter_size: int) -> ResumePoint:
    """The federation of ``run_dir``, checked against ``config`` and this model's adapter.

    Raises
    ------
    ConfigError
        If ``run_dir`` is not a fedpeft run directory, this configuration differs from the
        one the federation started with (sites would calibrate and train differently), or
        its latest checkpoint holds another adapter size or another federation's id.
    """
    where = run_dir.path
    stored = run_dir.read_json(FEDERATION_FILE)
    config_file = where / "config.yaml"
    if stored is None or not config_file.is_file():
        raise ConfigError(
            f"resume-from={str(where)!r} is not a fedpeft run directory (it lacks "
            f"{FEDERATION_FILE} or config.yaml); give the folder the first run wrote, or "
            "leave resume-from empty to start a new federation"
        )
    differences = config_differences(from_yaml(config_file.read_text(encoding="utf-8")), config)
    if differences:
        raise ConfigError(
            f"cannot resume {where}: the configuration differs from the one it started "
            f"with ({'; '.join(differences)}); resubmit with the same overrides as the "
            "first run (its config.yaml shows them)"
        )
    federation_id = str(stored["federation_id"])
    checkpoint = run_dir.latest_checkpoint()
    if checkpoint is None:
        return ResumePoint(federation_id, None)
    if checkpoint.global_flat.size != adapter_size:
        raise ConfigError(
            f"checkpoint of round {checkpoint.round} in {where} holds "
            f"{checkpoint.global_flat.size} adapter floats, this model has "
            f"{adapter_size}; resume with the model and LoRA settings of that run"
        )
    if checkpoint.state.get("federation_id", federation_id) != federation_id:
        raise ConfigError(
            f"checkpoint of round {checkpoint.round} in {where} belongs to federation "
            f"{checkpoint.state['federation_id']}, {FEDERATION_FILE} names "
            f"{federation_id}; the folder mixes two runs, start a new one"
        )
    return ResumePoint(federation_id, checkpoint)


def config_differences(stored: FedPeftConfig, current: FedPeftConfig) -> list[str]:
    """``key: stored -> current`` for every setting that differs, ``output_dir`` aside."""
    old, new = _flat(as_dict(stored)), _flat(as_dict(current))
    return [
        f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
        for key in sorted(set(old) | set(new))
        if key != "output_dir" and old.get(key) != new.get(key)
    ]


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
