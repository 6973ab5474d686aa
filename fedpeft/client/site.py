"""Everything a site keeps between messages: its configuration, model and data.

This module owns *where a site's resources come from*: the composed configuration,
the node config its operator set (data path, device), the base model with its adapter
(loaded once per process and reused across rounds and runs, at the LoRA rank the site
declares with node config ``lora-rank``, see :mod:`fedpeft.ranks`), the site's tokenised
train / held-out splits, and the prompts it publishes (:mod:`fedpeft.generate`). In a
simulation a site's data is one partition of a shared dataset; at a real site it is the
operator's own file.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import datasets
import torch

from fedpeft import constants as K
from fedpeft.config import ConfigError, FedPeftConfig
from fedpeft.data import (
    SiteData,
    load_dataset,
    load_file,
    partition_dataset,
    split_site,
    tokenize,
)
from fedpeft.generate import published_prompts
from fedpeft.model import AdapterLayout, LoadedModel, cached_model, resolve_device
from fedpeft.ranks import check_site_rank, site_lora, with_rank

if TYPE_CHECKING:  # flwr-datasets is imported only where a simulation partitions data
    from flwr_datasets.partitioner import Partitioner


@dataclass
class Site:
    """A site's resources for one configuration."""

    name: str
    config: FedPeftConfig
    node_config: dict[str, object]
    loaded: LoadedModel
    data: SiteData
    device: torch.device
    rank: int  # the LoRA rank this site trains, in [1, config.lora.r]
    # what the site publishes for generated answers (fedpeft.generate; empty: nothing)
    prompts: tuple[str, ...] = ()
    # with the seed and the round, the order of examples without DP (see order_key)
    order_key: int = 0

    @property
    def global_layout(self) -> AdapterLayout:
        """The adapter layout at the federation's rank ``lora.r`` (what the server sends)."""
        if self.rank == self.config.lora.r:
            return self.loaded.layout
        return with_rank(self.loaded.layout, self.config.lora.r)


_PARTITIONERS: dict[str, Partitioner] = {}
_SITES: dict[str, Site] = {}


def _shared_partitioner(config: FedPeftConfig) -> Partitioner:
    key = repr((config.data, config.federation, config.model.task, config.seed))
    if key not in _PARTITIONERS:
        _PARTITIONERS.clear()  # one simulated dataset per process at a time
        table = load_dataset(config.data, config.model.task, seed=config.seed)
        _PARTITIONERS[key] = partition_dataset(
            table, config.federation, config.data, config.model.task, seed=config.seed
        )
    return _PARTITIONERS[key]


def _raw_site_table(
    config: FedPeftConfig, node_config: Mapping[str, object]
) -> tuple[str, datasets.Dataset]:
    data_path = node_config.get(K.NODE_DATA_PATH)
    if data_path:
        return f"site {data_path}", load_file(str(data_path), config.data, config.model.task)
    if K.NODE_PARTITION_ID not in node_config:
        raise ConfigError(
            f"this node has neither '{K.NODE_DATA_PATH}' nor '{K.NODE_PARTITION_ID}' in its node "
            "config; start the SuperNode with "
            f"--node-config \"{K.NODE_DATA_PATH}='/data/site.csv'\"."
        )
    partition_id = int(str(node_config[K.NODE_PARTITION_ID]))
    partition = _shared_partitioner(config).load_partition(partition_id)
    return f"site {partition_id}", partition


def held_out_split(
    config: FedPeftConfig, node_config: Mapping[str, object]
) -> tuple[float, int | None, int]:
    """``(test_fraction, max_test, seed)`` of the site's train / held-out split.

    A simulation partition uses the run's ``data.test_fraction``, ``data.max_eval_examples``
    and ``seed``. A deployed site uses its own node config (``eval-fraction``,
    ``eval-max-examples``) and a fixed seed, so its held-out examples are the same in every
    run: a coordinator cannot move examples a site trained on into the set it evaluates, nor
    shrink that set to a handful of examples.
    """
    if K.NODE_PARTITION_ID in node_config:
        return config.data.test_fraction, config.data.max_eval_examples, config.seed
    raw_fraction = node_config.get(K.NODE_EVAL_FRACTION, K.DEFAULT_EVAL_FRACTION)
    raw_cap = node_config.get(K.NODE_EVAL_MAX, K.DEFAULT_EVAL_MAX)
    try:
        fraction = float(str(raw_fraction))
    except ValueError:
        fraction = math.nan
    if not 0.0 < fraction < 1.0:  # NaN fails too
        raise ConfigError(
            f"node config {K.NODE_EVAL_FRACTION}={raw_fraction!r} must be a number in (0, 1), "
            f"the share of the site's rows it holds out (default {K.DEFAULT_EVAL_FRACTION})"
        )
    try:
        cap = int(str(raw_cap))
    except ValueError:
        cap = 0
    if cap < 1:
        raise ConfigError(
            f"node config {K.NODE_EVAL_MAX}={raw_cap!r} must be a whole number >= 1, the most "
            f"held-out rows the site evaluates (default {K.DEFAULT_EVAL_MAX})"
        )
    return fraction, cap, 0


def site_rank(config: FedPeftConfig, node_config: Mapping[str, object]) -> int:
    """The LoRA rank this site trains: node config ``lora-rank``, by default ``lora.r``.

    Raises
    ------
    ConfigError
        For a rank outside ``[1, lora.r]``, or a rank below ``lora.r`` under secure
        aggregation without ``secagg.mixed_ranks`` (the server could not count its slots).
    """
    if K.NODE_LORA_RANK not in node_config:
        return config.lora.r
    full = config.lora.r
    rank = check_site_rank(node_config[K.NODE_LORA_RANK], full_rank=full)
    if rank < full and config.secagg.enabled and not config.secagg.mixed_ranks:
        raise ConfigError(
            f"node config {K.NODE_LORA_RANK}={rank} is below the federation's lora.r={full}, "
            "and secure aggregation averages lower-rank updates only with "
            f"secagg.mixed_ranks=true (each masked vector then carries {full} rank-slot "
            "indicators); ask the coordinator to set secagg.mixed_ranks=true, or start the "
            f'SuperNode with --node-config "{K.NODE_LORA_RANK}={full}" (allowed: 1 to {full}).'
        )
    return rank


def order_key(name: str, node_config: Mapping[str, object]) -> int:
    """What, with the seed and the round, sets a site's order of examples without DP: a CRC-32
    of its data file's bytes (or of its partition's name), not of the file's path, so a run
    repeats wherever its files lie (a benchmark's are in a fresh temporary folder each time)
    and sites whose files share a name (``/data/site.csv``) still draw apart."""
    data_path = node_config.get(K.NODE_DATA_PATH)
    if not data_path:
        return zlib.crc32(name.encode())
    key = 0
    with Path(str(data_path)).expanduser().open("rb") as stream:
        while chunk := stream.read(1 << 20):
            key = zlib.crc32(chunk, key)
    return key


def load_site(config: FedPeftConfig, node_config: Mapping[str, object]) -> Site:
    """The site's resources, built once per process for a configuration and node."""
    device_name = str(node_config.get(K.NODE_DEVICE, config.train.device))
    key = repr((config, sorted((str(k), str(v)) for k, v in node_config.items())))
    if key in _SITES:
        return _SITES[key]
    if config.train.num_threads > 0:
        torch.set_num_threads(config.train.num_threads)
    device = resolve_device(device_name)
    rank = site_rank(config, node_config)
    name, table = _raw_site_table(config, node_config)
    test_fraction, max_test, split_seed = held_out_split(config, node_config)
    train_table, test_table = split_site(
        table, test_fraction=test_fraction, max_test=max_test, seed=split_seed, source=name
    )
    prompts = published_prompts(config, node_config, test_table)  # checked before loading
    loaded = cached_model(
        config.model, site_lora(config.lora, rank), seed=config.seed, device=device
    )
    data = SiteData(
        train=tokenize(
            train_table,
            loaded.tokenizer,
            config=config.data,
            task=config.model.task,
            max_length=config.model.max_length,
        ),
        test=tokenize(
            test_table,
            loaded.tokenizer,
            config=config.data,
            task=config.model.task,
            max_length=config.model.max_length,
        ),
        num_train=len(train_table),
        num_test=len(test_table),
    )
    if len(_SITES) >= 64:  # a simulation actor may serve many virtual sites; bound memory
        _SITES.pop(next(iter(_SITES)))
    site = Site(
        name=name,
        config=config,
        node_config=dict(node_config),
        loaded=loaded,
        data=data,
        device=device,
        rank=rank,
        order_key=order_key(name, node_config),
        prompts=prompts,
    )
    _SITES[key] = site
    return site
