"""The coordinator's audit trail: ``RUN_DIR/audit.jsonl``, one hash-chained line per event.

What it records (the chain itself is :mod:`fedpeft.privacy.trail`):

- ``start`` (or ``resume`` after a crash): federation id, configuration digest, fedpeft and
  Flower versions, and the base model's identity (:func:`fedpeft.lineage.base_identity`);
- ``round``: who was sampled, who replied, who dropped (no answer), who refused and who
  failed, each with its error code; the SHA-256 of the committed adapter after the round;
  ε per site as the sites reported it (what ``privacy.json`` holds after the round).

Sites are named by their Flower node ids, as in ``metrics.jsonl`` and ``privacy.json``:
they are random 64-bit numbers the SuperLink assigns, which name no institution (the
mapping to institutions stays in the SuperLink's node registry), and keeping the same ids
lets an auditor join the three files. A refusal's code is the fixed code the site sent
(:data:`fedpeft.constants.SITE_ERRORS`), never its text.

The trail's head (line count and hash of the last line) goes into every checkpoint, so
``fedpeft verify`` can tell lines cut off the end from a complete trail.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from fedpeft import constants as K
from fedpeft.config import FedPeftConfig, to_yaml
from fedpeft.instructions import config_digest
from fedpeft.lineage import base_identity
from fedpeft.privacy.trail import AuditTrail, read_trail
from fedpeft.server.rounds import RoundRecord

__all__ = ["AUDIT_FILE", "REFUSAL_CODES", "CoordinatorTrail", "reason_code"]

AUDIT_FILE = "audit.jsonl"

#: Codes with which a site refuses by its own rules (everything else is a failure).
REFUSAL_CODES = frozenset(
    {
        K.ERR_BUDGET,
        K.ERR_LEDGER_REQUIRED,
        K.ERR_CEILING_REQUIRED,
        K.ERR_DP_REQUIRED,
        K.ERR_DELTA,
        K.ERR_DELTA_REQUIRED,
        K.ERR_SECAGG_REQUIRED,
        K.ERR_SIGNATURE,
        K.ERR_RELEASE_MISMATCH,
        K.ERR_EVALUATION_REFUSED,
    }
)


def reason_code(reason: str) -> str:
    """The code a failure reason starts with (``rejected`` for updates the server refused)."""
    return reason.split(":", 1)[0].strip()


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


class CoordinatorTrail:
    """Writer of ``RUN_DIR/audit.jsonl`` for one federation."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / AUDIT_FILE
        self.trail = AuditTrail(self.path, mode=0o644)

    def head(self) -> dict[str, Any]:
        """``{"lines": n, "sha256": hash of line n}``: what a checkpoint anchors."""
        if not self.path.exists():
            return {"lines": 0, "sha256": None}
        check = read_trail(self.path)
        return {"lines": len(check.entries), "sha256": check.head}

    def start(self, config: FedPeftConfig, *, federation_id: str, next_round: int) -> None:
        """Log the federation's start, or its resumption before round ``next_round``."""
        self.trail.append(
            "start" if next_round == 1 and not self.path.exists() else "resume",
            {
                "federation_id": federation_id,
                "next_round": next_round,
                "config_sha256": config_digest(to_yaml(config)),
                "fedpeft_version": _version("fedpeft"),
                "flwr_version": _version("flwr"),
                "base_model": base_identity(config.model).as_json(),
            },
        )

    def round(
        self, record: RoundRecord, *, sampled: list[int], replied: list[int]
    ) -> dict[str, Any]:
        """Log a written round (its adapter hash included); return the trail's head."""
        failures = record.failures
        answered = {str(n) for n in replied} | set(failures)
        refused = {
            n: reason_code(r) for n, r in failures.items() if reason_code(r) in REFUSAL_CODES
        }
        self.trail.append(
            "round",
            {
                "round": record.round,
                "sampled": [str(n) for n in sampled],
                "replied": [str(n) for n in replied],
                "dropped": [str(n) for n in sampled if str(n) not in answered],
                "refused": refused,
                "failed": {n: reason_code(r) for n, r in failures.items() if n not in refused},
                "updated": record.updated,
                "evaluated_by": record.eval_sites,
                "evaluation_failed": {
                    n: reason_code(r) for n, r in (record.eval_failures or {}).items()
                },
                "adapter_sha256": record.adapter_sha256,
                "epsilon": dict(record.epsilon),
            },
        )
        return self.head()
