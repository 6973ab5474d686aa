"""Configuration: every experiment composes, bad keys and values fail with their names."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedpeft.config import (
    ConfigError,
    FedPeftConfig,
    compose_config,
    conf_dir,
    from_run_config,
    from_yaml,
    to_yaml,
)
from fedpeft.constants import RUN_OVERRIDES

EXPERIMENTS = sorted(p.stem for p in (conf_dir() / "experiment").glob("*.yaml"))


def test_default_is_the_embedded_federation() -> None:
    config = compose_config()
    assert config.model.loader == "minilm"
    assert config.data.dataset == "rotten_tomatoes"
    assert config.federation.num_sites == 5
    assert config.federation.partition == "dirichlet"


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment: str, tmp_path: Path) -> None:
    config = compose_config([f"experiment={experiment}", f"data.path={tmp_path / 'x.csv'}"])
    assert isinstance(config, FedPeftConfig)
    assert config.federation.rounds >= 1


def test_experiments_exist() -> None:
    assert {"tiny_classification", "tiny_causal_lm"} <= set(EXPERIMENTS)


def test_unknown_key_names_the_key() -> None:
    with pytest.raises(ConfigError, match="federation.num_sitez"):
        compose_config(["federation.num_sitez=3"])


def test_unknown_preset_names_the_group() -> None:
    with pytest.raises(ConfigError, match="model"):
        compose_config(["model=gpt9"])


def test_wrong_type_is_refused() -> None:
    with pytest.raises(ConfigError, match="num_sites"):
        compose_config(["federation.num_sites=many"])


def test_all_range_problems_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        compose_config(["federation.fraction=0", "train.lr=-1", "federation.partition=random"])
    text = str(info.value)
    assert "3 problem(s)" in text
    for part in ("federation.fraction=0.0", "train.lr=-1", "federation.partition='random'"):
        assert part in text
    assert "allowed ['iid', 'dirichlet', 'column']" in text


def test_missing_mandatory_value_names_it() -> None:
    with pytest.raises(ConfigError, match="data.path"):
        compose_config(["experiment=tiny_classification"])


def test_yaml_round_trip() -> None:
    config = compose_config(["federation.rounds=7", "lora.r=4"])
    again = from_yaml(to_yaml(config))
    assert again == config


def test_run_config_overrides_compose_like_the_cli() -> None:
    config = from_run_config({RUN_OVERRIDES: "federation.rounds=4 lora.r=2"})
    assert config.federation.rounds == 4 and config.lora.r == 2
    assert from_run_config({}) == compose_config()
