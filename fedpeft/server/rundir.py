"""The run directory: what a federation leaves behind for people and for a restart.

Owns the files of PRODUCT.md's contract: ``config.yaml``, ``metrics.jsonl`` (one JSON
object per round), ``adapter/`` (the latest global adapter in PEFT format, with its model
card), ``sites.json`` (what each contributing site chose to declare about its data),
``generations.jsonl`` (the answers sites generated to the prompts they published) and
``checkpoints/`` (what a restarted server needs); ``base/`` is written by
:func:`fedpeft.export.write_base`. Every file is written to a temporary
name and renamed into place, so a crash leaves the previous complete version.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from fedpeft.files import atomic_write_text, replace_dir
from fedpeft.model_card import SITES_FILE
from fedpeft.server.rounds import RoundRecord, read_metrics_lines, read_rounds

if TYPE_CHECKING:
    from fedpeft.config import FedPeftConfig


def default_run_dir(config: FedPeftConfig) -> Path:
    """``output_dir``, or ``runs/<experiment_name>-<time>``."""
    if config.output_dir:
        return Path(config.output_dir)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{config.experiment_name}-{stamp}"


#: The federation's id and declared transport, written at its first start.
FEDERATION_FILE = "federation.json"
#: Why a federation ended before its last round (written by the ServerApp).
ABORTED_FILE = "aborted.json"
#: The ServerApp's progress as JSON lines (rounds, exchanges, messages): what
#: :class:`fedpeft.console.Console` renders while a simulation runs.
EVENTS_FILE = "events.jsonl"
#: Everything a simulation's processes printed, timestamped (:class:`fedpeft.simulation.RunLog`).
LOG_FILE = "log.txt"

CHECKPOINT_KEEP = 2  # the newest two, so a crash while writing one leaves the other


@dataclass(frozen=True)
class Checkpoint:
    """The server's state after a finished round."""

    round: int
    global_flat: NDArray[np.float32]
    state: dict[str, Any]  # strategy state, RNG state, anything JSON-able


class RunDir:
    """Writer (and reader) of one run directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.checkpoints = self.path / "checkpoints"
        self.checkpoints.mkdir(exist_ok=True)

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def adapter_path(self) -> Path:
        return self.path / "adapter"

    def record_declarations(
        self, round_number: int, declarations: dict[str, dict[str, str | int]]
    ) -> None:
        """Keep, in ``sites.json``, each contributing site's latest declaration (``{}``: it
        declared nothing) and the last round it contributed to."""
        sites = dict((self.read_json(SITES_FILE) or {}).get("sites", {}))
        for node, declared in declarations.items():
            sites[node] = {"declared": dict(declared), "last_round": round_number}
        self.write_json(SITES_FILE, {"sites": sites})

    def write_config(self, yaml_text: str) -> None:
        atomic_write_text(self.path / "config.yaml", yaml_text)

    def write_json(self, name: str, payload: dict[str, Any]) -> None:
        atomic_write_text(self.path / name, json.dumps(payload, indent=2, sort_keys=True) + "\n")

    def read_json(self, name: str) -> dict[str, Any] | None:
        """The object in ``name`` (written by :meth:`write_json`), or None if there is none."""
        path = self.path / name
        if not path.is_file():
            return None
        payload = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(payload, dict):
            raise ValueError(f"{path} holds {type(payload).__name__}, not a JSON object")
        return payload

    def append_metrics(self, record: RoundRecord) -> None:
        """Append one round's figures (a round run again replaces its line); the file is
        rewritten whole so a crash never leaves half a line."""
        rows = [r for r in self.read_metrics() if r.get("round") != record.round]
        rows.append(record.as_json())
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in rows))

    def record_generations(
        self, round_number: int, generations: dict[str, list[tuple[str, str]]]
    ) -> None:
        """Keep the round's generated answers in ``generations.jsonl`` (one line per node id,
        prompt and answer; a re-run round replaces its lines). Nothing written without any."""
        from fedpeft.generate import GENERATIONS_FILE

        path = self.path / GENERATIONS_FILE
        if not generations and not path.exists():
            return
        rows = [r for r in read_generations(self.path) if r.get("round") != round_number]
        rows += [
            {"round": round_number, "site": node, "prompt": prompt, "answer": answer}
            for node, pairs in sorted(generations.items())
            for prompt, answer in pairs
        ]
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))

    def read_metrics(self) -> list[dict[str, Any]]:
        """The lines of ``metrics.jsonl`` as JSON objects (the file as PRODUCT.md states it)."""
        return read_metrics_lines(self.metrics_path)

    def read_rounds(self) -> list[RoundRecord]:
        """The finished rounds, typed (:meth:`RoundRecord.from_json` checks every line)."""
        return read_rounds(self.metrics_path)

    def adapter_writer(self) -> Path:
        """A fresh temporary folder to save the adapter into; pass it to :meth:`commit_adapter`."""
        return Path(tempfile.mkdtemp(dir=self.path, prefix=".adapter."))

    def commit_adapter(self, tmp: Path) -> None:
        replace_dir(tmp, self.adapter_path)

    def save_checkpoint(self, checkpoint: Checkpoint) -> Path:
        """Write ``checkpoints/round-NNNN/`` atomically and prune older ones."""
        final = self.checkpoints / f"round-{checkpoint.round:04d}"
        tmp = Path(tempfile.mkdtemp(dir=self.checkpoints, prefix=".tmp-"))
        np.save(tmp / "global.npy", checkpoint.global_flat)
        (tmp / "state.json").write_text(
            json.dumps({"round": checkpoint.round, **checkpoint.state}, indent=1), encoding="utf-8"
        )
        replace_dir(tmp, final)
        for stale in sorted(self.checkpoints.glob("round-*"))[:-CHECKPOINT_KEEP]:
            shutil.rmtree(stale)
        return final

    def latest_checkpoint(self) -> Checkpoint | None:
        """The newest complete checkpoint, or None."""
        found = sorted(self.checkpoints.glob("round-*"))
        if not found:
            return None
        folder = found[-1]
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        flat = np.load(folder / "global.npy").astype(np.float32)
        return Checkpoint(round=int(state.pop("round")), global_flat=flat, state=state)


def read_generations(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of ``run_dir/generations.jsonl`` (``[]`` when the run has none)."""
    from fedpeft.generate import GENERATIONS_FILE

    path = run_dir / GENERATIONS_FILE
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]
