"""``fedpeft verify``: re-check a run directory's hash chains, every ε and the adapter on disk.

Each check prints one verdict line, ``ok`` or ``FAIL``, written for an auditor who has never
used Flower; the command exits 1 if any check fails.

1. **Coordinator audit trail** (``audit.jsonl``): every line links to the one before
   (:mod:`fedpeft.privacy.trail`), and it ends where the last checkpoint says it ended (a
   chain cannot show lines cut off its end by itself).
2. **Site audit trails** (``--site-audit``): the same chain check for each file given, and
   the site's own record against the coordinator's: every round ``audit.jsonl`` counts the
   site's update in is a round the site released one in, and every update the site released
   is in a round ``audit.jsonl`` lists it as sampled in.
3. **ε**:
   - the ε per site in the trail's last round equals ``privacy.json``'s;
   - with ``--ledger`` files: ε is recomputed with Opacus (:mod:`fedpeft.privacy.ledger`)
     from each ledger's history up to the site's last reported round of this federation, and
     must equal what a site of ``privacy.json`` with that history (steps, σ, q, δ,
     accountant) reported. This proves the reported ε is the ledger's;
   - without ledgers: ε is recomputed from ``privacy.json``'s own σ, q, steps, δ and
     accountant, as if every step was taken at that σ and q. This proves only that the
     reported figures agree with one another (a hand-edited ε, a wrong accountant); it
     cannot prove the site trained as reported, and a site with earlier federations at
     other settings does not reproduce this way — give its ledger then.
4. **Adapter**: the SHA-256 of ``adapter/adapter_model.safetensors`` equals the hash logged
   for the last round (in ``audit.jsonl`` and ``metrics.jsonl``).
5. **Ceilings**: every site's ε (reported, and recomputed from its ledger) is at most its
   ceiling.

This module reads files only (opening a ledger creates its ``.lock`` file beside it).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpeft.client.trail import TRAIL_SUFFIX
from fedpeft.lineage import ADAPTER_WEIGHTS, adapter_sha256
from fedpeft.privacy.calibration import compute_epsilon
from fedpeft.privacy.errors import LedgerError, PrivacyConfigError
from fedpeft.privacy.ledger import PrivacyLedger
from fedpeft.privacy.trail import TrailCheck, line_sha256, read_trail
from fedpeft.server.trail import AUDIT_FILE

__all__ = ["EPSILON_RTOL", "Verdict", "verify_run"]

#: Relative tolerance between a recomputed and a stated ε (the accountants are deterministic;
#: this absorbs only the decimal round trip of JSON).
EPSILON_RTOL = 1e-6
_NON_ROUND_EVENTS = ("start", "resume", "torn-tail")
_SITE_EVENTS = ("instruction", "release", "refusal")


@dataclass(frozen=True)
class Verdict:
    """One check's outcome."""

    ok: bool
    text: str

    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'}  {self.text}"


class NotARunDir(ValueError):
    """The folder given is not a fedpeft run directory (a usage error)."""


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=EPSILON_RTOL, abs_tol=1e-12)


def _json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _latest_checkpoint_state(run_dir: Path) -> dict[str, Any] | None:
    found = sorted((run_dir / "checkpoints").glob("round-*"))
    if not found:
        return None
    state: dict[str, Any] = _json(found[-1] / "state.json")
    return state


def _chain_verdict(what: str, check: TrailCheck) -> Verdict:
    if check.problem is not None:
        return Verdict(False, f"{what}: {check.problem.detail}")
    return Verdict(True, f"{what}: {len(check.entries)} lines, every line links to the one before")


def check_coordinator_trail(run_dir: Path) -> tuple[list[Verdict], TrailCheck | None]:
    path = run_dir / AUDIT_FILE
    what = f"coordinator audit trail {path}"
    if not path.is_file():
        return [Verdict(False, f"{what}: missing (the run wrote none, or it was deleted)")], None
    check = read_trail(path)
    verdicts = [_chain_verdict(what, check)]
    state = _latest_checkpoint_state(run_dir)
    head = (state or {}).get("audit_head")
    if check.ok and isinstance(head, dict) and head.get("lines"):
        anchored, lines = int(head["lines"]), len(check.entries)
        where = f"the last checkpoint (round {state['round'] if state else '?'})"
        if lines < anchored:
            verdicts.append(
                Verdict(
                    False,
                    f"{what}: ends at line {lines}, but {where} recorded {anchored} lines: "
                    f"lines {lines + 1}-{anchored} were removed from its end",
                )
            )
        else:
            raw = path.read_bytes().split(b"\n")[anchored - 1]
            later = [e for e in check.entries[anchored:] if e.get("event") not in _NON_ROUND_EVENTS]
            if line_sha256(raw) != head.get("sha256"):
                verdicts.append(
                    Verdict(
                        False,
                        f"{what}: line {anchored} hashes to {line_sha256(raw)[:12]}…, but "
                        f"{where} recorded {str(head.get('sha256'))[:12]}…: the trail was "
                        "rewritten from that line on (or the checkpoint was)",
                    )
                )
            elif later:
                verdicts.append(
                    Verdict(
                        False,
                        f"{what}: lines {anchored + 1}-{lines} log rounds that no checkpoint "
                        "covers: the coordinator stopped before checkpointing them, or they were "
                        "added; resume the run to finish it, then verify again",
                    )
                )
            else:
                verdicts.append(
                    Verdict(True, f"{what}: ends where {where} says it ends (line {anchored})")
                )
    elif check.ok:
        verdicts.append(
            Verdict(False, f"{what}: no checkpoint anchors it, so lines cut off its end go unseen")
        )
    return verdicts, check


def check_site_trail(path: Path) -> Verdict:
    what = f"site audit trail {path}"
    if not path.is_file():
        return Verdict(False, f"{what}: no such file")
    check = read_trail(path)
    verdict = _chain_verdict(what, check)
    if not verdict.ok:
        return verdict
    counts = {e: sum(1 for x in check.entries if x.get("event") == e) for e in _SITE_EVENTS}
    summary = ", ".join(f"{n} {e}s" for e, n in counts.items())
    return Verdict(True, f"{verdict.text} ({summary})")


def _last_round(check: TrailCheck | None) -> dict[str, Any] | None:
    """The last ``round`` line; past a broken link, the last one that parses (the chain's
    own verdict already says the trail was changed; the other checks still compare files)."""
    if check is None:
        return None
    entries: list[Any] = list(check.entries)
    if not check.ok:
        entries = []
        for line in check.path.read_bytes().splitlines():
            try:
                entries.append(json.loads(line))
            except ValueError:
                continue
    rounds = [e for e in entries if isinstance(e, dict) and e.get("event") == "round"]
    return rounds[-1] if rounds else None


def check_adapter(run_dir: Path, last: dict[str, Any] | None) -> Verdict:
    weights = run_dir / "adapter" / ADAPTER_WEIGHTS
    what = f"adapter {weights}"
    if last is None:
        return Verdict(False, f"{what}: the audit trail logs no round to compare it with")
    if not weights.is_file():
        return Verdict(False, f"{what}: missing, but round {last['round']} logged one")
    actual = adapter_sha256(weights.parent)
    logged = last.get("adapter_sha256")
    if actual != logged:
        return Verdict(
            False,
            f"{what}: SHA-256 {actual[:12]}…, but round {last['round']} of {AUDIT_FILE} logged "
            f"{str(logged)[:12]}…: the file on disk is not the adapter the federation produced",
        )
    metrics = run_dir / "metrics.jsonl"
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    row = rows[-1] if rows else {}
    if row.get("round") != last["round"] or row.get("adapter_sha256") != actual:
        return Verdict(
            False,
            f"metrics.jsonl: its last row (round {row.get('round')}) names adapter "
            f"{str(row.get('adapter_sha256'))[:12]}…, but {AUDIT_FILE} and the file on disk say "
            f"round {last['round']}, {actual[:12]}…",
        )
    return Verdict(
        True, f"{what}: SHA-256 {actual[:12]}… is the adapter logged after round {last['round']}"
    )


def check_reported_epsilons(privacy: dict[str, Any], last: dict[str, Any] | None) -> Verdict:
    sites = privacy.get("sites", {})
    logged = (last or {}).get("epsilon", {})
    stated = {n: s.get("epsilon") for n, s in sites.items()}
    bad = [
        n
        for n in sorted(set(stated) | set(logged))
        if not (
            isinstance(stated.get(n), (int, float))
            and isinstance(logged.get(n), (int, float))
            and _close(float(stated[n]), float(logged[n]))
        )
    ]
    if bad:
        shown = "; ".join(
            f"site {n}: privacy.json {stated.get(n)}, trail {logged.get(n)}" for n in bad
        )
        return Verdict(
            False, f"ε reported per site: privacy.json and {AUDIT_FILE} differ ({shown})"
        )
    return Verdict(
        True, f"ε reported per site: privacy.json agrees with {AUDIT_FILE} for {len(stated)} sites"
    )


def check_privacy_figures(privacy: dict[str, Any]) -> list[Verdict]:
    """Recompute each site's ε from privacy.json's own σ, q, steps, δ and accountant."""
    verdicts = []
    for node, s in sorted(privacy.get("sites", {}).items()):
        what = f"ε of site {node} (from privacy.json's σ, q, steps)"
        try:
            again = compute_epsilon(
                [(float(s["noise_multiplier"]), float(s["sampling_rate"]), int(s["steps"]))],
                delta=float(s["delta"]),
                accountant=str(s["accountant"]),
            )
        except (KeyError, TypeError, ValueError, PrivacyConfigError) as err:
            verdicts.append(Verdict(False, f"{what}: its figures cannot be read ({err})"))
            continue
        if _close(again, float(s["epsilon"])):
            verdicts.append(
                Verdict(
                    True,
                    f"{what}: recomputed {again:.6g} with Opacus ({s['accountant']}) equals the "
                    "stated ε (figures consistent; the ledger itself was not given)",
                )
            )
        else:
            verdicts.append(
                Verdict(
                    False,
                    f"{what}: recomputed {again:.6g} with Opacus ({s['accountant']}, "
                    f"σ={s['noise_multiplier']:.6g}, q={s['sampling_rate']:.6g}, {s['steps']} "
                    f"steps, δ={s['delta']:g}), but privacy.json states {s['epsilon']:.6g}; if "
                    "this site trained in earlier federations at other settings, verify with its "
                    "ledger (--ledger)",
                )
            )
    return verdicts


def check_ledger(path: Path, privacy: dict[str, Any], federation_id: str) -> Verdict:
    """Recompute ε from ``path``'s history and match it to a site of ``privacy.json``."""
    what = f"ledger {path}"
    try:
        document = _json(path)
        ledger = PrivacyLedger(
            path, delta=float(document["delta"]), accountant=str(document["accountant"])
        )
        entries = ledger.entries
    except (OSError, ValueError, KeyError, TypeError, LedgerError, PrivacyConfigError) as err:
        return Verdict(False, f"{what}: cannot be read as a fedpeft privacy ledger ({err})")
    ours = [i for i, e in enumerate(entries) if e.run_id == federation_id]
    if not ours:
        return Verdict(False, f"{what}: holds no round of federation {federation_id}")
    nodes = _trail_nodes(path.with_name(path.name + TRAIL_SUFFIX), federation_id)
    sites = {n: f for n, f in privacy.get("sites", {}).items() if nodes is None or n in nodes}
    matched: list[tuple[str, float]] = []
    for node, s in sorted(sites.items()):
        ends = [i for i in ours if entries[i].round == s.get("last_round")]
        if not ends:
            continue
        prefix = entries[: ends[-1] + 1]  # what the site had charged when it last reported
        last = prefix[-1]
        if (
            sum(e.steps for e in prefix) == s.get("steps")
            and _close(last.noise_multiplier, float(s.get("noise_multiplier") or -1))
            and _close(last.sample_rate, float(s.get("sampling_rate") or -1))
            and ledger.delta == s.get("delta")
            and ledger.accountant == s.get("accountant")
        ):
            again = compute_epsilon(
                [e.history_entry for e in prefix], delta=ledger.delta, accountant=ledger.accountant
            )
            matched.append((node, again))
    whose = (
        f"site {', '.join(sorted(nodes))} (named by the trail beside it)" if nodes else "any site"
    )
    if not matched:
        charged = ", ".join(str(entries[i].round) for i in ours)
        return Verdict(
            False,
            f"{what}: {whose} in privacy.json reports another history than this ledger's "
            f"(rounds {charged} of this federation, "
            f"{sum(e.steps for e in entries[: ours[-1] + 1])} steps, "
            f"σ={entries[ours[-1]].noise_multiplier:.6g}): the ledger or privacy.json was "
            "changed, or it is another federation's ledger",
        )
    # Sites reporting the same history must report the same ε: check every one.
    wrong = [
        f"site {n} reported ε={float(sites[n]['epsilon']):.6g}, but Opacus "
        f"({ledger.accountant}) recomputes ε={again:.6g} from this ledger"
        for n, again in matched
        if not _close(again, float(sites[n]["epsilon"]))
    ]
    if wrong:
        return Verdict(False, f"{what}: " + "; ".join(wrong))
    node, again = matched[0]
    ceiling = sites[node].get("epsilon_ceiling")
    if isinstance(ceiling, (int, float)) and again > ceiling:
        return Verdict(False, f"{what}: ε={again:.6g} exceeds site {node}'s ceiling {ceiling}")
    return Verdict(
        True,
        f"{what}: ε={again:.6g} recomputed with Opacus ({ledger.accountant}) from its history "
        f"equals what site {', '.join(n for n, _ in matched)} reported",
    )


def _trail_nodes(path: Path, federation_id: str) -> set[str] | None:
    """Node ids the site's trail beside its ledger ran as in this federation (None: no trail)."""
    if not path.is_file():
        return None
    found = {
        str(e["node_id"])
        for e in read_trail(path).entries
        if e.get("event") == "instruction"
        and e.get("federation_id") == federation_id
        and e.get("node_id") is not None
    }
    return found or None


UPDATE_MESSAGES = ("train", "train.secagg_masked")  # the replies that carry a site's update


def _site_update_rounds(entries: Sequence[dict[str, Any]], federation_id: str) -> set[int]:
    """Rounds of ``federation_id`` in which the site's trail shows it released an update.

    A release line follows its instruction line; the instruction says the task (a secure
    round's masked stage serves training and evaluation alike) and the federation.
    """
    rounds: set[int] = set()
    for before, entry in zip(entries, entries[1:], strict=False):
        if (
            entry.get("event") == "release"
            and entry.get("message_type") in UPDATE_MESSAGES
            and before.get("event") == "instruction"
            and before.get("message_type") == entry.get("message_type")
            and before.get("task", "train") == "train"
            and before.get("federation_id") == federation_id
        ):
            rounds.add(int(entry["round"]))
    return rounds


def check_site_against_coordinator(
    path: Path, coordinator: TrailCheck | None, federation_id: str
) -> Verdict | None:
    """The site's own record of its updates against what ``audit.jsonl`` says of that site.

    Every round the coordinator lists the site as a contributor must be a round the site
    released an update in, and every update the site released must be in a round in which
    the coordinator lists it as sampled: an instruction the coordinator sent but did not
    log (a hidden extra release) fails here. None when the trail names no node of this
    federation or a chain is already broken (its own verdict says so).
    """
    if coordinator is None or not coordinator.ok or not path.is_file():
        return None
    site = read_trail(path)
    if not site.ok:
        return None
    nodes = {
        str(e["node_id"])
        for e in site.entries
        if e.get("event") == "instruction"
        and e.get("federation_id") == federation_id
        and e.get("node_id") is not None
    }
    if len(nodes) != 1:
        return None
    (node,) = nodes
    released = _site_update_rounds(list(site.entries), federation_id)
    logged = [e for e in coordinator.entries if e.get("event") == "round"]
    replied = {int(e["round"]) for e in logged if node in map(str, e.get("replied", []))}
    sampled = {int(e["round"]) for e in logged if node in map(str, e.get("sampled", []))}
    what = f"site {node}: its trail {path} against {AUDIT_FILE}"
    claimed = sorted(replied - released)
    hidden = sorted(released - sampled)
    if claimed or hidden:
        problems = []
        if claimed:
            problems.append(
                f"{AUDIT_FILE} counts its update in round(s) {claimed}, which its own trail "
                "shows no update for"
            )
        if hidden:
            problems.append(
                f"the site released an update in round(s) {hidden}, which {AUDIT_FILE} does not "
                "list it as sampled in (an instruction the coordinator did not log)"
            )
        return Verdict(False, f"{what}: " + "; ".join(problems))
    return Verdict(
        True,
        f"{what}: the site released updates in round(s) {sorted(released)}; the coordinator "
        f"logged it as sampled in {sorted(sampled)} and counted it in {sorted(replied)}",
    )


def check_ceilings(privacy: dict[str, Any]) -> Verdict:
    over = [
        f"site {n}: ε={s['epsilon']:.6g} > ceiling {s['epsilon_ceiling']}"
        for n, s in sorted(privacy.get("sites", {}).items())
        if isinstance(s.get("epsilon"), (int, float))
        and isinstance(s.get("epsilon_ceiling"), (int, float))
        and s["epsilon"] > s["epsilon_ceiling"]
    ]
    if over:
        return Verdict(False, "privacy ceilings: " + "; ".join(over))
    return Verdict(
        True,
        f"privacy ceilings: all {len(privacy.get('sites', {}))} sites stayed within their ε "
        "ceiling",
    )


def verify_run(
    run_dir: Path, *, ledgers: Sequence[Path] = (), site_trails: Sequence[Path] = ()
) -> list[Verdict]:
    """Every verdict for ``run_dir``; raises :class:`NotARunDir` for a folder that is not one."""
    run_dir = Path(run_dir)
    federation_file = run_dir / "federation.json"
    if not (run_dir / "config.yaml").is_file() or not federation_file.is_file():
        raise NotARunDir(
            f"{run_dir} is not a fedpeft run directory (it lacks config.yaml or "
            "federation.json); give the folder that 'fedpeft simulate' printed or the "
            "ServerApp wrote"
        )
    federation_id = str(_json(federation_file)["federation_id"])
    verdicts, check = check_coordinator_trail(run_dir)
    verdicts += [check_site_trail(Path(p)) for p in site_trails]
    for p in site_trails:
        cross = check_site_against_coordinator(Path(p), check, federation_id)
        if cross is not None:
            verdicts.append(cross)
    last = _last_round(check)
    privacy_file = run_dir / "privacy.json"
    privacy: dict[str, Any] = _json(privacy_file) if privacy_file.is_file() else {}
    if not privacy.get("sites"):
        verdicts.append(Verdict(True, "ε: no site reported one (differential privacy off)"))
    else:
        verdicts.append(check_reported_epsilons(privacy, last))
        if ledgers:
            verdicts += [check_ledger(Path(p), privacy, federation_id) for p in ledgers]
        else:
            verdicts += check_privacy_figures(privacy)
        verdicts.append(check_ceilings(privacy))
    verdicts.append(check_adapter(run_dir, last))
    return verdicts
