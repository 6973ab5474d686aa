"""The server's round loop on an in-process grid: aggregation, failures, what it receives."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message

from fedpeft import constants as K
from fedpeft.client.app import make_client_app
from fedpeft.client.site import order_key
from fedpeft.config import ConfigError, FedPeftConfig
from fedpeft.model import build_model, is_bias, is_head
from fedpeft.server.federation import Federation, run_federation
from fedpeft.server.progress import Progress
from fedpeft.server.rundir import RunDir
from fedpeft.testing import InProcessGrid, Tamper, write_classification_csv
from tests.conftest import tiny_config


def _grid(
    config: FedPeftConfig,
    tmp_path: Path,
    *,
    tamper: Tamper | None = None,
    bad_node: int | None = None,
    grid_type: type[InProcessGrid] = InProcessGrid,
) -> InProcessGrid:
    """Three sites, each with its own CSV file (a real site's node config)."""
    configs: dict[int, dict[str, Any]] = {}
    for node in (11, 22, 33):
        path = write_classification_csv(tmp_path / f"site{node}.csv", n=60, seed=node)
        configs[node] = {
            K.NODE_DATA_PATH: str(path if node != bad_node else tmp_path / "gone.csv"),
            K.NODE_PRIVACY_REQUIRED: "false",  # a plain run: these sites waive DP
        }
    return grid_type(make_client_app(config), configs, tamper=tamper)


def test_server_receives_exactly_the_trainable_adapter(cls_csv: Path, tmp_path: Path) -> None:
    config = tiny_config("classification", cls_csv, "federation.rounds=1")
    grid = _grid(config, tmp_path)
    run_federation(grid, config, run_dir=tmp_path / "run", progress=Progress())
    loaded = build_model(config.model, config.lora, seed=config.seed)
    trainable = {n: p.numel() for n, p in loaded.peft_model.named_parameters() if p.requires_grad}
    base_names = {n for n, p in loaded.peft_model.named_parameters() if not p.requires_grad}
    train_replies = [m for m in grid.received if K.LAYOUT in m.content.config_records]
    assert len(train_replies) == 3
    for reply in train_replies:
        layout = reply.content.config_records[K.LAYOUT]
        names = list(layout[K.LAYOUT_NAMES])  # type: ignore[arg-type]
        assert set(names) == set(trainable) and not set(names) & base_names
        assert all(".lora_" in n or ".modules_to_save." in n for n in names)
        arrays = reply.content.array_records[K.ARRAYS]
        assert list(arrays.keys()) == [K.ARRAY_FLAT]
        assert arrays[K.ARRAY_FLAT].numpy().size == sum(trainable.values())
        assert sum(layout[K.LAYOUT_NUMELS]) == sum(trainable.values())  # type: ignore[arg-type]


def test_global_update_is_the_weighted_mean_of_deltas(cls_csv: Path, tmp_path: Path) -> None:
    config = tiny_config("classification", cls_csv, "federation.rounds=1", "strategy.server_lr=1.0")
    grid = _grid(config, tmp_path)
    federation = Federation(grid, config, RunDir(tmp_path / "run"), Progress())
    start = federation.global_flat.copy()
    federation.run()
    deltas, weights = [], []
    for reply in grid.received:
        if K.LAYOUT in reply.content.config_records:
            deltas.append(reply.content.array_records[K.ARRAYS][K.ARRAY_FLAT].numpy())
            weights.append(int(reply.content.metric_records[K.METRICS][K.MET_NUM_EXAMPLES]))
    expected = start + sum(w * d for w, d in zip(weights, deltas, strict=True)) / sum(weights)
    np.testing.assert_allclose(federation.global_flat, expected, rtol=1e-5, atol=1e-7)
    assert len(set(weights)) >= 1 and all(w > 0 for w in weights)


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_failing_site_is_recorded_and_round_goes_on(cls_csv: Path, tmp_path: Path) -> None:
    config = tiny_config("classification", cls_csv)
    run_federation(_grid(config, tmp_path, bad_node=22), config, run_dir=tmp_path / "run")
    rows = _rows(tmp_path / "run")
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert row["sites_replied"] == 2 and row["sites_failed"] == 1 and row["updated"]
        assert row["failures"]["22"].startswith(K.ERR_SITE_CONFIG)  # the detail: site's log


@pytest.mark.parametrize("attack", ["nan", "wrong_length", "float64", "wrong_names", "no_arrays"])
def test_malformed_update_is_rejected(attack: str, cls_csv: Path, tmp_path: Path) -> None:
    def tamper(node: int, reply: Message) -> Message:
        if node != 33 or K.LAYOUT not in reply.content.config_records:
            return reply
        flat = reply.content.array_records[K.ARRAYS][K.ARRAY_FLAT].numpy()
        if attack == "nan":
            flat = flat.copy()
            flat[0] = np.nan
        elif attack == "wrong_length":
            flat = np.concatenate([flat, np.zeros(3, np.float32)])
        elif attack == "float64":
            flat = flat.astype(np.float64)
        elif attack == "wrong_names":
            layout = reply.content.config_records[K.LAYOUT]
            names = list(layout[K.LAYOUT_NAMES])  # type: ignore[arg-type]
            names[0] = "base_model.model.bert.embeddings.word_embeddings.weight"
            layout[K.LAYOUT_NAMES] = names
        if attack == "no_arrays":
            del reply.content.array_records[K.ARRAYS]
        else:
            reply.content.array_records[K.ARRAYS] = ArrayRecord({K.ARRAY_FLAT: Array(flat)})
        return reply

    config = tiny_config("classification", cls_csv, "federation.rounds=1")
    run_federation(_grid(config, tmp_path, tamper=tamper), config, run_dir=tmp_path / "run")
    (row,) = _rows(tmp_path / "run")
    assert row["sites_replied"] == 2 and row["sites_failed"] == 1 and row["updated"]
    assert row["failures"]["33"].startswith("rejected: node 33")


def test_too_few_usable_updates_leave_the_adapter_unchanged(cls_csv: Path, tmp_path: Path) -> None:
    config = tiny_config("classification", cls_csv, "federation.rounds=1", "federation.min_sites=3")
    grid = _grid(config, tmp_path, tamper=lambda node, r: None if node == 11 else r)
    federation = Federation(grid, config, RunDir(tmp_path / "run"), Progress())
    before = federation.global_flat.copy()
    federation.run()
    (row,) = _rows(tmp_path / "run")
    assert row["sites_dropped"] == 1 and not row["updated"]
    assert np.array_equal(federation.global_flat, before)


def test_fraction_samples_the_right_number_of_sites(cls_csv: Path, tmp_path: Path) -> None:
    config = tiny_config(
        "classification",
        cls_csv,
        "federation.fraction=0.5",
        "federation.min_sites=1",
        "federation.rounds=3",
    )
    run_federation(_grid(config, tmp_path), config, run_dir=tmp_path / "run")
    assert [r["sites_sampled"] for r in _rows(tmp_path / "run")] == [2, 2, 2]


def test_checkpoint_holds_the_global_adapter(cls_csv: Path, tmp_path: Path) -> None:
    config = tiny_config("classification", cls_csv)
    federation = Federation(_grid(config, tmp_path), config, RunDir(tmp_path / "run"), Progress())
    federation.run()
    checkpoint = RunDir(tmp_path / "run").latest_checkpoint()
    assert checkpoint is not None and checkpoint.round == 2
    np.testing.assert_array_equal(checkpoint.global_flat, federation.global_flat)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "round-0001",
        "round-0002",
    ]


class _ReversedGrid(InProcessGrid):
    """Replies arrive in the opposite order (as they may, from sites of different speed)."""

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> Any:
        return list(reversed(list(super().send_and_receive(messages, timeout=timeout))))


def test_the_sum_does_not_depend_on_the_order_replies_arrive_in(
    cls_csv: Path, tmp_path: Path
) -> None:
    """Equal weights and updates +1e17, -1e17 and 1: summed in arrival order, one order
    gives 1 and the other 0 (1 - 1e17 rounds to -1e17), so the global adapter would differ."""
    values = {11: 1e17, 22: -1e17, 33: 1.0}

    def crafted(node: int, reply: Message) -> Message:
        if K.LAYOUT in reply.content.config_records:
            flat = reply.content.array_records[K.ARRAYS][K.ARRAY_FLAT].numpy()
            update = np.full_like(flat, values[node])
            reply.content.array_records[K.ARRAYS] = ArrayRecord({K.ARRAY_FLAT: Array(update)})
            reply.content.metric_records[K.METRICS][K.MET_NUM_EXAMPLES] = 1
        return reply

    config = tiny_config("classification", cls_csv, "federation.rounds=1")
    results = []
    for name, grid_type in (("arrival", InProcessGrid), ("reversed", _ReversedGrid)):
        (tmp_path / name).mkdir()
        grid = _grid(config, tmp_path / name, tamper=crafted, grid_type=grid_type)
        federation = Federation(grid, config, RunDir(tmp_path / name / "run"), Progress())
        start = federation.global_flat.copy()
        federation.run()
        results.append(federation.global_flat - start)
    np.testing.assert_array_equal(results[0], results[1])
    # one of the two sums, whichever the content order gives
    assert np.allclose(results[0], 0.0, atol=1e-6) or np.allclose(results[0], 1 / 3, atol=1e-6)


def test_lora_on_chosen_layers_at_rank_one_trains_and_sends_only_those(
    cls_csv: Path, tmp_path: Path
) -> None:
    config = tiny_config(
        "classification",
        cls_csv,
        "federation.rounds=1",
        "lora.r=1",
        "lora.layers_to_transform=[1]",
    )
    grid = _grid(config, tmp_path)
    run_federation(grid, config, run_dir=tmp_path / "run", progress=Progress())
    train_replies = [m for m in grid.received if K.LAYOUT in m.content.config_records]
    assert len(train_replies) == 3
    for reply in train_replies:
        names = list(reply.content.config_records[K.LAYOUT][K.LAYOUT_NAMES])  # type: ignore[arg-type]
        lora = [n for n in names if ".lora_" in n]
        assert lora and all(".layer.1." in n for n in lora)  # layer 0 has no adapter
        # r = 1 on query and value of one 32-wide layer: A and B of 32 each, and the head
        assert reply.content.array_records[K.ARRAYS][K.ARRAY_FLAT].numpy().size == 4 * 32 + 66
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert saved["layers_to_transform"] == [1] and saved["r"] == 1  # peft's own save format


def _sent_names(grid: InProcessGrid) -> dict[str, list[str]]:
    """The tensor names each round's replies carried, by round (the message's group id)."""
    return {
        m.metadata.group_id: sorted(m.content.config_records[K.LAYOUT][K.LAYOUT_NAMES])  # type: ignore[arg-type]
        for m in grid.received
        if K.LAYOUT in m.content.config_records
    }


@pytest.mark.parametrize("strategy", ["fedavg", "fedsvd"])
def test_a_head_round_trains_the_head_alone_and_leaves_lora_at_its_start(
    cls_csv: Path, tmp_path: Path, strategy: str
) -> None:
    config = tiny_config(
        "classification",
        cls_csv,
        "federation.rounds=2",
        f"strategy={strategy}",
        "train.trainable=[head,lora]",
    )
    grid = _grid(config, tmp_path)
    federation = Federation(grid, config, RunDir(tmp_path / "run"), Progress())
    start = federation.global_flat.copy()
    layout = federation.loaded.layout
    lora = np.concatenate(
        [
            np.arange(offset, offset + numel)
            for name, offset, numel in zip(
                layout.names, np.cumsum((0,) + layout.numels[:-1]), layout.numels, strict=True
            )
            if ".lora_" in name
        ]
    )
    federation.train_round(1, [11, 22, 33])
    after_head = federation.global_flat.copy()
    np.testing.assert_array_equal(after_head[lora], start[lora])  # A and B as they started
    assert not np.array_equal(after_head, start)  # the head moved
    sent = _sent_names(grid)
    assert sent["1"] and all(".modules_to_save." in n for n in sent["1"])
    federation.train_round(2, [11, 22, 33])
    assert any(".lora_B." in n for n in _sent_names(grid)["2"])  # the last entry, lora, repeats
    assert not np.array_equal(federation.global_flat[lora], start[lora])


def test_a_plain_round_repeats_wherever_the_sites_files_lie(cls_csv: Path, tmp_path: Path) -> None:
    # without DP the example order comes from the seed, the round and the file's name: the
    # same files in another folder (a benchmark's fresh temporary one) give the same round
    config = tiny_config("classification", cls_csv, "federation.rounds=1")
    flats = []
    for folder in ("first", "second"):
        (tmp_path / folder).mkdir()
        federation = Federation(
            _grid(config, tmp_path / folder), config, RunDir(tmp_path / folder / "run"), Progress()
        )
        federation.train_round(1, [11, 22, 33])
        flats.append(federation.global_flat.copy())
    np.testing.assert_array_equal(flats[0], flats[1])
    # and sites whose files share a name but not their rows still draw their own orders
    same_name = [tmp_path / f"{site}" / "site.csv" for site in ("a", "b")]
    keys = set()
    for seed, path in enumerate(same_name):
        path.parent.mkdir()
        write_classification_csv(path, n=60, seed=seed)
        keys.add(order_key(f"site {path}", {K.NODE_DATA_PATH: str(path)}))
    assert len(keys) == 2


@pytest.mark.parametrize("strategy", ["fedavg", "ffa"])
def test_bitfit_rounds_move_the_biases_and_head_and_send_nothing_else(
    cls_csv: Path, tmp_path: Path, strategy: str
) -> None:
    config = tiny_config(
        "classification",
        cls_csv,
        "federation.rounds=2",
        f"strategy={strategy}",
        "lora.bias=all",
        "train.trainable=[bias,bias,lora]",
    )
    grid = _grid(config, tmp_path)
    federation = Federation(grid, config, RunDir(tmp_path / "run"), Progress())
    layout = federation.loaded.layout
    offsets = np.cumsum((0,) + layout.numels[:-1])
    spans = {
        n: slice(o, o + k) for n, o, k in zip(layout.names, offsets, layout.numels, strict=True)
    }
    biases = [n for n in layout.names if is_bias(n)]
    # every bias of the tiny BERT's encoder, embeddings and pooler; peft's bias="all"
    assert len(biases) == 18 and all(n.endswith(".bias") for n in biases)
    start = federation.global_flat.copy()
    federation.train_round(1, [11, 22, 33])
    after = federation.global_flat
    moved = {n for n in layout.names if not np.array_equal(after[spans[n]], start[spans[n]])}
    assert moved and moved <= set(biases) | {n for n in layout.names if is_head(n)}
    assert set(biases) & moved and not any(".lora_" in n for n in moved)
    # what left each site: exactly the biases and the head, as many floats as they hold
    expected = sorted(n for n in layout.names if is_bias(n) or is_head(n))
    assert _sent_names(grid)["1"] == expected
    size = sum(layout.numels[layout.names.index(n)] for n in expected)
    flats = [m.content.array_records[K.ARRAYS][K.ARRAY_FLAT].numpy() for m in grid.received]
    assert all(f.size == size for f in flats if f.size)
    federation.train_round(3, [11, 22, 33])  # past the schedule's end: lora, with the biases
    names = _sent_names(grid)["3"]
    assert set(expected) <= set(names) and any(".lora_B." in n for n in names)
    assert (".lora_A." in " ".join(names)) == (strategy == "fedavg")


def test_a_schedule_is_checked(cls_csv: Path) -> None:
    allowed = r"allowed \['head', 'bias', 'lora'\]"
    with pytest.raises(ConfigError, match=rf"train.trainable='last': {allowed}"):
        tiny_config("classification", cls_csv, "train.trainable=[head,last]")
    with pytest.raises(ConfigError, match="train.trainable is empty"):
        tiny_config("classification", cls_csv, "train.trainable=[]")
    with pytest.raises(ConfigError, match="a causal LM has no classifier head"):
        tiny_config("causal_lm", cls_csv, "train.trainable=[head,lora]")
    # FedAdam's momentum would move LoRA in a head round after a LoRA round, biases likewise
    for schedule in ("[lora,head]", "[lora,bias]", "[bias,head]", "[head,lora,head]"):
        with pytest.raises(ConfigError, match="entries go head → bias → lora"):
            tiny_config("classification", cls_csv, f"train.trainable={schedule}", "lora.bias=all")
    tiny_config("classification", cls_csv, "train.trainable=[head,bias,lora]", "lora.bias=all")
    with pytest.raises(ConfigError, match="lora.bias=none: the adapter holds no biases"):
        tiny_config("classification", cls_csv, "train.trainable=[bias]")
    with pytest.raises(ConfigError, match=r"lora.bias='every': allowed \['none', 'all'"):
        tiny_config("classification", cls_csv, "lora.bias=every")
    for schedule in ("[head,lora]", "[bias,lora]"):
        with pytest.raises(ConfigError, match="a head or bias round has no LoRA rank slots"):
            tiny_config(
                "classification",
                cls_csv,
                f"train.trainable={schedule}",
                "lora.bias=all",
                "secagg.mixed_ranks=true",
            )
