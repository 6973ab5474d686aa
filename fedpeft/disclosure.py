"""What leaves a site, and who decides which setting: the one source of both tables.

The README shows these tables (between ``<!-- BEGIN … -->`` / ``<!-- END … -->`` markers, kept
equal by a test) and the run report renders them too, so what a privacy officer reads is
what the code states in one place. Each row names the code that makes it true.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedpeft import constants as K

__all__ = ["RELEASES", "SETTINGS", "Release", "Setting", "markdown_table"]


@dataclass(frozen=True)
class Release:
    """One quantity that leaves a site."""

    quantity: str
    when: str
    protection: str


@dataclass(frozen=True)
class Setting:
    """One setting, who decides it, and what the other side can do about it."""

    setting: str
    decided_by: str
    rule: str


RELEASES: tuple[Release, ...] = (
    Release(
        "masked update vector",
        "each train round, secure aggregation on",
        "DP (site ε) + secure sum over at least max(t, `federation.min_sites`) connected sites",
    ),
    Release(
        "plain update delta, example count N",
        "each train round, secure aggregation off",
        "DP (site ε); N public (weighting)",
    ),
    Release(
        "ε spent, ε ceiling, δ, σ, q, steps, clip norm",
        "with each update",
        "public parameters; with the coordinator's `privacy.sample_rate` and `privacy.delta` "
        "they do not depend on N",
    ),
    Release(
        "evaluation accuracy and loss",
        "at most once per round the site trained, for one adapter and one set of settings "
        "(its ledger records the evaluation's binding)",
        "secure aggregation on: only inside a secure sum of the evaluating sites; off: per "
        "site, with the held-out count. Not DP",
    ),
    Release(
        "generated answers to the prompts the site publishes (node config `eval-prompts`; "
        "causal LM)",
        "with a plain evaluation (bound like the figures: once per round the site trained, one "
        "adapter; the prompts enter the binding), only when the node config names prompts; "
        "prompts in the coordinator's instruction are never read",
        "none for the prompts: the site publishes them; the answers are greedy (at most "
        "`train.eval_max_new_tokens` tokens) from the global adapter. Secure aggregation on: "
        "never sent (a text cannot be summed)",
    ),
    Release(
        "train loss",
        "only with DP off and secure aggregation off",
        "none",
    ),
    Release(
        "LoRA rank (node config `lora-rank` below `lora.r`)",
        "each train round",
        "plain aggregation: in the clear; secure: per-slot counts inside the secure sum",
    ),
    Release(
        "the site's declaration (node config `site-description`, `site-license`, `site-rows`)",
        "with each update, only the keys the site's node config sets",
        "none: the site publishes it (in the clear, also under secure aggregation); the model "
        "card shows it, and no row count the site did not set",
    ),
    Release(
        "SecAgg+ public keys, encrypted shares, unmask shares",
        "each secure round",
        "the protocol (semi-honest server): shares of one site's two secrets are never both "
        "released",
    ),
    Release(
        "error code",
        "on a refusal or failure",
        "fixed codes and messages; the detail stays in the site's log",
    ),
    Release(
        "participation, timing, refusals",
        "every message",
        "none (not promised)",
    ),
)

SETTINGS: tuple[Setting, ...] = (
    Setting(
        "`privacy-epsilon-max`",
        "site (node config)",
        "required on a deployed site; the ceiling is the lower of it and `privacy.epsilon`",
    ),
    Setting(
        "`ledger-path`",
        "site",
        "required on a deployed site; the run's `privacy.ledger_dir` is ignored there",
    ),
    Setting(
        "`privacy-required`",
        "site",
        "default true: a run with `privacy.enabled=false` is refused",
    ),
    Setting(
        "`privacy-delta`",
        "site",
        "required on a deployed site, which accounts at it (the run's `privacy.delta` applies "
        "to simulations only); a ledger keeps its δ for life; δ above 1/N is refused",
    ),
    Setting(
        "`eval-fraction`, `eval-max-examples`",
        "site",
        "a deployed site's held-out split (default 0.2, 200), the same in every run; the run's "
        "`data.test_fraction` / `data.max_eval_examples` apply to simulations only",
    ),
    Setting(
        "`eval-prompts`",
        "site",
        f"optional: a .txt / .jsonl file of at most {K.EVAL_PROMPTS_MAX} prompts (each at most "
        f"{K.EVAL_PROMPT_CHARS_MAX} characters) the site answers in the clear; unset: no text. "
        "The run's `data.eval_prompts` (the first K held-out prompts) applies to simulations "
        "only",
    ),
    Setting(
        "`coordinator-public-key`",
        "site",
        "train and evaluate only for instructions this coordinator signed",
    ),
    Setting(
        "`secagg-required`, `secagg-min-sites`",
        "site",
        "refuse runs without secure aggregation, and secure rounds whose threshold is below "
        "the minimum (default: any)",
    ),
    Setting(
        "`site-description`, `site-license`, `site-rows`",
        "site",
        "optional; published with each update for the model card, as the table above says",
    ),
    Setting(
        "`data-path`, `device`, `lora-rank`",
        "site",
        "never sent; the rank only as the table above says",
    ),
    Setting(
        "`privacy.epsilon`, `privacy.delta`, `privacy.sample_rate`, `privacy.max_grad_norm`",
        "coordinator (run config)",
        "cannot loosen the site's rules; any change of these or of `train.*`, `lora.*`, "
        "`model.*`, `data.*`, `secagg.*` makes another release: fresh noise and a fresh charge",
    ),
    Setting(
        "`coordinator-key`",
        "coordinator (ServerApp run config)",
        "the Ed25519 key that signs every train and evaluate instruction",
    ),
)


def markdown_table(rows: tuple[Release, ...] | tuple[Setting, ...]) -> str:
    """A Markdown table of ``rows`` (their fields, in order, as columns)."""
    if not rows:
        raise ValueError("no rows")
    fields = list(rows[0].__dataclass_fields__)
    header = "| " + " | ".join(f.replace("_", " ") for f in fields) + " |"
    rule = "|" + "|".join("---" for _ in fields) + "|"
    lines = [header, rule]
    for row in rows:
        lines.append("| " + " | ".join(str(getattr(row, f)) for f in fields) + " |")
    return "\n".join(lines)
