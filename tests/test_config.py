"""Configuration: every experiment composes, bad keys and values fail with their names."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from dataclasses import replace
from enum import StrEnum
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedpeft import names
from fedpeft.config import (
    ConfigError,
    FedPeftConfig,
    compose_config,
    conf_dir,
    from_run_config,
    from_yaml,
    to_yaml,
    validate,
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
        compose_config(["federation.fraction=0", "train.lr=-1", "federation.alpha=0"])
    text = str(info.value)
    assert "3 problem(s)" in text
    for part in ("federation.fraction=0.0", "train.lr=-1", "federation.alpha=0.0"):
        assert part in text


def test_an_unknown_name_fails_at_composition_and_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError) as info:
        compose_config(["federation.partition=random"])
    assert "federation.partition='random': allowed ['iid', 'dirichlet', 'column']" in str(
        info.value
    )
    assert "problem(s)" not in str(info.value)  # refused while composing, before validate()
    # a configuration built in code is not composed: validate() names the same problem
    config = compose_config([])
    bad = replace(config, federation=replace(config.federation, partition="random"))
    with pytest.raises(ConfigError, match=r"federation.partition='random': allowed \['iid', "):
        validate(bad)


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


# --- names, registries, schema defaults and presets -------------------------------------


def test_every_registry_is_keyed_by_exactly_its_enum() -> None:
    from fedpeft.data import DATASETS
    from fedpeft.model import MODEL_LOADERS
    from fedpeft.privacy.calibration import ACCOUNTANTS
    from fedpeft.privacy.dp import _MODES
    from fedpeft.server.strategies import SERVER_OPTIMIZERS, STRATEGIES

    registries: list[tuple[object, type[StrEnum]]] = [
        (MODEL_LOADERS, names.Loader),
        (DATASETS, names.DatasetName),
        (STRATEGIES, names.StrategyName),
        (SERVER_OPTIMIZERS, names.ServerOptimizerName),
        (ACCOUNTANTS, names.Accountant),
        (_MODES, names.Clipping),
    ]
    for registry, enum in registries:
        assert set(registry) == set(enum), enum.__name__  # type: ignore[call-overload]


def test_every_name_enum_is_one_members_name_equal_to_its_value() -> None:
    # OmegaConf looks a string up by member *name*; the value is what code compares with
    for enum in (getattr(names, n) for n in names.__all__):
        assert [m.name for m in enum] == [m.value for m in enum], enum.__name__


def test_the_schema_defaults_are_the_default_federation() -> None:
    composed, schema = compose_config([]), FedPeftConfig()
    # the one value the default model preset changes: minilm reads the mean of its tokens
    assert composed.model.pooling == "mean" and schema.model.pooling == "model"
    assert composed == replace(schema, model=replace(schema.model, pooling=names.Pooling.mean))
    assert composed.privacy.enabled and composed.secagg.enabled  # private by default


def _leaves(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if key == "defaults":
            continue
        if isinstance(value, dict):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


#: The key that names what a preset of a named-choice group is (stated even when default).
IDENTITY = {"model": "loader", "data": "dataset", "strategy": "name"}


@pytest.mark.parametrize(
    "preset",
    sorted(
        str(p.relative_to(conf_dir()))
        for p in conf_dir().glob("*/*.yaml")
        if p.parent.name != "experiment"
    ),
)
def test_a_group_preset_holds_only_what_it_changes(preset: str) -> None:
    group = preset.split("/")[0]
    text = (conf_dir() / preset).read_text()
    values = _leaves(yaml.safe_load(text) or {})
    if preset.endswith("/default.yaml"):
        assert values == {}, f"{preset}: the defaults are the schema's; move these there"
    schema = dataclasses.asdict(getattr(FedPeftConfig(), group))
    for key, value in values.items():
        if key == IDENTITY.get(group) or value == "???":
            continue
        assert value != schema[key], f"{preset}: {key}: {value!r} is already the schema's default"


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_an_experiment_holds_only_what_it_changes(experiment: str) -> None:
    tree = yaml.safe_load((conf_dir() / "experiment" / f"{experiment}.yaml").read_text())
    groups = [
        f"{k.removeprefix('override /')}={v}"
        for entry in tree.get("defaults", [])
        for k, v in entry.items()
    ]
    # what the experiment's presets give, without its own values (data.path for file data)
    without = dataclasses.asdict(compose_config([*groups, "data.path=x.csv"]))
    for key, value in _leaves(tree).items():
        section, field = key.split(".")
        assert value != without[section][field], (
            f"experiment/{experiment}.yaml: {key}: {value!r} is what its presets give already"
        )


def test_a_configuration_cannot_be_changed_in_place() -> None:
    config = compose_config([])
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.federation.rounds = 9  # type: ignore[misc]
    assert compose_config([]).federation.rounds == 3  # the cached object is untouched


def test_checking_a_configuration_loads_no_model_or_server_code() -> None:
    code = (
        "import sys; from fedpeft.config import compose_config; compose_config([]); "
        "print(sorted(m for m in sys.modules if m.startswith('fedpeft') or m == 'torch'))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert loaded.strip() == "['fedpeft', 'fedpeft.config', 'fedpeft.constants', 'fedpeft.names']"


def test_automatic_clipping_needs_a_positive_gamma_and_per_sample_gradients() -> None:
    assert compose_config(["privacy.automatic_clipping=0.01"]).privacy.automatic_clipping == 0.01
    for bad in ("0", "1e-7", "inf"):  # γ below the floor could overflow C/γ to inf
        with pytest.raises(ConfigError, match="must be a number in \\[1e-6, ∞\\)"):
            compose_config([f"privacy.automatic_clipping={bad}"])
    with pytest.raises(ConfigError, match="ghost clipping computes its scale inside Opacus"):
        compose_config(["privacy.automatic_clipping=0.01", "privacy.clipping=ghost"])
