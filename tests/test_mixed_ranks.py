"""Mixed LoRA ranks across sites on the in-process grid: padding, per-slot means, errors.

Three CSV sites train ranks 8, 4 and 2 against the federation's ``lora.r=8``. Each site's
padded delta is captured from ``InProcessGrid.received``; the server's mean must equal the
per-slot mean computed by hand from those deltas: columns 0-1 of every B (rows of every A)
average all three sites, columns 2-3 sites 11 and 22, columns 4-7 site 11 alone.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from numpy.typing import NDArray

from fedpeft import constants as K
from fedpeft.client.app import make_client_app
from fedpeft.config import FedPeftConfig
from fedpeft.model import AdapterLayout, build_model, set_flat, split_flat
from fedpeft.ranks import element_slots, pad_to_rank, site_lora, slice_to_rank, with_rank
from fedpeft.server.aggregation import (
    PlainAggregation,
    RoundOutcome,
    RoundRequest,
    reported_rank,
)
from fedpeft.server.federation import Federation
from fedpeft.server.progress import Progress
from fedpeft.server.rundir import RunDir
from fedpeft.server.secure_aggregation import SecureAggregation
from fedpeft.server.validation import ReplyRejected, check_train_reply
from fedpeft.testing import InProcessGrid, write_classification_csv
from tests.conftest import tiny_config

NODES = (11, 22, 33)
RANKS = {11: 8, 22: 4, 33: 2}
SIZES = {11: 60, 22: 90, 33: 120}
# (first slot, end slot, sites that trained those slots)
BLOCKS = ((0, 2, (11, 22, 33)), (2, 4, (11, 22)), (4, 8, (11,)))
ATOL = 1e-6  # secure aggregation: quantisation error per element ≈ 1e-9 for clip 1, 3 sites


@dataclass
class Round:
    """One plain round of the three mixed-rank sites and what the server made of it."""

    config: FedPeftConfig
    node_configs: dict[int, dict[str, Any]]
    request: RoundRequest
    outcome: RoundOutcome
    replies: dict[int, Any]
    deltas: dict[int, NDArray[np.float32]]
    num_examples: dict[int, int]


def _node_configs(tmp: Path) -> dict[int, dict[str, Any]]:
    return {
        n: {
            K.NODE_DATA_PATH: str(write_classification_csv(tmp / f"s{n}.csv", n=SIZES[n], seed=n)),
            K.NODE_LORA_RANK: RANKS[n],
            K.NODE_PRIVACY_REQUIRED: "false",  # a plain run: these sites waive DP
        }
        for n in NODES
    }


def _request(federation: Federation, nodes: tuple[int, ...] = NODES) -> RoundRequest:
    return RoundRequest(
        round_number=1,
        nodes=list(nodes),
        global_flat=federation.global_flat,
        trained=federation.strategy.trained_layout(),
        min_sites=2,
        timeout=60.0,
        federation_id="mixed-ranks",
    )


@pytest.fixture(scope="module", params=["ffa", "fedavg"])
def plain_round(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Round:
    tmp = tmp_path_factory.mktemp(f"ranks-{request.param}")
    node_configs = _node_configs(tmp)
    config = tiny_config(
        "classification",
        tmp / "unused.csv",
        "lora.r=8",
        f"strategy={request.param}",
        "federation.rounds=1",
        "train.local_steps=2",
        "secagg.enabled=true",  # the plain round below ignores it; the secure test uses it
        "secagg.mixed_ranks=true",
    )
    # the plain round: the same training, replies in the clear (under secure aggregation a
    # site sends no example count)
    plain = replace(config, secagg=replace(config.secagg, enabled=False))
    grid = InProcessGrid(make_client_app(plain), node_configs)
    federation = Federation(grid, config, RunDir(tmp / "unused"), Progress())
    round_request = _request(federation)
    outcome = PlainAggregation().run_round(grid, round_request)
    replies = {int(r.metadata.src_node_id): r for r in grid.received}
    return Round(
        config=config,
        node_configs=node_configs,
        request=round_request,
        outcome=outcome,
        replies=replies,
        deltas={
            n: r.content.array_records[K.ARRAYS][K.ARRAY_FLAT].numpy() for n, r in replies.items()
        },
        num_examples={
            n: int(r.content.metric_records[K.METRICS][K.MET_NUM_EXAMPLES])  # type: ignore[arg-type]
            for n, r in replies.items()
        },
    )


def _by_hand(
    deltas: dict[int, NDArray[np.float32]], weights: dict[int, float], trained: AdapterLayout
) -> dict[str, NDArray[np.float64]]:
    """Per-slot weighted means, tensor by tensor, over the sites that trained each block."""
    parts = {n: split_flat(d, trained) for n, d in deltas.items()}
    out: dict[str, NDArray[np.float64]] = {}
    for name in trained.names:
        if ".lora_" not in name:  # the head: every site
            out[name] = sum(weights[n] * parts[n][name] for n in NODES) / sum(weights.values())
            continue
        mean = np.zeros(parts[11][name].shape)
        for first, end, sites in BLOCKS:
            total = sum(weights[n] for n in sites)
            cut = (
                (slice(first, end), slice(None))
                if ".lora_A." in name
                else (slice(None), slice(first, end))
            )
            mean[cut] = sum(weights[n] * parts[n][name][cut] for n in sites) / total
        out[name] = mean
    return out


def test_every_site_sends_the_global_trained_layout(plain_round: Round) -> None:
    trained = plain_round.request.trained
    assert plain_round.outcome.contributors == list(NODES) and plain_round.outcome.failures == {}
    for node, reply in plain_round.replies.items():
        layout = reply.content.config_records[K.LAYOUT]
        assert list(layout[K.LAYOUT_NAMES]) == list(trained.names)  # type: ignore[arg-type]
        assert list(layout[K.LAYOUT_NUMELS]) == list(trained.numels)  # type: ignore[arg-type]
        assert plain_round.deltas[node].shape == (trained.size,)
        metrics = reply.content.metric_records[K.METRICS]
        assert metrics.get(K.MET_LORA_RANK) == (None if RANKS[node] == 8 else RANKS[node])
        parts = split_flat(plain_round.deltas[node], trained)
        for name, part in parts.items():  # zeros beyond the site's rank, something within
            if ".lora_B." in name:
                assert not part[:, RANKS[node] :].any() and part[:, : RANKS[node]].any()
            if ".lora_A." in name:
                assert not part[RANKS[node] :].any() and part[: RANKS[node]].any()


def test_plain_mean_is_the_per_slot_weighted_mean(plain_round: Round) -> None:
    trained = plain_round.request.trained
    expected = _by_hand(
        plain_round.deltas, {n: float(w) for n, w in plain_round.num_examples.items()}, trained
    )
    assert plain_round.outcome.mean_delta is not None
    got = split_flat(plain_round.outcome.mean_delta, trained)
    sites = [split_flat(flat, trained) for flat in plain_round.deltas.values()]
    for name in trained.names:
        # The mean is summed in float32: a slot where the sites' deltas nearly cancel keeps an
        # absolute error of a few float32 ulps of the terms, not of the (small) result.
        scale = max(float(np.abs(site[name]).max()) for site in sites)
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-6 * scale)
    # The plain mean of padded deltas would halve slots 4-7, which only site 11 trains.
    b = next(n for n in trained.names if ".lora_B." in n)
    np.testing.assert_allclose(
        got[b][:, 4:], split_flat(plain_round.deltas[11], trained)[b][:, 4:], rtol=1e-6
    )


def test_secure_mean_is_the_per_slot_uniform_mean(plain_round: Round) -> None:
    grid = InProcessGrid(make_client_app(plain_round.config), plain_round.node_configs)
    outcome = SecureAggregation(plain_round.config.secagg).run_round(grid, plain_round.request)
    assert outcome.contributors == list(NODES) and outcome.failures == {}
    trained = plain_round.request.trained
    masked = [r for r in grid.received if r.metadata.message_type == f"train.{K.SECAGG_MASKED}"]
    for reply in masked:  # the indicator rides inside the vector; no rank in the clear
        (vector,) = reply.content.array_records[K.SECAGG_ARRAYS].values()
        assert vector.shape == (trained.size + 8,)
        assert K.MET_LORA_RANK not in reply.content.metric_records[K.METRICS]
    expected = _by_hand(plain_round.deltas, dict.fromkeys(NODES, 1.0), trained)
    assert outcome.mean_delta is not None
    got = split_flat(outcome.mean_delta, trained)
    for name in trained.names:
        np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=ATOL)


def test_a_site_of_lower_rank_means_the_same_delta_w(tmp_path: Path) -> None:
    config = tiny_config("classification", tmp_path / "unused.csv", "lora.r=8")
    full = build_model(config.model, config.lora, seed=0)
    small = build_model(config.model, site_lora(config.lora, 4), seed=0)
    rng = np.random.default_rng(0)
    global_flat = rng.standard_normal(full.layout.size).astype(np.float32) * 0.2
    block = slice_to_rank(global_flat, full.layout, 4)
    assert small.layout == with_rank(full.layout, 4)
    set_flat(small.peft_model, small.layout, block)
    set_flat(full.peft_model, full.layout, pad_to_rank(block, full.layout, 4))
    ids = torch.randint(4, 200, (2, 12))
    unscaled = build_model(config.model, replace(config.lora, r=4), seed=0)  # alpha kept at 16
    set_flat(unscaled.peft_model, unscaled.layout, block)
    with torch.no_grad():
        want, got, wrong = (
            m.peft_model.eval()(input_ids=ids).logits for m in (full, small, unscaled)
        )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (wrong - want).abs().max() > 1e-3  # without alpha·r_i/r the site's ΔW doubles


def test_a_bad_rank_is_an_error_reply(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    node_configs = _node_configs(tmp_path)
    node_configs[22][K.NODE_LORA_RANK] = 16
    node_configs[33][K.NODE_LORA_RANK] = "0"
    config = tiny_config(
        "classification", tmp_path / "unused.csv", "lora.r=8", "federation.rounds=1"
    )
    grid = InProcessGrid(make_client_app(config), node_configs)
    federation = Federation(grid, config, RunDir(tmp_path / "run"), Progress())
    with caplog.at_level(logging.ERROR, logger="fedpeft.client.errors"):
        outcome = PlainAggregation().run_round(grid, _request(federation))
    assert outcome.contributors == [11]
    site_log = "\n".join(r.getMessage() for r in caplog.records)
    for node, shown in ((22, "16"), (33, "'0'")):
        # the server gets the fixed code; the site's own log names the value and the fix
        assert outcome.failures[str(node)].startswith(K.ERR_SITE_CONFIG)
        assert f"{K.NODE_LORA_RANK}={shown} is not allowed" in site_log
    assert "[1, 8]" in site_log and "--node-config" in site_log


def test_lower_rank_under_secagg_without_mixed_ranks_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = tiny_config(
        "classification",
        tmp_path / "unused.csv",
        "lora.r=8",
        "federation.rounds=1",
        "secagg.enabled=true",
    )
    grid = InProcessGrid(make_client_app(config), _node_configs(tmp_path))
    federation = Federation(grid, config, RunDir(tmp_path / "run"), Progress())
    with caplog.at_level(logging.ERROR, logger="fedpeft.client.errors"):
        outcome = SecureAggregation(config.secagg).run_round(grid, _request(federation))
    assert outcome.mean_delta is None  # one site left, below the SecAgg+ threshold
    for node in (22, 33):
        assert outcome.failures[str(node)].startswith(K.ERR_SITE_CONFIG)
    assert "secagg.mixed_ranks=true" in "\n".join(r.getMessage() for r in caplog.records)


def test_a_mixed_rank_federation_runs_and_evaluates(tmp_path: Path) -> None:
    config = tiny_config(
        "classification",
        tmp_path / "unused.csv",
        "lora.r=8",
        "strategy=fedsvd",
        "federation.rounds=2",
    )
    grid = InProcessGrid(make_client_app(config), _node_configs(tmp_path))
    federation = Federation(grid, config, RunDir(tmp_path / "run"), Progress())
    start = federation.global_flat.copy()
    federation.run()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["updated"] for r in rows] == [True, True]
    assert all(r["sites_replied"] == 3 and r["eval_sites"] == 3 for r in rows)
    assert not np.allclose(federation.global_flat, start)


def test_server_rejects_a_rank_the_delta_contradicts(plain_round: Round) -> None:
    trained = plain_round.request.trained
    reply = plain_round.replies[33]  # rank 2: its delta is zero in slots 2-7
    checked = check_train_reply(reply, trained)
    assert reported_rank(reply, checked, trained) == 2
    stray = checked.delta.copy()
    stray[element_slots(trained) == 5] = 0.1
    with pytest.raises(ReplyRejected, match="non-zero values in rank slots >= 2"):
        reported_rank(reply, replace(checked, delta=stray), trained)
    reply.content.metric_records[K.METRICS][K.MET_LORA_RANK] = 9
    with pytest.raises(ReplyRejected, match=r"lora-rank=9 is not an int in \[1, 8\]"):
        reported_rank(reply, checked, trained)
    reply.content.metric_records[K.METRICS][K.MET_LORA_RANK] = 2


def test_a_head_round_of_sites_of_lower_rank_is_aggregated(tmp_path: Path) -> None:
    # a head round trains no LoRA rank slot: the ranks the sites report do not apply
    config = tiny_config(
        "classification",
        tmp_path / "unused.csv",
        "lora.r=8",
        "strategy=fedavg",
        "federation.rounds=2",
        "train.trainable=[head,lora]",
    )
    grid = InProcessGrid(make_client_app(config), _node_configs(tmp_path))
    Federation(grid, config, RunDir(tmp_path / "run"), Progress()).run()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["updated"] for r in rows] == [True, True]
    assert all(r["sites_replied"] == 3 and r["sites_failed"] == 0 for r in rows)
