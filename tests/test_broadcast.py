"""The global adapter on the wire: rank-nested LoRA starts, only what a site cannot derive."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedpeft import constants as K
from fedpeft.broadcast import Broadcast, decode, encode, initial_lora_a
from fedpeft.client.app import make_client_app
from fedpeft.model import build_model, get_flat, split_flat
from fedpeft.ranks import site_lora
from fedpeft.server.federation import run_federation
from fedpeft.server.progress import Progress
from fedpeft.testing import InProcessGrid, write_classification_csv
from tests.conftest import tiny_config

pytestmark = pytest.mark.filterwarnings(
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"
)


def test_lora_a_start_is_rank_nested_and_peft_distributed() -> None:
    full = initial_lora_a("layer.q.lora_A.default.weight", (8, 400), seed=3)
    low = initial_lora_a("layer.q.lora_A.default.weight", (3, 400), seed=3)
    np.testing.assert_array_equal(low, full[:3])
    other = initial_lora_a("layer.v.lora_A.default.weight", (8, 400), seed=3)
    assert not np.array_equal(full, other)  # each tensor its own stream
    assert not np.array_equal(full, initial_lora_a("layer.q.lora_A.default.weight", (8, 400), 4))
    bound = 1 / np.sqrt(400)  # peft: kaiming_uniform_(a=sqrt(5))
    assert full.dtype == np.float32 and np.abs(full).max() <= bound
    assert abs(full.std() - bound / np.sqrt(3)) < 0.05 * bound  # uniform(-b, b) has std b/√3


def test_model_starts_from_the_shared_rule_at_every_rank(cls_csv: Path) -> None:
    config = tiny_config("classification", cls_csv, "lora.r=4")
    full = build_model(config.model, config.lora, seed=config.seed)
    low = build_model(config.model, site_lora(config.lora, 2), seed=config.seed)
    full_a = dict(split_flat(get_flat(full.peft_model, full.layout), full.layout))
    low_a = dict(split_flat(get_flat(low.peft_model, low.layout), low.layout))
    names = [n for n in full.layout.names if ".lora_A." in n]
    assert names
    for name in names:
        np.testing.assert_array_equal(full_a[name], initial_lora_a(name, full_a[name].shape, 0))
        np.testing.assert_array_equal(low_a[name], full_a[name][:2])


def test_encode_leaves_out_factors_at_their_start_and_decode_rebuilds_them(cls_csv: Path) -> None:
    config = tiny_config("classification", cls_csv)
    loaded = build_model(config.model, config.lora, seed=config.seed)
    layout, start = loaded.layout, get_flat(loaded.peft_model, loaded.layout)
    head = [n for n in layout.names if ".modules_to_save." in n]

    message = encode(start, layout, seed=config.seed)
    assert list(message.sent) == head  # round 1: A at its start, B at zero
    np.testing.assert_array_equal(decode(message, layout, seed=config.seed), start)

    trained = start.copy()
    tensors = split_flat(trained, layout)
    b_name = next(n for n in layout.names if ".lora_B." in n)
    a_name = next(n for n in layout.names if ".lora_A." in n)
    tensors[b_name][...] = 0.5  # views: this writes into `trained`
    message = encode(trained, layout, seed=config.seed)
    assert b_name in message.sent and a_name not in message.sent  # FFA: A never moves
    np.testing.assert_array_equal(decode(message, layout, seed=config.seed), trained)

    tensors[a_name][0, 0] += 1.0  # FedAvg / FedSVD move A: then it is sent
    message = encode(trained, layout, seed=config.seed)
    assert a_name in message.sent
    np.testing.assert_array_equal(decode(message, layout, seed=config.seed), trained)


def test_decode_refuses_what_it_cannot_rebuild_or_check(cls_csv: Path) -> None:
    config = tiny_config("classification", cls_csv)
    loaded = build_model(config.model, config.lora, seed=config.seed)
    layout, start = loaded.layout, get_flat(loaded.peft_model, loaded.layout)
    message = encode(start, layout, seed=config.seed)
    with pytest.raises(ValueError, match="digest mismatch.*versions or seeds"):
        decode(message, layout, seed=config.seed + 1)
    with pytest.raises(ValueError, match="does not have"):
        decode(Broadcast(message.values, ("nope", *message.sent), ""), layout, seed=0)
    with pytest.raises(ValueError, match="a site cannot rebuild"):
        decode(Broadcast(np.zeros(0, np.float32), (), message.derived_digest), layout, seed=0)
    with pytest.raises(ValueError, match="expected float32"):
        decode(Broadcast(message.values[:-1], message.sent, message.derived_digest), layout, seed=0)


@pytest.mark.parametrize(("strategy", "a_sent_after_round_1"), [("ffa", False), ("fedavg", True)])
def test_federation_sends_down_only_what_sites_cannot_derive(
    tmp_path: Path, strategy: str, a_sent_after_round_1: bool
) -> None:
    nodes: dict[int, dict[str, Any]] = {
        n: {
            K.NODE_DATA_PATH: str(write_classification_csv(tmp_path / f"{n}.csv", 48, seed=n)),
            K.NODE_PRIVACY_REQUIRED: "false",  # a plain run: these sites waive DP
        }
        for n in (1, 2, 3)
    }
    config = tiny_config("classification", tmp_path / "1.csv", f"strategy={strategy}")
    grid = InProcessGrid(make_client_app(config), nodes)
    rows = run_federation(grid, config, run_dir=tmp_path / "run", progress=Progress())
    loaded = build_model(config.model, config.lora, seed=config.seed)
    sizes = dict(zip(loaded.layout.names, loaded.layout.numels, strict=True))
    head = sum(v for n, v in sizes.items() if ".modules_to_save." in n)
    b = sum(v for n, v in sizes.items() if ".lora_B." in n)
    a = sum(v for n, v in sizes.items() if ".lora_A." in n)
    assert len(grid.sent) == 2 * 2 * 3  # 2 rounds × (train, evaluate) × 3 sites
    sent_sizes = [
        (m.content.config_records[K.CONFIG][K.CFG_ROUND], m.content.array_records[K.ARRAYS])
        for m in grid.sent
    ]
    for round_number, arrays in sent_sizes:
        size = arrays[K.ARRAY_FLAT].numpy().size
        if round_number == 1 and size == head:
            continue  # round 1 train: only the head differs from the start
        expected = head + b + (a if a_sent_after_round_1 else 0)
        assert size == expected, (round_number, size)
    assert rows[0]["bytes_down"] == 4 * head * 3
    assert rows[1]["bytes_down"] == 4 * (head + b + (a if a_sent_after_round_1 else 0)) * 3
    assert all(r["sites_replied"] == 3 for r in rows)
