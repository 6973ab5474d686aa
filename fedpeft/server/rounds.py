"""One finished round's figures, as the round loop writes them and every reader reads them.

:class:`RoundRecord` is a line of ``RUN_DIR/metrics.jsonl`` (PRODUCT.md's contract): the
round loop builds it from its training and evaluation exchanges, :meth:`RoundRecord.as_json`
writes it (``dataclasses.asdict``, fields in the file's order), and the progress display, the
report, the model card and the benchmarks read it back typed with
:meth:`RoundRecord.from_json`, which refuses a line that lacks a field or has one it does not
know, naming it.

Site ids are Flower node ids as strings (JSON object keys).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

__all__ = ["RoundRecord", "SiteFigures", "read_metrics_lines", "read_rounds"]

#: What a site reported with its update (ε spent, σ, q, steps, clip norm, ...): JSON values.
SiteFigures = dict[str, Any]

#: Fields a line carries only when they apply (a causal LM's perplexity, an evaluation that
#: failed somewhere, generated answers): omitted from the line, not written as null.
_WHEN_PRESENT = ("eval_failures", "eval_perplexity", "eval_generations")


@dataclass(frozen=True, kw_only=True)
class RoundRecord:
    """A finished round: who took part, what travelled, what it reached, what it cost."""

    round: int
    rounds: int
    # --- training: the sites asked, their answers and the aggregate ---
    sites_sampled: int
    sites_replied: int  # usable updates in the aggregate
    sites_failed: int  # error replies and rejected updates
    sites_dropped: int  # secure aggregation: sites that left during the round
    failures: dict[str, str]  # node id → reason (an error code and message)
    updated: bool  # whether the global adapter changed (enough usable updates)
    train_loss: float | None  # only without DP and without secure aggregation
    bytes_down: int
    bytes_up: int
    site_metrics: dict[str, SiteFigures]
    secagg: bool
    secagg_params: dict[str, int]  # SecAgg+ as resolved this round (k, t, ...); {}: plain
    # --- evaluation of the new adapter, by sites that trained it ---
    eval_loss: float | None
    eval_accuracy: float | None
    eval_sites: int
    eval_bytes_down: int
    eval_failures: dict[str, str] | None = None
    eval_perplexity: float | None = None  # causal LM
    eval_generations: int | None = None  # answers to published prompts, kept apart
    # --- what the round cost ---
    phase_seconds: dict[str, float]
    epsilon: dict[str, float]  # node id → ε spent so far, as the site reported it
    epsilon_max: float | None
    seconds: float
    adapter_sha256: str  # of the adapter written after this round (fedpeft.lineage)

    def as_json(self) -> dict[str, Any]:
        """The metrics.jsonl line, fields in order, those that do not apply left out."""
        row = asdict(self)
        for name in _WHEN_PRESENT:
            if row[name] is None:
                del row[name]
        return row

    @classmethod
    def from_json(cls, row: Mapping[str, Any]) -> RoundRecord:
        """A metrics.jsonl line read back.

        Raises
        ------
        ValueError
            If the line lacks a field or has one this version does not know.
        """
        known = {f.name for f in fields(cls)}
        missing = sorted(known - set(row) - set(_WHEN_PRESENT))
        unknown = sorted(set(row) - known)
        if missing or unknown:
            raise ValueError(
                f"a metrics.jsonl line of round {row.get('round')!r} "
                + (f"lacks {missing}" if missing else "")
                + (" and " if missing and unknown else "")
                + (f"has fields this fedpeft does not know: {unknown}" if unknown else "")
                + "; it was not written by this version of fedpeft's round loop"
            )
        return cls(**{name: row[name] for name in known if name in row})


def read_metrics_lines(path: Path) -> list[dict[str, Any]]:
    """The lines of a ``metrics.jsonl`` as JSON objects (none before the first round)."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def read_rounds(path: Path) -> list[RoundRecord]:
    """The rounds of a ``metrics.jsonl``, typed (each line checked by ``from_json``)."""
    return [RoundRecord.from_json(row) for row in read_metrics_lines(path)]
