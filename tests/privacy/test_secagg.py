"""SecAgg+ state machines: exact secure sums, dropout recovery, aborts and message validation."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Collection, Mapping
from fractions import Fraction
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray
from scipy import stats

from fedpeft.privacy import secagg_messages
from fedpeft.privacy.quantize import quantize
from fedpeft.privacy.secagg import (
    EncryptedShares,
    MaskedVector,
    PublicKeys,
    SecAggAbort,
    SecAggClient,
    SecAggConfigError,
    SecAggProtocolError,
    SecAggResult,
    SecAggServer,
    Stage,
    UnmaskRequest,
    build_neighbour_graph,
    default_num_neighbours,
    default_threshold,
)

NO_DROPS: frozenset[int] = frozenset()


class Round:
    """Drives one in-process round; each stage skips the nodes in ``drop`` (they drop out)."""

    def __init__(
        self,
        num_nodes: int,
        length: int,
        *,
        num_neighbours: int | None = None,
        threshold: int | None = None,
        clip: float = 1.0,
        persist: bool = False,
        updates: Mapping[int, NDArray[np.float32]] | None = None,
    ) -> None:
        self.ids = [1000 + 37 * i for i in range(num_nodes - 1)] + [2**64 - 1]  # uint64 ids
        self.server = SecAggServer(
            round_id=42,
            node_ids=self.ids,
            vector_length=length,
            clip=clip,
            num_neighbours=num_neighbours,
            threshold=threshold,
        )
        self.clients = {node: SecAggClient(node_id=node) for node in self.ids}
        rng = np.random.default_rng(num_nodes * 1009 + length)
        self.updates = (
            dict(updates)
            if updates is not None
            else {node: rng.uniform(-clip, clip, length).astype(np.float32) for node in self.ids}
        )
        self.persist = persist
        self.masked: dict[int, MaskedVector] = {}

    def client(self, node: int) -> SecAggClient:
        if self.persist:  # a stateless ClientApp: restore the state for every message
            self.clients[node] = SecAggClient.from_state(self.clients[node].to_state())
        return self.clients[node]

    def setup(self, drop: Collection[int] = NO_DROPS) -> None:
        for node, request in self.server.setup().items():
            if node not in drop:
                self.server.receive_public_keys(self.client(node).setup(request))

    def share_keys(self, drop: Collection[int] = NO_DROPS) -> None:
        for node, request in self.server.share_keys().items():
            if node not in drop:
                self.server.receive_encrypted_shares(self.client(node).share_keys(request))

    def collect(self, drop: Collection[int] = NO_DROPS) -> None:
        for node, request in self.server.collect_masked_vectors().items():
            if node not in drop:
                rng = np.random.default_rng(node % 2**32)
                reply = self.client(node).collect_masked_vectors(
                    request, update=self.updates[node], rng=rng
                )
                self.masked[node] = reply
                self.server.receive_masked_vector(reply)

    def unmask(self, drop: Collection[int] = NO_DROPS) -> SecAggResult:
        for node, request in self.server.unmask().items():
            if node not in drop:
                self.server.receive_unmask_shares(self.client(node).unmask(request))
        return self.server.result()

    def run(self, drops: Mapping[str, Collection[int]] | None = None) -> SecAggResult:
        drops = drops or {}
        self.setup(drops.get("setup", NO_DROPS))
        self.share_keys(drops.get("share_keys", NO_DROPS))
        self.collect(drops.get("collect", NO_DROPS))
        return self.unmask(drops.get("unmask", NO_DROPS))

    def expected_quantized(self, included: Collection[int]) -> NDArray[np.uint32]:
        total = np.zeros(self.server.vector_length, dtype=np.uint32)
        for node in included:  # the same rounding randomness as the client used
            rng = np.random.default_rng(node % 2**32)
            total += quantize(self.updates[node], self.server.quantization, rng=rng).values
        return total

    def check_exact(self, result: SecAggResult, included: Collection[int]) -> None:
        assert result.included == tuple(sorted(included))
        assert result.dropped == tuple(sorted(set(self.ids) - set(included)))
        np.testing.assert_array_equal(result.quantized_total, self.expected_quantized(included))
        plain = np.sum([self.updates[node].astype(np.float64) for node in included], axis=0)
        bound = len(included) / self.server.quantization.scale
        assert np.max(np.abs(result.total - plain)) <= bound + 1e-9


@st.composite
def round_shapes(draw: st.DrawFn) -> tuple[int, int, int, int]:
    n = draw(st.sampled_from([3, 5, 10]))
    # k = 1 pairs the nodes off (a disconnected graph): rejected for n > 2, tested below.
    k = draw(st.sampled_from([k for k in range(2, n) if k % 2 == 0 or n % 2 == 0]))
    t = draw(st.integers(min_value=(k + 1) // 2 + 1, max_value=k + 1))
    return n, k, t, draw(st.integers(min_value=1, max_value=300))


@settings(max_examples=12, deadline=None)
@given(round_shapes())
def test_secure_sum_equals_plain_sum(shape: tuple[int, int, int, int]) -> None:
    n, k, t, length = shape
    federation = Round(n, length, num_neighbours=k, threshold=t)
    federation.check_exact(federation.run(), federation.ids)


def test_masked_upload_is_four_bytes_per_parameter() -> None:
    federation = Round(4, 1234)
    federation.run()
    for reply in federation.masked.values():
        assert reply.vector.dtype == np.uint32
        assert reply.vector.shape == (1234,)
        assert reply.vector.nbytes == 4 * 1234


def test_masked_vector_is_independent_of_the_update() -> None:
    length, clip = 50_000, 4.0
    rng = np.random.default_rng(7)
    large = rng.uniform(-clip, clip, length).astype(np.float32)
    zeros = np.zeros(length, dtype=np.float32)
    updates = {1000: zeros, 1037: large, 1074: zeros, 2**64 - 1: large}
    federation = Round(4, length, clip=clip, updates=updates)
    federation.check_exact(federation.run(), updates)
    seen_zero = federation.masked[1000].vector.astype(np.float64)
    seen_large = federation.masked[1037].vector.astype(np.float64)
    for seen in (seen_zero, seen_large):
        # uniform on [0, 2^32): KS test, and the mean within 6 standard errors of 2^31
        assert stats.kstest(seen / 2**32, "uniform").pvalue > 1e-6
        assert abs(seen.mean() - 2**31) < 6 * 2**32 / np.sqrt(12 * length)
    # the two sites' uploads have the same distribution ...
    assert stats.ks_2samp(seen_zero, seen_large).pvalue > 1e-6
    # ... and the upload is uncorrelated with the update (standard error 1/sqrt(L) = 0.0045)
    assert abs(np.corrcoef(seen_large, large)[0, 1]) < 0.03


@pytest.mark.parametrize("stage", ["setup", "share_keys", "collect", "unmask"])
def test_dropout_at_each_stage_gives_the_exact_sum_of_included_nodes(stage: str) -> None:
    federation = Round(7, 500, num_neighbours=4, threshold=3, persist=True)
    dropped = {federation.ids[2]}
    result = federation.run({stage: dropped})
    # a node that dropped during unmask had its masked vector included already
    included = set(federation.ids) if stage == "unmask" else set(federation.ids) - dropped
    federation.check_exact(result, included)


def _recoverable_drops(graph: Mapping[int, tuple[int, ...]], threshold: int) -> list[int]:
    """Nodes to drop at setup, share_keys, collect and unmask such that the round can finish.

    The graph is random, so fixed picks sometimes leave a node with fewer than ``threshold``
    share holders that answer unmask (e.g. one whose neighbours include all four), and the
    round then rightly aborts. Every node with a secret to reconstruct (all but the first two)
    must keep ``threshold`` holders among the nodes that answer unmask.
    """
    for picks in itertools.permutations(sorted(graph), 4):
        replying = set(graph) - set(picks)
        needing = set(graph) - set(picks[:2])
        if all(len(({x} | set(graph[x])) & replying) >= threshold for x in needing):
            return list(picks)
    raise AssertionError("no recoverable choice of four drops in this graph")


def test_dropouts_at_every_stage_in_one_round() -> None:
    federation = Round(12, 300, num_neighbours=6, threshold=4)
    a, b, c, d = _recoverable_drops(federation.server.graph, federation.server.threshold)
    result = federation.run({"setup": {a}, "share_keys": {b}, "collect": {c}, "unmask": {d}})
    federation.check_exact(result, set(federation.ids) - {a, b, c})


def test_node_with_too_few_live_neighbours_is_excluded_before_masking() -> None:
    federation = Round(10, 100, num_neighbours=4, threshold=3)
    victim = federation.ids[0]
    gone = set(federation.server.graph[victim][:3])  # 1 neighbour + itself < threshold 3
    result = federation.run({"setup": gone})
    assert victim not in result.included
    federation.check_exact(result, result.included)
    assert len(result.included) >= 5


def test_too_few_survivors_abandons_the_round() -> None:
    federation = Round(5, 50)  # k = 4, t = 3
    federation.setup()
    federation.share_keys()
    federation.collect(drop=federation.ids[:3])
    with pytest.raises(SecAggAbort, match="2 node\\(s\\) remain at stage unmask, fewer than thr"):
        federation.server.unmask()
    with pytest.raises(SecAggProtocolError, match="stage aborted"):
        federation.server.result()


def test_too_few_unmask_replies_abandons_the_round() -> None:
    federation = Round(5, 50)
    with pytest.raises(SecAggAbort, match="fewer than threshold 3"):
        federation.run({"unmask": federation.ids[:3]})


def test_too_few_keys_abandons_the_round_at_share_keys() -> None:
    federation = Round(4, 10, num_neighbours=3, threshold=3)
    federation.setup(drop=federation.ids[:2])
    with pytest.raises(SecAggAbort, match="at stage share_keys"):
        federation.server.share_keys()


def test_client_state_survives_serialisation() -> None:
    federation = Round(5, 64, persist=True)
    federation.check_exact(federation.run(), federation.ids)


# -- rejected messages -----------------------------------------------------------------------


def _at_collect(num_nodes: int = 5) -> tuple[Round, dict[int, MaskedVector]]:
    federation = Round(num_nodes, 20)
    federation.setup()
    federation.share_keys()
    requests = federation.server.collect_masked_vectors()
    replies = {
        node: federation.clients[node].collect_masked_vectors(
            request, update=federation.updates[node], rng=np.random.default_rng(node % 2**32)
        )
        for node, request in requests.items()
    }
    return federation, replies


def test_server_rejects_bad_masked_vectors_and_keeps_going() -> None:
    federation, replies = _at_collect()
    server, first = federation.server, replies[federation.ids[0]]
    wrong_length = dataclasses.replace(first, vector=np.zeros(21, dtype=np.uint32))
    wrong_dtype = dataclasses.replace(first, vector=first.vector.astype(np.int64))
    for bad in (wrong_length, wrong_dtype):
        with pytest.raises(SecAggProtocolError, match=r"expected uint32 of shape \(20,\)"):
            server.receive_masked_vector(bad)
    with pytest.raises(SecAggProtocolError, match="round 41.*round 42 is in progress"):
        server.receive_masked_vector(dataclasses.replace(first, round_id=41))
    with pytest.raises(SecAggProtocolError, match="not a participant"):
        server.receive_masked_vector(dataclasses.replace(first, node_id=7))
    server.receive_masked_vector(first)
    with pytest.raises(SecAggProtocolError, match="duplicate MaskedVector"):
        server.receive_masked_vector(first)
    for node in federation.ids[1:]:
        server.receive_masked_vector(replies[node])
    for node, request in server.unmask().items():
        server.receive_unmask_shares(federation.clients[node].unmask(request))
    federation.check_exact(server.result(), federation.ids)


def test_server_rejects_late_and_dropped_senders() -> None:
    federation = Round(5, 8)
    requests = federation.server.setup()
    late = federation.ids[0]
    keys = {node: federation.clients[node].setup(request) for node, request in requests.items()}
    for node in federation.ids[1:]:
        federation.server.receive_public_keys(keys[node])
    federation.server.share_keys()
    with pytest.raises(SecAggProtocolError, match="arrived in stage share_keys"):
        federation.server.receive_public_keys(keys[late])
    with pytest.raises(SecAggProtocolError, match="left the round before stage share_keys"):
        federation.server.receive_encrypted_shares(
            EncryptedShares(round_id=42, node_id=late, ciphertexts={})
        )
    with pytest.raises(SecAggProtocolError, match="cannot start stage unmask"):
        federation.server.unmask()


def test_server_rejects_malformed_keys_and_misaddressed_shares() -> None:
    federation = Round(5, 8)
    requests = federation.server.setup()
    node = federation.ids[0]
    good = federation.clients[node].setup(requests[node])
    with pytest.raises(SecAggProtocolError, match="must be 32 bytes, got 31"):
        federation.server.receive_public_keys(dataclasses.replace(good, mask_key=bytes(31)))
    with pytest.raises(SecAggProtocolError, match="low-order point"):
        federation.server.receive_public_keys(dataclasses.replace(good, encryption_key=bytes(32)))
    for other in federation.ids:
        federation.server.receive_public_keys(
            good if other == node else federation.clients[other].setup(requests[other])
        )
    share_requests = federation.server.share_keys()
    shares = federation.clients[node].share_keys(share_requests[node])
    partial = dict(list(shares.ciphertexts.items())[1:])
    with pytest.raises(SecAggProtocolError, match="expected exactly its live neighbours"):
        federation.server.receive_encrypted_shares(dataclasses.replace(shares, ciphertexts=partial))


def test_server_rejects_unmask_replies_that_do_not_answer_the_request() -> None:
    federation, replies = _at_collect()
    for reply in replies.values():
        federation.server.receive_masked_vector(reply)
    requests = federation.server.unmask()
    node = federation.ids[0]
    shares = federation.clients[node].unmask(requests[node])
    missing = dict(list(shares.self_mask_shares.items())[1:])
    with pytest.raises(SecAggProtocolError, match="do not answer its request"):
        federation.server.receive_unmask_shares(
            dataclasses.replace(shares, self_mask_shares=missing)
        )
    owner, share = next(iter(shares.self_mask_shares.items()))
    relabelled = {**shares.self_mask_shares, owner: (99).to_bytes(2, "big") + share[2:]}
    with pytest.raises(SecAggProtocolError, match="has index 99"):
        federation.server.receive_unmask_shares(
            dataclasses.replace(shares, self_mask_shares=relabelled)
        )


def test_client_refuses_to_reveal_both_kinds_of_shares_of_one_node() -> None:
    federation, replies = _at_collect()
    node = federation.ids[0]
    client, neighbour = federation.clients[node], federation.server.graph[node][0]
    everyone = tuple(sorted({node, *federation.server.graph[node]}))
    bad_requests = {
        "both survived and dropped": UnmaskRequest(42, node, everyone, (neighbour,)),
        "itself is listed as dropped": UnmaskRequest(42, node, everyone[1:], (node,)),
        "holds no shares of nodes \\[5\\]": UnmaskRequest(42, node, (*everyone, 5), ()),
        "only 2 survivor": UnmaskRequest(42, node, everyone[:2], everyone[2:3]),
        "round 43": UnmaskRequest(43, node, everyone, ()),
    }
    for message, request in bad_requests.items():
        survived = [n for n in request.survived if n != node]
        if node not in request.dropped:
            request = dataclasses.replace(request, survived=tuple(sorted({node, *survived})))
        with pytest.raises(SecAggProtocolError, match=message):
            client.unmask(request)
    assert client.stage is Stage.UNMASK  # refused requests leave the state unchanged
    reply = client.unmask(UnmaskRequest(42, node, everyone, ()))
    assert set(reply.self_mask_shares) == set(everyone) and not reply.mask_key_shares
    with pytest.raises(SecAggProtocolError, match="while in stage done"):
        client.unmask(UnmaskRequest(42, node, everyone, ()))


def test_client_rejects_tampered_shares_and_bad_requests() -> None:
    federation = Round(4, 8)
    federation.setup()
    federation.share_keys()
    requests = federation.server.collect_masked_vectors()
    node = federation.ids[0]
    request = requests[node]
    sender, ciphertext = next(iter(request.ciphertexts.items()))
    tampered = {**request.ciphertexts, sender: ciphertext[:-1] + bytes([ciphertext[-1] ^ 1])}
    client = federation.clients[node]
    with pytest.raises(SecAggProtocolError, match=f"shares from node {sender}: authentication"):
        client.collect_masked_vectors(
            dataclasses.replace(request, ciphertexts=tampered), update=federation.updates[node]
        )
    with pytest.raises(SecAggConfigError, match=r"shape \(8,\)"):
        client.collect_masked_vectors(request, update=np.zeros(9, dtype=np.float32))
    with pytest.raises(SecAggProtocolError, match="addressed to node"):
        client.collect_masked_vectors(
            dataclasses.replace(request, node_id=federation.ids[1]), update=federation.updates[node]
        )
    reply = client.collect_masked_vectors(request, update=federation.updates[node])
    assert reply.vector.shape == (8,)


def test_client_rejects_an_unsafe_setup() -> None:
    federation = Round(5, 8)
    node = federation.ids[0]
    request = federation.server.setup()[node]
    client = SecAggClient(node_id=node)
    with pytest.raises(SecAggProtocolError, match="threshold=2 with 4 neighbours"):
        client.setup(dataclasses.replace(request, threshold=2))
    with pytest.raises(SecAggProtocolError, match="exclude node itself"):
        client.setup(dataclasses.replace(request, neighbours=(node, *request.neighbours[1:])))
    assert isinstance(client.setup(request), PublicKeys)
    with pytest.raises(SecAggProtocolError, match="while in stage share_keys"):
        client.setup(request)


def test_server_parameters_are_validated_together() -> None:
    with pytest.raises(SecAggConfigError) as info:
        SecAggServer(round_id=1, node_ids=[1, 2, 3, 3, 4], vector_length=0, clip=0.0, threshold=2)
    message = str(info.value)
    for part in ("repeats [3]", "vector_length=0", "clip=0.0", "threshold=2 is not allowed"):
        assert part in message
    with pytest.raises(SecAggConfigError, match="num_neighbours=3 is odd"):
        SecAggServer(round_id=1, node_ids=range(7), vector_length=4, clip=1.0, num_neighbours=3)
    with pytest.raises(SecAggConfigError, match="num_neighbours=1 with 6 nodes pairs them off"):
        SecAggServer(round_id=1, node_ids=range(6), vector_length=4, clip=1.0, num_neighbours=1)
    two = SecAggServer(round_id=1, node_ids=[3, 4], vector_length=4, clip=1.0, num_neighbours=1)
    assert two.graph == {3: (4,), 4: (3,)}
    with pytest.raises(SecAggConfigError, match="num_neighbours=7 is not allowed"):
        SecAggServer(round_id=1, node_ids=range(7), vector_length=4, clip=1.0, num_neighbours=7)
    with pytest.raises(SecAggConfigError, match="at least 2"):
        SecAggServer(round_id=1, node_ids=[5], vector_length=4, clip=1.0)
    with pytest.raises(SecAggConfigError, match="node id=-1"):
        SecAggServer(round_id=1, node_ids=[-1, 2], vector_length=4, clip=1.0)
    for bad in (-1, True, 2.5):
        with pytest.raises(SecAggConfigError, match=f"min_sum={bad!r} is not allowed"):
            SecAggServer(round_id=1, node_ids=range(5), vector_length=4, clip=1.0, min_sum=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("num_nodes", [2, 3, 8, 20, 101])
def test_neighbour_graph_is_regular_and_symmetric(num_nodes: int) -> None:
    k = default_num_neighbours(num_nodes)
    graph = build_neighbour_graph(list(range(num_nodes)), num_neighbours=k)
    for node, neighbours in graph.items():
        assert len(neighbours) == k and node not in neighbours
        assert all(node in graph[other] for other in neighbours)
    holders = k + 1
    assert holders / 2 < default_threshold(k) <= holders


@pytest.mark.parametrize("num_nodes", [26, 64])
def test_default_threshold_is_the_bounds_for_the_default_degree(num_nodes: int) -> None:
    server = SecAggServer(round_id=1, node_ids=range(num_nodes), vector_length=4, clip=1.0)
    params = secagg_messages.graph_parameters(num_nodes)
    assert (server.num_neighbours, server.threshold) == (params.num_neighbours, params.threshold)
    explicit = SecAggServer(
        round_id=1, node_ids=range(num_nodes), vector_length=4, clip=1.0, num_neighbours=6
    )
    assert explicit.threshold == default_threshold(6) == 4  # a majority of the 7 holders
    assert server.min_sum == 0 and server.min_included == server.threshold


# The table in default_num_neighbours' docstring: n -> (k, t) for γ = δ = 1/3, σ = 40, η = 20.
DEFAULT_TABLE = {
    3: (2, 2), 4: (3, 3), 5: (4, 3), 6: (5, 4), 7: (6, 4), 8: (6, 4), 10: (8, 5), 12: (10, 6),
    16: (12, 7), 20: (14, 8), 26: (18, 10), 32: (22, 12), 40: (28, 15), 50: (34, 18),
    64: (44, 23), 80: (54, 28), 100: (68, 35), 128: (84, 43), 200: (122, 64), 256: (146, 77),
    300: (164, 86), 500: (216, 114), 700: (254, 134), 1000: (292, 154),
}  # fmt: skip


def test_default_graph_parameters_match_the_documented_table() -> None:
    for n, (k, t) in DEFAULT_TABLE.items():
        assert (default_num_neighbours(n), default_threshold(k, num_nodes=n)) == (k, t), n
        params = secagg_messages.graph_parameters(n)
        assert (params.num_neighbours, params.threshold) == (k, t)
        assert params.meets_bound is (n not in (2, 3, 4, 6))
        assert (k + 1) / 2 < t <= k + 1  # the holders' majority that SecAggClient requires
    docstring = secagg_messages.default_num_neighbours.__doc__ or ""
    rows = [line.split() for line in docstring.splitlines()]
    rows = [r for r in rows if len(r) == 9 and all(c.isdigit() for c in r)]
    cells = {int(r[i]): (int(r[i + 1]), int(r[i + 2])) for r in rows for i in range(0, 9, 3)}
    assert cells == DEFAULT_TABLE


@pytest.mark.parametrize(
    ("num_nodes", "rate", "degree"),
    [(100, "0.45", 92), (100, "0.33", 68), (1000, "0.33", 286), (10, "0.33", 8)],
)
def test_graph_parameters_reproduce_the_reference_implementation(
    num_nodes: int, rate: str, degree: int
) -> None:
    # Degrees from google-parfait/federated-compute graph_parameter_finder_test.cc (semi-
    # honest, security 40, correctness 20, adversarial rate = dropout rate = ``rate``). Its
    # thresholds (46, 34, 150, 4) may sit at or below half of the k + 1 holders; ours may not.
    params = secagg_messages.graph_parameters(
        num_nodes, corrupt_fraction=Fraction(rate), dropout_fraction=Fraction(rate)
    )
    assert params.num_neighbours == degree and params.meets_bound
    assert params.threshold == max((degree + 1) // 2 + 1, {92: 46, 68: 34, 286: 150, 8: 4}[degree])


@pytest.fixture
def ring_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """Neighbour graphs put the nodes on the ring in the order of ``node_ids``."""

    class InOrder:
        def shuffle(self, order: list[int]) -> None:
            pass

    monkeypatch.setattr(secagg_messages, "secrets", SimpleNamespace(SystemRandom=InOrder))


@pytest.mark.usefixtures("ring_in_order")
def test_pruning_before_masking_reaches_a_fixed_point() -> None:
    federation = Round(20, 16, num_neighbours=4, threshold=3)  # ring: ids in order, k/2 = 2
    at = federation.ids.__getitem__
    # Position 5 keeps one live neighbour (7): too weak. Dropping it opens a gap 3-6, which
    # with the gap 12-13 splits the ring into 7-11 (5 nodes) and 14-19, 0-2 (9 nodes).
    federation.setup(drop={at(3), at(4), at(6), at(12), at(13)})
    requests = federation.server.share_keys()
    largest = {at(p) for p in [*range(14, 20), 0, 1, 2]}
    assert set(requests) == largest
    for node, request in requests.items():
        federation.server.receive_encrypted_shares(federation.clients[node].share_keys(request))
    federation.collect()
    result = federation.unmask()
    federation.check_exact(result, largest)


@pytest.mark.usefixtures("ring_in_order")
def test_unmask_refuses_survivors_in_separate_groups_before_asking_for_shares() -> None:
    federation = Round(20, 16, num_neighbours=4, threshold=3)
    at = federation.ids.__getitem__
    federation.setup()
    federation.share_keys()
    federation.collect(drop={at(3), at(4), at(12), at(13)})  # two gaps of k/2 after masking
    with pytest.raises(SecAggAbort, match=r"form 2 separate groups \(sizes \[9, 7\]\)"):
        federation.server.unmask()
    assert all(
        c.stage is Stage.UNMASK for n, c in federation.clients.items() if n in federation.masked
    )
    with pytest.raises(SecAggProtocolError, match="stage aborted"):
        federation.server.result()


def test_min_sum_sets_the_floor_of_every_stage() -> None:
    federation = Round(6, 8, num_neighbours=4, threshold=3)
    federation.server = SecAggServer(
        round_id=42, node_ids=federation.ids, vector_length=8, clip=1.0, num_neighbours=4,
        threshold=3, min_sum=5,
    )  # fmt: skip
    assert federation.server.min_included == 5
    federation.setup(drop={federation.ids[0], federation.ids[1]})
    with pytest.raises(
        SecAggAbort, match=r"4 node\(s\) remain at stage share_keys, fewer than min_sum 5"
    ):
        federation.server.share_keys()
