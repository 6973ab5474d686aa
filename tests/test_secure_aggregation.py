"""Secure aggregation (SecAgg+) over Flower messages: exact sums, no float uploads, drops.

The in-process grid runs the real ClientApp handlers; each site's true delta comes from a
plain train exchange of the same round (training is deterministic given the round and site),
so the secure mean can be compared with the plain uniform mean of those deltas.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from numpy.typing import NDArray

from fedpeft import constants as K
from fedpeft.client.app import make_client_app
from fedpeft.config import FedPeftConfig, SecAggConfig
from fedpeft.model import AdapterLayout, build_model
from fedpeft.privacy import masking, shamir
from fedpeft.privacy.secagg import SecAggConfigError, SecAggServer
from fedpeft.privacy.secagg_messages import CIPHERTEXT_BYTES
from fedpeft.privacy.secagg_wire import encode
from fedpeft.server.aggregation import EvalRequest, PlainAggregation, RoundOutcome, RoundRequest
from fedpeft.server.federation import Federation
from fedpeft.server.progress import Progress
from fedpeft.server.rundir import RunDir
from fedpeft.server.secure_aggregation import SecureAggregation, payload_bytes
from fedpeft.testing import InProcessGrid, Tamper, write_classification_csv
from tests.conftest import tiny_config

NODES = (11, 22, 33)
SIZES = {11: 60, 22: 90, 33: 120}  # unequal, so the uniform and weighted means differ
STAGES = (K.SECAGG_SETUP, K.SECAGG_SHARE_KEYS, K.SECAGG_MASKED, K.SECAGG_UNMASK)
ATOL = 1e-6  # quantisation error per element is < 1 / scale ≈ 1.4e-9 for clip 1 and 3 sites


@dataclass
class Sites:
    """Three CSV sites, a secure config, the round-1 request and each site's true delta."""

    config: FedPeftConfig
    node_configs: dict[int, dict[str, Any]]
    start: NDArray[np.float32]
    trained: AdapterLayout
    deltas: dict[int, NDArray[np.float32]]
    num_examples: dict[int, int]
    tmp: Path

    def grid(
        self,
        tamper: Tamper | None = None,
        cls: type[InProcessGrid] = InProcessGrid,
        config: FedPeftConfig | None = None,
    ) -> InProcessGrid:
        return cls(make_client_app(config or self.config), self.node_configs, tamper=tamper)

    def request(self, round_number: int = 1, nodes: Iterable[int] = NODES) -> RoundRequest:
        return RoundRequest(
            round_number=round_number,
            nodes=list(nodes),
            global_flat=self.start,
            trained=self.trained,
            min_sites=2,
            timeout=60.0,
            federation_id="secure",
        )

    def mean(self, nodes: Iterable[int]) -> NDArray[np.float64]:
        return np.mean([self.deltas[n].astype(np.float64) for n in nodes], axis=0)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Sites:
    tmp = tmp_path_factory.mktemp("secagg")
    paths = {n: write_classification_csv(tmp / f"site{n}.csv", n=SIZES[n], seed=n) for n in NODES}
    config = tiny_config(
        "classification",
        paths[11],
        "federation.rounds=1",
        "strategy.server_lr=1.0",
        "secagg.enabled=true",
    )
    node_configs: dict[int, dict[str, Any]] = {
        n: {K.NODE_DATA_PATH: str(p), K.NODE_PRIVACY_REQUIRED: "false"}  # a plain run
        for n, p in paths.items()
    }
    # The same training with replies in the clear (a site under secure aggregation sends no N).
    plain = replace(config, secagg=replace(config.secagg, enabled=False))
    grid = InProcessGrid(make_client_app(plain), node_configs)
    federation = Federation(grid, config, RunDir(tmp / "unused"), Progress())
    trained = federation.strategy.trained_layout()
    request = RoundRequest(
        round_number=1,
        nodes=list(NODES),
        global_flat=federation.global_flat,
        trained=trained,
        min_sites=2,
        timeout=60.0,
        federation_id="secure",
    )
    PlainAggregation().run_round(grid, request)  # the same training, replies in the clear
    deltas, counts = {}, {}
    for reply in grid.received:
        node = reply.metadata.src_node_id
        deltas[node] = reply.content.array_records[K.ARRAYS][K.ARRAY_FLAT].numpy()
        counts[node] = int(reply.content.metric_records[K.METRICS][K.MET_NUM_EXAMPLES])  # type: ignore[arg-type]
    assert sorted(deltas) == list(NODES)
    return Sites(
        config=config,
        node_configs=node_configs,
        start=federation.global_flat.copy(),
        trained=trained,
        deltas=deltas,
        num_examples=counts,
        tmp=tmp,
    )


def _run(sites: Sites, grid: InProcessGrid, config: SecAggConfig | None = None) -> RoundOutcome:
    return SecureAggregation(config or sites.config.secagg).run_round(grid, sites.request())


def _is_stage(reply: Message, stage: str) -> bool:
    return reply.metadata.message_type == f"train.{stage}"


def _overhead_up(num_neighbours: int, survivors: int) -> int:
    """Bytes a site sends besides its masked vector: 2 keys, k ciphertexts, its seed shares."""
    keys = 2 * masking.KEY_BYTES  # two X25519 public keys
    return keys + num_neighbours * CIPHERTEXT_BYTES + survivors * shamir.SHARE_BYTES


# --- (a) the secure mean is the plain uniform mean --------------------------------------------


def test_global_update_is_the_uniform_mean_of_the_deltas(sites: Sites) -> None:
    grid = sites.grid()
    federation = Federation(grid, sites.config, RunDir(sites.tmp / "run-a"), Progress())
    np.testing.assert_array_equal(federation.global_flat, sites.start)
    federation.run()
    uniform = sites.mean(NODES)
    np.testing.assert_allclose(federation.global_flat, sites.start + uniform, rtol=0, atol=ATOL)
    weighted = np.average(
        [sites.deltas[n] for n in NODES], axis=0, weights=[sites.num_examples[n] for n in NODES]
    )
    assert len(set(sites.num_examples.values())) == 3
    assert np.abs(weighted - uniform).max() > 100 * ATOL  # the test tells the two apart

    (row,) = [json.loads(line) for line in (sites.tmp / "run-a" / "metrics.jsonl").open()]
    assert row["secagg"] is True and row["updated"] is True
    assert row["sites_replied"] == 3 and row["sites_failed"] == row["sites_dropped"] == 0
    size = sites.trained.size
    assert row["bytes_up"] == 3 * (4 * size + _overhead_up(2, 3))
    assert set(row["site_metrics"]) == {str(n) for n in NODES}


def test_secure_evaluation_is_the_uniform_mean_of_the_sites_figures(sites: Sites) -> None:
    grid = sites.grid()
    federation = Federation(grid, sites.config, RunDir(sites.tmp / "run-eval"), Progress())
    federation.run()
    (row,) = [json.loads(line) for line in (sites.tmp / "run-eval" / "metrics.jsonl").open()]
    # what each site would have said in the clear about the same adapter
    plain = replace(sites.config, secagg=replace(sites.config.secagg, enabled=False))
    plain_grid = InProcessGrid(make_client_app(plain), sites.node_configs)
    request = EvalRequest(
        round_number=1,
        nodes=list(NODES),
        global_flat=federation.global_flat,
        broadcast=None,
        federation_id=federation.federation_id,
        timeout=60.0,
        min_sites=2,
    )
    PlainAggregation().evaluate(plain_grid, request)
    figures = [r.content.metric_records[K.METRICS] for r in plain_grid.received]
    accuracies = [float(f[K.MET_EVAL_ACCURACY]) for f in figures]  # type: ignore[arg-type]
    losses = [float(f[K.MET_EVAL_LOSS]) for f in figures]  # type: ignore[arg-type]
    assert len(set(accuracies)) > 1  # the sites differ, so a mean is a real check
    assert row["eval_sites"] == 3
    assert row["eval_accuracy"] == pytest.approx(np.mean(accuracies), abs=1e-6)
    assert row["eval_loss"] == pytest.approx(np.mean(losses), abs=1e-6)
    # and no site said its own figures: the evaluation's masked replies are 3 uint32 values
    evaluation = [
        r
        for r in grid.received
        if _is_stage(r, K.SECAGG_MASKED) and K.LAYOUT not in r.content.config_records
    ][-3:]
    for reply in evaluation:
        (vector,) = reply.content.array_records[K.SECAGG_ARRAYS].values()
        assert vector.dtype == "uint32" and vector.shape == (3,)
        assert dict(reply.content.metric_records[K.METRICS]) == {}


# --- (b) what the server receives -----------------------------------------------------------


def test_server_receives_only_masked_uint32_vectors(sites: Sites) -> None:
    grid = sites.grid()
    outcome = _run(sites, grid)
    assert outcome.contributors == list(NODES)
    size = sites.trained.size
    masked = [r for r in grid.received if _is_stage(r, K.SECAGG_MASKED)]
    assert len(masked) == 3 and len(grid.received) == 12  # four stages × three sites
    for reply in grid.received:  # no stage carries a float array, nor the client's state
        for record in reply.content.array_records.values():
            assert all(array.dtype == "uint32" for array in record.values())
        assert K.SECAGG_STATE not in reply.content
    for reply in masked:
        node = reply.metadata.src_node_id
        assert list(reply.content.array_records) == [K.SECAGG_ARRAYS]
        (vector,) = reply.content.array_records[K.SECAGG_ARRAYS].values()
        values = vector.numpy()
        assert values.dtype == np.uint32 and values.shape == (size,)
        upload = RecordDict({"v": reply.content.array_records[K.SECAGG_ARRAYS]})
        assert payload_bytes(upload) == 4 * size  # 4 bytes per parameter
        corr = np.corrcoef(values.astype(np.float64), sites.deltas[node].astype(np.float64))[0, 1]
        assert abs(corr) < 0.15  # ~N(0, 1/size): masked values say nothing about the delta
        metrics = reply.content.metric_records[K.METRICS]
        # no per-site figure that depends on the data: no train loss, no example count
        assert K.MET_TRAIN_LOSS not in metrics and K.MET_NUM_EXAMPLES not in metrics
    for node in NODES:  # the round is over: no keys or shares left in the sites' state
        assert K.SECAGG_STATE not in grid.contexts[node].state


def test_client_state_between_stages_stays_in_context_state(sites: Sites) -> None:
    grid = sites.grid(tamper=lambda node, r: None if _is_stage(r, K.SECAGG_SHARE_KEYS) else r)
    _run(sites, grid)  # aborts after setup: every site holds its keys in context.state
    sent = [v for r in grid.received for v in r.content.config_records[K.SECAGG].values()]
    for node in NODES:
        state = grid.contexts[node].state.config_records[K.SECAGG_STATE][K.SECAGG_STATE_CLIENT]
        assert isinstance(state, bytes)
        for key in ("encryption_sk", "mask_sk"):
            secret = bytes.fromhex(json.loads(state)[key])
            assert len(secret) == 32
            assert not any(isinstance(v, bytes) and secret in v for v in sent)


# --- (c) dropouts at every stage ------------------------------------------------------------


@pytest.mark.parametrize("stage", STAGES)
def test_a_site_dropping_at_any_stage_leaves_the_exact_mean(sites: Sites, stage: str) -> None:
    grid = sites.grid(tamper=lambda node, r: None if node == 33 and _is_stage(r, stage) else r)
    outcome = _run(sites, grid)
    # After the masked stage its vector is in the sum; its neighbours' shares unmask it.
    expected = list(NODES) if stage == K.SECAGG_UNMASK else [11, 22]
    assert outcome.contributors == expected and outcome.failures == {}
    assert outcome.dropped == ([] if stage == K.SECAGG_UNMASK else [33])
    assert outcome.mean_delta is not None and outcome.mean_delta.dtype == np.float32
    np.testing.assert_allclose(outcome.mean_delta, sites.mean(expected), rtol=0, atol=ATOL)
    assert set(outcome.site_metrics) == {str(n) for n in expected}


# --- (d) too many drops ---------------------------------------------------------------------


def test_too_many_drops_abandon_the_round_and_the_next_one_runs(
    sites: Sites, caplog: pytest.LogCaptureFixture
) -> None:
    def tamper(node: int, reply: Message) -> Message | None:
        if node == 11 or not _is_stage(reply, K.SECAGG_SHARE_KEYS):
            return reply
        round_id = int(reply.content.config_records[K.SECAGG]["round_id"])  # type: ignore[arg-type]
        return None if round_id & 0xFFFFFFFF == 1 else reply  # drop 22 and 33 in round 1

    config = replace(sites.config, federation=replace(sites.config.federation, rounds=2))
    run_dir = sites.tmp / "run-d"
    federation = Federation(sites.grid(tamper, config=config), config, RunDir(run_dir), Progress())
    with caplog.at_level(logging.WARNING):
        federation.run()
    abandoned = [r.getMessage() for r in caplog.records if "abandoned" in r.getMessage()]
    assert len(abandoned) == 1 and abandoned[0].startswith("round 1 abandoned: ")
    assert "fewer than threshold 2" in abandoned[0]
    first, second = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    assert not first["updated"] and first["sites_replied"] == 0 and first["sites_dropped"] == 2
    assert second["updated"] and second["sites_replied"] == 3
    round_one = np.load(run_dir / "checkpoints" / "round-0001" / "global.npy")
    np.testing.assert_array_equal(round_one, sites.start)
    assert not np.allclose(federation.global_flat, sites.start)


def test_abandoned_round_outcome(sites: Sites) -> None:
    grid = sites.grid(
        tamper=lambda node, r: None if node != 11 and _is_stage(r, K.SECAGG_MASKED) else r
    )
    outcome = _run(sites, grid)
    assert outcome.mean_delta is None and outcome.contributors == []
    assert outcome.dropped == [22, 33] and outcome.failures == {}


# --- (e) malformed, duplicated and stale replies --------------------------------------------


class DuplicatingGrid(InProcessGrid):
    """Delivers site 22's masked reply twice."""

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(super().pull_messages(message_ids))
        return replies + [
            r for r in replies if r.metadata.src_node_id == 22 and _is_stage(r, K.SECAGG_MASKED)
        ]


def _attack(kind: str, sites: Sites) -> Tamper:
    def tamper(node: int, reply: Message) -> Message | None:
        if node != 33:
            return reply
        fields = reply.content.config_records.get(K.SECAGG)
        if kind in ("wrong_length", "float_vector") and _is_stage(reply, K.SECAGG_MASKED):
            vector = reply.content.array_records[K.SECAGG_ARRAYS]["vector"].numpy()
            bad = np.append(vector, np.uint32(7)) if kind == "wrong_length" else sites.deltas[33]
            reply.content.array_records[K.SECAGG_ARRAYS] = ArrayRecord({"vector": Array(bad)})
        elif kind == "wrong_round" and _is_stage(reply, K.SECAGG_SHARE_KEYS):
            assert fields is not None
            fields["round_id"] = int(fields["round_id"]) + 1  # type: ignore[arg-type]
        elif kind == "impersonation" and _is_stage(reply, K.SECAGG_SETUP):
            assert fields is not None
            fields["node_id"] = 22
        elif kind == "missing_record" and _is_stage(reply, K.SECAGG_SETUP):
            del reply.content.config_records[K.SECAGG]
        return reply

    return tamper


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("wrong_length", "rejected at secagg_masked: masked vector from node 33 has shape"),
        (
            "float_vector",
            "rejected at secagg_masked: array 'vector' from node 33 has dtype float32",
        ),
        ("wrong_round", "rejected at secagg_share_keys: EncryptedShares from node 33 is for round"),
        (
            "impersonation",
            "rejected at secagg_setup: a reply sent by node 33 claims to come from node 22",
        ),
        ("missing_record", "rejected at secagg_setup: the reply of node 33 lacks the 'secagg'"),
    ],
)
def test_bad_reply_is_rejected_and_the_round_goes_on(sites: Sites, kind: str, reason: str) -> None:
    outcome = _run(sites, sites.grid(tamper=_attack(kind, sites)))
    assert list(outcome.failures) == ["33"] and outcome.failures["33"].startswith(reason)
    assert outcome.contributors == [11, 22] and outcome.dropped == []
    assert outcome.mean_delta is not None
    np.testing.assert_allclose(outcome.mean_delta, sites.mean([11, 22]), rtol=0, atol=ATOL)


def test_wrong_length_reason_names_the_expected_shape(sites: Sites) -> None:
    outcome = _run(sites, sites.grid(tamper=_attack("wrong_length", sites)))
    assert f"expected uint32 of shape ({sites.trained.size},)" in outcome.failures["33"]


def test_duplicated_reply_is_ignored(sites: Sites, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        outcome = _run(sites, sites.grid(cls=DuplicatingGrid))
    assert outcome.contributors == list(NODES) and outcome.failures == {}
    assert outcome.mean_delta is not None
    np.testing.assert_allclose(outcome.mean_delta, sites.mean(NODES), rtol=0, atol=ATOL)
    assert any("ignored a second reply of node 22" in r.getMessage() for r in caplog.records)


def test_site_error_reply_is_recorded(sites: Sites) -> None:
    node_configs = dict(sites.node_configs)
    node_configs[33] = {
        K.NODE_DATA_PATH: str(sites.tmp / "gone.csv"),
        K.NODE_PRIVACY_REQUIRED: "false",
    }
    grid = InProcessGrid(make_client_app(sites.config), node_configs)
    outcome = _run(sites, grid)
    # The site's fixed code and message, as PlainAggregation records it (the privacy report
    # recognises budget refusals by the code); the detail stays in the site's log.
    assert outcome.contributors == [11, 22]
    assert outcome.failures["33"] == f"{K.ERR_SITE_CONFIG}: {K.SITE_ERRORS[K.ERR_SITE_CONFIG][1]}"
    assert outcome.mean_delta is not None
    np.testing.assert_allclose(outcome.mean_delta, sites.mean([11, 22]), rtol=0, atol=ATOL)


# --- the site refuses requests out of protocol ----------------------------------------------


def _send(grid: InProcessGrid, node: int, stage: str, fields: dict[str, Any]) -> Message:
    content = RecordDict({K.SECAGG: ConfigRecord(fields)})
    (reply,) = grid.send_and_receive(
        [Message(content=content, dst_node_id=node, message_type=f"train.{stage}")]
    )
    return reply


def _error(reply: Message) -> str:
    assert reply.has_error(), "the site accepted a request it should refuse"
    return str(reply.error.reason)


def test_site_refuses_a_request_for_the_wrong_round_or_stage(
    sites: Sites, caplog: pytest.LogCaptureFixture
) -> None:
    def refused(reply: Message, detail: str) -> bool:
        """The reply is the fixed protocol error; the site's log holds the detail."""
        fixed = f"{K.ERR_PROTOCOL}: {K.SITE_ERRORS[K.ERR_PROTOCOL][1]}"
        return _error(reply) == fixed and detail in caplog.records[-1].getMessage()

    caplog.set_level(logging.ERROR, logger="fedpeft.client.errors")
    grid = sites.grid()
    server = SecAggServer(round_id=5, node_ids=[11, 22], vector_length=sites.trained.size, clip=1.0)
    unmask = {"round_id": 5, "node_id": 11, "survived": [11, 22], "dropped": []}
    reply = _send(grid, 11, K.SECAGG_UNMASK, unmask)
    assert refused(reply, "no secure aggregation round in progress")

    for node, request in server.setup().items():
        reply = _send(grid, node, K.SECAGG_SETUP, dict(encode(request).fields))
        assert not reply.has_error()
    before = grid.contexts[11].state.config_records[K.SECAGG_STATE][K.SECAGG_STATE_CLIENT]
    reply = _send(grid, 11, K.SECAGG_UNMASK, unmask)
    assert refused(reply, "while in stage share_keys")
    stale = {
        "round_id": 4,
        "node_id": 11,
        "encryption_keys.nodes": [],
        "encryption_keys.values": [],
        "mask_keys.nodes": [],
        "mask_keys.values": [],
    }
    reply = _send(grid, 11, K.SECAGG_SHARE_KEYS, stale)
    assert refused(reply, "is for round 4, but round 5 is in progress")
    reply = _send(grid, 11, K.SECAGG_SHARE_KEYS, {"round_id": 5})
    assert refused(reply, "")
    after = grid.contexts[11].state.config_records[K.SECAGG_STATE][K.SECAGG_STATE_CLIENT]
    assert after == before  # refused requests leave the round's state as it was


# --- configuration and round ids ------------------------------------------------------------


def test_invalid_settings_are_reported_together() -> None:
    with pytest.raises(SecAggConfigError) as info:
        SecureAggregation(SecAggConfig(clip_range=0.0, threshold=0, stage_timeout=-1.0))
    message = str(info.value)
    assert "secagg.clip_range=0.0" in message and "secagg.threshold=0" in message
    assert "secagg.stage_timeout=-1.0" in message


def test_one_sampled_site_is_a_configuration_error(sites: Sites) -> None:
    with pytest.raises(SecAggConfigError, match="federation.min_sites >= 2"):
        SecureAggregation(sites.config.secagg).run_round(sites.grid(), sites.request(nodes=[11]))


def test_round_ids_differ_between_rounds_and_runs() -> None:
    first, second = SecureAggregation(SecAggConfig()), SecureAggregation(SecAggConfig())
    ids = {first.round_id(1), first.round_id(2), second.round_id(1), second.round_id(2)}
    assert len(ids) == 4 and all(0 <= i < 2**64 for i in ids)


# --- the real engine ------------------------------------------------------------------------


@pytest.mark.slow
def test_secure_simulation_through_flowers_engine(cls_csv: Path, tmp_path: Path) -> None:
    from fedpeft.simulation import simulate

    config = tiny_config(
        "classification", cls_csv, "secagg.enabled=true", f"output_dir={tmp_path / 'run'}"
    )
    result = simulate(config)
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").open()]
    assert [r["round"] for r in rows] == [1, 2]
    size = build_model(config.model, config.lora, seed=config.seed).layout.size
    for row in rows:
        assert row["secagg"] is True and row["updated"] is True
        assert row["sites_sampled"] == row["sites_replied"] == 3
        assert row["sites_failed"] == row["sites_dropped"] == 0
        assert row["bytes_up"] == 3 * (4 * size + _overhead_up(2, 3))
        # no per-site train loss under secure aggregation; evaluation is a secure sum
        assert row["train_loss"] is None and np.isfinite(row["eval_loss"])
        assert all(K.MET_NUM_EXAMPLES not in m for m in row["site_metrics"].values())
