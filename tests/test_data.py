"""Site data: file checks, partition properties, tokenisation of both task types."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest

from fedpeft.config import ConfigError, DataConfig, FederationConfig
from fedpeft.data import collate, load_file, partition_dataset, split_site, tokenize
from fedpeft.losses import IGNORE_INDEX
from fedpeft.model import _byte_tokenizer


def _table(n: int = 400, seed: int = 0) -> datasets.Dataset:
    rng = np.random.default_rng(seed)
    return datasets.Dataset.from_dict(
        {
            "text": [f"t{i}" for i in range(n)],
            "label": rng.integers(0, 2, n).tolist(),
            "domain": [f"d{i % 4}" for i in range(n)],
        }
    )


def _partitions(table: datasets.Dataset, **fed: object) -> list[datasets.Dataset]:
    federation = FederationConfig(**fed)  # type: ignore[arg-type]
    partitioner = partition_dataset(table, federation, DataConfig(), "classification", seed=1)
    return [partitioner.load_partition(i) for i in range(federation.num_sites)]


def test_iid_partitions_are_disjoint_cover_and_balanced() -> None:
    parts = _partitions(_table(), num_sites=4, partition="iid")
    texts = [t for p in parts for t in p["text"]]
    assert len(texts) == len(set(texts)) == 400
    assert {len(p) for p in parts} == {100}


def test_dirichlet_small_alpha_skews_labels_more_than_large() -> None:
    def skew(alpha: float) -> float:
        parts = _partitions(
            _table(2000), num_sites=5, partition="dirichlet", alpha=alpha, min_partition_size=5
        )
        return float(np.mean([abs(np.mean(p["label"]) - 0.5) for p in parts]))

    assert skew(0.2) > skew(100.0) + 0.1
    parts = _partitions(
        _table(2000), num_sites=5, partition="dirichlet", alpha=0.3, min_partition_size=5
    )
    assert sum(len(p) for p in parts) == 2000


def test_column_partition_gives_one_site_per_value() -> None:
    parts = _partitions(_table(), num_sites=4, partition="column", partition_column="domain")
    assert sorted(p["domain"][0] for p in parts) == ["d0", "d1", "d2", "d3"]
    assert all(len(set(p["domain"])) == 1 for p in parts)


def test_column_partition_with_wrong_site_count_says_the_right_one() -> None:
    with pytest.raises(ConfigError, match="federation.num_sites=4"):
        _partitions(_table(), num_sites=3, partition="column", partition_column="domain")


def test_column_partition_on_missing_column() -> None:
    with pytest.raises(ConfigError, match="'hospital' is not a column"):
        _partitions(_table(), num_sites=3, partition="column", partition_column="hospital")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist.*data-path"):
        load_file(tmp_path / "nope.csv", DataConfig(), "classification")


def test_missing_column_lists_what_is_there(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_text("sentence,label\nhi,1\n")
    with pytest.raises(
        ConfigError, match=r"lacks column\(s\) \['text'\].*sentence.*data.text_column"
    ):
        load_file(path, DataConfig(), "classification")


def test_bad_labels(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_text("text,label\nhi,yes\nho,no\n")
    with pytest.raises(ConfigError, match="integer class ids"):
        load_file(path, DataConfig(), "classification")


def test_unknown_suffix(tmp_path: Path) -> None:
    path = tmp_path / "x.parquet"
    path.write_text("")
    with pytest.raises(ConfigError, match="allowed: .csv"):
        load_file(path, DataConfig(), "classification")


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text("")
    with pytest.raises(ConfigError):
        load_file(path, DataConfig(), "causal_lm")


def test_site_with_too_few_examples() -> None:
    with pytest.raises(ConfigError, match="at least 2"):
        split_site(_table(1), test_fraction=0.2, max_test=None, seed=0, source="site 3")


def test_split_is_disjoint_and_capped() -> None:
    train, test = split_site(_table(100), test_fraction=0.3, max_test=10, seed=0, source="s")
    assert len(train) == 70 and len(test) == 10
    assert not set(train["text"]) & set(test["text"])


def test_causal_lm_labels_cover_only_the_response() -> None:
    tokenizer = _byte_tokenizer()
    table = datasets.Dataset.from_dict({"prompt": ["say hi", "x"], "response": ["hi", "yy"]})
    tokens = tokenize(table, tokenizer, config=DataConfig(), task="causal_lm", max_length=64)
    ids, mask, labels = tokens[0]
    scored = labels[labels != IGNORE_INDEX].tolist()
    # the response bytes and EOS, nothing of the prompt
    assert scored == tokenizer("hi", add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id
    ]
    batch = collate([tokens[0], tokens[1]], pad_id=int(tokenizer.pad_token_id))
    assert batch[0].shape == batch[2].shape
    short = int(tokens[1][0].shape[0])
    assert (batch[2][1, short:] == IGNORE_INDEX).all() and (batch[1][1, short:] == 0).all()


def test_classification_tokens_truncate_to_max_length() -> None:
    tokenizer = _byte_tokenizer()
    table = datasets.Dataset.from_dict({"text": ["a" * 100], "label": [1]})
    ids, _, label = tokenize(
        table, tokenizer, config=DataConfig(), task="classification", max_length=16
    )[0]
    assert ids.shape[0] == 16 and int(label) == 1


def test_rotten_tomatoes_is_embedded_and_labelled() -> None:
    from fedpeft.data import load_dataset

    table = load_dataset(DataConfig(), "classification", seed=0)
    assert len(table) == 12808
    assert Counter(table["label"]) == {1: 7403, 0: 5405}
