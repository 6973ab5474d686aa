"""What a person watching a federation sees: one line per round and a closing table.

:class:`Progress` is the ServerApp's side. It prints the round lines to its stream (a
coordinator's console; in a simulation the run's ``log.txt``) and appends every event to
``RUN_DIR/events.jsonl`` (:data:`~fedpeft.server.rundir.EVENTS_FILE`): the start, each
exchange with the sites as replies arrive (phase, stage, replied / asked), each finished
round and each message. :class:`fedpeft.console.Console` renders that file live in
``fedpeft simulate``; the text of a round line is :func:`round_line` on both sides.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from fedpeft.server.rounds import RoundRecord
from fedpeft.server.rundir import EVENTS_FILE


def format_bytes(n: float) -> str:
    """``n`` bytes in decimal units: ``792 B``, ``25.4 kB``, ``1.2 MB``."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _fmt(value: Any, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def start_line(*, rounds: int, sites: int, run_dir: str, adapter_floats: int) -> str:
    return (
        f"fedpeft: {rounds} round(s) over {sites} site(s); adapter {adapter_floats:,} floats; "
        f"run directory {run_dir}"
    )


def round_line(record: RoundRecord) -> str:
    """The one line a finished round prints."""
    eps = record.epsilon_max
    privacy = f" | ε≤{eps:.2f}" if eps is not None else ""
    ppl = record.eval_perplexity  # causal LM: perplexity beside token accuracy
    perplexity = f" ppl {ppl:.2f}" if ppl is not None else ""
    return (
        f"round {record.round}/{record.rounds} | sites {record.sites_replied}/"
        f"{record.sites_sampled} (failed {record.sites_failed}) | train loss "
        f"{_fmt(record.train_loss)} | eval loss {_fmt(record.eval_loss)}{perplexity} acc "
        f"{_fmt(record.eval_accuracy)} | up {format_bytes(record.bytes_up)} down "
        f"{format_bytes(record.bytes_down)} | {record.seconds:.1f} s{privacy}"
    )


class Progress:
    """Prints round lines to ``stream`` (stderr by default) and records every event.

    Events go to ``RUN_DIR/events.jsonl`` from :meth:`start` on (appended: a resumed run
    continues the file). :meth:`exchange` is called by
    :class:`~fedpeft.server.exchange.PollingGrid` from the round loop's thread.
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.events: Path | None = None
        self.round = 0
        self.phase = ""
        self._lock = threading.Lock()
        self._last: tuple[Any, ...] | None = None

    def _record(self, event: str, **fields: Any) -> None:
        if self.events is None:
            return
        line = json.dumps({"event": event, "time": time.time(), **fields}, default=str)
        with self._lock, self.events.open("a", encoding="utf-8") as handle:
            handle.write(line + "\n")

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def start(self, *, rounds: int, sites: int, run_dir: str, adapter_floats: int) -> None:
        self.events = Path(run_dir) / EVENTS_FILE
        self._record(
            "start", rounds=rounds, sites=sites, run_dir=run_dir, adapter_floats=adapter_floats
        )
        self._print(
            start_line(rounds=rounds, sites=sites, run_dir=run_dir, adapter_floats=adapter_floats)
        )

    def round_started(self, round_number: int, *, sampled: int) -> None:
        self.round = round_number
        self._record("round_start", round=round_number, sampled=sampled)

    def phase_started(self, phase: str) -> None:
        """``training`` or ``evaluation`` of the current round."""
        self.phase = phase
        self._record("phase", round=self.round, phase=phase)

    def exchange(self, message_type: str, *, replied: int, asked: int) -> None:
        """An exchange with the sites: ``replied`` of ``asked`` answers are in."""
        key = (self.round, self.phase, message_type, replied, asked)
        if key == self._last:
            return
        self._last = key
        stage = message_type.split(".", 1)[1] if "." in message_type else ""
        self._record(
            "exchange",
            round=self.round,
            phase=self.phase,
            stage=stage,
            replied=replied,
            asked=asked,
        )

    def round_done(self, record: RoundRecord) -> None:
        self._record("round", row=record.as_json())
        self._print(round_line(record))

    def message(self, text: str) -> None:
        self._record("message", text=text)
        self._print(f"fedpeft: {text}")


def summary_table(records: Sequence[RoundRecord]) -> str:
    """A fixed-width table of the rounds, for the end of a run."""
    header = (
        f"{'round':>5} {'sites':>7} {'train loss':>10} {'eval loss':>9} {'accuracy':>8} "
        f"{'up':>9} {'down':>9} {'s':>6}"
    )
    lines = [header, "-" * len(header)]
    for r in records:
        lines.append(
            f"{r.round:>5} {f'{r.sites_replied}/{r.sites_sampled}':>7} "
            f"{_fmt(r.train_loss):>10} {_fmt(r.eval_loss):>9} {_fmt(r.eval_accuracy):>8} "
            f"{format_bytes(r.bytes_up):>9} {format_bytes(r.bytes_down):>9} "
            f"{r.seconds:>6.1f}"
        )
    return "\n".join(lines)
