"""What ``fedpeft simulate`` shows while a federation runs: fedpeft's own lines, live.

The ServerApp runs in Flower's ``flwr-simulation`` process and records its progress in
``RUN_DIR/events.jsonl`` (:class:`fedpeft.server.progress.Progress`); everything the run's
processes print goes to ``RUN_DIR/log.txt`` (:class:`fedpeft.simulation.RunLog`).
:class:`Console` follows the events file and shows a header, a live status during each round
(round, phase — training, the secure-aggregation stage, evaluation —, sites answered of
asked, elapsed, an estimate of what is left), one line per finished round and fedpeft's
messages.

On a terminal the status is one line redrawn in place (``rich.live``); when the stream is not
a terminal (a CI log, a pipe) it degrades to plain lines: one when an exchange with the sites
completes, and one every :data:`PLAIN_EVERY_S` seconds while a long one is still open.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from fedpeft.config import FedPeftConfig
from fedpeft.server.progress import round_line, start_line
from fedpeft.server.rounds import RoundRecord
from fedpeft.server.rundir import LOG_FILE

#: Seconds between two plain progress lines of one open exchange (non-terminal output).
PLAIN_EVERY_S = 30.0
#: Seconds between looks at the events file.
FOLLOW_INTERVAL_S = 0.2

STAGES = {
    "secagg_setup": "secure aggregation: keys",
    "secagg_share_keys": "secure aggregation: shares",
    "secagg_masked": "secure aggregation: masked update",
    "secagg_unmask": "secure aggregation: unmask",
}


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes} min {rest:02d} s"


def shown_path(path: Path) -> str:
    """``path`` as a reader would type it here: relative to the working folder when inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


class Console:
    """Renders a run's ``events.jsonl`` on ``stream`` (stderr by default).

    Parameters
    ----------
    stream : text stream, optional
        Where to write (default ``sys.stderr``).
    live : bool, optional
        Redraw a status line in place; default: whether ``stream`` is a terminal.
    """

    def __init__(self, stream: TextIO | None = None, *, live: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.rounds = 0
        self.round = 0
        self.phase = ""
        self.stage = ""
        self.replied = self.asked = 0
        self.round_began = self.exchange_began = self.last_plain = 0.0
        self.durations: list[float] = []
        self._live: Any = None  # rich.live.Live while a round runs on a terminal

    # --- output ---------------------------------------------------------------------------
    def line(self, text: str) -> None:
        """A permanent line (above the live status on a terminal)."""
        if self._live is not None:
            self._live.console.print(text, markup=False, highlight=False, soft_wrap=True)
        else:
            print(text, file=self.stream, flush=True)

    def notices(self, config: FedPeftConfig, *, log_dir: Path | None = None) -> None:
        """What fedpeft says once, in its own words, before the run starts."""
        where = shown_path(log_dir / LOG_FILE) if log_dir is not None else f"RUN_DIR/{LOG_FILE}"
        self.line(f"fedpeft: Flower, Ray and library output goes to {where} (-v shows it here too)")
        if config.privacy.enabled:
            self.line(
                "fedpeft: DP-SGD noise and Poisson sampling are drawn from ChaCha20 streams "
                "keyed per site (fedpeft.privacy.randomness); Opacus's 'Secure RNG turned "
                "off' warning in the log is about its torch generators, which are not used"
            )

    def status(self, now: float | None = None) -> str:
        """The live status of the running round."""
        now = time.time() if now is None else now
        elapsed = now - self.round_began
        what = self.phase or "starting"
        if self.stage:
            what += f" · {STAGES.get(self.stage, self.stage)}"
        text = f"round {self.round}/{self.rounds} · {what} · sites {self.replied}/{self.asked}"
        text += f" · {_duration(elapsed)}"
        return text + f" · {self.estimate(elapsed)}"

    def estimate(self, elapsed: float) -> str:
        """Time left in the run, from the rounds finished so far."""
        if not self.durations:
            return "estimate after round 1"
        later = self.durations[1:] or self.durations  # round 1 includes starting Ray
        per_round = statistics.fmean(later)
        left = max(per_round - elapsed, 0.0) + per_round * (self.rounds - self.round)
        return f"about {_duration(left)} left"

    def _show_status(self, now: float) -> None:
        if self.live:
            if self._live is None:
                from rich.console import Console as RichConsole
                from rich.live import Live
                from rich.text import Text

                self._text = Text
                self._live = Live(
                    console=RichConsole(file=self.stream, force_terminal=True, highlight=False),
                    transient=True,
                    auto_refresh=False,
                )
                self._live.start()
            self._live.update(self._text(self.status(now)), refresh=True)
        elif self.replied == self.asked or now - self.last_plain >= PLAIN_EVERY_S:
            self.last_plain = now
            print(self.status(now), file=self.stream, flush=True)

    def _end_status(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    # --- events ---------------------------------------------------------------------------
    def handle(self, event: dict[str, Any]) -> None:
        kind, now = event.get("event"), float(event.get("time", time.time()))
        if kind == "start":
            self.rounds = int(event["rounds"])
            self.line(
                start_line(
                    rounds=self.rounds,
                    sites=int(event["sites"]),
                    run_dir=shown_path(Path(str(event["run_dir"]))),
                    adapter_floats=int(event["adapter_floats"]),
                )
            )
        elif kind == "round_start":
            self.round, self.round_began = int(event["round"]), now
            self.phase, self.stage, self.replied = "", "", 0
            self.asked = int(event["sampled"])
        elif kind == "phase":
            self.phase, self.stage = str(event["phase"]), ""
        elif kind == "exchange":
            self.stage = str(event.get("stage", ""))
            self.replied, self.asked = int(event["replied"]), int(event["asked"])
            if self.replied == 0:
                self.exchange_began = self.last_plain = now
            self._show_status(now)
        elif kind == "round":
            self._end_status()
            record = RoundRecord.from_json(event["row"])
            self.durations.append(record.seconds)
            self.line(round_line(record))
        elif kind == "message":
            self._end_status()
            self.line(f"fedpeft: {event['text']}")

    def follow(self, path: Path, offset: int, *, running: Callable[[], bool]) -> int:
        """Render the events appended to ``path`` after ``offset`` while ``running()``.

        Returns the offset after the last complete line rendered (pass it to the next call).
        """
        while True:
            still = running()  # asked first: a last look after the end reads everything
            if path.exists():
                with path.open("rb") as handle:
                    handle.seek(offset)
                    chunk = handle.read()
                end = chunk.rfind(b"\n") + 1  # only whole lines; the rest is being written
                for raw in chunk[:end].splitlines():
                    try:
                        self.handle(json.loads(raw))
                    except (ValueError, KeyError, TypeError):
                        continue  # not an event this version knows: the log has everything
                offset += end
            if not still:
                return offset
            if self._live is not None:
                self._show_status(time.time())  # the clock moves between events
            time.sleep(FOLLOW_INTERVAL_S)

    def close(self) -> None:
        self._end_status()
