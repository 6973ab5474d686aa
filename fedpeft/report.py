"""``RUN_DIR/report.html``: one page a privacy officer can read and hand to an auditor.

Written after every round by the ServerApp and on demand by ``fedpeft report RUN_DIR``, from
the run directory's own files only (``config.yaml``, ``metrics.jsonl``, ``privacy.json``,
``federation.json``, optionally ``reference.json`` and ``generations.jsonl``), so the page shows
what the machine files say and nothing else. It holds:

- quality per round (accuracy and loss, or perplexity), beside a non-private reference run
  when ``reference.json`` exists (``fedpeft report RUN_DIR --reference OTHER_RUN`` writes it);
- the latest round's generated answers per publishing site, when the run has any;
- ε spent per site per round against each site's ceiling;
- bytes up and down, and sites sampled / replied / dropped / refused / failed per round;
- the settings that make the guarantee (accountant, δ, C, σ, q, steps, SecAgg+ k / t, transport);
- the "what leaves a site" tables, rendered from :mod:`fedpeft.disclosure` (the README's source);
- the model's lineage: base model (:func:`fedpeft.lineage.base_identity`) and adapter hash per
  round.

The plots are plain SVG written here rather than matplotlib: a line chart of a few series is
a hundred lines, the page stays one small self-contained text file (no script, font or image
from anywhere; it opens from disk with no connection), its content is deterministic and
testable by reading the DOM, and the ServerApp gains no plotting dependency.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedpeft import constants as K
from fedpeft.config import ConfigError, FedPeftConfig, from_yaml
from fedpeft.disclosure import RELEASES, SETTINGS, Release, Setting
from fedpeft.lineage import ADAPTER_WEIGHTS, adapter_sha256, base_identity
from fedpeft.server.rounds import RoundRecord
from fedpeft.server.rundir import RunDir
from fedpeft.server.trail import REFUSAL_CODES, reason_code

__all__ = [
    "REFERENCE_FILE",
    "REPORT_FILE",
    "Series",
    "line_chart",
    "render_report",
    "write_reference",
    "write_report",
]

REPORT_FILE = "report.html"
REFERENCE_FILE = "reference.json"  # a non-private run's rounds, for comparison

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")


# --- SVG line charts --------------------------------------------------------------------
@dataclass(frozen=True)
class Series:
    """One line of a chart: ``(x, y)`` points, y None where the round has no value."""

    label: str
    points: tuple[tuple[float, float | None], ...]
    dashed: bool = False


@dataclass(frozen=True)
class _Axis:
    low: float
    high: float
    ticks: tuple[float, ...] = field(default=())


def _nice_axis(values: Sequence[float], *, count: int = 5) -> _Axis:
    """Round bounds and about ``count`` ticks spanning ``values``."""
    low, high = min(values), max(values)
    if high - low < 1e-12:
        pad = abs(high) * 0.1 or 1.0
        low, high = low - pad, high + pad
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    start = math.floor(low / step) * step
    stop = math.ceil(high / step) * step
    ticks = tuple(start + i * step for i in range(round((stop - start) / step) + 1))
    return _Axis(start, stop, ticks)


def _tick(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 10_000:
        return f"{value:.3g}"
    return f"{value:.4g}"


def line_chart(
    series: Sequence[Series],
    *,
    title: str,
    x_label: str,
    y_label: str,
    width: int = 640,
    height: int = 260,
) -> str:
    """An inline ``<svg>`` line chart of ``series`` (with a legend), or a note if all are empty."""
    points = [(x, y) for s in series for x, y in s.points if y is not None and math.isfinite(y)]
    if not points:
        return f'<p class="empty">{html.escape(title)}: no values yet.</p>'
    left, right, top, bottom = 64, 16, 28, 44
    legend_rows = math.ceil(len(series) / 3)
    height += 18 * legend_rows
    plot_w, plot_h = width - left - right, height - top - bottom - 18 * legend_rows
    xs = _nice_axis([x for x, _ in points] + [min(x for x, _ in points) + 1])
    ys = _nice_axis([y for _, y in points])

    def px(x: float) -> float:
        return left + (x - xs.low) / (xs.high - xs.low) * plot_w

    def py(y: float) -> float:
        return top + plot_h - (y - ys.low) / (ys.high - ys.low) * plot_h

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{html.escape(title)}">',
        f'<text x="{left}" y="16" class="title">{html.escape(title)}</text>',
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" class="frame"/>',
    ]
    for y in ys.ticks:
        out.append(
            f'<line x1="{left}" x2="{left + plot_w}" y1="{py(y):.1f}" y2="{py(y):.1f}" '
            f'class="grid"/><text x="{left - 6}" y="{py(y) + 4:.1f}" class="tick" '
            f'text-anchor="end">{_tick(y)}</text>'
        )
    for x in xs.ticks:
        if float(x).is_integer():
            out.append(
                f'<text x="{px(x):.1f}" y="{top + plot_h + 16}" class="tick" '
                f'text-anchor="middle">{_tick(x)}</text>'
            )
    out.append(
        f'<text x="{left + plot_w / 2:.1f}" y="{top + plot_h + 34}" class="label" '
        f'text-anchor="middle">{html.escape(x_label)}</text>'
        f'<text x="14" y="{top + plot_h / 2:.1f}" class="label" text-anchor="middle" '
        f'transform="rotate(-90 14 {top + plot_h / 2:.1f})">{html.escape(y_label)}</text>'
    )
    for i, line in enumerate(series):
        colour = PALETTE[i % len(PALETTE)]
        dash = ' stroke-dasharray="6 4"' if line.dashed else ""
        run: list[str] = []
        segments: list[list[str]] = [run]
        for x, value in line.points:
            if value is None or not math.isfinite(value):
                run = []
                segments.append(run)
                continue
            run.append(f"{px(x):.1f},{py(value):.1f}")
        for segment in segments:
            if len(segment) > 1:
                out.append(
                    f'<polyline points="{" ".join(segment)}" fill="none" stroke="{colour}" '
                    f'stroke-width="2"{dash}/>'
                )
            for point in [] if line.dashed else segment:  # markers on measured lines only
                cx, cy = point.split(",")
                out.append(f'<circle cx="{cx}" cy="{cy}" r="3" fill="{colour}"/>')
        lx = left + (i % 3) * (plot_w / 3)
        ly = top + plot_h + 52 + 18 * (i // 3)
        out.append(
            f'<line x1="{lx:.1f}" x2="{lx + 22:.1f}" y1="{ly - 4}" y2="{ly - 4}" '
            f'stroke="{colour}" stroke-width="2"{dash}/><text x="{lx + 28:.1f}" y="{ly}" '
            f'class="legend">{html.escape(line.label)}</text>'
        )
    out.append("</svg>")
    return "".join(out)


# --- the run directory's contents -------------------------------------------------------
@dataclass(frozen=True)
class RunFiles:
    """What the report reads from a run directory."""

    path: Path
    config: FedPeftConfig
    rounds: list[RoundRecord]  # metrics.jsonl
    privacy: dict[str, Any]
    federation: dict[str, Any]
    reference: dict[str, Any] | None


def _json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    payload = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(payload, dict):
        raise ConfigError(f"{path} holds {type(payload).__name__}, not a JSON object")
    return payload


def read_run(run_dir: Path) -> RunFiles:
    """The files of ``run_dir``.

    Raises
    ------
    ConfigError
        If ``run_dir`` holds no ``config.yaml`` (it is not a fedpeft run directory).
    """
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise ConfigError(
            f"{run_dir} is not a fedpeft run directory (no config.yaml); give the folder that "
            "'fedpeft simulate' printed or the ServerApp's run directory"
        )
    return RunFiles(
        path=run_dir,
        config=from_yaml(config_file.read_text(encoding="utf-8")),
        rounds=RunDir(run_dir).read_rounds(),
        privacy=_json(run_dir / "privacy.json") or {},
        federation=_json(run_dir / "federation.json") or {},
        reference=_json(run_dir / REFERENCE_FILE),
    )


# --- sections ---------------------------------------------------------------------------
def _esc(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return html.escape(f"{value:.6g}")
    return html.escape(str(value))


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], *, cls: str = "") -> str:
    attr = f' class="{cls}"' if cls else ""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table{attr}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _metric(row: RoundRecord | Mapping[str, Any], key: str) -> float | None:
    """A round's figure ``key``: of a record, or of a reference row (reference.json)."""
    value = row.get(key) if isinstance(row, Mapping) else getattr(row, key)
    return float(value) if isinstance(value, int | float) else None


def _quality(run: RunFiles) -> str:
    causal = run.config.model.task == "causal_lm"
    metric, name = ("eval_perplexity", "perplexity") if causal else ("eval_accuracy", "accuracy")
    ref_rows = (run.reference or {}).get("rows", [])
    ref_label = str((run.reference or {}).get("label", "non-private reference"))

    def series(key: str, label: str) -> list[Series]:
        found = [Series(label, tuple((r.round, _metric(r, key)) for r in run.rounds))]
        if ref_rows:
            points = tuple((r["round"], _metric(r, key)) for r in ref_rows)
            found.append(Series(ref_label, points, dashed=True))
        return found

    this = "this run (DP)" if run.config.privacy.enabled else "this run (no DP)"
    charts = [
        line_chart(series(metric, this), title=f"Held-out {name}", x_label="round", y_label=name),
        line_chart(
            series("eval_loss", this), title="Held-out loss", x_label="round", y_label="loss"
        ),
    ]
    note = (
        f"<p>Dashed: {html.escape(ref_label)} ({html.escape(str(run.reference.get('run', '')))})."
        "</p>"
        if run.reference
        else "<p>No non-private reference in this run directory (<code>fedpeft report RUN_DIR "
        "--reference OTHER_RUN</code> adds one).</p>"
    )
    where = (
        "inside a secure sum over the evaluating sites (the coordinator sees only the mean)"
        if run.config.secagg.enabled
        else "per site, in the clear"
    )
    return (
        '<section id="quality"><h2>Model quality per round</h2>'
        f"<p>Each site evaluates on its own held-out split; the figures reach the coordinator "
        f"{where}.</p>{''.join(charts)}{note}</section>"
    )


def _privacy(run: RunFiles) -> str:
    p = run.config.privacy
    if not p.enabled:
        return (
            '<section id="privacy"><h2>Privacy budget per site</h2><p class="warn">'
            "Differential privacy is <b>off</b> in this run: no ε bounds what the released "
            "updates say about a training example.</p></section>"
        )
    sites = sorted({node for r in run.rounds for node in r.epsilon})
    names = {node: f"site {i + 1}" for i, node in enumerate(sites)}
    series = [
        Series(
            f"{names[node]} ({node[:8]}…)",
            tuple((r.round, r.epsilon.get(node)) for r in run.rounds),
        )
        for node in sites
    ]
    ceilings = sorted(
        {
            float(f[K.MET_EPSILON_CEILING])
            for r in run.rounds
            for f in r.site_metrics.values()
            if K.MET_EPSILON_CEILING in f
        }
    )
    rounds = [r.round for r in run.rounds] or [1]
    span = (min(rounds), max(rounds))
    series += [
        Series(f"ceiling ε = {c:g}", tuple((x, c) for x in span), dashed=True) for c in ceilings
    ]
    chart = line_chart(
        series, title="ε spent per site (whole ledger)", x_label="round", y_label="ε"
    )
    same: dict[tuple[Any, ...], list[str]] = {}
    for line, node in zip(series, sites, strict=False):
        same.setdefault(line.points, []).append(names[node])
    overlaps = [" = ".join(group) for group in same.values() if len(group) > 1]
    if overlaps:
        chart += (
            f"<p>Lines on top of each other (the same ε each round): {'; '.join(overlaps)}.</p>"
        )

    rows = []
    for node, f in sorted((run.privacy.get("sites") or {}).items()):
        within = (
            f.get("epsilon") is not None
            and f.get("epsilon_ceiling") is not None
            and (float(f["epsilon"]) <= float(f["epsilon_ceiling"]))
        )
        rows.append(
            [
                names.get(node, node[:8]),
                node,
                f.get("epsilon"),
                f.get("epsilon_ceiling"),
                "yes" if within else "NO",
                f.get("delta"),
                f.get("accountant"),
                f.get("noise_multiplier"),
                f.get("sampling_rate"),
                f.get("steps"),
                f.get("clip_norm"),
                f.get("last_round"),
            ]
        )
    table = _table(
        [
            "site",
            "node id",
            "ε",
            "ceiling",
            "within",
            "δ",
            "accountant",
            "σ",
            "q",
            "steps",
            "C",
            "last round",
        ],
        rows,
        cls="sites",
    )
    return (
        '<section id="privacy"><h2>Privacy budget per site</h2>'
        "<p>Each site computes its ε with Opacus's accountant from its own ledger (every run it "
        "took part in) and refuses a round that would pass its ceiling; the coordinator only "
        f"reports the figures. Unit: one training example at one site.</p>{chart}{table}"
        "</section>"
    )


def _participation(row: RoundRecord) -> tuple[int, int, list[str], list[str]]:
    failures = {str(k): str(v) for k, v in row.failures.items()}
    refused = sorted(
        f"{reason_code(v)}" for v in failures.values() if reason_code(v) in REFUSAL_CODES
    )
    failed = sorted(
        reason_code(v) for v in failures.values() if reason_code(v) not in REFUSAL_CODES
    )
    return row.sites_sampled, row.sites_replied, refused, failed


def _kilo(value: float | None) -> float | None:
    return None if value is None else value / 1000


def _traffic(run: RunFiles) -> str:
    chart = line_chart(
        [
            Series(
                "up (sites → coordinator)",
                tuple((r.round, _kilo(r.bytes_up)) for r in run.rounds),
            ),
            Series(
                "down (coordinator → sites)",
                tuple((r.round, _kilo(r.bytes_down)) for r in run.rounds),
            ),
        ],
        title="Traffic per round (training exchange, all sites)",
        x_label="round",
        y_label="kB",
    )
    rows = []
    for r in run.rounds:
        sampled, replied, refused, failed = _participation(r)
        rows.append(
            [
                r.round,
                sampled,
                replied,
                r.sites_dropped,
                len(refused),
                len(failed),
                ", ".join(refused + failed) or "–",
                r.eval_sites,
                r.bytes_up,
                r.bytes_down,
            ]
        )
    table = _table(
        [
            "round",
            "sampled",
            "replied",
            "dropped",
            "refused",
            "failed",
            "codes",
            "evaluated",
            "bytes up",
            "bytes down",
        ],
        rows,
        cls="rounds",
    )
    return (
        '<section id="traffic"><h2>Sites and traffic per round</h2>'
        "<p>Refused: the site's own rules said no (budget, δ, signature, secure aggregation "
        "required); failed: an error or an update the coordinator rejected; dropped: no "
        f"answer. Codes are the fixed codes of the sites' error replies.</p>{chart}{table}"
        "</section>"
    )


def _guarantee(run: RunFiles) -> str:
    c, p, s = run.config, run.config.privacy, run.config.secagg
    sites = run.privacy.get("sites") or {}
    sigmas = sorted({f.get("noise_multiplier") for f in sites.values()} - {None})
    rates = sorted({f.get("sampling_rate") for f in sites.values()} - {None})
    steps = sorted({f.get("steps") for f in sites.values()} - {None})
    params = [r.secagg_params for r in run.rounds if r.secagg_params]
    ks = sorted({int(x["num_neighbours"]) for x in params})
    ts = sorted({int(x["threshold"]) for x in params})
    transport = run.federation.get("transport") or {}

    def listed(values: Sequence[Any], unset: str) -> str:
        return ", ".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in values) or unset

    rows: list[list[Any]] = [
        ["differential privacy", "on (DP-SGD, Opacus)" if p.enabled else "OFF"],
        ["accountant", p.accountant],
        ["δ (target; a deployed site accounts at its own node privacy-delta)", p.delta],
        ["ε target (each site's ceiling is the lower of it and its node ceiling)", p.epsilon],
        ["clip norm C", p.max_grad_norm],
        [
            "clipping",
            p.clipping
            if p.automatic_clipping is None
            else f"{p.clipping}; automatic: each gradient scaled by C/(‖g‖+γ), "
            f"γ = {p.automatic_clipping:g} (Bu et al. 2022), sensitivity still C",
        ],
        ["noise multiplier σ (as reported by sites)", listed(sigmas, "not reported yet")],
        ["sampling rate q (as reported)", listed(rates, "not reported yet")],
        ["noisy steps per ledger (as reported)", listed(steps, "not reported yet")],
        ["local steps per round", c.train.local_steps],
        ["secure aggregation", "on (SecAgg+)" if s.enabled else "OFF: updates in the clear"],
        [
            "SecAgg+ neighbours k (per round, resolved)",
            listed(ks, "–" if not s.enabled else "not run yet"),
        ],
        [
            "SecAgg+ threshold t (per round, resolved)",
            listed(ts, "–" if not s.enabled else "not run yet"),
        ],
        ["smallest sum the server may unmask", c.federation.min_sites if s.enabled else "–"],
        ["instructions signed by the coordinator", "yes" if transport.get("signed") else "no"],
        ["transport: TLS", transport.get("tls", "not recorded")],
        ["transport: SuperNode authentication", transport.get("node_auth", "not recorded")],
    ]
    return (
        '<section id="guarantee"><h2>Settings that make the guarantee</h2>'
        f"{_table(['setting', 'value'], rows, cls='settings')}</section>"
    )


def _generations(run: RunFiles) -> str:
    """The latest round's (prompt, answer) per publishing site; empty without any."""
    from fedpeft.server.rundir import read_generations

    rows = read_generations(run.path)
    if not rows:
        return ""
    latest = max(int(r["round"]) for r in rows)
    shown = [[r["site"], r["prompt"], r["answer"]] for r in rows if r["round"] == latest]
    tokens = run.config.train.eval_max_new_tokens
    return (
        '<section id="generations"><h2>Generated answers</h2>'
        f"<p>Greedy answers (at most {tokens} tokens) of the global adapter after round "
        f"{latest}, generated at each site on the prompts it chose to publish (node config "
        "<code>eval-prompts</code>); a site that published none sent no text, and none is sent "
        "under secure aggregation. Every round's are in <code>generations.jsonl</code>.</p>"
        f"{_table(['site', 'prompt', 'answer'], shown, cls='generations')}</section>"
    )


def _disclosure() -> str:
    def rows(items: Sequence[Release] | Sequence[Setting]) -> list[list[str]]:
        return [[getattr(r, f) for f in r.__dataclass_fields__] for r in items]

    def header(items: Sequence[Release] | Sequence[Setting]) -> list[str]:
        return [f.replace("_", " ") for f in items[0].__dataclass_fields__]

    return (
        '<section id="disclosure"><h2>What leaves each site</h2>'
        "<p>From <code>fedpeft/disclosure.py</code>, the same source as the README's table.</p>"
        f"{_table(header(RELEASES), rows(RELEASES), cls='releases')}"
        "<h3>Who decides which setting</h3>"
        f"{_table(header(SETTINGS), rows(SETTINGS), cls='decides')}</section>"
    )


def _lineage(run: RunFiles) -> str:
    base = base_identity(run.config.model)
    weights = "; ".join(f"{n}: {h}" for n, h in base.weights_sha256.items()) or "no file"
    base_rows = [
        ["name", base.name],
        ["loader", base.loader],
        ["source", base.source],
        ["weights SHA-256", weights],
        ["model settings SHA-256", base.settings_sha256],
    ]
    on_disk = run.path / "adapter"
    current = adapter_sha256(on_disk) if (on_disk / ADAPTER_WEIGHTS).is_file() else None
    rounds = [[r.round, r.adapter_sha256 or "not recorded"] for r in run.rounds]
    return (
        '<section id="lineage"><h2>Model lineage</h2>'
        f"{_table(['base model', ''], base_rows, cls='base')}"
        f"<p>Adapter on disk (<code>adapter/{ADAPTER_WEIGHTS}</code>) SHA-256: "
        f"<code>{_esc(current)}</code></p>"
        f"{_table(['round', 'adapter SHA-256 after the round'], rounds, cls='adapters')}"
        "</section>"
    )


STYLE = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2em auto;max-width:60em;
color:#222;padding:0 1em}
h1{font-size:1.5em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.8em 0;font-size:.9em}
td,th{border:1px solid #ccc;padding:.25em .5em;text-align:left;vertical-align:top}
th{background:#f3f3f3}code{font-size:.9em;word-break:break-all}
.warn{color:#a00;font-weight:bold}svg{display:block;margin:.8em 0}
svg .title{font-size:13px;font-weight:bold}svg .tick,svg .legend{font-size:11px}
svg .label{font-size:12px}svg .frame{fill:none;stroke:#999}svg .grid{stroke:#eee}
"""


def render_report(run_dir: str | Path) -> str:
    """The HTML of ``run_dir``'s report (self-contained: inline CSS and SVG only)."""
    run = read_run(Path(run_dir))
    done = len(run.rounds)
    planned = run.config.federation.rounds
    headline = _headline(run)
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    sections = [
        _quality(run),
        _generations(run),
        _privacy(run),
        _traffic(run),
        _guarantee(run),
        _disclosure(),
        _lineage(run),
    ]
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>fedpeft run report: {html.escape(run.config.experiment_name)}</title>"
        f"<style>{STYLE}</style></head><body>"
        f"<h1>fedpeft run report: {html.escape(run.config.experiment_name)}</h1>"
        f"<p>Federation <code>{_esc(run.federation.get('federation_id'))}</code> · "
        f"{done} of {planned} round(s) finished · {_sites_seen(run)} site(s) took part · "
        f"strategy {html.escape(run.config.strategy.name)} · written {stamp} from "
        f"<code>{html.escape(str(run.path.resolve()))}</code></p>"
        f'<p class="headline">{headline}</p>'
        f"{''.join(sections)}</body></html>\n"
    )


def _sites_seen(run: RunFiles) -> int:
    seen: set[str] = set()
    for r in run.rounds:
        seen.update(str(n) for n in r.site_metrics)
        seen.update(str(n) for n in r.failures)
    return len(seen)


def _headline(run: RunFiles) -> str:
    p, s = run.config.privacy, run.config.secagg
    sites = run.privacy.get("sites") or {}
    eps = [float(f["epsilon"]) for f in sites.values() if f.get("epsilon") is not None]
    if not p.enabled:
        dp = "<b>No differential privacy.</b>"
    elif eps:
        delta = sorted({f.get("delta") for f in sites.values()} - {None})
        dp = (
            f"Each site's training examples are protected by DP-SGD at ε ≤ {max(eps):.3g} "
            f"(δ = {', '.join(f'{d:g}' for d in delta)}) over each site's whole ledger, as the "
            "sites report."
        )
    else:
        dp = "Differential privacy is on; no site has reported its ε yet."
    agg = (
        "The coordinator saw only sums of the sites' updates (SecAgg+)."
        if s.enabled
        else "<b>Secure aggregation is off</b>: the coordinator saw each site's update."
    )
    return f"{dp} {agg}"


def write_report(run_dir: str | Path) -> Path:
    """Write ``run_dir/report.html`` atomically and return its path."""
    from fedpeft.files import atomic_write_text

    path = Path(run_dir) / REPORT_FILE
    atomic_write_text(path, render_report(run_dir))
    return path


def write_reference(run_dir: str | Path, reference_dir: str | Path) -> Path:
    """Keep ``reference_dir``'s rounds in ``run_dir/reference.json`` for the report.

    Raises
    ------
    ConfigError
        If ``reference_dir`` is not a run directory with rounds.
    """
    from fedpeft.files import atomic_write_text

    reference = read_run(Path(reference_dir))
    if not reference.rounds:
        raise ConfigError(
            f"--reference {reference_dir} has no finished rounds (metrics.jsonl is empty or "
            "missing); give a finished run directory"
        )
    label = "no DP" if not reference.config.privacy.enabled else "reference run (DP)"
    keep = ("round", "eval_accuracy", "eval_loss", "eval_perplexity")
    payload = {
        "run": str(Path(reference_dir).resolve()),
        "label": label,
        "rows": [{k: getattr(r, k) for k in keep} for r in reference.rounds],
    }
    path = Path(run_dir) / REFERENCE_FILE
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")
    return path
