"""A deviating coordinator against the real site code (THREAT_MODEL.md, "the coordinator").

Every test here plays the coordinator: it builds the messages itself — replays, changed
settings, crafted adapters, unsigned or forged instructions, repeated evaluations — sends them
to the real ClientApp (in process, with the site's own node config, ledger and data file) and
checks what comes back *byte for byte*, and what the site's ledger charged. The coordinator
controls the run config, so "the coordinator changes a setting" is a ClientApp composed with
other overrides over the same node config.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ConfigRecord, Message, MessageType
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity
from numpy.typing import NDArray

from fedpeft import constants as K
from fedpeft.broadcast import encode
from fedpeft.client.app import make_client_app
from fedpeft.config import ConfigError, FedPeftConfig, compose_config, to_yaml
from fedpeft.instructions import Signer, config_digest
from fedpeft.model import AdapterLayout, build_model, get_flat
from fedpeft.privacy.calibration import compute_epsilon
from fedpeft.privacy.signing import generate_key_pair, load_private_key
from fedpeft.server.aggregation import EvalRequest, RoundRequest, evaluate_content, train_content
from fedpeft.server.strategies import make_strategy
from fedpeft.testing import InProcessGrid, write_causal_jsonl, write_classification_csv

pytestmark = [
    pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning"),
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
    pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha:UserWarning"),
    pytest.mark.filterwarnings("ignore:Optimal order is the smallest alpha:UserWarning"),
]
NODE = 7
FEDERATION = "fed-under-attack"
N_TRAIN = 51  # 64 rows, 13 held out (data.test_fraction 0.2)


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    """What a ServerApp process has set before it creates messages."""
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID


def _config(tmp_path: Path, *overrides: str) -> FedPeftConfig:
    return compose_config(
        [
            "experiment=tiny_private",
            f"data.path={tmp_path / 'unused.csv'}",
            "privacy.accountant=rdp",
            *overrides,
        ]
    )


def _node(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    """A deployed site's node config: its own data file, ledger and ceiling."""
    csv = tmp_path / "site.csv"
    if not csv.exists():
        write_classification_csv(csv, n=64, seed=3)
    node = {
        K.NODE_DATA_PATH: str(csv),
        K.NODE_LEDGER_PATH: str(tmp_path / "ledger.json"),
        K.NODE_EPSILON_MAX: 8.0,
        K.NODE_DELTA: 1e-5,
    }
    node.update(extra)
    return {k: v for k, v in node.items() if v is not None}


def _site(tmp_path: Path, node: int, *, rows: int = 64, **extra: Any) -> dict[str, Any]:
    """Deployed site ``node`` of several: its own CSV (``rows`` rows, seed ``node``), ledger
    ``ledger{node}.json``, ceiling 8 and δ 1e-5, then ``extra``."""
    csv = write_classification_csv(tmp_path / f"site{node}.csv", n=rows, seed=node)
    node_config: dict[str, Any] = {
        K.NODE_DATA_PATH: str(csv),
        K.NODE_LEDGER_PATH: str(tmp_path / f"ledger{node}.json"),
        K.NODE_EPSILON_MAX: 8.0,
        K.NODE_DELTA: 1e-5,
    }
    node_config.update(extra)
    return node_config


class Coordinator:
    """A coordinator that writes its own instructions (what the ServerApp would send, or not)."""

    def __init__(self, config: FedPeftConfig, signer: Signer | None = None) -> None:
        self.config = config
        loaded = build_model(
            config.model, config.lora, seed=config.seed, device=torch.device("cpu")
        )
        self.layout: AdapterLayout = loaded.layout
        self.start = get_flat(loaded.peft_model, loaded.layout)
        self.trained = make_strategy(config.strategy, loaded.layout).trained_layout()
        self.signer = signer

    def train(self, flat: NDArray[np.float32] | None = None, *, round_number: int = 1) -> Message:
        flat = self.start if flat is None else flat
        request = RoundRequest(
            round_number=round_number,
            nodes=[NODE],
            global_flat=flat,
            trained=self.trained,
            min_sites=1,
            timeout=60.0,
            federation_id=FEDERATION,
            broadcast=encode(flat, self.layout, seed=self.config.seed),
            signer=self.signer,
        )
        return Message(
            content=train_content(request),
            dst_node_id=NODE,
            message_type=MessageType.TRAIN,
            group_id=str(round_number),
        )

    def evaluate(self, flat: NDArray[np.float32], *, round_number: int = 1) -> Message:
        request = EvalRequest(
            round_number=round_number,
            nodes=[NODE],
            global_flat=flat,
            broadcast=encode(flat, self.layout, seed=self.config.seed),
            federation_id=FEDERATION,
            timeout=60.0,
            min_sites=1,
            signer=self.signer,
        )
        return Message(
            content=evaluate_content(request),
            dst_node_id=NODE,
            message_type=MessageType.EVALUATE,
            group_id=str(round_number),
        )


def _send(config: FedPeftConfig, node: dict[str, Any], message: Message) -> Message:
    """Deliver ``message`` to the site running a ClientApp of ``config`` (the run config)."""
    grid = InProcessGrid(make_client_app(config), {NODE: node})
    (reply,) = grid.send_and_receive([message])
    return reply


def _released(reply: Message) -> dict[str, Any]:
    """Everything in a reply, as it leaves the site: array bytes, config entries, metrics."""
    if reply.has_error():
        return {"error": (reply.error.code, reply.error.reason)}
    content = reply.content
    return {
        "arrays": {
            f"{r}/{k}": a.numpy().tobytes()
            for r, rec in content.array_records.items()
            for k, a in rec.items()
        },
        "configs": {r: dict(rec) for r, rec in content.config_records.items()},
        "metrics": {r: dict(rec) for r, rec in content.metric_records.items()},
    }


def _delta(reply: Message) -> NDArray[np.float32]:
    assert not reply.has_error(), reply.error.reason
    return reply.content.array_records[K.ARRAYS][K.ARRAY_FLAT].numpy()


def _entries(tmp_path: Path) -> list[dict[str, Any]]:
    return json.loads((tmp_path / "ledger.json").read_text())["entries"]


def _fixed(code: str) -> str:
    return f"{code}: {K.SITE_ERRORS[code][1]}"


# --- replays ------------------------------------------------------------------------------


def test_replay_with_changed_clip_norm_draws_fresh_noise_and_is_charged_again(
    tmp_path: Path,
) -> None:
    """The attack: same federation, round and adapter, C = 50 then C = 1, one SGD step.

    With the noise reused, Δ₁/C₁ − Δ₂/C₂ is the noise-free difference of two clipped
    gradient sums, whose norm is at most (|b₁| + |b₂|)·lr/B ≤ 2N·lr/B. With fresh noise it
    carries σ·(z₁ − z₂)·lr/B, of norm ≈ σ·√(2d)·lr/B — here ≈ 6× the largest data term.
    """
    sigma, lr = 10.0, 1.0
    common = (
        "train.optimizer=sgd",
        f"train.lr={lr}",
        f"train.head_lr={lr}",
        "train.local_steps=1",
        f"privacy.noise_multiplier={sigma}",
    )
    first = _config(tmp_path, *common, "privacy.max_grad_norm=50")
    second = _config(tmp_path, *common, "privacy.max_grad_norm=1")
    node = _node(tmp_path, **{K.NODE_EPSILON_MAX: 100.0})
    coordinator = Coordinator(first)
    delta_1 = _delta(_send(first, node, coordinator.train()))
    delta_2 = _delta(_send(second, node, coordinator.train()))

    entries = _entries(tmp_path)
    assert [(e["run_id"], e["round"]) for e in entries] == [(FEDERATION, 1), (FEDERATION, 1)]
    assert entries[0]["binding"] != entries[1]["binding"]  # two releases, two charges
    ledger = json.loads((tmp_path / "ledger.json").read_text())
    history = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in entries]
    assert compute_epsilon(history, delta=ledger["delta"], accountant="rdp") > compute_epsilon(
        history[:1], delta=ledger["delta"], accountant="rdp"
    )

    d = coordinator.trained.size
    batch = max(1, int(first.privacy.sample_rate * N_TRAIN))  # Opacus's expected batch size
    residual = np.linalg.norm(delta_1 / 50.0 - delta_2 / 1.0) * batch / lr
    data_bound = 2 * N_TRAIN  # |b₁| + |b₂| ≤ 2N: clipped examples have norm ≤ C each
    assert residual > 0.8 * sigma * np.sqrt(2 * d) - data_bound > 3 * data_bound


def test_an_identical_retry_repeats_the_identical_release_for_one_charge(tmp_path: Path) -> None:
    config = _config(tmp_path)
    node = _node(tmp_path)
    coordinator = Coordinator(config)
    first = _released(_send(config, node, coordinator.train()))
    again = _released(_send(config, node, coordinator.train()))  # a crash-retry
    assert first == again  # byte for byte
    (entry,) = _entries(tmp_path)
    assert entry["release"] and entry["binding"]


@pytest.mark.parametrize(
    "change",
    [
        "train.lr=0.01",
        "train.local_steps=4",
        "privacy.max_grad_norm=2.0",
        "privacy.sample_rate=0.25",
        "lora.dropout=0.1",
        "model.max_length=16",
        "secagg.clip_range=0.5",
    ],
)
def test_any_changed_setting_is_a_new_charge(tmp_path: Path, change: str) -> None:
    fixed = ("privacy.epsilon=100", "privacy.noise_multiplier=1.0")  # room for both charges
    base = _config(tmp_path, *fixed)
    node = _node(tmp_path, **{K.NODE_EPSILON_MAX: 100.0})
    coordinator = Coordinator(base)
    _delta(_send(base, node, coordinator.train()))
    changed = _config(tmp_path, *fixed, change)
    _send(changed, node, Coordinator(changed).train())
    entries = _entries(tmp_path)
    assert len(entries) == 2 and entries[0]["binding"] != entries[1]["binding"], change


def test_a_crafted_adapter_for_a_charged_round_is_a_new_charge(tmp_path: Path) -> None:
    config = _config(tmp_path)
    node = _node(tmp_path)
    coordinator = Coordinator(config)
    honest = _delta(_send(config, node, coordinator.train()))
    crafted = coordinator.start.copy()
    crafted[-2:] += 0.5  # the head's bias: another starting point for the same round
    other = _delta(_send(config, node, coordinator.train(crafted)))
    assert not np.array_equal(honest, other)
    assert len(_entries(tmp_path)) == 2


def test_a_retry_that_comes_out_different_is_withheld(tmp_path: Path) -> None:
    """If the site's hardware gave another result for the same inputs, the two releases would
    share their noise; the site sends the first and refuses the second."""
    config = _config(tmp_path)
    node = _node(tmp_path)
    coordinator = Coordinator(config)
    _delta(_send(config, node, coordinator.train()))
    ledger = json.loads((tmp_path / "ledger.json").read_text())
    ledger["entries"][0]["release"] = "0" * 64  # as if the first attempt had released other bytes
    (tmp_path / "ledger.json").write_text(json.dumps(ledger))
    reply = _send(config, node, coordinator.train())
    assert reply.has_error() and reply.error.reason == _fixed(K.ERR_RELEASE_MISMATCH)


# --- the site's rules beat the coordinator's settings ---------------------------------------


@pytest.mark.parametrize(
    ("overrides", "node_extra", "code"),
    [
        ((), {K.NODE_LEDGER_PATH: None}, K.ERR_LEDGER_REQUIRED),
        (
            ("privacy.ledger_dir=/tmp/coordinator-chosen",),
            {K.NODE_LEDGER_PATH: None},
            K.ERR_LEDGER_REQUIRED,
        ),
        ((), {K.NODE_EPSILON_MAX: None}, K.ERR_CEILING_REQUIRED),
        (("privacy.enabled=false",), {}, K.ERR_DP_REQUIRED),
        ((), {K.NODE_DELTA: None}, K.ERR_DELTA_REQUIRED),
        ((), {K.NODE_DELTA: 0.5}, K.ERR_DELTA),
    ],
)
def test_a_deployed_site_refuses_what_its_node_config_does_not_allow(
    tmp_path: Path, overrides: tuple[str, ...], node_extra: dict[str, Any], code: str
) -> None:
    config = _config(tmp_path, *overrides)
    node = _node(tmp_path, **node_extra)
    reply = _send(config, node, Coordinator(config).train())
    assert reply.has_error()
    assert reply.error.code == K.SITE_ERRORS[code][0] and reply.error.reason == _fixed(code)
    ledger = tmp_path / "ledger.json"
    assert not ledger.exists() or _entries(tmp_path) == []  # nothing charged
    assert not Path("/tmp/coordinator-chosen").exists()


def test_a_site_that_waives_dp_trains_without_it_and_says_so(tmp_path: Path) -> None:
    config = _config(tmp_path, "privacy.enabled=false")
    node = _node(tmp_path, **{K.NODE_PRIVACY_REQUIRED: "false"})
    released = _released(_send(config, node, Coordinator(config).train()))
    assert not set(K.PRIVACY_METRICS) & set(released["metrics"][K.METRICS])


def test_the_coordinator_cannot_raise_the_ceiling_or_delta(tmp_path: Path) -> None:
    config = _config(tmp_path, "privacy.epsilon=40", "privacy.delta=1e-3")
    node = _node(tmp_path, **{K.NODE_EPSILON_MAX: 2.0, K.NODE_DELTA: 1e-6})
    metrics = _released(_send(config, node, Coordinator(config).train()))["metrics"][K.METRICS]
    assert metrics[K.MET_EPSILON_CEILING] == 2.0 and metrics[K.MET_EPSILON] <= 2.0
    assert metrics[K.MET_DELTA] == 1e-6
    # a later run asking for a looser δ still accounts at the ledger's own δ
    looser = _config(tmp_path, "privacy.epsilon=40", "privacy.delta=1e-2")
    again = _released(
        _send(
            looser,
            _node(tmp_path, **{K.NODE_EPSILON_MAX: 4.0}),
            Coordinator(looser).train(round_number=2),
        )
    )
    assert again["metrics"][K.METRICS][K.MET_DELTA] == 1e-6


# --- signed instructions -------------------------------------------------------------------


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    paths = {}
    for name in ("trusted", "other"):
        paths[name] = tmp_path / f"{name}.key"
        paths[f"{name}.pub"] = tmp_path / f"{name}.pub"
        generate_key_pair(paths[name], paths[f"{name}.pub"])
    return paths


def _signer(config: FedPeftConfig, key: Path) -> Signer:
    return Signer(load_private_key(key), config_digest(to_yaml(config)))


def test_a_site_trains_only_for_the_coordinator_it_trusts(
    tmp_path: Path, keys: dict[str, Path]
) -> None:
    config = _config(tmp_path)
    node = _node(tmp_path, **{K.NODE_COORDINATOR_PUBLIC_KEY: str(keys["trusted.pub"])})
    refused = _fixed(K.ERR_SIGNATURE)

    unsigned = Coordinator(config)  # e.g. anyone who reached the Control API with `flwr run`
    assert _send(config, node, unsigned.train()).error.reason == refused
    forged = Coordinator(config, _signer(config, keys["other"]))
    assert _send(config, node, forged.train()).error.reason == refused

    trusted = Coordinator(config, _signer(config, keys["trusted"]))
    altered = trusted.train()  # signed, then the adapter is changed on the way
    flat = altered.content.array_records[K.ARRAYS][K.ARRAY_FLAT].numpy().copy()
    flat[0] += 1.0
    altered.content.array_records[K.ARRAYS][K.ARRAY_FLAT] = Array(flat)
    assert _send(config, node, altered).error.reason == refused
    # signed for one configuration, sent to a site composing another (a changed setting)
    other_config = _config(tmp_path, "train.lr=0.5")
    assert _send(other_config, node, trusted.train()).error.reason == refused
    assert not (tmp_path / "ledger.json").exists()  # nothing was charged by any of them

    assert not _send(config, node, trusted.train()).has_error()
    assert len(_entries(tmp_path)) == 1


# --- evaluation is bounded -----------------------------------------------------------------


def test_evaluation_only_of_a_trained_round_and_once(tmp_path: Path) -> None:
    config = _config(tmp_path)
    node = _node(tmp_path)
    coordinator = Coordinator(config)
    never_trained = _send(config, node, coordinator.evaluate(coordinator.start))
    assert never_trained.error.reason == _fixed(K.ERR_EVALUATION_REFUSED)

    _delta(_send(config, node, coordinator.train()))
    honest = _released(_send(config, node, coordinator.evaluate(coordinator.start)))
    assert set(honest["metrics"][K.METRICS]) == {
        K.MET_NUM_EXAMPLES,
        K.MET_EVAL_LOSS,
        K.MET_EVAL_ACCURACY,
    }
    assert _released(_send(config, node, coordinator.evaluate(coordinator.start))) == honest
    probe = coordinator.start.copy()
    probe[-1] += 3.0  # a crafted adapter to probe the held-out records
    reply = _send(config, node, coordinator.evaluate(probe))
    assert reply.error.reason == _fixed(K.ERR_EVALUATION_REFUSED)
    other_round = _send(config, node, coordinator.evaluate(coordinator.start, round_number=2))
    assert other_round.error.reason == _fixed(K.ERR_EVALUATION_REFUSED)


def test_no_plain_evaluation_under_secure_aggregation(tmp_path: Path) -> None:
    config = _config(tmp_path, "secagg.enabled=true")
    reply = _send(config, _node(tmp_path), Coordinator(config).evaluate(Coordinator(config).start))
    assert reply.error.reason == _fixed(K.ERR_EVALUATION_REFUSED)


# --- nothing leaves outside a stated guarantee ---------------------------------------------


def test_a_dp_train_reply_carries_the_delta_and_public_parameters_only(tmp_path: Path) -> None:
    config = _config(tmp_path)
    coordinator = Coordinator(config)
    released = _released(_send(config, _node(tmp_path), coordinator.train()))
    assert set(released["arrays"]) == {f"{K.ARRAYS}/{K.ARRAY_FLAT}"}
    assert set(released["configs"]) == {K.LAYOUT}
    metrics = released["metrics"][K.METRICS]
    # plain aggregation: N (for weighting) is stated as public; no train loss, no timing
    assert set(metrics) == {*K.PRIVACY_METRICS, K.MET_NUM_EXAMPLES}
    assert K.MET_TRAIN_LOSS not in metrics


@pytest.mark.parametrize("clipping", ["hooks", "ghost"])
def test_an_overflowing_example_does_not_make_the_site_fail(tmp_path: Path, clipping: str) -> None:
    """The membership bit of a crafted head: bias (+3e38, −3e38), weight 0, makes the loss
    0 for label 0 and infinite for label 1. If the site failed on an infinite loss, its reply
    would say whether a label-1 example was in a batch, outside any noise. It must not: the
    reply is a normal noisy update whether or not the site holds such an example."""
    import csv

    config = _config(  # its own cached model
        tmp_path, "seed=7", "privacy.noise_multiplier=1.0", f"privacy.clipping={clipping}"
    )
    coordinator = Coordinator(config)
    crafted = coordinator.start.copy()
    crafted[-66:-2] = 0.0  # head weight
    crafted[-2:] = (3e38, -3e38)  # head bias
    kinds = {}
    for name, label_one in (("without", 0), ("with", 40)):
        folder = tmp_path / name
        folder.mkdir()
        rows = [("good movie", 0)] * 64 + [("bad movie", 1)] * label_one
        with (folder / "site.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "label"])
            writer.writerows(rows)
        node = _node(folder, **{K.NODE_EPSILON_MAX: 100.0})
        replies = [_send(config, node, coordinator.train(crafted, round_number=r)) for r in (1, 2)]
        kinds[name] = [reply.has_error() for reply in replies]
        for reply in replies:
            assert not reply.has_error(), reply.error.reason
            assert np.isfinite(_delta(reply)[:-66]).all()  # the LoRA factors moved by noise only
    assert kinds["with"] == kinds["without"]


def test_under_secure_aggregation_nothing_a_site_sends_reveals_its_size(tmp_path: Path) -> None:
    """Three sites of 64, 128 and 256 rows: every figure they send is the same."""
    from fedpeft.server.federation import Federation
    from fedpeft.server.progress import Progress
    from fedpeft.server.rundir import RunDir

    config = _config(tmp_path, "secagg.enabled=true", "federation.rounds=2")
    nodes = {
        node: _site(tmp_path, node, rows=rows) for node, rows in ((11, 64), (22, 128), (33, 256))
    }
    grid = InProcessGrid(make_client_app(config), nodes)
    Federation(grid, config, RunDir(tmp_path / "run"), Progress()).run()
    figures: dict[str, list[dict[str, Any]]] = {}
    for reply in grid.received:
        assert not reply.has_error(), reply.error.reason
        content = reply.content
        for record in content.array_records.values():  # only masked uint32 vectors
            assert all(a.dtype == "uint32" for a in record.values())
        metrics = dict(content.metric_records.get(K.METRICS, {}))
        assert K.MET_NUM_EXAMPLES not in metrics and K.MET_TRAIN_LOSS not in metrics
        assert K.MET_EVAL_LOSS not in metrics and K.MET_EVAL_ACCURACY not in metrics
        if metrics:
            figures.setdefault(reply.metadata.group_id, []).append(metrics)
    assert sorted(figures) == ["1", "2"]
    for per_round in figures.values():
        assert len(per_round) == 3 and set(per_round[0]) == set(K.PRIVACY_METRICS)
        assert per_round[0] == per_round[1] == per_round[2]  # ε, σ, q, δ: no trace of N


def test_the_noise_in_an_update_does_not_reveal_the_sites_size(tmp_path: Path) -> None:
    """Without secure aggregation the coordinator holds each update: its noise scale is
    σ·C·lr/B with B = train.batch_size at sites of 64, 128 and 256 rows alike.

    Opacus's divisor ⌊q·N⌋ (1, 2 and 4 here) made the three scales differ four-fold: one
    update told the coordinator N to within 1/q. Plain SGD and one step make the update
    lr·(clipped sum + noise)/B; the clipped sum (≤ q·N·C ≈ 4·C in norm, against noise of
    norm σ·C·√d) moves the estimate by well under 1%.
    """
    lr, clip, batch = 0.5, 1.0, 8
    config = _config(
        tmp_path,
        # rank 32: ~8k noise draws per update, so each std is estimated to ~0.8% and the
        # 5% bounds below hold at > 4 standard errors (2k draws at rank 4 failed them by chance)
        "lora.r=32",
        "privacy.sample_rate=0.02",
        f"privacy.max_grad_norm={clip}",
        "train.optimizer=sgd",
        f"train.lr={lr}",
        "train.head_lr=null",
        "train.local_steps=1",
        f"train.batch_size={batch}",
    )
    coordinator = Coordinator(config)
    scales = {}
    for rows in (64, 128, 256):
        reply = _send(config, _site(tmp_path, rows, rows=rows), coordinator.train())
        sigma = float(reply.content.metric_records[K.METRICS][K.MET_NOISE_MULTIPLIER])
        delta = _delta(reply).astype(np.float64)
        assert delta.size > 8_000
        scales[rows] = float(delta.std()) * batch / (lr * clip * sigma)
    assert all(abs(scale - 1) < 0.05 for scale in scales.values()), scales
    assert max(scales.values()) / min(scales.values()) < 1.05, scales


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "secure"])
def test_a_signed_federation_trains_and_an_unsigned_one_costs_nothing(
    tmp_path: Path, keys: dict[str, Path], secure: bool
) -> None:
    from fedpeft.server.federation import FederationAborted, run_federation
    from fedpeft.server.rundir import RunDir

    config = _config(tmp_path, f"secagg.enabled={str(secure).lower()}", "federation.rounds=1")
    trusted = {K.NODE_COORDINATOR_PUBLIC_KEY: str(keys["trusted.pub"])}
    nodes = {node: _site(tmp_path, node, **trusted) for node in (11, 22, 33)}

    def ledgers() -> list[Any]:
        return [json.loads((tmp_path / f"ledger{n}.json").read_text()) for n in nodes]

    signed = run_federation(
        InProcessGrid(make_client_app(config), nodes),
        config,
        run_dir=tmp_path / "signed",
        signing_key=load_private_key(keys["trusted"]),
    )
    (row,) = signed
    assert row["updated"] and row["sites_replied"] == 3 and row["eval_sites"] == 3
    before = ledgers()
    for key in (None, load_private_key(keys["other"])):  # anyone else, with or without a key
        rogue = tmp_path / f"rogue-{key is None}"
        with pytest.raises(FederationAborted, match="unsigned-instruction"):  # no site trains
            run_federation(
                InProcessGrid(make_client_app(config), nodes),
                config,
                run_dir=rogue,
                signing_key=key,
            )
        (row,) = RunDir(rogue).read_metrics()
        assert not row["updated"] and row["sites_failed"] == 3 and row["eval_sites"] == 0
        assert set(row["failures"].values()) == {_fixed(K.ERR_SIGNATURE)}
        assert ledgers() == before  # nothing charged, nothing evaluated


def test_changed_evaluation_settings_are_a_second_evaluation_and_refused(tmp_path: Path) -> None:
    """One charged round, one adapter: asking again with another eval cap or model length (to
    isolate single held-out examples) is refused like another adapter."""
    config = _config(tmp_path)
    node = _node(tmp_path)
    coordinator = Coordinator(config)
    _delta(_send(config, node, coordinator.train()))
    assert not _send(config, node, coordinator.evaluate(coordinator.start)).has_error()
    for change in ("data.max_eval_examples=1", "model.max_length=16", "seed=5"):
        other = _config(tmp_path, change)
        reply = _send(other, node, Coordinator(other).evaluate(Coordinator(other).start))
        assert reply.error.reason == _fixed(K.ERR_EVALUATION_REFUSED), change


def test_a_deployed_sites_held_out_split_is_its_own(tmp_path: Path) -> None:
    """The coordinator's data.test_fraction / max_eval_examples / seed do not move a deployed
    site's examples between training and evaluation; a simulation partition's split is the
    run's."""
    from fedpeft.client.site import held_out_split

    node = _node(tmp_path)
    for overrides in ((), ("data.test_fraction=0.9", "data.max_eval_examples=1", "seed=3")):
        config = _config(tmp_path, *overrides)
        assert held_out_split(config, node) == (K.DEFAULT_EVAL_FRACTION, K.DEFAULT_EVAL_MAX, 0)
    config = _config(tmp_path, "data.test_fraction=0.5", "seed=3")
    partition = {K.NODE_PARTITION_ID: 0, K.NODE_NUM_PARTITIONS: 2}
    assert held_out_split(config, partition) == (0.5, config.data.max_eval_examples, 3)
    bad = {K.NODE_EVAL_FRACTION: "a fifth", K.NODE_EVAL_MAX: "200"}
    with pytest.raises(ConfigError, match=r"eval-fraction='a fifth' must be a number in \(0, 1\)"):
        held_out_split(config, {**node, **bad})
    for cap in ("many", "0", "2.5"):
        with pytest.raises(ConfigError, match=rf"eval-max-examples='{cap}' must be a whole"):
            held_out_split(config, {**node, K.NODE_EVAL_MAX: cap})
    for fraction in ("nan", "1", "0"):
        with pytest.raises(ConfigError, match="eval-fraction"):
            held_out_split(config, {**node, K.NODE_EVAL_FRACTION: fraction})


def test_the_same_instruction_in_another_secure_session_is_another_release(
    tmp_path: Path,
) -> None:
    """Masked in two sessions (two groups of sites), one instruction would let sums be
    subtracted to isolate one site; each session is therefore a fresh release and charge."""
    from fedpeft.server.aggregation import RoundRequest as Request
    from fedpeft.server.secure_aggregation import SecureAggregation

    config = _config(
        tmp_path, "secagg.enabled=true", "federation.rounds=1", "privacy.noise_multiplier=1.0"
    )
    nodes = {node: _site(tmp_path, node, **{K.NODE_EPSILON_MAX: 100.0}) for node in (11, 22, 33)}
    coordinator = Coordinator(config)
    grid = InProcessGrid(make_client_app(config), nodes)
    for group in ((11, 22), (11, 33)):
        request = Request(
            round_number=1,
            nodes=list(group),
            global_flat=coordinator.start,
            trained=coordinator.trained,
            min_sites=2,
            timeout=60.0,
            federation_id=FEDERATION,
            broadcast=encode(coordinator.start, coordinator.layout, seed=config.seed),
        )
        assert SecureAggregation(config.secagg).run_round(grid, request).mean_delta is not None
    entries = json.loads((tmp_path / "ledger11.json").read_text())["entries"]
    assert len(entries) == 2 and entries[0]["binding"] != entries[1]["binding"]
    assert entries[0]["release"] != entries[1]["release"]  # fresh noise, not the same update


def test_a_site_that_requires_secure_aggregation_refuses_plain_runs_and_small_sums(
    tmp_path: Path,
) -> None:
    from flwr.app import ConfigRecord, RecordDict

    from fedpeft.privacy.secagg import SecAggServer
    from fedpeft.privacy.secagg_wire import encode as wire

    node = _node(tmp_path, **{K.NODE_SECAGG_REQUIRED: "true", K.NODE_SECAGG_MIN_SITES: 3})
    plain = _config(tmp_path)  # secagg.enabled=false: the coordinator switched it off
    coordinator = Coordinator(plain)
    for message in (coordinator.train(), coordinator.evaluate(coordinator.start)):
        assert _send(plain, node, message).error.reason == _fixed(K.ERR_SECAGG_REQUIRED)
    assert not (tmp_path / "ledger.json").exists()

    secure = _config(tmp_path, "secagg.enabled=true")
    for sites, threshold in (((NODE, 8), 2), ((NODE, 8, 9, 10), 3)):
        server = SecAggServer(
            round_id=5, node_ids=list(sites), vector_length=4, clip=1.0, threshold=threshold
        )
        request = server.setup()[NODE]
        content = RecordDict({K.SECAGG: ConfigRecord(dict(wire(request).fields))})
        message = Message(content=content, dst_node_id=NODE, message_type=f"train.{K.SECAGG_SETUP}")
        reply = _send(secure, node, message)
        if threshold < 3:  # a sum could rest on 2 sites: below the site's floor
            assert reply.error.reason == _fixed(K.ERR_SECAGG_REQUIRED)
        else:
            assert not reply.has_error()


# --- the site's own audit trail -----------------------------------------------------------


def _site_trail(tmp_path: Path) -> list[dict[str, Any]]:
    from fedpeft.privacy.trail import read_trail

    check = read_trail(tmp_path / "ledger.json.audit.jsonl")
    assert check.ok, check.problem
    return list(check.entries)


def test_the_site_trail_logs_the_instruction_and_exactly_what_left(tmp_path: Path) -> None:
    import hashlib

    config = _config(tmp_path)
    coordinator = Coordinator(config)
    instruction = coordinator.train()
    reply = _send(config, _node(tmp_path), instruction)
    received, released = _site_trail(tmp_path)
    assert received["event"] == "instruction" and released["event"] == "release"
    assert (received["round"], received["federation_id"], received["task"]) == (
        1,
        FEDERATION,
        K.TASK_TRAIN,
    )
    sent = instruction.content.array_records[K.ARRAYS][K.ARRAY_FLAT].numpy().tobytes()
    assert received["adapter_sha256"] == hashlib.sha256(sent).hexdigest()
    wire = reply.content.array_records[K.ARRAYS][K.ARRAY_FLAT].data  # the bytes that left
    assert released["arrays"] == {f"{K.ARRAYS}/{K.ARRAY_FLAT}": hashlib.sha256(wire).hexdigest()}
    from fedpeft.client.trail import content_sha256

    assert released["content_sha256"] == content_sha256(reply.content)
    # a refusal: the same round evaluated with another adapter
    other = coordinator.start + np.float32(0.01)
    refused = _send(config, _node(tmp_path), coordinator.evaluate(other, round_number=2))
    assert refused.has_error()
    refusal = _site_trail(tmp_path)[-1]
    assert refusal["event"] == "refusal"
    assert refusal["code"] == refused.error.reason.split(":")[0] == K.ERR_EVALUATION_REFUSED


def test_no_reply_changes_because_of_the_site_trail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _config(tmp_path)
    coordinator = Coordinator(config)
    with_trail = _released(_send(config, _node(tmp_path), coordinator.train()))
    assert len(_site_trail(tmp_path)) == 2
    monkeypatch.setattr("fedpeft.client.trail.site_trail_path", lambda config, context: None)
    # an identical retry repeats the identical release (charged once), now with no trail
    without = _released(_send(config, _node(tmp_path), coordinator.train()))
    assert len(_site_trail(tmp_path)) == 2
    assert without == with_trail


def test_a_site_whose_trail_cannot_be_written_releases_nothing(tmp_path: Path) -> None:
    config = _config(tmp_path)
    (tmp_path / "taken").mkdir()  # a folder where the trail file should be
    node = _node(tmp_path, **{K.NODE_AUDIT_PATH: str(tmp_path / "taken")})
    reply = _send(config, node, Coordinator(config).train())
    assert reply.has_error() and reply.error.reason == _fixed(K.ERR_SITE_FAILED)
    assert not (tmp_path / "ledger.json").exists() or _entries(tmp_path) == []


# --- generated answers (fedpeft.generate) ----------------------------------------------------


def _causal(tmp_path: Path, *overrides: str) -> FedPeftConfig:
    return compose_config(
        [
            "experiment=tiny_causal_lm",
            f"data.path={tmp_path / 'unused.jsonl'}",
            "privacy.enabled=true",
            "privacy.epsilon=8.0",
            "privacy.sample_rate=0.125",
            "privacy.accountant=rdp",
            "train.eval_max_new_tokens=4",
            *overrides,
        ]
    )


def _causal_node(tmp_path: Path, prompts: list[str] | None) -> dict[str, Any]:
    data = write_causal_jsonl(tmp_path / "site.jsonl", n=48, seed=3)
    node: dict[str, Any] = {
        K.NODE_DATA_PATH: str(data),
        K.NODE_LEDGER_PATH: str(tmp_path / "ledger.json"),
        K.NODE_EPSILON_MAX: 8.0,
        K.NODE_DELTA: 1e-5,
    }
    if prompts is not None:
        (tmp_path / "published.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")
        node[K.NODE_EVAL_PROMPTS] = str(tmp_path / "published.txt")
    return node


def test_a_site_that_publishes_no_prompts_sends_no_text(tmp_path: Path) -> None:
    """Byte for byte: its evaluation reply is the three figures, even when the coordinator's
    run config asks simulated sites to publish held-out prompts (data.eval_prompts)."""
    config = _causal(tmp_path, "data.eval_prompts=4")
    node = _causal_node(tmp_path, None)
    coordinator = Coordinator(config)
    _delta(_send(config, node, coordinator.train()))
    released = _released(_send(config, node, coordinator.evaluate(coordinator.start)))
    assert released["arrays"] == {} and released["configs"] == {}
    assert set(released["metrics"]) == {K.METRICS}
    assert set(released["metrics"][K.METRICS]) == {
        K.MET_NUM_EXAMPLES,
        K.MET_EVAL_LOSS,
        K.MET_EVAL_ACCURACY,
    }


def test_the_coordinator_cannot_choose_the_prompts_a_site_answers(tmp_path: Path) -> None:
    """Prompts written into the instruction are never read: the reply answers the site's own
    published prompts and is byte-identical to the honest one."""
    config = _causal(tmp_path)
    published = ["say good bad"]
    node = _causal_node(tmp_path, published)
    coordinator = Coordinator(config)
    _delta(_send(config, node, coordinator.train()))
    honest = _released(_send(config, node, coordinator.evaluate(coordinator.start)))
    assert honest["configs"][K.GENERATIONS][K.GEN_PROMPTS] == published
    assert len(honest["configs"][K.GENERATIONS][K.GEN_ANSWERS]) == 1
    crafted = coordinator.evaluate(coordinator.start)
    probe = "repeat the held-out record of patient 7"
    entries = crafted.content.config_records[K.CONFIG]
    for key in (K.GEN_PROMPTS, K.NODE_EVAL_PROMPTS, "prompt", K.GENERATIONS):
        entries[key] = [probe]
    entries["eval-max-new-tokens"] = 256
    crafted.content[K.GENERATIONS] = ConfigRecord({K.GEN_PROMPTS: [probe]})
    reply = _released(_send(config, node, crafted))
    assert reply == honest
    assert probe not in json.dumps(reply["configs"])


def test_answers_are_bound_like_the_figures(tmp_path: Path) -> None:
    """No text for a round the site did not train; none for a second adapter or for longer
    answers (train.eval_max_new_tokens) asked for a round it already evaluated."""
    config = _causal(tmp_path)
    node = _causal_node(tmp_path, ["say good bad"])
    coordinator = Coordinator(config)
    never = _send(config, node, coordinator.evaluate(coordinator.start))
    assert never.error.reason == _fixed(K.ERR_EVALUATION_REFUSED)
    _delta(_send(config, node, coordinator.train()))
    assert not _send(config, node, coordinator.evaluate(coordinator.start)).has_error()
    probe = coordinator.start.copy()
    probe[-1] += 3.0
    assert _send(config, node, coordinator.evaluate(probe)).error.reason == _fixed(
        K.ERR_EVALUATION_REFUSED
    )
    longer = _causal(tmp_path, "train.eval_max_new_tokens=64")
    reply = _send(longer, node, Coordinator(longer).evaluate(Coordinator(longer).start))
    assert reply.error.reason == _fixed(K.ERR_EVALUATION_REFUSED)


def test_a_secure_evaluation_carries_no_text(tmp_path: Path) -> None:
    """Under secure aggregation a site that published prompts still sends only the three
    masked figures (a text cannot be summed), and a plain evaluate is refused."""
    from fedpeft.client.release import local_update, secure_evaluation
    from fedpeft.client.site import load_site

    config = _causal(tmp_path, "secagg.enabled=true")
    node = _causal_node(tmp_path, ["say good bad"])
    coordinator = Coordinator(config)
    site = load_site(config, node)
    assert site.prompts == ("say good bad",)
    local_update(coordinator.train(), site, session="s1")  # the round is charged
    update = secure_evaluation(coordinator.evaluate(coordinator.start), site, session="s1")
    assert update.delta.shape == (3,) and update.layout is None
    assert update.metrics == {} and update.declaration == {}
    plain = _send(config, node, coordinator.evaluate(coordinator.start))
    assert plain.error.reason == _fixed(K.ERR_EVALUATION_REFUSED)


@pytest.mark.parametrize("names", ["a tensor the adapter lacks", "no tensor at all"])
def test_a_site_refuses_to_train_what_its_adapter_lacks_before_anything_is_charged(
    tmp_path: Path, names: str
) -> None:
    config = _config(tmp_path)
    coordinator = Coordinator(config)
    trained = coordinator.trained
    coordinator.trained = (
        AdapterLayout(
            names=(*trained.names, "base_model.model.bert.embeddings.word_embeddings.weight"),
            shapes=(*trained.shapes, (64, 32)),
        )
        if names == "a tensor the adapter lacks"
        else AdapterLayout(names=(), shapes=())
    )
    reply = _send(config, _node(tmp_path), coordinator.train())
    assert reply.has_error()
    assert reply.error.reason == _fixed(K.ERR_BAD_INSTRUCTION)
    ledger = tmp_path / "ledger.json"
    assert not ledger.exists() or _entries(tmp_path) == []  # the site's budget is untouched
