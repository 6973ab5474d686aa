"""report.html: the plots, tables and lineage a privacy officer reads, checked on a real run.

The run is a real private, secure federation over an in-process grid (the real ServerApp
round loop and ClientApp), in which one site's ceiling is too low to train: it refuses with
its fixed code, which the report must count as a refusal, not a failure. The browser test
renders the page in headless Chromium (installed by ``.ci/run``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from fedpeft import constants as K
from fedpeft.cli import main
from fedpeft.client.app import make_client_app
from fedpeft.config import compose_config
from fedpeft.disclosure import RELEASES, SETTINGS
from fedpeft.lineage import adapter_sha256
from fedpeft.report import REPORT_FILE, Series, _nice_axis, line_chart, render_report
from fedpeft.server.federation import Federation
from fedpeft.server.progress import Progress
from fedpeft.server.rundir import RunDir
from fedpeft.testing import InProcessGrid, write_classification_csv

NODES = (21, 22, 23, 24, 25)
STRICT_NODE = 24  # asks for secure sums over more sites than the round's threshold: refuses
BROKEN_NODE = 25  # its data file is missing: it fails


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("report")
    config = compose_config(
        [
            "experiment=tiny_private",
            f"data.path={write_classification_csv(tmp / 'unused.csv')}",
            "federation.rounds=2",
            "secagg.enabled=true",
            "federation.min_sites=3",
        ]
    )
    node_configs = {
        n: {
            K.NODE_DATA_PATH: str(
                tmp / "missing.csv"
                if n == BROKEN_NODE
                else write_classification_csv(tmp / f"site{n}.csv", seed=n)
            ),
            K.NODE_LEDGER_PATH: str(tmp / f"ledger-{n}.json"),
            K.NODE_EPSILON_MAX: 8.0,
            K.NODE_DELTA: 1e-5,
            **({K.NODE_SECAGG_MIN_SITES: 5} if n == STRICT_NODE else {}),
        }
        for n in NODES
    }
    grid = InProcessGrid(make_client_app(config), node_configs)
    out = tmp / "run"
    Federation(grid, config, RunDir(out), Progress()).run()
    return out


def _rows(html_text: str, table_class: str) -> int:
    match = re.search(rf'<table class="{table_class}">.*?<tbody>(.*?)</tbody>', html_text, re.S)
    assert match, f"no table {table_class}"
    return match.group(1).count("<tr>")


def test_a_report_is_written_after_the_rounds_with_every_plot_and_table(run_dir: Path) -> None:
    page = (run_dir / REPORT_FILE).read_text(encoding="utf-8")
    stamp = re.compile(r"written [^<]* from")
    assert stamp.sub("", page) == stamp.sub("", render_report(run_dir))  # from the files alone
    assert page.count("<svg") == 4  # accuracy, loss, ε per site, bytes
    assert _rows(page, "sites") == len(NODES) - 2  # the refusing and failing sites report no ε
    assert _rows(page, "rounds") == 2
    assert _rows(page, "releases") == len(RELEASES)
    assert _rows(page, "decides") == len(SETTINGS)
    assert _rows(page, "adapters") == 2
    for release in RELEASES:
        assert release.quantity.replace("`", "") in page.replace("`", "").replace("&#x27;", "'")


def test_the_page_is_self_contained(run_dir: Path) -> None:
    page = (run_dir / REPORT_FILE).read_text(encoding="utf-8")
    assert "<script" not in page and "<link" not in page and "<img" not in page
    assert "@import" not in page and "url(" not in page
    external = set(re.findall(r"https?://[^\s\"'<]+", page))
    assert external == {"http://www.w3.org/2000/svg"}  # the SVG namespace, not a fetch


def test_refusals_and_failures_are_counted_apart_with_their_codes(run_dir: Path) -> None:
    page = (run_dir / REPORT_FILE).read_text(encoding="utf-8")
    body = re.search(r'<table class="rounds">.*?<tbody>(.*?)</tbody>', page, re.S)
    assert body is not None
    first = re.findall(r"<td>(.*?)</td>", body.group(1).split("</tr>")[0])
    # round, sampled, replied, dropped, refused, failed, codes
    assert first[:7] == [
        "1",
        "5",
        "3",
        "0",
        "1",
        "1",
        f"{K.ERR_SECAGG_REQUIRED}, {K.ERR_SITE_CONFIG}",
    ]


def test_epsilon_lines_and_the_ceiling_are_drawn_from_the_rounds(run_dir: Path) -> None:
    page = (run_dir / REPORT_FILE).read_text(encoding="utf-8")
    privacy = re.search(r'aria-label="ε spent per site.*?</svg>', page, re.S)
    assert privacy is not None
    chart = privacy.group(0)
    # three sites with a line of two rounds each, and one dashed ceiling line at 8
    assert chart.count("<polyline") == 4
    assert chart.count('stroke-dasharray="6 4"/>') == 2  # ceiling line + its legend swatch
    assert "ceiling ε = 8" in chart
    # the three sites spend the same ε: the page says their lines overlap
    assert "(the same ε each round): site 1 = site 2 = site 3." in page
    assert "5 site(s) took part" in page
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    eps = {e for r in rows for e in r["epsilon"].values()}
    assert len(eps) == 2 and max(eps) <= 8.0  # the y axis spans these


def test_the_lineage_names_the_adapter_on_disk(run_dir: Path) -> None:
    page = (run_dir / REPORT_FILE).read_text(encoding="utf-8")
    assert adapter_sha256(run_dir / "adapter") in page
    assert "random weights built in-process" in page  # the tiny base model's identity


def test_the_guarantee_settings_name_the_resolved_secagg_parameters(run_dir: Path) -> None:
    page = (run_dir / REPORT_FILE).read_text(encoding="utf-8")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    params = rows[0]["secagg_params"]
    assert params == {"num_neighbours": 4, "threshold": 3, "min_sum": 3}  # 5 sampled, min 3
    table = re.search(r'<table class="settings">(.*?)</table>', page, re.S)
    assert table is not None
    assert "<td>SecAgg+ threshold t (per round, resolved)</td><td>3</td>" in table.group(1)


def test_a_reference_run_is_drawn_dashed_beside_this_one(run_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    reference = tmp_path / "plain"
    shutil.copytree(run_dir, reference)
    config = (
        (reference / "config.yaml")
        .read_text()
        .replace("privacy:\n  enabled: true", "privacy:\n  enabled: false")
    )
    (reference / "config.yaml").write_text(config)
    assert main(["report", str(copy), "--reference", str(reference)]) == 0
    page = (copy / REPORT_FILE).read_text(encoding="utf-8")
    quality = re.search(r'aria-label="Held-out accuracy".*?</svg>', page, re.S)
    assert quality is not None and ">no DP</text>" in quality.group(0)
    assert quality.group(0).count('stroke-dasharray="6 4"') == 2  # reference line + swatch
    assert json.loads((copy / "reference.json").read_text())["run"] == str(reference.resolve())


def test_report_of_a_folder_that_is_not_a_run_exits_2(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["report", str(tmp_path)]) == 2
    assert "not a fedpeft run directory" in capsys.readouterr().err


def test_chart_points_map_to_known_pixels_and_gaps_break_the_line() -> None:
    svg = line_chart(
        [Series("a", ((1, 0.0), (2, None), (3, 1.0), (4, 0.5)))],
        title="t",
        x_label="round",
        y_label="y",
        width=164,
        height=172,
    )
    # plot area (the legend row takes 18 px below it): x from 64 to 148 over the axis [1, 4];
    # y from 128 (value 0) up to 28 (value 1)
    assert svg.count("<circle") == 3
    assert svg.count("<polyline") == 1  # (1, 0) stands alone; (3, 1)-(4, 0.5) is one segment
    assert 'cx="64.0" cy="128.0"' in svg
    assert '<polyline points="120.0,28.0 148.0,78.0"' in svg
    assert "no values yet" in line_chart(
        [Series("a", ((1, None),))], title="t", x_label="", y_label=""
    )


@pytest.mark.parametrize(
    ("values", "low", "high"),
    [([0.41, 0.73], 0.4, 0.8), ([5.8, 7.99], 5.5, 8.0), ([0, 27156], 0, 30000), ([3, 3], 2.6, 3.4)],
)
def test_axis_bounds_are_round_and_cover_the_values(
    values: list[float], low: float, high: float
) -> None:
    axis = _nice_axis(values)
    assert axis.low == pytest.approx(low) and axis.high == pytest.approx(high)
    assert axis.ticks[0] == pytest.approx(low) and axis.ticks[-1] == pytest.approx(high)
    assert 3 <= len(axis.ticks) <= 11


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_the_report_renders_in_a_headless_browser(run_dir: Path, tmp_path: Path) -> None:
    browser = _chromium()
    if browser is None:
        if os.environ.get("FEDPEFT_REQUIRE_BROWSER") == "1":
            pytest.fail("chromium is not installed; .ci/run installs Debian's chromium package")
        pytest.skip("chromium not installed (apt-get install chromium; .ci/run does)")
    from PIL import Image

    page = (run_dir / REPORT_FILE).resolve().as_uri()
    flags = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    dom = subprocess.run(
        [*flags, "--dump-dom", page], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    assert dom.count("<svg") == 4
    assert len(re.findall(r"<table", dom)) == 7
    assert dom.count("<polyline") >= 8
    shot = tmp_path / "report.png"
    subprocess.run(
        [*flags, f"--screenshot={shot}", "--window-size=1280,2400", page],
        capture_output=True,
        timeout=120,
        check=True,
    )
    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 2400)
    colours = image.getcolors(maxcolors=1 << 20) or []
    white = sum(n for n, c in colours if min(c) > 245)
    assert white < 0.97 * image.size[0] * image.size[1]  # not blank
    # the plot colours of the first two series are on screen (the lines were drawn)
    near = {c for _, c in colours}
    for target in ((0x1F, 0x77, 0xB4), (0xD6, 0x27, 0x28)):
        assert any(sum(abs(a - b) for a, b in zip(c, target, strict=True)) < 30 for c in near)
    keep = os.environ.get("FEDPEFT_REPORT_PNG")
    if keep:
        shutil.copy(shot, keep)


def test_transport_is_declared_by_the_coordinator_not_claimed_as_observed() -> None:
    from fedpeft.server.app import SIMULATED_TRANSPORT, declared_transport

    found = declared_transport({K.RUN_TRANSPORT_TLS: "on: fedpeft certs", "other": 1})
    assert found["tls"].startswith("on: fedpeft certs (declared by the coordinator;")
    assert found["node_auth"] == (
        f"not declared (run config {K.RUN_TRANSPORT_NODE_AUTH}); check the SuperLink's command line"
    )
    assert "not applicable" in SIMULATED_TRANSPORT["tls"]
