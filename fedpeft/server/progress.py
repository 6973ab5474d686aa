"""What a person watching a federation sees: one line per round and a closing table."""

from __future__ import annotations

import sys
from typing import Any, TextIO


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _fmt(value: Any, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


class Progress:
    """Prints round lines to ``stream`` (stderr by default) as rounds finish."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr

    def start(self, *, rounds: int, sites: int, run_dir: str, adapter_floats: int) -> None:
        print(
            f"fedpeft: {rounds} round(s) over {sites} site(s); adapter {adapter_floats:,} floats; "
            f"run directory {run_dir}",
            file=self.stream,
            flush=True,
        )

    def round_done(self, row: dict[str, Any]) -> None:
        eps = row.get("epsilon_max")
        privacy = f" | ε≤{eps:.2f}" if eps is not None else ""
        ppl = row.get("eval_perplexity")  # causal LM: perplexity beside token accuracy
        perplexity = f" ppl {ppl:.2f}" if ppl is not None else ""
        print(
            f"round {row['round']}/{row['rounds']} | sites {row['sites_replied']}/"
            f"{row['sites_sampled']} (failed {row['sites_failed']}) | train loss "
            f"{_fmt(row['train_loss'])} | eval loss {_fmt(row['eval_loss'])}{perplexity} acc "
            f"{_fmt(row['eval_accuracy'])} | up {_fmt_bytes(row['bytes_up'])} down "
            f"{_fmt_bytes(row['bytes_down'])} | {row['seconds']:.1f} s{privacy}",
            file=self.stream,
            flush=True,
        )

    def message(self, text: str) -> None:
        print(f"fedpeft: {text}", file=self.stream, flush=True)


def summary_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width table of the rounds, for the end of a run."""
    header = (
        f"{'round':>5} {'sites':>7} {'train loss':>10} {'eval loss':>9} {'accuracy':>8} "
        f"{'up':>9} {'down':>9} {'s':>6}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['round']:>5} {str(r['sites_replied']) + '/' + str(r['sites_sampled']):>7} "
            f"{_fmt(r['train_loss']):>10} {_fmt(r['eval_loss']):>9} {_fmt(r['eval_accuracy']):>8} "
            f"{_fmt_bytes(r['bytes_up']):>9} {_fmt_bytes(r['bytes_down']):>9} {r['seconds']:>6.1f}"
        )
    return "\n".join(lines)
