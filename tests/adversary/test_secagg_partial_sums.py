"""A deviating coordinator against SecAgg+: it must never unmask a partial sum.

The coordinator follows the message flow but chooses who "drops" (it simply does not forward
some replies). Pairwise masks cancel only within connected groups of survivors, so if it
splits the survivors ``U3`` into groups with no graph edge between them, each group's sum
would be unmaskable on its own. These tests drive the real :class:`SecAggServer` and
:class:`SecAggClient` state machines and check that a round either ends abandoned before any
share is requested, or releases one sum over a connected set of at least
``max(threshold, min_sum)`` sites — the exact sum of exactly those sites.

The ring order of the neighbour graph is secret from the sites, not from the coordinator,
which builds the graph; the ``known_ring`` fixture makes it the order of ``node_ids`` so the
tests can aim at it as an attacker would.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from flwr.app import Message
from numpy.typing import NDArray

from fedpeft import constants as K
from fedpeft.client.app import make_client_app
from fedpeft.privacy import masking, secagg_messages, shamir
from fedpeft.privacy.masking import pair_mask
from fedpeft.privacy.quantize import quantize
from fedpeft.privacy.secagg import (
    SecAggAbort,
    SecAggClient,
    SecAggProtocolError,
    SecAggResult,
    SecAggServer,
    Stage,
    UnmaskRequest,
)
from fedpeft.privacy.secagg_messages import share_holders
from fedpeft.server.aggregation import RoundRequest
from fedpeft.server.federation import Federation
from fedpeft.server.progress import Progress
from fedpeft.server.rundir import RunDir
from fedpeft.server.secure_aggregation import SecureAggregation
from fedpeft.testing import InProcessGrid, write_classification_csv
from tests.conftest import tiny_config

STAGES = ("setup", "share_keys", "collect", "unmask")
TRIALS = 40  # about 5 s on one core
Graph = Mapping[int, Sequence[int]]


@pytest.fixture
def known_ring(monkeypatch: pytest.MonkeyPatch) -> None:
    """Build every neighbour graph on the ring in the order of ``node_ids``."""

    class InOrder:
        def shuffle(self, order: list[int]) -> None:
            pass

    monkeypatch.setattr(secagg_messages, "secrets", SimpleNamespace(SystemRandom=InOrder))


def components(graph: Graph, nodes: Iterable[int]) -> list[set[int]]:
    """Connected components of the graph induced on ``nodes`` (the test's own reckoning)."""
    left, found = set(nodes), []
    while left:
        component, frontier = set(), [min(left)]
        while frontier:
            node = frontier.pop()
            if node in component:
                continue
            component.add(node)
            frontier.extend(j for j in graph[node] if j in left and j not in component)
        left -= component
        found.append(component)
    return found


def arc(ring: Sequence[int], start: int, length: int) -> set[int]:
    """``length`` consecutive ring positions from ``start``."""
    return {ring[(start + i) % len(ring)] for i in range(length)}


@dataclass
class Coordinator:
    """Runs one round with real clients; ``drops[stage]`` are replies it does not forward.

    Records who was asked what, so tests can check what the server could have learned.
    """

    ids: Sequence[int]
    length: int = 8
    num_neighbours: int | None = None
    threshold: int | None = None
    min_sum: int = 0
    server: SecAggServer = field(init=False)
    clients: dict[int, SecAggClient] = field(init=False)
    updates: dict[int, NDArray[np.float32]] = field(init=False)
    asked: dict[str, set[int]] = field(default_factory=lambda: {s: set() for s in STAGES})
    masked: set[int] = field(default_factory=set)  # U3: masked vectors the server summed
    vectors: dict[int, NDArray[np.uint32]] = field(default_factory=dict)  # what it received
    mask_keys: dict[int, bytes] = field(default_factory=dict)  # public, routed by the server
    aborted_at: str | None = None
    abort_reason: str = ""

    def __post_init__(self) -> None:
        self.server = SecAggServer(
            round_id=7,
            node_ids=list(self.ids),
            vector_length=self.length,
            clip=1.0,
            num_neighbours=self.num_neighbours,
            threshold=self.threshold,
            min_sum=self.min_sum,
        )
        self.clients = {node: SecAggClient(node_id=node) for node in self.ids}
        rng = np.random.default_rng(len(self.ids))
        self.updates = {
            node: rng.uniform(-1, 1, self.length).astype(np.float32) for node in self.ids
        }

    def run(self, drops: Mapping[str, Collection[int]]) -> SecAggResult | None:
        """The round's result, or None if it was abandoned (``aborted_at`` says where)."""
        server, stage = self.server, "setup"
        try:
            for node, setup in server.setup().items():
                self.asked["setup"].add(node)
                if node not in drops.get("setup", ()):
                    keys = self.clients[node].setup(setup)
                    self.mask_keys[node] = keys.mask_key
                    server.receive_public_keys(keys)
            stage = "share_keys"
            for node, peers in server.share_keys().items():
                self.asked["share_keys"].add(node)
                if node not in drops.get("share_keys", ()):
                    server.receive_encrypted_shares(self.clients[node].share_keys(peers))
            stage = "collect"
            for node, request in server.collect_masked_vectors().items():
                self.asked["collect"].add(node)
                if node not in drops.get("collect", ()):
                    rng = np.random.default_rng(node)  # the rounding randomness, reproducible
                    reply = self.clients[node].collect_masked_vectors(
                        request, update=self.updates[node], rng=rng
                    )
                    server.receive_masked_vector(reply)
                    self.masked.add(node)
                    self.vectors[node] = reply.vector
            stage = "unmask"
            for node, unmask in server.unmask().items():
                self.asked["unmask"].add(node)
                if node not in drops.get("unmask", ()):
                    server.receive_unmask_shares(self.clients[node].unmask(unmask))
            stage = "result"
            return server.result()
        except SecAggAbort as error:
            self.aborted_at, self.abort_reason = stage, str(error)
            return None

    def expected_quantized(self, included: Iterable[int]) -> NDArray[np.uint32]:
        total = np.zeros(self.length, dtype=np.uint32)
        for node in included:
            rng = np.random.default_rng(node)
            total += quantize(self.updates[node], self.server.quantization, rng=rng).values
        return total

    def check_released(self, result: SecAggResult) -> None:
        """A released sum: one connected group of survivors, large enough, exact."""
        graph, included = self.server.graph, set(result.included)
        assert included == self.masked  # the sum covers exactly the vectors summed
        assert len(components(graph, included)) == 1
        assert len(included) >= max(self.server.threshold, self.min_sum)
        assert result.dropped == tuple(sorted(set(self.ids) - included))
        np.testing.assert_array_equal(result.quantized_total, self.expected_quantized(included))

    def unmask_group_if_given_shares(self, group: set[int]) -> NDArray[np.uint32]:
        """What the server could compute for ``group`` if the survivors answered unmask.

        Asks copies of the survivors' clients for the shares an UnmaskRequest would have
        asked for, reconstructs the group's self-mask seeds and the dropped neighbours' mask
        keys, and removes those masks from the group's own masked vectors.
        """
        graph, t, survivors = self.server.graph, self.server.threshold, self.masked
        dropped = self.asked["collect"] - survivors  # masked with, then gone
        seeds: dict[int, list[shamir.Share]] = {}
        keys: dict[int, list[shamir.Share]] = {}
        for node in sorted(survivors):
            copy = SecAggClient.from_state(self.clients[node].to_state())
            live = [j for j in graph[node] if j in survivors]
            reply = copy.unmask(
                UnmaskRequest(
                    7,
                    node,
                    share_holders(node, live),
                    tuple(j for j in graph[node] if j in dropped),
                )
            )
            for owner, data in reply.self_mask_shares.items():
                seeds.setdefault(owner, []).append(shamir.Share.from_bytes(data))
            for owner, data in reply.mask_key_shares.items():
                keys.setdefault(owner, []).append(shamir.Share.from_bytes(data))
        total = np.zeros(self.length, dtype=np.uint32)
        for node in group:
            seed = shamir.reconstruct(seeds[node], threshold=t)
            total += self.vectors[node] - masking.prg_uint32(seed, self.length)
            for gone in (j for j in graph[node] if j in dropped):
                secret = shamir.reconstruct(keys[gone], threshold=t)
                mask = pair_mask(
                    secret, self.mask_keys[node], round_id=7, a=gone, b=node, length=self.length
                )
                if node < gone:  # the survivor added the mask: remove it
                    total -= mask
                else:
                    total += mask
        return total

    def check_no_share_requested(self) -> None:
        """No UnmaskRequest went out: every client that masked still holds its shares."""
        assert not self.asked["unmask"]
        assert self.server.stage is Stage.ABORTED
        for node in self.masked:
            assert self.clients[node].stage is Stage.UNMASK
        with pytest.raises(SecAggProtocolError, match="stage aborted"):
            self.server.result()


# --- (a) the reported attack: 26 sites, two arcs of 6 dropped ------------------------------


@pytest.mark.usefixtures("known_ring")
def test_two_dropped_arcs_that_split_the_survivors_abandon_the_round() -> None:
    ids = [100 + i for i in range(26)]
    # The setting of the report: k = 12, t = 7 (the former defaults for 26 sites).
    round_ = Coordinator(ids, num_neighbours=12, threshold=7)
    gone = arc(ids, 0, 6) | arc(ids, 13, 6)  # two runs of k / 2: positions 0-5 and 13-18
    survivors = set(ids) - gone
    groups = components(round_.server.graph, survivors)
    assert sorted(len(g) for g in groups) == [7, 7]  # the dangerous configuration
    result = round_.run({"collect": gone})
    assert result is None and round_.aborted_at == "unmask"
    assert "form 2 separate groups (sizes [7, 7])" in round_.abort_reason
    assert round_.masked == survivors  # the server holds both groups' masked vectors ...
    round_.check_no_share_requested()  # ... and was given nothing to unmask them with.
    # Had it asked, each group's own sum would have come out exactly: the refusal matters.
    for group in groups:
        leaked = round_.unmask_group_if_given_shares(group)
        np.testing.assert_array_equal(leaked, round_.expected_quantized(group))


@pytest.mark.usefixtures("known_ring")
@pytest.mark.parametrize("run_length", [4, 6])
def test_with_the_default_graph_two_dropped_arcs_cannot_split_the_survivors(
    run_length: int,
) -> None:
    ids = [100 + i for i in range(26)]
    round_ = Coordinator(ids)  # defaults for 26 sites: k = 18, t = 10
    assert (round_.server.num_neighbours, round_.server.threshold) == (18, 10)
    gone = arc(ids, 0, run_length) | arc(ids, 13, run_length)  # gaps < k / 2 = 9
    assert len(components(round_.server.graph, set(ids) - gone)) == 1
    result = round_.run({"collect": gone})
    if run_length == 4:  # every secret keeps t holders: one sum over all 18 survivors
        assert result is not None
        round_.check_released(result)
        assert len(result.included) == 18
    else:  # the sites next to both gaps keep only 9 < t holders: abandoned, nothing asked
        assert result is None and "fewer than threshold 10" in round_.abort_reason
        round_.check_no_share_requested()


@pytest.mark.usefixtures("known_ring")
def test_a_split_before_masking_asks_only_the_largest_group_to_mask() -> None:
    ids = [100 + i for i in range(26)]
    round_ = Coordinator(ids, num_neighbours=12, threshold=7)
    gone = arc(ids, 6, 6) | arc(ids, 19, 6)  # leaves arcs 0-5 + 25 (7 sites) and 12-18 (7)
    result = round_.run({"share_keys": gone})
    low, high = arc(ids, 25, 7), arc(ids, 12, 7)
    assert 100 in low  # the tie goes to the group with the smallest node id
    assert round_.asked["collect"] == low  # the other group never trains or masks
    assert result is not None
    round_.check_released(result)
    assert set(result.included) == low and not high & set(result.included)


# --- (b) 3 sites, min_sum 3: one dropout means no sum at all -------------------------------


@pytest.mark.parametrize("stage", ["setup", "share_keys", "collect"])
def test_three_sites_with_min_sum_three_release_nothing_after_one_dropout(stage: str) -> None:
    ids = [11, 22, 33]
    round_ = Coordinator(ids, min_sum=3)
    assert round_.server.min_included == 3
    result = round_.run({stage: {33}})
    assert result is None
    assert "fewer than min_sum 3" in round_.abort_reason
    # The round ends at the next transition: before anyone masks if 33 left before masking.
    next_stage = {"setup": "share_keys", "share_keys": "collect", "collect": "unmask"}
    assert round_.aborted_at == next_stage[stage]
    if stage == "collect":
        assert round_.masked == {11, 22}  # two vectors summed, never unmasked
    else:
        assert not round_.asked["collect"]  # nobody was asked to train and mask
    round_.check_no_share_requested()


def test_three_sites_with_min_sum_three_and_no_dropout_release_the_sum() -> None:
    round_ = Coordinator([11, 22, 33], min_sum=3)
    result = round_.run({})
    assert result is not None
    round_.check_released(result)


def test_min_sum_above_the_participants_abandons_the_round_at_setup() -> None:
    round_ = Coordinator([11, 22, 33], min_sum=4)
    assert round_.run({}) is None and round_.aborted_at == "setup"
    assert not round_.asked["setup"]


# --- (c) Monte Carlo: random sizes, graphs, dropouts and stages -----------------------------


def _random_drops(rng: random.Random, ring: Sequence[int], k: int) -> dict[str, set[int]]:
    """A drop pattern: the split attack, arcs at random stages, or scattered drops."""
    drops: dict[str, set[int]] = {stage: set() for stage in STAGES}
    n, mode = len(ring), rng.choice(["split", "arcs", "scattered"])
    if mode == "split":  # two runs of >= k/2 that cut the ring in two, at a random stage
        first, second = rng.randrange(n), rng.randint(n // 3, 2 * n // 3)
        stage = rng.choice(["share_keys", "collect", "collect"])
        for start in (first, first + second):
            drops[stage] |= arc(ring, start, k // 2 + rng.randint(0, 1))
    elif mode == "arcs":
        for _ in range(rng.randint(1, 3)):
            start, length = rng.randrange(n), rng.randint(1, k // 2 + 1)
            drops[rng.choice(STAGES)] |= arc(ring, start, length)
    for node in ring:
        if rng.random() < (0.08 if mode == "scattered" else 0.02):
            drops[rng.choice(STAGES)].add(node)
    return drops


@pytest.mark.usefixtures("known_ring")
def test_every_completed_round_is_one_connected_exact_sum_of_enough_sites() -> None:
    rng = random.Random(20201109)
    outcomes = {"released": 0, "split refused": 0, "other abort": 0}
    for _ in range(TRIALS):
        n = rng.randint(10, 64)
        ids = rng.sample(range(1, 2**16), n)  # the ring order is this random order
        # Sparse graphs split easily; the defaults (k = 8..24 here) only below 32 nodes,
        # where they are cheap (at 64 nodes k = 44 costs seconds per round).
        k = None if n < 32 and rng.random() < 0.3 else rng.choice([4, 6, 8, 10])
        min_sum = rng.choice([0, 0, rng.randint(2, n)])
        round_ = Coordinator(ids, num_neighbours=k, min_sum=min_sum)
        server = round_.server
        drops = _random_drops(rng, ids, server.num_neighbours)
        result = round_.run(drops)
        graph, t, survivors = server.graph, server.threshold, round_.masked
        # Whoever was asked to mask formed one connected group of nodes with t holders each.
        asked = round_.asked["collect"]
        if asked:
            assert len(components(graph, asked)) == 1
            assert all(sum(j in asked for j in graph[i]) + 1 >= t for i in asked)
            assert len(asked) >= server.min_included
        # Shares were requested only for one connected group of enough survivors.
        if round_.asked["unmask"]:
            assert len(components(graph, survivors)) == 1
            assert len(survivors) >= server.min_included
        if result is not None:
            round_.check_released(result)
            outcomes["released"] += 1
        elif round_.aborted_at == "unmask":  # refused for one of the stated reasons, not idly
            round_.check_no_share_requested()
            split = len(components(graph, survivors)) > 1
            small = len(survivors) < server.min_included
            owners = survivors | {d for d in asked - survivors if set(graph[d]) & survivors}
            weak = any(sum(j in survivors for j in graph[o]) + (o in survivors) < t for o in owners)
            assert split or small or weak, round_.abort_reason
            refused_split = split and not small and "separate groups" in round_.abort_reason
            outcomes["split refused" if refused_split else "other abort"] += 1
        else:  # before unmask (too few left), or at result (unmask replies missing)
            if round_.aborted_at != "result":
                round_.check_no_share_requested()
            outcomes["other abort"] += 1
    # The seeded draws exercise every branch: released sums, refused splits, other aborts.
    assert all(count > 0 for count in outcomes.values()), outcomes


# --- the Flower glue: federation.min_sites reaches SecAggServer -----------------------------


NODES = (11, 22, 33)


@pytest.fixture(scope="module")
def three_sites(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    tmp = tmp_path_factory.mktemp("partial-sums")
    paths = {n: write_classification_csv(tmp / f"site{n}.csv", n=60, seed=n) for n in NODES}
    config = tiny_config("classification", paths[11], "federation.rounds=1", "secagg.enabled=true")
    node_configs: dict[int, dict[str, Any]] = {
        n: {K.NODE_DATA_PATH: str(p), K.NODE_PRIVACY_REQUIRED: "false"}  # a plain run
        for n, p in paths.items()
    }
    federation = Federation(
        InProcessGrid(make_client_app(config), node_configs), config, RunDir(tmp / "x"), Progress()
    )
    return SimpleNamespace(
        config=config,
        node_configs=node_configs,
        start=federation.global_flat.copy(),
        trained=federation.strategy.trained_layout(),
    )


@pytest.mark.parametrize("stage", [K.SECAGG_SETUP, K.SECAGG_MASKED])
def test_min_sites_three_and_one_dropout_never_reach_unmasking(
    three_sites: SimpleNamespace, stage: str, caplog: pytest.LogCaptureFixture
) -> None:
    def tamper(node: int, reply: Message) -> Message | None:
        return None if node == 33 and reply.metadata.message_type == f"train.{stage}" else reply

    grid = InProcessGrid(
        make_client_app(three_sites.config), three_sites.node_configs, tamper=tamper
    )
    request = RoundRequest(
        round_number=1,
        nodes=list(NODES),
        global_flat=three_sites.start,
        trained=three_sites.trained,
        min_sites=3,
        timeout=60.0,
        federation_id="partial-sums",
    )
    with caplog.at_level(logging.WARNING):
        outcome = SecureAggregation(three_sites.config.secagg).run_round(grid, request)
    assert outcome.mean_delta is None and outcome.contributors == []
    sent = {m.metadata.message_type for m in grid.sent}
    assert f"train.{K.SECAGG_UNMASK}" not in sent  # no share was ever requested
    if stage == K.SECAGG_SETUP:  # ended before anyone trained and masked
        assert f"train.{K.SECAGG_MASKED}" not in sent
    assert any("fewer than min_sum 3" in r.getMessage() for r in caplog.records)
    server_log = [r for r in caplog.records if r.name == "fedpeft.server.secure_aggregation"]
    assert not any(r.levelno >= logging.ERROR for r in server_log)  # the defensive branch
