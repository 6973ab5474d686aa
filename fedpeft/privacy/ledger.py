"""The per-site privacy ledger: every DP round a site has trained, persisted on its own disk.

This module owns the *state* of privacy accounting at a site: a JSON file listing each round
of DP-SGD (run, round, noise multiplier, sampling rate, steps, time), with the accountant and δ
the site accounts at. ε is never stored; it is recomputed from the full history, across all runs
and restarts, by :func:`fedpeft.privacy.calibration.compute_epsilon` (Opacus' accountants).
The PrivacyEngine's own accountant lives only as long as one ``make_private`` call, so it cannot
be the source of truth across rounds and runs; this file is.

Guarantees:

- **Durable and atomic.** A change is written to a temporary file in the same directory,
  fsynced, then moved over the ledger with ``os.replace`` (atomic on POSIX) and the directory
  is fsynced (:func:`fedpeft.files.atomic_write_text`). A reader sees the old or the new
  ledger, never half of one.
- **No interleaving.** Read-modify-write runs under an exclusive ``fcntl.flock`` on a sibling
  ``<name>.lock`` file, so two processes of the same site cannot both pass a budget check
  and then both record. (POSIX only; ``flock`` may not be honoured on some network filesystems.)
- **Idempotent, and bound to what shaped the release.** A round is keyed by ``(run_id,
  round, binding)``, where the binding is the digest of everything that determines the
  release (:mod:`fedpeft.privacy.binding`). Recording the same key again charges nothing (a
  retried round, which repeats the identical release); the same round with another binding
  is another release and is charged again. After training, the digest of what was released
  is attached to the entry (:meth:`PrivacyLedger.attach_release`); a retry whose result
  differs is refused (:class:`ReleaseMismatchError`) instead of sent.
- **Bounded evaluation.** The ledger also records which global adapter the site evaluated
  for each charged round (:meth:`PrivacyLedger.record_evaluation`): at most one adapter per
  round, and only for rounds the site was charged for.
- **Never reset silently.** A missing parent directory, an unreadable or corrupted file, or a
  file written for another accountant or δ raises :class:`LedgerError` naming the path. Deleting
  a ledger resets the site's spent budget, so this module never does it.

Opacus provides the accounting, not a persistent multi-run ledger; that is why this is written
here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from fedpeft.files import atomic_write_text
from fedpeft.privacy.calibration import (
    ACCOUNTANTS,
    HistoryEntry,
    canonical_history,
    compute_epsilon,
)
from fedpeft.privacy.errors import (
    BudgetExceededError,
    EvaluationRefusedError,
    LedgerError,
    PrivacyConfigError,
    ReleaseMismatchError,
)

__all__ = ["LEDGER_FORMAT", "EvaluationEntry", "LedgerEntry", "LedgerSummary", "PrivacyLedger"]

#: Value of the ``format`` field that marks a file as a fedpeft privacy ledger.
LEDGER_FORMAT: Final[str] = "fedpeft.privacy_ledger"
_VERSION: Final[int] = 2
# Version 1 (fedpeft 0.1.0) entries lack binding and release; they read as unbound ("").
_V1_ENTRY_FIELDS: Final[frozenset[str]] = frozenset(
    {"run_id", "round", "noise_multiplier", "sample_rate", "steps", "recorded_at"}
)
_ENTRY_FIELDS: Final[frozenset[str]] = _V1_ENTRY_FIELDS | {"binding", "release"}
_EVALUATION_FIELDS: Final[frozenset[str]] = frozenset({"run_id", "round", "adapter", "recorded_at"})
_DO_NOT_DELETE: Final[str] = (
    "Do not delete or reset it: that would erase the privacy budget this site has spent. "
    "Restore it from a backup, or repair it by hand."
)


@dataclass(frozen=True)
class LedgerEntry:
    """One round of DP-SGD at this site.

    Attributes
    ----------
    run_id : str
        Identifier of the federated run (unique across runs at this site).
    round : int
        Round number within the run.
    noise_multiplier : float
        σ: noise standard deviation over the clipping norm.
    sample_rate : float
        Poisson sampling rate q.
    steps : int
        Noisy optimizer steps charged for this round.
    recorded_at : str
        UTC time of recording, ISO 8601.
    binding : str
        Digest of everything that shaped the release (empty for a version-1 entry).
    release : str
        SHA-256 of what was released, attached after training (empty until then).
    """

    run_id: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    recorded_at: str
    binding: str = ""
    release: str = ""

    @property
    def key(self) -> tuple[str, int, str]:
        """``(run_id, round, binding)``, the identity of a release in the ledger."""
        return (self.run_id, self.round, self.binding)

    @property
    def history_entry(self) -> HistoryEntry:
        """``(noise_multiplier, sample_rate, steps)`` as the accountants take it."""
        return (self.noise_multiplier, self.sample_rate, self.steps)


@dataclass(frozen=True)
class EvaluationEntry:
    """One evaluation a site made of a global adapter, for a round it was charged for."""

    run_id: str
    round: int
    adapter: str  # the evaluation's binding: the adapter's digest and every setting used
    recorded_at: str


@dataclass(frozen=True)
class LedgerSummary:
    """The privacy figures of a site, as ``privacy.json`` reports them.

    Attributes
    ----------
    epsilon : float
        ε spent over the whole history at ``delta``.
    delta : float
        δ of ``epsilon``.
    accountant : str
        Opacus accountant that computed ``epsilon``.
    noise_multipliers : tuple of float
        Distinct noise multipliers used, in order of first use.
    sample_rates : tuple of float
        Distinct sampling rates used, in order of first use.
    total_steps : int
        Noisy steps over all rounds.
    rounds : int
        Number of rounds recorded.
    runs : tuple of str
        Distinct run ids, in order of first use.
    """

    epsilon: float
    delta: float
    accountant: str
    noise_multipliers: tuple[float, ...]
    sample_rates: tuple[float, ...]
    total_steps: int
    rounds: int
    runs: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists)."""
        return {
            key: list(value) if isinstance(value, tuple) else value
            for key, value in dataclasses.asdict(self).items()
        }


def _check_round_args(
    *, noise_multiplier: float, sample_rate: float, steps: int, where: str
) -> None:
    """Raise PrivacyConfigError unless (σ, q, steps) is a valid history entry."""
    problems = []
    if not (
        isinstance(noise_multiplier, (int, float))
        and not isinstance(noise_multiplier, bool)
        and math.isfinite(noise_multiplier)
        and noise_multiplier >= 0
    ):
        problems.append(f"noise_multiplier={noise_multiplier!r} must be a finite number >= 0")
    if not (
        isinstance(sample_rate, (int, float))
        and not isinstance(sample_rate, bool)
        and 0 < sample_rate <= 1
    ):
        problems.append(f"sample_rate={sample_rate!r} must be in (0, 1]")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        problems.append(f"steps={steps!r} must be an integer >= 0")
    if problems:
        raise PrivacyConfigError(f"{where}: " + "; ".join(problems) + ".")


class PrivacyLedger:
    """A site's privacy ledger, persisted as JSON at ``path``.

    Every method reads the file afresh, so several ``PrivacyLedger`` objects (in one process or
    several, before and after a restart) on the same path always agree.

    Parameters
    ----------
    path : str or os.PathLike
        The ledger file on the site's disk (chosen by the site operator, e.g. through
        ``node_config``). Its parent directory must exist. The file is created, empty, if it
        does not exist yet.
    delta : float
        δ in (0, 1) at which this site accounts. Fixed for the life of the ledger.
    accountant : {"prv", "rdp"}, default "prv"
        Opacus accountant used for ε. Fixed for the life of the ledger.

    Raises
    ------
    PrivacyConfigError
        If ``delta`` or ``accountant`` is invalid.
    LedgerError
        If the parent directory does not exist, the file is unreadable or corrupted, or it
        was written with another accountant or δ.

    Examples
    --------
    >>> ledger = PrivacyLedger(site_dir / "privacy_ledger.json", delta=1e-5)
    >>> ledger.check_round(noise_multiplier=1.1, sample_rate=0.01, steps=100,
    ...                    ceiling_epsilon=8.0)  # raises BudgetExceededError if too much
    >>> ledger.record(run_id="42", round=1, noise_multiplier=1.1, sample_rate=0.01,
    ...               steps=100, ceiling_epsilon=8.0)
    >>> ledger.epsilon()
    """

    def __init__(
        self, path: str | os.PathLike[str], *, delta: float, accountant: str = "prv"
    ) -> None:
        if accountant not in ACCOUNTANTS:
            raise PrivacyConfigError(
                f"accountant={accountant!r} is not supported; use one of {ACCOUNTANTS}."
            )
        if not (isinstance(delta, (int, float)) and not isinstance(delta, bool) and 0 < delta < 1):
            raise PrivacyConfigError(f"delta={delta!r} must be a number in (0, 1), e.g. 1e-5.")
        self._path = Path(path)
        self._lock_path = self._path.with_name(self._path.name + ".lock")
        self._delta = float(delta)
        self._accountant = accountant
        if not self._path.parent.is_dir():
            raise LedgerError(
                f"privacy ledger {str(self._path)!r}: directory {str(self._path.parent)!r} does "
                "not exist. Create it, or fix the ledger path in the site's configuration."
            )
        with self._locked():
            if self._path.exists():
                self._read()  # validates format, accountant and δ
            else:
                self._write([], [])

    # ------------------------------------------------------------------ properties

    @property
    def path(self) -> Path:
        """The ledger file."""
        return self._path

    @property
    def delta(self) -> float:
        """δ at which this ledger accounts."""
        return self._delta

    @property
    def accountant(self) -> str:
        """Name of the Opacus accountant this ledger uses."""
        return self._accountant

    @property
    def entries(self) -> tuple[LedgerEntry, ...]:
        """All recorded rounds, oldest first."""
        return tuple(self._read())

    @property
    def history(self) -> list[HistoryEntry]:
        """``(noise_multiplier, sample_rate, steps)`` of every recorded round, oldest first."""
        return [entry.history_entry for entry in self._read()]

    @property
    def evaluations(self) -> tuple[EvaluationEntry, ...]:
        """Every evaluation recorded, oldest first."""
        return tuple(self._read_document()[1])

    # ------------------------------------------------------------------ accounting

    def epsilon(self, *, delta: float | None = None) -> float:
        """ε spent so far, recomputed from the full history.

        Parameters
        ----------
        delta : float, optional
            δ to report ε at; defaults to the ledger's δ.

        Returns
        -------
        float
            ε >= 0 (0.0 for an empty ledger).
        """
        return compute_epsilon(
            self.history, delta=self._delta if delta is None else delta, accountant=self._accountant
        )

    def check_round(
        self,
        *,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        ceiling_epsilon: float,
        delta: float | None = None,
    ) -> float:
        """Check that one more round fits in the budget, without recording anything.

        Parameters
        ----------
        noise_multiplier, sample_rate, steps
            The round's planned DP-SGD work.
        ceiling_epsilon : float
            The site's ε ceiling (> 0).
        delta : float, optional
            δ to check at; defaults to the ledger's δ. A δ larger than the ledger's is refused:
            it would loosen the site's guarantee.

        Returns
        -------
        float
            ε after the round.

        Raises
        ------
        BudgetExceededError
            If ε after the round would exceed ``ceiling_epsilon``; the message gives ε spent,
            ε after this round and the ceiling.
        PrivacyConfigError
            If an argument is invalid.
        """
        _check_round_args(
            noise_multiplier=noise_multiplier,
            sample_rate=sample_rate,
            steps=steps,
            where="check_round",
        )
        check_delta = self._resolve_delta(delta)
        return self._projected(
            self._read(),
            (float(noise_multiplier), float(sample_rate), int(steps)),
            ceiling_epsilon=ceiling_epsilon,
            delta=check_delta,
        )

    def record(
        self,
        *,
        run_id: str,
        round: int,  # noqa: A002 - the domain's word; keyword-only, so no shadowing hazard
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        ceiling_epsilon: float | None = None,
        binding: str = "",
    ) -> LedgerEntry:
        """Charge one round to the ledger (idempotent per ``(run_id, round, binding)``).

        With ``ceiling_epsilon`` the budget check and the write happen under the same lock, so
        no concurrent writer can slip in between; this is the call to use before training.

        Parameters
        ----------
        run_id : str
            Identifier of the run, non-empty.
        round : int
            Round number, >= 0.
        noise_multiplier, sample_rate, steps
            The round's DP-SGD work.
        ceiling_epsilon : float, optional
            If given, refuse the record (``BudgetExceededError``) when ε after it would exceed
            this ceiling. A round already recorded with the same numbers is returned unchanged
            without a check: it was charged before.
        binding : str, optional
            Digest of everything that shapes the release (:mod:`fedpeft.privacy.binding`).
            The same round with another binding is another release: charged again.

        Returns
        -------
        LedgerEntry
            The entry as stored (the earlier one for an idempotent repeat).

        Raises
        ------
        LedgerError
            If ``(run_id, round, binding)`` is already recorded with different numbers.
        BudgetExceededError
            If ``ceiling_epsilon`` is given and would be exceeded; nothing is recorded.
        PrivacyConfigError
            If an argument is invalid.
        """
        if not isinstance(run_id, str) or not run_id:
            raise PrivacyConfigError(f"run_id={run_id!r} must be a non-empty string.")
        if isinstance(round, bool) or not isinstance(round, int) or round < 0:
            raise PrivacyConfigError(f"round={round!r} must be an integer >= 0.")
        _check_round_args(
            noise_multiplier=noise_multiplier,
            sample_rate=sample_rate,
            steps=steps,
            where=f"record(run_id={run_id!r}, round={round})",
        )
        if not isinstance(binding, str):
            raise PrivacyConfigError(f"binding={binding!r} must be a string (a hex digest).")
        sigma, rate = float(noise_multiplier), float(sample_rate)
        with self._locked():
            entries, evaluations = self._read_document()
            for entry in entries:
                if entry.key != (run_id, round, binding):
                    continue
                if entry.history_entry == (sigma, rate, steps):
                    return entry  # a retried round: already charged
                raise LedgerError(
                    f"privacy ledger {str(self._path)!r}: run {run_id!r} round {round} is already "
                    f"recorded with noise_multiplier={entry.noise_multiplier!r}, "
                    f"sample_rate={entry.sample_rate!r}, steps={entry.steps!r}; refusing to "
                    f"record it again with noise_multiplier={sigma!r}, sample_rate={rate!r}, "
                    f"steps={steps!r}. A retried round must repeat the same DP settings; a new "
                    "round needs a new round number (or a new run_id)."
                )
            if ceiling_epsilon is not None:
                self._projected(
                    entries,
                    (sigma, rate, steps),
                    ceiling_epsilon=ceiling_epsilon,
                    delta=self._delta,
                )
            new = LedgerEntry(
                run_id=run_id,
                round=round,
                noise_multiplier=sigma,
                sample_rate=rate,
                steps=steps,
                recorded_at=datetime.now(UTC).isoformat(timespec="seconds"),
                binding=binding,
            )
            self._write([*entries, new], evaluations)
            return new

    def attach_release(self, *, run_id: str, round: int, binding: str, release: str) -> None:  # noqa: A002
        """Record the digest of what a charged round released; refuse a different one.

        Call it after training and before sending. The first call stores ``release``; a
        later call (a retried round) must bring the same digest.

        Raises
        ------
        LedgerError
            If no entry ``(run_id, round, binding)`` exists (charge the round first).
        ReleaseMismatchError
            If the entry already holds a different release digest: the retry came out
            different from what was sent before, and must not be sent.
        """
        with self._locked():
            entries, evaluations = self._read_document()
            for index, entry in enumerate(entries):
                if entry.key != (run_id, round, binding):
                    continue
                if entry.release == release:
                    return
                if entry.release:
                    raise ReleaseMismatchError(
                        f"privacy ledger {str(self._path)!r}: run {run_id!r} round {round} "
                        f"already released {entry.release[:16]}…; this retry produced "
                        f"{release[:16]}… from the same inputs. Sending both would let the "
                        "receiver cancel the shared noise, so this release is withheld."
                    )
                entries[index] = dataclasses.replace(entry, release=release)
                self._write(entries, evaluations)
                return
        raise LedgerError(
            f"privacy ledger {str(self._path)!r}: no charged round (run {run_id!r}, round "
            f"{round}, binding {binding[:16]}…) to attach a release to; charge it first."
        )

    def record_evaluation(self, *, run_id: str, round: int, adapter: str) -> None:  # noqa: A002
        """Allow one evaluation of the adapter ``adapter`` for a charged round.

        Evaluation figures are not DP (held-out data), so the site bounds them: at most one
        adapter per ``(run_id, round)``, and only for a round this ledger charged. The same
        adapter again (a retried evaluation, which gives identical figures) is allowed.

        Raises
        ------
        EvaluationRefusedError
            If the round was never charged here, or another adapter was evaluated for it.
        """
        with self._locked():
            entries, evaluations = self._read_document()
            if not any(e.run_id == run_id and e.round == round for e in entries):
                raise EvaluationRefusedError(
                    f"evaluation of run {run_id!r} round {round} refused: this site was not "
                    "charged for that round, so it has no trained round to tie the adapter to"
                )
            for done in evaluations:
                if (done.run_id, done.round) != (run_id, round):
                    continue
                if done.adapter == adapter:
                    return
                raise EvaluationRefusedError(
                    f"evaluation of run {run_id!r} round {round} refused: this site already "
                    f"evaluated adapter {done.adapter[:16]}… for that round; a second adapter "
                    "would be a probe of the held-out data"
                )
            new = EvaluationEntry(
                run_id=run_id,
                round=round,
                adapter=adapter,
                recorded_at=datetime.now(UTC).isoformat(timespec="seconds"),
            )
            self._write(entries, [*evaluations, new])

    def summary(self) -> LedgerSummary:
        """The figures ``privacy.json`` reports for this site (at the ledger's δ)."""
        entries = self._read()
        history = [entry.history_entry for entry in entries]
        return LedgerSummary(
            epsilon=compute_epsilon(history, delta=self._delta, accountant=self._accountant),
            delta=self._delta,
            accountant=self._accountant,
            noise_multipliers=tuple(dict.fromkeys(e.noise_multiplier for e in entries)),
            sample_rates=tuple(dict.fromkeys(e.sample_rate for e in entries)),
            total_steps=sum(e.steps for e in entries),
            rounds=len(entries),
            runs=tuple(dict.fromkeys(e.run_id for e in entries)),
        )

    # ------------------------------------------------------------------ internals

    def _resolve_delta(self, delta: float | None) -> float:
        if delta is None:
            return self._delta
        if not (isinstance(delta, (int, float)) and 0 < delta <= self._delta):
            raise PrivacyConfigError(
                f"delta={delta!r} is not allowed for ledger {str(self._path)!r}: it must be in "
                f"(0, {self._delta:g}], the site's δ. A larger δ would loosen the site's "
                "guarantee; leave delta unset to use the site's δ."
            )
        return float(delta)

    def _projected(
        self,
        entries: list[LedgerEntry],
        planned: HistoryEntry,
        *,
        ceiling_epsilon: float,
        delta: float,
    ) -> float:
        """ε after ``planned``; raise BudgetExceededError if above the ceiling."""
        if not (
            isinstance(ceiling_epsilon, (int, float))
            and not isinstance(ceiling_epsilon, bool)
            and ceiling_epsilon > 0
            and not math.isnan(ceiling_epsilon)
        ):
            raise PrivacyConfigError(
                f"ceiling_epsilon={ceiling_epsilon!r} must be a number > 0 (the site's ε ceiling)."
            )
        history = [entry.history_entry for entry in entries]
        after = compute_epsilon([*history, planned], delta=delta, accountant=self._accountant)
        if after > ceiling_epsilon:
            spent = compute_epsilon(history, delta=delta, accountant=self._accountant)
            sigma, rate, steps = planned
            raise BudgetExceededError(
                f"privacy budget of ledger {str(self._path)!r} would be exceeded: spent "
                f"ε={spent:.4g}, after this round ε={after:.4g}, ceiling ε={ceiling_epsilon:.4g} "
                f"(δ={delta:g}, accountant={self._accountant!r}; round: noise_multiplier="
                f"{sigma:.4g}, sample_rate={rate:.4g}, steps={steps}). Nothing was recorded. "
                "Train fewer steps, sample less, add more noise, or have the site operator "
                "raise the ceiling."
            )
        return after

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold an exclusive flock on the sibling lock file."""
        try:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise LedgerError(
                f"privacy ledger {str(self._path)!r}: cannot open lock file "
                f"{str(self._lock_path)!r}: {exc}. Check the directory's permissions."
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _corrupt(self, problem: str) -> LedgerError:
        return LedgerError(
            f"privacy ledger {str(self._path)!r} is corrupted: {problem}. {_DO_NOT_DELETE}"
        )

    def _read(self) -> list[LedgerEntry]:
        """The validated entries of the file; never repairs or resets it."""
        return self._read_document()[0]

    def _read_document(self) -> tuple[list[LedgerEntry], list[EvaluationEntry]]:
        """Load and validate the file (entries, evaluations); never repairs or resets it."""
        try:
            text = self._path.read_text(encoding="utf-8")
        except FileNotFoundError as exc:
            raise LedgerError(
                f"privacy ledger {str(self._path)!r} has disappeared since it was opened. "
                f"{_DO_NOT_DELETE}"
            ) from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise LedgerError(
                f"privacy ledger {str(self._path)!r} cannot be read: {exc}. {_DO_NOT_DELETE}"
            ) from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise self._corrupt(f"not valid JSON ({exc})") from exc
        if not isinstance(data, dict) or data.get("format") != LEDGER_FORMAT:
            raise self._corrupt(f"expected a JSON object with format={LEDGER_FORMAT!r}")
        version = data.get("version")
        if version not in (1, _VERSION):
            raise self._corrupt(f"version={version!r}, expected 1 or {_VERSION}")
        accountant, delta = data.get("accountant"), data.get("delta")
        if accountant not in ACCOUNTANTS:
            raise self._corrupt(f"accountant={accountant!r} is not one of {ACCOUNTANTS}")
        if not (isinstance(delta, float) and 0 < delta < 1):
            raise self._corrupt(f"delta={delta!r} is not a number in (0, 1)")
        if accountant != self._accountant or delta != self._delta:
            raise LedgerError(
                f"privacy ledger {str(self._path)!r} accounts with accountant={accountant!r}, "
                f"delta={delta!r}, but it was opened with accountant={self._accountant!r}, "
                f"delta={self._delta!r}. Open it with the ledger's own settings, or give this "
                "configuration its own ledger path."
            )
        raw_entries = data.get("entries")
        if not isinstance(raw_entries, list):
            raise self._corrupt("'entries' is not a list")
        entries: list[LedgerEntry] = []
        seen: set[tuple[str, int, str]] = set()
        for index, raw in enumerate(raw_entries):
            entry = self._parse_entry(index, raw, version=version)
            if entry.key in seen:
                raise self._corrupt(
                    f"entries[{index}] repeats run {entry.run_id!r} round {entry.round}"
                )
            seen.add(entry.key)
            entries.append(entry)
        try:
            canonical_history(entry.history_entry for entry in entries)
        except PrivacyConfigError as exc:
            raise self._corrupt(str(exc)) from exc
        raw_evaluations = data.get("evaluations", [])
        if not isinstance(raw_evaluations, list):
            raise self._corrupt("'evaluations' is not a list")
        evaluations: list[EvaluationEntry] = []
        for index, raw in enumerate(raw_evaluations):
            if not isinstance(raw, dict) or set(raw) != _EVALUATION_FIELDS:
                raise self._corrupt(
                    f"evaluations[{index}] must be an object with exactly the fields "
                    f"{sorted(_EVALUATION_FIELDS)}"
                )
            run_id, round_, adapter = raw["run_id"], raw["round"], raw["adapter"]
            if not (
                isinstance(run_id, str)
                and isinstance(round_, int)
                and not isinstance(round_, bool)
                and isinstance(adapter, str)
                and isinstance(raw["recorded_at"], str)
            ):
                raise self._corrupt(f"evaluations[{index}] has a field of the wrong type")
            evaluations.append(EvaluationEntry(run_id, round_, adapter, raw["recorded_at"]))
        return entries, evaluations

    def _parse_entry(self, index: int, raw: object, *, version: int) -> LedgerEntry:
        fields = _V1_ENTRY_FIELDS if version == 1 else _ENTRY_FIELDS
        if not isinstance(raw, dict) or set(raw) != fields:
            raise self._corrupt(
                f"entries[{index}] must be an object with exactly the fields {sorted(fields)}"
            )
        binding, release = raw.get("binding", ""), raw.get("release", "")
        if not (isinstance(binding, str) and isinstance(release, str)):
            raise self._corrupt(f"entries[{index}].binding / release must be strings")
        run_id, round_, sigma = raw["run_id"], raw["round"], raw["noise_multiplier"]
        rate, steps, recorded_at = raw["sample_rate"], raw["steps"], raw["recorded_at"]
        if not isinstance(run_id, str) or not run_id:
            raise self._corrupt(f"entries[{index}].run_id={run_id!r} is not a non-empty string")
        for name, value in (("round", round_), ("steps", steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise self._corrupt(f"entries[{index}].{name}={value!r} is not an integer >= 0")
        for name, value in (("noise_multiplier", sigma), ("sample_rate", rate)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise self._corrupt(f"entries[{index}].{name}={value!r} is not a number")
        if not isinstance(recorded_at, str):
            raise self._corrupt(f"entries[{index}].recorded_at={recorded_at!r} is not a string")
        return LedgerEntry(
            run_id=run_id,
            round=round_,
            noise_multiplier=float(sigma),
            sample_rate=float(rate),
            steps=steps,
            recorded_at=recorded_at,
            binding=binding,
            release=release,
        )

    def _write(
        self,
        entries: list[LedgerEntry],
        evaluations: list[EvaluationEntry],
    ) -> None:
        """Atomically replace the ledger file (call with the lock held); always version 2."""
        document = {
            "format": LEDGER_FORMAT,
            "version": _VERSION,
            "accountant": self._accountant,
            "delta": self._delta,
            "entries": [dataclasses.asdict(entry) for entry in entries],
            "evaluations": [dataclasses.asdict(e) for e in evaluations],
        }
        atomic_write_text(self._path, json.dumps(document, indent=2, allow_nan=False) + "\n")
