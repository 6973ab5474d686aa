"""``benchmarks/README.md`` and its plots, regenerated from the results JSON files.

Used by ``benchmarks/run.py`` after a run (or with ``--report-only``). Each section appears
only when its JSON file is there; figures are read, never recomputed.
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path
from typing import Any

INTRO = """\
# Benchmarks

Measured comparisons for fedpeft, each a script in this folder that writes a JSON file (and
sometimes a plot) to `results/`. `make bench` runs the default set and regenerates this page
(`python benchmarks/run.py`; `--full` for the long versions plus the quality sweep, `--quick`
for smoke settings, `--report-only` to rebuild this page from the JSON already there).
Variants that are compared run side by side in one process or interleaved, so a busy machine
slows them alike; the ratios are the figures to read, the absolute times depend on the machine.
"""


def _load(results: Path, name: str) -> dict[str, Any] | None:
    path = results / f"{name}.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f} ms" if seconds < 10 else f"{seconds:,.1f} s"


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n:,.0f} B"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _yes(flag: Any) -> str:
    return "not measured" if flag is None else "met" if flag else "missed"


def _row(rows: list[dict[str, Any]], sites: int, length: int) -> dict[str, Any] | None:
    return next((r for r in rows if r["sites"] == sites and r["vector_length"] == length), None)


# --- plots -----------------------------------------------------------------------------------


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_secagg(report: dict[str, Any], path: Path) -> Path:
    plt = _plt()
    rows = report["in_process"]
    sizes = sorted({r["vector_length"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    panels = [
        ("client_total_s", "client time per site, all stages (s)"),
        ("server_unmask_s", "server unmasking time (s)"),
    ]
    for ax, (key, title) in zip(axes, panels, strict=True):
        for size, colour in zip(sizes, ("tab:blue", "tab:orange", "tab:green"), strict=False):
            sub = sorted((r for r in rows if r["vector_length"] == size), key=lambda r: r["sites"])
            n = [r["sites"] for r in sub]
            ax.plot(
                n, [r["ours"][key] for r in sub], "-o", color=colour, label=f"fedpeft L={size:,}"
            )
            ax.plot(
                n, [r["flower"][key] for r in sub], "--s", color=colour, label=f"Flower L={size:,}"
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(
            sorted({r["sites"] for r in rows}), [str(s) for s in sorted({r["sites"] for r in rows})]
        )
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        ax.set_xlabel("sites in the round (n)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(
        "SecAgg+ cost: fedpeft (solid) vs Flower 1.41 (dashed), same n, k, t, vectors", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_scale(report: dict[str, Any], path: Path) -> Path:
    plt = _plt()
    rows = report["results"]
    sites = [r["sites"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].plot(sites, [r["peak_rss_mb"] for r in rows], "-o", label="peak RSS, all processes")
    axes[0].plot(sites, [r["peak_pss_mb"] for r in rows], "-s", label="peak PSS, all processes")
    axes[0].plot(sites, [r["peak_driver_rss_mb"] for r in rows], "-^", label="peak RSS, driver")
    axes[0].set_ylabel("MB")
    axes[0].set_ylim(bottom=0)
    axes[0].set_title("memory of the simulation", fontsize=10)
    axes[0].legend(fontsize=8)
    axes[1].plot(
        sites, [r["median_seconds_per_round"] for r in rows], "-o", label="median, rounds 2..R"
    )
    for r in rows:
        axes[1].scatter(
            [r["sites"]] * len(r["seconds_per_round"]), r["seconds_per_round"], s=10, color="grey"
        )
    axes[1].set_ylabel("seconds per round")
    axes[1].set_ylim(bottom=0)
    axes[1].set_title(f"{report['sampled_per_round']} sites sampled per round", fontsize=10)
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xticks(sites, [str(s) for s in sites])
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        ax.set_xlabel("virtual sites in the federation")
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- sections ----------------------------------------------------------------------------------


def section_secagg(report: dict[str, Any], img: str | None) -> list[str]:
    rows = report["in_process"]
    out = ["## Secure aggregation: fedpeft vs Flower's SecAgg+ (`secagg_vs_flower.py`)", ""]
    out.append(
        "One SecAgg+ round with every node in one process, no drop-outs, the same `n`, "
        "neighbours `k`, threshold `t`, clipping range and float32 vectors for both; Flower "
        f"{report.get('flwr', '')} is driven through its own client stage functions "
        "(`secaggplus_mod`) and its workflow's server steps. Client time covers all four stages "
        "per site; bytes are protocol payloads (no transport framing)."
    )
    out.append("")
    table = []
    for r in rows:
        o, f = r["ours"], r["flower"]
        table.append(
            [
                str(r["sites"]),
                f"{r['vector_length']:,}",
                f"{r['num_neighbours']}/{r['threshold']}",
                _ms(o["client_total_s"]),
                _ms(f["client_total_s"]),
                f"{r['flower_over_ours']['client_total_s']:.1f}×",
                _ms(o["server_unmask_s"]),
                _ms(f["server_unmask_s"]),
                f"{r['flower_over_ours']['server_unmask_s']:.1f}×",
                f"{o['upload_vs_plain']:.3f}× / {f['upload_vs_plain']:.3f}×",
                f"{o['masked_vector_dtype']} / {f['masked_vector_dtype']}",
            ]
        )
    out.append(
        _table(
            [
                "n",
                "L",
                "k/t",
                "client, fedpeft",
                "client, Flower",
                "Flower ÷ fedpeft",
                "unmask, fedpeft",
                "unmask, Flower",
                "Flower ÷ fedpeft",
                "upload ÷ plain fp32 (fedpeft / Flower)",
                "masked dtype",
            ],
            table,
        )
    )
    out.append("")
    if img:
        out += [f"![SecAgg+ cost vs n]({img})", ""]
    sim = report.get("simulation", {})
    med = sim.get("median_seconds_per_round", {})
    if med:
        out.append(
            f"Whole rounds in Flower's simulation engine: {sim['sites']} sites, adapter "
            f"{sim['adapter_floats']:,} floats (`{' '.join(sim['model_overrides'])}`), rounds "
            f"{sim['timed_rounds']} timed from `metrics.jsonl` (train + evaluate exchanges), one "
            "torch thread per site, each variant in its own process."
        )
        out.append("")
        table = []
        for name, label in (
            ("ours_plain", "fedpeft, plain"),
            ("ours_secure", "fedpeft, secagg.enabled=true"),
            ("flower_plain", "Flower legacy FedAvg (no training)"),
            ("flower_secure", "Flower legacy SecAgg+ workflow (no training)"),
        ):
            if name in med:
                base = med.get(name.replace("secure", "plain"))
                table.append(
                    [
                        label,
                        f"{med[name]:.2f}",
                        f"{med[name] / base:.2f}×" if base else "",
                        f"{med[name] - base:+.2f} s" if base and name.endswith("secure") else "",
                    ]
                )
        out.append(_table(["variant", "s / round", "÷ plain", "added"], table))
        out.append("")
        if "flower_note" in sim:
            out += [f"Flower's rows: {sim['flower_note']}.", ""]
    for name, err in sim.get("errors", {}).items():
        out += [f"`{name}` failed: `{err.splitlines()[0] if err else ''}`", ""]
    return out


def section_targets(report: dict[str, Any]) -> list[str]:
    t = report["targets"]
    b, c, f, s = (
        t["bytes_per_site_vs_plain"],
        t["client_cost_vs_dp_round"],
        t["faster_than_flower"],
        t["simulated_round_vs_plain"],
    )
    dp = report.get("dp_round", {})
    rows = [
        [
            "bytes per site ≤ 1.0× plain fp32 update (Flower: 2×)",
            f"masked vector {b['ours_masked_vector']:.2f}× "
            f"(Flower {b['flower_masked_vector']:.2f}×); whole upload ≤ "
            f"{b['ours_upload_total_max']:.3f}× (Flower "
            f"{b['flower_upload_total_max']:.3f}×)",
            (_yes(b["met"]) + " for the masked vector; keys and shares add the rest")
            if b["ours_upload_total_max"] > 1
            else _yes(b["met"]),
        ],
        [
            "client cost ≤ 5% of a local DP round",
            f"{_ms(c['client_total_s'])} per site (n={c['sites']}, L={c['vector_length']:,}) vs "
            f"{c['dp_round_s']:.1f} s DP round = {100 * c['fraction']:.2f}% "
            f"({dp.get('source', '')})",
            _yes(c["met"]),
        ],
        [
            "simulated round ≤ 1.5× without secure aggregation",
            f"{s['ratio']:.2f}×" if s["ratio"] is not None else "not measured",
            _yes(s["met"]),
        ],
        [
            "faster than Flower's SecAgg+ at equal n and size",
            f"client ≥ {f['min_client_speedup']:.1f}×, server unmask ≥ "
            f"{f['min_server_unmask_speedup']:.1f}× faster",
            _yes(f["client_total_all"] and f["server_unmask_all"]),
        ],
    ]
    return ["### Targets", "", _table(["target", "measured", ""], rows), ""]


def section_communication(report: dict[str, Any]) -> list[str]:
    out = ["## Communication per site per round (`communication.py`)", ""]
    models = report["models"]
    for name, info in models.items():
        out.append(
            f"- **{name}**: {info['description']}; {info['base_parameters']:,} base parameters "
            f"({_size(4 * info['base_parameters'])} fp32), adapter "
            f"{info['adapter_floats']:,} floats."
        )
    out += [
        "",
        "Down: the global adapter in the train and the evaluate instruction, as it goes on the "
        "wire once a round has moved the trained tensors (float32 tensors that differ from the "
        "shared start: for `ffa` LoRA B and the head, for `fedavg` everything); up: the trained "
        "tensors' delta (or the uint32 masked vector). Secure rows "
        "add the real SecAgg+ protocol payloads of a round of `n` sites. Percentages are of the "
        "full model's fp32 bytes; FlowerTune reports ≈ "
        f"{100 * report['flowertune_reference_fraction']:.2f}%.",
        "",
    ]
    table = []
    for r in report["rows"]:
        table.append(
            [
                r["model"],
                r["strategy"],
                f"secure, n={r['sites']}" if r["secure"] else "plain",
                f"{r['trained_floats']:,}",
                f"{r.get('down_floats', r['adapter_floats']):,}",
                f"{_size(r['up_bytes'])} ({100 * r['up_fraction']:.3f}%)",
                f"{_size(r['down_bytes'])} ({100 * r['down_fraction']:.3f}%)",
                f"+{_size(r['secagg_extra_up_bytes'])} / +{_size(r['secagg_extra_down_bytes'])}"
                if r["secure"]
                else "",
            ]
        )
    out.append(
        _table(
            [
                "model",
                "strategy",
                "aggregation",
                "floats up",
                "floats down",
                "up",
                "down",
                "SecAgg+ extra up / down",
            ],
            table,
        )
    )
    return [*out, ""]


def section_scale(report: dict[str, Any], img: str | None) -> list[str]:
    out = ["## Scale: unsampled sites cost nothing (`scale.py`)", ""]
    out.append(
        f"`fedpeft simulate` with {report['model']}, {report['rows']:,} IID rows, "
        f"{report['sampled_per_round']} sites sampled and evaluated per round; memory of the "
        "driver and all Ray processes sampled every 0.25 s (RSS) and 2 s (PSS)."
    )
    out.append("")
    table = [
        [
            f"{r['sites']:,}",
            f"{r['sampled_per_round']}",
            f"{r['median_seconds_per_round']:.2f}",
            f"{r['round1_seconds']:.1f}",
            f"{r['peak_rss_mb']:,.0f}",
            f"{r['peak_pss_mb']:,.0f}",
            f"{r['peak_driver_rss_mb']:,.0f}",
            f"{r.get('driver_cpu_seconds', float('nan')):,.0f} / "
            f"{r.get('all_cpu_seconds', float('nan')):,.0f}",
            f"{r.get('process_seconds', float('nan')):,.0f}",
        ]
        for r in report["results"]
    ]
    out.append(
        _table(
            [
                "sites",
                "sampled",
                "s / round (2..R)",
                "round 1 s",
                "peak RSS MB",
                "peak PSS MB",
                "driver RSS MB",
                "CPU s, driver / all",
                "wall s",
            ],
            table,
        )
    )
    g = report["growth_first_to_last"]
    out += [
        "",
        f"From {g['sites'][0]:,} to {g['sites'][1]:,} sites: peak RSS ×{g['peak_rss']:.2f}, "
        f"peak PSS ×{g['peak_pss']:.2f}, seconds per round ×{g['seconds_per_round']:.2f}.",
        "",
    ]
    first, last = report["results"][0], report["results"][-1]
    if "driver_cpu_seconds" in first:
        out += [
            f"The driver's CPU time goes from {first['driver_cpu_seconds']:.0f} s to "
            f"{last['driver_cpu_seconds']:.0f} s for the same work: Flower's "
            "simulation engine polls the message store for *every* node every 0.1 s "
            "(`flwr/server/superlink/fleet/vce/vce_api.py`, `add_messages_to_queue`), and each "
            "poll scans all stored messages (`InMemoryLinkState.get_message_ins`). That is "
            "Flower's cost, outside fedpeft; fedpeft's per-site caches are bounded.",
            "",
        ]
    if img:
        out += [f"![memory and seconds per round vs sites]({img})", ""]
    return out


def section_dp(report: dict[str, Any]) -> list[str]:
    out = ["## DP-SGD throughput (`dp_throughput.py`)", ""]
    if "paired_ratios" not in report:  # a run of the older layout: its one table
        return [*out, _table_dp_legacy(report), ""]
    out.append(
        f"{report['model']}, adapter {report['adapter_floats']:,} floats, expected batch "
        f"{report['expected_batch']:g}, {report['steps_per_round']} steps per round, σ = "
        f"{report['noise_multiplier']:g}, C = {report['max_grad_norm']:g}, "
        f"{report['torch_threads']} torch threads in every round; {report['repeats']} repeats "
        "in rotating order after one warm-up round each. Time per example processed (Poisson "
        "batches vary), median (min–max); ratios are paired within a repeat."
    )
    out.append("")
    ms = report["ms_per_example"]
    rows = [
        [
            name,
            f"{ms[name]['median']:.1f} ({ms[name]['min']:.1f}–{ms[name]['max']:.1f})",
            f"{statistics.median(report['setup_seconds'][name]) * 1e3:.1f}",
            f"{report['slowdown_vs_plain'][name]:.3f}×",
        ]
        for name in report["variants"]
    ]
    out += [
        _table(["variant", "ms / example", "setup ms / round", "÷ plain (paired)"], rows),
        "",
    ]
    labels = {
        "dp_hooks_over_plain": "fedpeft DP (hooks) ÷ plain",
        "dp_hooks_over_opacus": "fedpeft DP (hooks) ÷ bare Opacus",
        "opacus_hooks_over_plain": "bare Opacus ÷ plain",
        "dp_ghost_over_plain": "fedpeft DP (ghost) ÷ plain",
        "dp_ghost_over_opacus": "fedpeft DP (ghost) ÷ bare Opacus",
    }
    ratio_rows = []
    for key, label in labels.items():
        figure = report["paired_ratios"].get(key)
        if figure is None:
            continue
        r, st = figure["round"], figure["steps_only"]
        target = report["targets"].get(key)
        ratio_rows.append(
            [
                label,
                f"{r['median']:.3f} ({r['min']:.3f}–{r['max']:.3f})",
                f"{st['median']:.3f} ({st['min']:.3f}–{st['max']:.3f})",
                f"≤ {target['at_most']}: {_yes(target['met'])}" if target else "",
            ]
        )
    out += [_table(["ratio", "whole round", "steps only", "target"], ratio_rows), ""]
    plain = ms.get("plain")
    if plain:
        out += [
            "A range that reaches below 1 is a repeat in which the other round met a slower "
            f"moment of the machine (plain alone took {plain['min']:.1f}–{plain['max']:.1f} ms "
            "per example over the run); no variant is faster than plain in the median.",
            "",
        ]
    site = report["site_setup_seconds"]
    out += [
        "Set up apart, once per round at a site before it trains: σ calibration for ε = 8 "
        f"(PRV) {site['calibration']['median'] * 1e3:.0f} ms, one ledger charge "
        f"{site['ledger_charge']['median'] * 1e3:.1f} ms (medians).",
        "",
    ]
    return out


def _table_dp_legacy(report: dict[str, Any]) -> str:
    table = [
        [name, f"{rate:.1f}", f"{report['slowdown_vs_plain'][name]:.2f}×"]
        for name, rate in report["samples_per_second"].items()
    ]
    return _table(["variant", "samples / s", "time ÷ plain"], table)


def section_instruct(report: dict[str, Any]) -> list[str]:
    out = ["## Instruction tuning SmolLM2-135M-Instruct (`instruct.py`)", ""]
    t = report.get("throughput")
    if t:
        tps = t["tokens_per_second"]
        ratio = t["dp_over_plain"]
        out += [
            f"Tokens per second of one site's local round ({t['site']}, "
            f"{t['site_train_examples']} training conversations, {t['steps']} steps, batch "
            f"{t['batch_size']}; DP: Poisson q = {t['sample_rate']}, expected batch "
            f"{t['expected_dp_batch']:.1f}, {t['clipping']} clipping), {t['repeats']} "
            "interleaved repeats: median (min–max).",
            "",
            _table(
                ["variant", "tokens / s", "round seconds"],
                [
                    [
                        name,
                        f"{v['median']:.1f} ({v['min']:.1f}–{v['max']:.1f})",
                        f"{sec['median']:.1f} ({sec['min']:.1f}–{sec['max']:.1f})",
                    ]
                    for name, v, sec in (
                        ("non-DP", tps["plain"], t["round_seconds"]["plain"]),
                        ("DP-SGD", tps["dp"], t["round_seconds"]["dp"]),
                    )
                ],
            ),
            "",
            "Tokens are those the round read: a DP round's Poisson batches vary in size (and "
            "their conversations in length), so it may read more tokens than the plain round's "
            "fixed batches in a longer round; tokens / s compares the work per second.",
            "",
            f"DP ÷ non-DP: {ratio['median']:.3f} ({ratio['min']:.3f}–{ratio['max']:.3f}); "
            f"target ≥ 0.85: {_yes(t['met'])}.",
            "",
        ]
    q = report.get("quality")
    if q:
        names = {
            "untrained": "untrained base",
            "centralised": "centralised, no DP",
            "nonprivate_federation": "federation, no DP",
            "dp_federation": f"federation, DP ε = {q['epsilon']:g} + SecAgg+",
        }
        rows = [
            [label, f"{q['perplexity'][key]['median']:.3f}", _per_seed(q, key)]
            for key, label in names.items()
        ]
        r = q["dp_over_nonprivate"]
        out += [
            f"Held-out perplexity (response tokens, the union of the {q['sites']} sites' own "
            f"held-out splits) after {q['rounds']} rounds × {q['local_steps']} local steps "
            f"(centralised: the same number of steps on the union of the training splits), "
            f"{q['seeds']} seeds.",
            "",
            _table(["variant", "median", "per seed"], rows),
            "",
            f"DP ÷ non-private federation: median {r['median']:.3f} ({r['min']:.3f}–"
            f"{r['max']:.3f}); target ≤ 1.10 (mean): {_yes(q['met'])}.",
            "",
        ]
    return out


def _per_seed(quality: dict[str, Any], key: str) -> str:
    if key == "untrained":
        return ", ".join(f"{r['base_perplexity']:.3f}" for r in quality["per_seed"])
    return ", ".join(f"{r[key]['perplexity']:.3f}" for r in quality["per_seed"])


def section_primitives(report: dict[str, Any]) -> list[str]:
    out = ["## fedpeft SecAgg+ with drop-outs (`secagg_primitives.py`)", ""]
    table = [
        [
            str(r["sites"]),
            f"{r['vector_length']:,}",
            str(r["dropped_after_share_keys"]),
            _ms(r["client_masking_s_mean"]),
            _ms(r["server_unmasking_s"]),
            f"{r['upload_bytes_per_site'] / r['plain_float32_update_bytes']:.3f}×",
        ]
        for r in report["results"]
    ]
    header = ["n", "L", "dropped", "client masking", "server unmasking", "upload ÷ plain"]
    return [*out, _table(header, table), ""]


def section_quality(
    report: dict[str, Any], results: Path, readme: Path, stem: str = "quality"
) -> list[str]:
    """One quality sweep (``results/<stem>.json``): accuracy, LoRA's part, paired differences."""
    title = "## Quality (`quality.py`)"
    if stem != "quality":
        setting = report.get("setting", {})
        title = (
            f"## Quality, {setting.get('rounds', '?')} rounds × {setting.get('local_steps', '?')} "
            f"steps (`quality.py --name {stem}`)"
        )
    out = [title, ""]
    try:
        s = report["setting"]
        out.append(
            f"{s['model']} on {s['dataset']}, {s['sites']} sites (Dirichlet α={s['alpha']}), "
            f"{s['rounds']} rounds × {s['local_steps']} steps; pooled held-out accuracy."
        )
        out.append("")
        columns = [f"{e:g}" for e in s["epsilons"]] + ["no_dp"]

        def rows(by_strategy: dict[str, dict[str, float]], fmt: str) -> list[list[str]]:
            return [
                [name, *[format(by.get(c, float("nan")), fmt) for c in columns]]
                for name, by in by_strategy.items()
            ]

        def single(label: str, value: float, fmt: str) -> list[str]:
            return [label, format(value, fmt), *[""] * (len(columns) - 1)]

        header = ["strategy", *[f"ε={c}" if c != "no_dp" else "no DP" for c in columns]]
        table = rows(report["accuracy"], ".3f")
        table.append(single("ceiling (centralised)", report["ceiling"], ".3f"))
        table.append(single("floor (site alone)", report["floor"], ".3f"))
        if "probe" in report:  # results written before the probe existed lack it
            table.append(
                single("probe (head on frozen encoder)", report["probe"]["accuracy"], ".3f")
            )
        out.append(_table(header, table))
        if "lora_gain" in report:  # results written before this column existed lack it
            out += [
                "",
                "What the LoRA update adds: accuracy minus the same run with ΔW = B·A = 0 "
                "(trained head kept). Near zero, the rows above compare head training, "
                "not LoRA aggregation.",
                "",
            ]
            gains = rows(report["lora_gain"], "+.3f")
            gains.append(single("ceiling", report["ceiling_lora_gain"], "+.3f"))
            out.append(_table(header, gains))
        seeds = report.get("seeds", [])
        if len(seeds) > 1 and report.get("vs_fedavg"):
            out += [
                "",
                f"Figures above are means over {len(seeds)} training seeds. Accuracy minus "
                "fedavg's, paired by seed (the same sites' batches and noise seeds), with the "
                "seeds won:",
                "",
            ]
            versus = [
                [
                    name,
                    *[
                        f"{sum(by[c]) / len(by[c]):+.3f} ({sum(d > 0 for d in by[c])}/{len(by[c])})"
                        for c in columns
                    ],
                ]
                for name, by in report["vs_fedavg"].items()
            ]
            out.append(_table(header, versus))
    except (KeyError, TypeError, ValueError):
        out.append("See `results/quality.json`.")
    png = results / f"{stem}.png"
    if png.is_file():
        out += ["", f"![{stem}]({os.path.relpath(png, readme.parent)})"]
    return [*out, ""]


def section_deployment(report: dict[str, Any]) -> list[str]:
    out = ["## A deployed round against the same round simulated (`deployment_latency.py`)", ""]
    out += [
        f"{report['experiment']}; deployment: {report['deployment']}. Seconds per round from "
        "the ServerApp's own `metrics.jsonl` (start-up excluded), mean of rounds 2+ (round 1 "
        "also builds the model).",
        "",
    ]
    by = {(r["mode"], r["engine"]): r for r in report["results"]}
    engines = [e for e in ("flower-default", "fedpeft-worker") if any(k[1] == e for k in by)]
    table, notes = [], []
    for mode in dict.fromkeys(r["mode"] for r in report["results"]):
        sim = by.get((mode, "simulation"))
        if not sim or not sim["later_rounds_mean_s"]:
            continue
        base = sim["later_rounds_mean_s"]
        cells = [mode, f"{base} s"]
        for engine in engines:
            dep = by.get((mode, engine))
            late = dep["later_rounds_mean_s"] if dep else None
            cells.append(f"{late} s ({late / base:.1f}×)" if late else "")
        table.append(cells)
        worker = by.get((mode, "fedpeft-worker"))
        if worker and worker.get("site_task_s"):
            phases = ", ".join(f"{k} {v:.2f} s" for k, v in worker["later_phase_s"].items())
            task = worker["site_task_s"]
            ratio = worker["later_rounds_mean_s"] / base
            notes.append(
                f"- {mode}, fedpeft worker: {ratio:.1f}× the simulated round, target ≤ 2× "
                f"{'met' if ratio <= 2 else 'not met'}. Round phases: {phases}. A site's task "
                f"takes {task['task']:.3f} s, of which the app itself {task['app']:.3f} s; "
                f"pulling the message {task['pull']:.3f} s (mostly waiting for its arrays to "
                f"reach the SuperNode) and pushing the reply {task['push']:.3f} s. The rest of "
                "each exchange is Flower's messaging: HTTP requests between ServerApp, "
                "SuperLink, SuperNode and worker, each a Python web service on the same cores."
            )
    header = ["mode", "simulated", *(f"deployed, {e}" for e in engines)]
    out.append(_table(header, table))
    if notes:
        out += ["", *notes]
    imports = report.get("fresh_process_imports", {})
    if imports:
        out += [
            "",
            f"Under Flower's default every message starts a fresh ClientApp process, which "
            f"imports fedpeft's ClientApp in {imports['clientapp_module_s']} s and the training "
            f"stack in {imports['training_stack_s']} s; the fedpeft worker imports them once.",
        ]
    return [*out, ""]


def headline(results: Path) -> list[str]:
    rows: list[list[str]] = []
    sec = _load(results, "secagg_vs_flower")
    if sec:
        inp = sec["in_process"]
        for n, length in ((5, 75_000), (100, 1_000_000)):
            r = _row(inp, n, length)
            if r:
                rows.append(
                    [
                        f"SecAgg+ client time per site, n={n}, L={length:,}",
                        _ms(r["ours"]["client_total_s"]),
                        _ms(r["flower"]["client_total_s"]),
                        f"{r['flower_over_ours']['client_total_s']:.1f}× faster",
                    ]
                )
                rows.append(
                    [
                        f"SecAgg+ server unmasking, n={n}, L={length:,}",
                        _ms(r["ours"]["server_unmask_s"]),
                        _ms(r["flower"]["server_unmask_s"]),
                        f"{r['flower_over_ours']['server_unmask_s']:.1f}× faster",
                    ]
                )
        b = sec["targets"]["bytes_per_site_vs_plain"]
        rows.append(
            [
                "SecAgg+ upload per site ÷ plain fp32 update",
                f"{b['ours_upload_total_max']:.3f}×",
                f"{b['flower_upload_total_max']:.3f}×",
                "uint32 vs int64 masked vectors",
            ]
        )
        sim = sec.get("simulation", {})
        if "ours_secure_over_plain" in sim:
            rows.append(
                [
                    f"simulated round, secure ÷ plain ({sim['sites']} sites, "
                    f"{sim['adapter_floats']:,} floats)",
                    f"{sim['ours_secure_over_plain']:.2f}× ({sim['ours_added_seconds']:+.2f} s)",
                    f"{sim['flower_secure_over_plain']:.2f}× ({sim['flower_added_seconds']:+.2f} s)"
                    if "flower_secure_over_plain" in sim
                    else "not run",
                    "Flower's clients do not train",
                ]
            )
        c = sec["targets"]["client_cost_vs_dp_round"]
        rows.append(
            [
                "SecAgg+ client cost ÷ one local DP round",
                f"{100 * c['fraction']:.2f}%",
                "",
                f"DP round {c['dp_round_s']:.1f} s",
            ]
        )
    com = _load(results, "communication")
    if com:
        for model, strategy in (("minilm", "fedavg"), ("smollm2_135m", "ffa")):
            r = next(
                (
                    x
                    for x in com["rows"]
                    if x["model"] == model and x["strategy"] == strategy and not x["secure"]
                ),
                None,
            )
            if r:
                rows.append(
                    [
                        f"upload per site per round, {model} {strategy} (% of full model)",
                        f"{100 * r['up_fraction']:.3f}%",
                        f"{100 * com['flowertune_reference_fraction']:.2f}% (FlowerTune)",
                        f"down {100 * r['down_fraction']:.3f}%",
                    ]
                )
    sca = _load(results, "scale")
    if sca:
        first, last = sca["results"][0], sca["results"][-1]
        rows.append(
            [
                f"simulation, {first['sites']:,} → {last['sites']:,} sites (10 sampled)",
                f"{first['median_seconds_per_round']:.2f} → {last['median_seconds_per_round']:.2f}"
                " s/round",
                f"{first['peak_pss_mb']:,.0f} → {last['peak_pss_mb']:,.0f} MB PSS",
                f"×{sca['growth_first_to_last']['seconds_per_round']:.2f} time, "
                f"×{sca['growth_first_to_last']['peak_pss']:.2f} memory",
            ]
        )
    dp = _load(results, "dp_throughput")
    if dp:
        opacus = dp.get("paired_ratios", {}).get("dp_hooks_over_opacus")
        rows.append(
            [
                f"DP-SGD (hooks) time ÷ plain, {dp['model']}",
                f"{dp['slowdown_vs_plain'].get('dp_hooks', float('nan')):.2f}×",
                f"bare Opacus {dp['slowdown_vs_plain']['opacus_hooks']:.2f}×"
                if "opacus_hooks" in dp["slowdown_vs_plain"]
                else "",
                (f"hooks ÷ bare Opacus {opacus['round']['median']:.2f}×; " if opacus else "")
                + f"ghost {dp['slowdown_vs_plain'].get('dp_ghost', float('nan')):.2f}× plain",
            ]
        )
    if not rows:
        return []
    return [
        "## Headline figures",
        "",
        _table(["figure", "fedpeft", "Flower / reference", "note"], rows),
        "",
    ]


def write_report(results: Path, readme: Path) -> list[Path]:
    """Write ``readme`` and the plots in ``results``; returns the plots written."""
    plots: list[Path] = []
    rel = lambda p: os.path.relpath(p, readme.parent)  # noqa: E731
    lines = [INTRO]
    run = _load(results, "run")
    if run:
        took = ", ".join(f"{n} {b['seconds'] / 60:.1f} min" for n, b in run["benchmarks"].items())
        lines += [
            f"Last run: `{run['mode']}` set, {run['total_seconds'] / 60:.1f} min on "
            f"{run['cpu_count']} cores ({run['when']}): {took}.",
            "",
        ]
    lines += headline(results)
    sec = _load(results, "secagg_vs_flower")
    if sec:
        img = None
        if len({r["sites"] for r in sec["in_process"]}) > 1:
            plots.append(plot_secagg(sec, results / "secagg_vs_flower.png"))
            img = rel(plots[-1])
        lines += section_secagg(sec, img)
        lines += section_targets(sec)
    com = _load(results, "communication")
    if com:
        lines += section_communication(com)
    sca = _load(results, "scale")
    if sca:
        plots.append(plot_scale(sca, results / "scale.png"))
        lines += section_scale(sca, rel(plots[-1]))
    dp = _load(results, "dp_throughput")
    if dp:
        lines += section_dp(dp)
    instruct = _load(results, "instruct")
    if instruct:
        lines += section_instruct(instruct)
    prim = _load(results, "secagg_primitives")
    if prim:
        lines += section_primitives(prim)
    # the default sweep first, then other named sweeps (quality.py --name quality_…)
    stems = sorted(
        (p.stem for p in results.glob("quality*.json")), key=lambda s: (s != "quality", s)
    )
    for stem in stems:
        qual = _load(results, stem)
        if qual:
            lines += section_quality(qual, results, readme, stem)
    dep = _load(results, "deployment_latency")
    if dep:
        lines += section_deployment(dep)
    readme.parent.mkdir(parents=True, exist_ok=True)
    readme.write_text("\n".join(lines).rstrip() + "\n")
    return plots
