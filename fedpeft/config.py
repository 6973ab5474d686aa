"""Typed configuration: schemas, composition from ``conf/``, validation, transport.

This module owns the configuration's *shape* and its *checks*. Presets live as YAML
in the ``conf/`` config groups; Hydra composes them over the frozen schemas below
(registered in Hydra's ConfigStore), so an unknown key, a value of the wrong type or an
unknown name (every choice of a name is a :mod:`fedpeft.names` enum) fails at composition,
listing the valid ones. :func:`validate` then checks ranges and combinations and raises once
with every problem found.

The schemas' defaults are the embedded default federation: the ``default`` presets of
``conf/`` hold nothing, and every other preset only what it changes (a test holds them to
it). The named-choice groups (``model``, ``data``, ``strategy``) state their name even where
it is the default, and ``ModelConfig.pooling`` stays the architecture's own head: the
default model preset, ``minilm``, reads the mean instead.

The schemas are ``frozen``: a configuration is built once (composed, or parsed from the
YAML that carried it) and changed only with :func:`dataclasses.replace`, so the objects the
cached readers below hand out cannot be changed under another reader.

This module imports only :mod:`fedpeft.names` and :mod:`fedpeft.constants` from fedpeft:
checking a configuration loads neither torch nor the server's code.

The resolved configuration crosses the network only as plain YAML text that is parsed
back into these schemas (never ``instantiate()``-d), see :func:`to_yaml` and
:func:`from_yaml`.
"""

from __future__ import annotations

import functools
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from enum import StrEnum
from itertools import pairwise
from pathlib import Path
from typing import Any, cast, get_args, get_type_hints

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedpeft.constants import (
    EVAL_PROMPTS_MAX,
    MAX_NEW_TOKENS_MAX,
    RUN_CONFIG,
    RUN_OVERRIDES,
    RUN_RESUME_FROM,
)
from fedpeft.names import (
    Accountant,
    Clipping,
    DatasetName,
    Device,
    Loader,
    LoraBias,
    Optimizer,
    Partition,
    Pooling,
    ServerOptimizerName,
    StrategyName,
    Task,
    Trainable,
)

#: train.trainable's entries in the order a schedule may take them (each trains a superset)
_SCHEDULE = {entry: rank for rank, entry in enumerate(Trainable)}


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type, or out of range."""


@dataclass(frozen=True)
class ModelConfig:
    """Which base model to load and for which task.

    ``loader`` picks from :data:`fedpeft.model.MODEL_LOADERS`: ``minilm`` (embedded
    all-MiniLM-L6-v2), ``local`` (any Hugging Face folder at ``path``), ``smollm2``
    (embedded SmolLM2-135M-Instruct, dequantised once into ``cache_dir``), ``tiny_bert`` /
    ``tiny_llama`` (random tiny models built in-process, for tests).
    """

    loader: Loader = Loader.minilm
    path: str | None = None
    # Where built model folders are cached (smollm2); null: $XDG_CACHE_HOME/fedpeft or
    # ~/.cache/fedpeft. A machine's $FEDPEFT_CACHE wins (see fedpeft.model_cache).
    cache_dir: str | None = None
    task: Task = Task.classification
    num_labels: int = 2
    max_length: int = 64
    # Classification head input: "model" = the architecture's own (BERT: the pooler on the
    # first token); "mean" = the masked mean of the last layer, as sentence encoders are
    # trained to be read (BERT-family models only; see fedpeft.heads).
    pooling: Pooling = Pooling.model
    # Sizes of the in-process tiny models; ignored by the other loaders.
    hidden_size: int = 32
    num_layers: int = 2
    num_heads: int = 2


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapter hyper-parameters (peft ``LoraConfig``)."""

    r: int = 8
    # peft scales B·A by alpha / r; a float so that a site of lower rank (node config
    # lora-rank) can keep the same scaling with alpha·r_site/r (see fedpeft.ranks).
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["query", "value"])
    # Indices of the transformer layers to adapt (peft's layers_to_transform); null: every
    # layer. Fewer adapted layers, fewer trained coordinates: less DP noise per signal.
    layers_to_transform: list[int] | None = None
    # Biases the adapter also trains and saves (peft's LoraConfig.bias): all (BitFit, with
    # train.trainable=[bias]: biases and head only) or lora_only (those of the adapted layers).
    bias: LoraBias = LoraBias.none


@dataclass(frozen=True)
class DataConfig:
    """Where the examples come from and how each site splits them.

    ``dataset`` picks from :data:`fedpeft.data.DATASETS`: ``rotten_tomatoes`` (embedded),
    ``chatterbot`` (embedded English conversations, causal LM) or ``file`` (CSV/JSONL at
    ``path``). A real site overrides ``path`` through its node config key ``data-path``.
    Causal-LM rows are either ``prompt``/``response`` columns or a ``messages`` column of
    chat turns (``[{"role": "user", "content": ...}, {"role": "assistant", ...}, ...]``).
    """

    dataset: DatasetName = DatasetName.rotten_tomatoes
    path: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    prompt_column: str = "prompt"
    response_column: str = "response"
    messages_column: str = "messages"
    # chatterbot only: spread its 21 categories over this many groups, balanced by size, as
    # column ``category_group`` (federation.partition=column on it: one site per group).
    category_groups: int | None = None
    test_fraction: float = 0.2
    # Cap on the whole dataset before it is split into sites (None: all of it).
    max_examples: int | None = None
    # Cap on each site's held-out split, to keep evaluation cheap (None: all of it).
    max_eval_examples: int | None = 200
    # Simulation partitions only (causal LM): each virtual site publishes the prompts of its
    # first K held-out examples and sends the global adapter's answers to them with each
    # evaluation (fedpeft.generate). A deployed site publishes only what its node config
    # eval-prompts names; this setting does not reach it.
    eval_prompts: int = 0


@dataclass(frozen=True)
class TrainConfig:
    """Local training at a site, per round.

    Tuned on the embedded default (5 Dirichlet sites, DP ε = 8, SecAgg): AdamW, whose
    per-coordinate steps do not depend on DP's clipping scale, with the classifier head at
    its own larger rate (``head_lr``, see :func:`fedpeft.client.train.make_optimizer`).
    """

    local_steps: int = 5
    # Without DP, the batch; under DP, the divisor of each step's noisy sum (the batch is
    # Poisson, of mean privacy.sample_rate · N; dividing by that would reveal N).
    batch_size: int = 64
    eval_batch_size: int = 64
    # Causal LM: the longest greedy answer (in tokens) a site generates for a published prompt
    eval_max_new_tokens: int = 32
    lr: float = 2e-3
    # learning rate of the classifier head (null: train.lr); see fedpeft.client.train
    head_lr: float | None = 0.05
    optimizer: Optimizer = Optimizer.adamw
    # SGD only: heavy-ball momentum (0 = plain SGD); it averages DP noise over steps.
    momentum: float = 0.0
    weight_decay: float = 0.0
    device: Device = Device.auto
    # torch threads per site process; 0 keeps torch's default.
    num_threads: int = 0
    # What each round trains, the last entry repeating: [head, lora] trains the classifier
    # head alone in round 1 (under DP it gets the whole clipping budget, as a linear probe
    # before fine-tuning), then LoRA with the head; [bias] with lora.bias=all is BitFit (the
    # biases and the head, never LoRA). Entries go head → bias → lora; head: classification.
    trainable: list[Trainable] = field(default_factory=lambda: [Trainable.lora])


@dataclass(frozen=True)
class FederationConfig:
    """Size and schedule of the federation and how a simulated dataset is split."""

    num_sites: int = 5
    rounds: int = 3
    fraction: float = 1.0
    fraction_evaluate: float = 1.0
    min_sites: int = 2
    partition: Partition = Partition.dirichlet
    alpha: float = 0.5
    partition_column: str | None = None
    min_partition_size: int = 20
    round_timeout: float = 3600.0
    # Simulation only: CPU cores / GPUs reserved per virtual site. 0 cores = all of this
    # machine's cores, i.e. one site trains at a time (fastest on a small CPU machine).
    client_cpus: float = 0.0
    client_gpus: float = 0.0
    # Simulation only: an existing Ray cluster (its head's HOST:PORT, or "auto" for the one
    # this machine has joined) to run the virtual sites on, instead of a private local Ray.
    ray_address: str | None = None


@dataclass(frozen=True)
class StrategyConfig:
    """Server-side aggregation of the sites' adapter updates."""

    name: StrategyName = StrategyName.ffa
    server_lr: float = 1.0
    server_optimizer: ServerOptimizerName = ServerOptimizerName.average
    adam_beta1: float = 0.9
    adam_beta2: float = 0.99
    adam_tau: float = 1e-3


@dataclass(frozen=True)
class PrivacyConfig:
    """Sample-level differential privacy at every site (DP-SGD through Opacus).

    ``epsilon``/``delta`` are the target for the *whole federation* at each site; the
    noise multiplier is calibrated so a site taking part in every round ends within it.
    ``delta`` None means ``1 / (10 · N)`` for a site with N training examples (plain
    aggregation only: it would reveal N). A site's own ceiling (node config
    ``privacy-epsilon-max``) and δ (``privacy-delta``) always win over this target.
    ``sample_rate`` is the Poisson rate q at every site (its expected batch is q·N; each
    step's noisy sum is divided by ``train.batch_size``, never by q·N, so the noise in an
    update does not reveal N either); None
    means ``1 / ceil(N / train.batch_size)`` (plain aggregation only: it would reveal N).
    ``ledger_dir`` (simulation only) is where the virtual sites keep their ledgers; a
    real site names its ledger file with the node config key ``ledger-path``.
    """

    enabled: bool = True
    epsilon: float = 8.0
    delta: float | None = 1e-5
    # Each site's expected batch is 0.2 · N (≈ 150 to 580 at the default 5 sites; 2,049 per
    # step in all): with few steps σ grows far slower than q, so the noise per example falls
    # (fedpeft plan). Measured against the earlier 0.03 (benchmarks/README.md, "DP training
    # choices"): DP ÷ no DP at ε = 8 from 0.86 to 0.99, at ~6× the time of a DP step.
    sample_rate: float | None = 0.2
    max_grad_norm: float = 1.0
    accountant: Accountant = Accountant.prv
    clipping: Clipping = Clipping.hooks
    # γ > 0: automatic clipping (Bu et al. 2022), each per-example gradient scaled by
    # C/(‖g‖+γ) rather than clipped to norm C; same sensitivity, same σ and ε. null: Opacus's.
    automatic_clipping: float | None = None
    noise_multiplier: float | None = None
    ledger_dir: str | None = None


@dataclass(frozen=True)
class SecAggConfig:
    """Secure aggregation (SecAgg+) of the sites' updates.

    ``clip_range`` bounds every element of a site's update before fixed-point
    quantisation (values beyond it are clipped; a LoRA delta of one round is orders of
    magnitude smaller). ``num_neighbours`` / ``threshold``: None picks SecAgg+'s
    defaults for the number of sampled sites. ``mixed_ranks``: every masked vector also
    carries ``lora.r`` rank-slot indicators (exactly 0 or 1; needs ``clip_range >= 1``), so
    sites with a node-config ``lora-rank`` below ``lora.r`` are averaged per rank slot; with
    false such sites refuse secure rounds (plain aggregation needs no switch).
    """

    enabled: bool = True
    clip_range: float = 1.0
    mixed_ranks: bool = False
    num_neighbours: int | None = None
    threshold: int | None = None
    stage_timeout: float = 600.0


@dataclass(frozen=True)
class FedPeftConfig:
    """The whole resolved configuration of one federation."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    experiment_name: str = "default"
    output_dir: str | None = None
    seed: int = 0


def _schema_node() -> DictConfig:
    """The schema as Hydra composes over it: typed, but not read-only.

    OmegaConf marks the node of a frozen dataclass read-only, and Hydra merges the presets
    and overrides *into* the schema node; the flag is lifted on every node here, and
    :func:`OmegaConf.to_object` builds frozen objects again at the end.
    """
    node: DictConfig = OmegaConf.structured(FedPeftConfig)

    def unlock(cfg: DictConfig) -> None:
        OmegaConf.set_readonly(cfg, None)
        for key in cfg:
            child = cfg[key]
            if isinstance(child, DictConfig):
                unlock(child)

    unlock(node)
    return node


ConfigStore.instance().store(name="fedpeft_schema", node=_schema_node())


def conf_dir() -> Path:
    """The ``conf/`` folder: packaged inside ``fedpeft`` or at the project root."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise ConfigError(
        f"No 'conf/config.yaml' found beside {here} or its parent; reinstall fedpeft "
        "or run from the project root."
    )


def compose_config(overrides: list[str] | tuple[str, ...] = ()) -> FedPeftConfig:
    """Compose ``conf/config.yaml`` with Hydra ``key=value`` overrides and validate it.

    Raises
    ------
    ConfigError
        For an unknown key, an unknown preset, a wrong type or an out-of-range value.
    """
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = compose(config_name="config", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(_composition_error(err, overrides)) from None
    return _to_object(cfg)


def _composition_error(err: Exception, overrides: list[str] | tuple[str, ...]) -> str:
    """What was wrong, in the words :func:`validate` uses where it can be said so."""
    cause = err.__cause__
    full_key = getattr(cause, "full_key", None)
    key = full_key.split("[", 1)[0] if isinstance(full_key, str) else None  # a list's entry
    names = _name_field(key) if key is not None else None
    given = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].lstrip("+~") == key]
    if names is not None and given:
        allowed = [member.value for member in names]
        value = getattr(cause, "value", None) if full_key != key else given[-1]
        return f"Bad configuration override {key}={value!r}: allowed {allowed}"
    # Hydra's "Error merging override k=v" keeps OmegaConf's reason (an unknown name with
    # the valid ones, a wrong type) as the cause; both are shown.
    why = f" ({str(cause).splitlines()[0]})" if cause is not None else ""
    return (
        f"Bad configuration override in {list(overrides)}: {err}{why}. Valid keys and "
        "presets are listed in conf/ (e.g. 'federation.num_sites=5', 'model=minilm')."
    )


def _name_field(key: str) -> type[StrEnum] | None:
    """The :mod:`fedpeft.names` enum that types the schema field ``section.field``."""
    section, _, name = key.partition(".")
    for group in fields(FedPeftConfig):
        if group.name == section and isinstance(group.default_factory, type):
            hint = get_type_hints(group.default_factory).get(name)
            for candidate in (hint, *get_args(hint)):  # list[Trainable]: its entries' enum
                if isinstance(candidate, type) and issubclass(candidate, StrEnum):
                    return candidate
    return None


def _to_object(cfg: DictConfig) -> FedPeftConfig:
    try:
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(
            f"Incomplete configuration: {err}. Give the missing value as an override, "
            "e.g. 'data.path=/data/site.csv'."
        ) from None
    if not isinstance(obj, FedPeftConfig):
        raise ConfigError(f"Configuration did not resolve to FedPeftConfig: {type(obj)}")
    validate(obj)
    return obj


def to_yaml(config: FedPeftConfig) -> str:
    """The configuration as YAML text (what ``config.yaml`` and the network carry)."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))


@functools.lru_cache(maxsize=8)
def from_yaml(text: str) -> FedPeftConfig:
    """Parse YAML produced by :func:`to_yaml` back into a validated schema object."""
    try:
        merged = OmegaConf.merge(_schema_node(), OmegaConf.create(text))
    except OmegaConfBaseException as err:
        raise ConfigError(f"Received configuration does not match the schema: {err}") from None
    return _to_object(cast(DictConfig, merged))


def _name_problems(config: FedPeftConfig) -> list[str]:
    """Names not in their enum: composition rejects them, an object built in code may not."""
    choices: list[tuple[str, object, type[StrEnum]]] = [
        ("model.loader", config.model.loader, Loader),
        ("model.task", config.model.task, Task),
        ("model.pooling", config.model.pooling, Pooling),
        ("lora.bias", config.lora.bias, LoraBias),
        ("data.dataset", config.data.dataset, DatasetName),
        ("train.optimizer", config.train.optimizer, Optimizer),
        ("train.device", config.train.device, Device),
        ("federation.partition", config.federation.partition, Partition),
        ("strategy.name", config.strategy.name, StrategyName),
        ("strategy.server_optimizer", config.strategy.server_optimizer, ServerOptimizerName),
        ("privacy.accountant", config.privacy.accountant, Accountant),
        ("privacy.clipping", config.privacy.clipping, Clipping),
        *(("train.trainable", entry, Trainable) for entry in config.train.trainable),
    ]
    return [
        f"{key}={value!r}: allowed {[member.value for member in names]}"
        for key, value, names in choices
        if value not in {member.value for member in names}
    ]


def _problems(config: FedPeftConfig) -> list[str]:
    m, d, t, f = config.model, config.data, config.train, config.federation
    checks: list[tuple[bool, str]] = [
        (m.loader != "local" or bool(m.path), "model.loader=local needs model.path=/a/folder"),
        (
            m.pooling != "mean" or (m.task == "classification" and m.loader != "tiny_llama"),
            f"model.pooling=mean with model.loader={m.loader!r}, model.task={m.task!r}: mean "
            "pooling is a head for BERT-family classifiers; use model.pooling=model",
        ),
        (m.num_labels >= 2, f"model.num_labels={m.num_labels}: must be >= 2"),
        (m.max_length >= 8, f"model.max_length={m.max_length}: must be >= 8"),
        (config.lora.r >= 1, f"lora.r={config.lora.r}: must be >= 1"),
        (
            0.0 <= config.lora.dropout < 1.0,
            f"lora.dropout={config.lora.dropout}: must be in [0, 1)",
        ),
        (
            bool(config.lora.target_modules),
            "lora.target_modules is empty: name the layers to adapt",
        ),
        (
            config.lora.layers_to_transform is None
            or (
                bool(config.lora.layers_to_transform)
                and min(config.lora.layers_to_transform) >= 0
                and len(set(config.lora.layers_to_transform))
                == len(config.lora.layers_to_transform)
            ),
            f"lora.layers_to_transform={config.lora.layers_to_transform}: give distinct layer "
            "indices >= 0 (e.g. lora.layers_to_transform=[4,5] for the last two of six), or "
            "null for every layer",
        ),
        (d.dataset != "file" or bool(d.path), "data.dataset=file needs data.path=/a/file.csv"),
        (
            d.category_groups is None or d.category_groups >= 1,
            f"data.category_groups={d.category_groups}: must be >= 1 or null",
        ),
        (
            not (
                f.partition == "column"
                and f.partition_column == "category_group"
                and d.category_groups != f.num_sites
            ),
            f"federation.partition_column=category_group with data.category_groups="
            f"{d.category_groups} and federation.num_sites={f.num_sites}: one site per group; "
            f"set data.category_groups={f.num_sites}",
        ),
        (0.0 < d.test_fraction < 1.0, f"data.test_fraction={d.test_fraction}: must be in (0, 1)"),
        (
            0 <= d.eval_prompts <= EVAL_PROMPTS_MAX,
            f"data.eval_prompts={d.eval_prompts}: must be in [0, {EVAL_PROMPTS_MAX}] (the held-out "
            "prompts each simulated site publishes; 0: none)",
        ),
        (
            1 <= t.eval_max_new_tokens <= MAX_NEW_TOKENS_MAX,
            f"train.eval_max_new_tokens={t.eval_max_new_tokens}: must be in "
            f"[1, {MAX_NEW_TOKENS_MAX}] (the longest generated answer, in tokens)",
        ),
        (t.local_steps >= 1, f"train.local_steps={t.local_steps}: must be >= 1"),
        (
            bool(t.trainable),
            "train.trainable is empty: name what each round trains, e.g. "
            "train.trainable=[head,lora] (the last entry repeats)",
        ),
        (
            all(_SCHEDULE.get(a, 0) <= _SCHEDULE.get(b, 0) for a, b in pairwise(t.trainable)),
            f"train.trainable={[str(x) for x in t.trainable]}: entries go head → bias → lora "
            "(a round that trains less after one that trained more would move the rest by a "
            "server optimiser's momentum); e.g. train.trainable=[head,head,lora]",
        ),
        (
            Trainable.bias not in t.trainable or config.lora.bias != LoraBias.none,
            f"train.trainable={[str(x) for x in t.trainable]} with lora.bias=none: the adapter "
            "holds no biases to train; set lora.bias=all (BitFit) or lora.bias=lora_only",
        ),
        (
            set(t.trainable) == {Trainable.lora} or not config.secagg.mixed_ranks,
            f"train.trainable={[str(x) for x in t.trainable]} with secagg.mixed_ranks=true: a "
            "head or bias round has no LoRA rank slots to count; use train.trainable=[lora] or "
            "secagg.mixed_ranks=false",
        ),
        (
            Trainable.head not in t.trainable or m.task == "classification",
            f"train.trainable={[str(x) for x in t.trainable]} with model.task={m.task!r}: a "
            "causal LM has no classifier head to train alone; use train.trainable=[lora]",
        ),
        (t.batch_size >= 1, f"train.batch_size={t.batch_size}: must be >= 1"),
        (t.lr > 0, f"train.lr={t.lr}: must be > 0"),
        (t.head_lr is None or t.head_lr > 0, f"train.head_lr={t.head_lr}: must be > 0 or null"),
        (
            0.0 <= t.momentum < 1.0,
            f"train.momentum={t.momentum}: must be in [0, 1) (heavy-ball momentum of SGD)",
        ),
        (
            t.momentum == 0.0 or t.optimizer == "sgd",
            f"train.momentum={t.momentum} with train.optimizer={t.optimizer!r}: momentum is an SGD "
            "setting; set train.optimizer=sgd or train.momentum=0",
        ),
        (f.num_sites >= 1, f"federation.num_sites={f.num_sites}: must be >= 1"),
        (f.rounds >= 1, f"federation.rounds={f.rounds}: must be >= 1"),
        (0.0 < f.fraction <= 1.0, f"federation.fraction={f.fraction}: must be in (0, 1]"),
        (
            0.0 <= f.fraction_evaluate <= 1.0,
            f"federation.fraction_evaluate={f.fraction_evaluate}: must be in [0, 1]",
        ),
        (
            1 <= f.min_sites <= f.num_sites,
            f"federation.min_sites={f.min_sites}: must be in "
            f"[1, federation.num_sites={f.num_sites}]",
        ),
        (
            f.ray_address in (None, "auto") or ray_head(str(f.ray_address)) is not None,
            f"federation.ray_address={f.ray_address!r}: allowed 'auto' or a Ray head's "
            "HOST:PORT (its GCS address, printed by `ray start --head`; an IPv6 host in "
            "brackets), e.g. "
            "federation.ray_address=10.0.0.5:6379; null starts a private Ray on this machine",
        ),
        (
            float(f.client_cpus).is_integer() and f.client_cpus >= 0,
            f"federation.client_cpus={f.client_cpus!r}: Flower's simulation reserves whole "
            "cores per site (its federation config client-resources-num-cpus is an integer); "
            "set 0 (every core, one site at a time) or 1, 2, ...",
        ),
        (
            f.ray_address is None or f.client_cpus > 0,
            f"federation.ray_address={f.ray_address!r} with federation.client_cpus="
            f"{f.client_cpus}: on a cluster each virtual site must reserve a number of cores "
            "(and trains with that many threads); set e.g. federation.client_cpus=4",
        ),
        (
            f.ray_address is None or not config.privacy.enabled or bool(config.privacy.ledger_dir),
            f"federation.ray_address={f.ray_address!r} with privacy.enabled=true needs "
            "privacy.ledger_dir=PATH on a filesystem every node of the cluster shares: a "
            "virtual site may run on another node in a later round and must find its own "
            "ledger there (else it would be charged from zero)",
        ),
        (
            f.ray_address is None
            or all(
                Path(p).is_absolute()
                for p in (config.privacy.ledger_dir, config.data.path, config.model.path)
                if p
            ),
            f"federation.ray_address={f.ray_address!r} with a relative path "
            f"(privacy.ledger_dir={config.privacy.ledger_dir!r}, data.path="
            f"{config.data.path!r}, model.path={config.model.path!r}): a virtual site "
            "resolves it on the node it runs on, in that node's working folder; give absolute "
            "paths",
        ),
        (f.alpha > 0, f"federation.alpha={f.alpha}: must be > 0"),
        (
            f.partition != "column" or bool(f.partition_column),
            "federation.partition=column needs federation.partition_column=NAME",
        ),
        (
            config.strategy.server_lr > 0,
            f"strategy.server_lr={config.strategy.server_lr}: must be > 0",
        ),
        (
            not (config.strategy.name == "fedsvd" and config.strategy.server_optimizer == "adam"),
            "strategy=fedsvd with strategy.server_optimizer=adam: the SVD re-factorisation changes "
            "B's basis every round, so Adam's moments would not match; "
            "use server_optimizer=average",
        ),
        (config.privacy.epsilon > 0, f"privacy.epsilon={config.privacy.epsilon}: must be > 0"),
        (
            config.privacy.delta is None or 0 < config.privacy.delta < 1,
            f"privacy.delta={config.privacy.delta}: must be in (0, 1), or null for 1/(10·N)",
        ),
        (
            config.privacy.sample_rate is None or 0 < config.privacy.sample_rate <= 1,
            f"privacy.sample_rate={config.privacy.sample_rate}: must be in (0, 1], or null for "
            "1/ceil(N/train.batch_size)",
        ),
        (
            not (
                config.privacy.enabled
                and config.secagg.enabled
                and (config.privacy.delta is None or config.privacy.sample_rate is None)
            ),
            f"privacy.delta={config.privacy.delta} and privacy.sample_rate="
            f"{config.privacy.sample_rate} with secagg.enabled=true: a null δ or sampling rate "
            "is derived from each site's example count N, and the site would report it; set "
            "both (e.g. privacy.delta=1e-5 privacy.sample_rate=0.03)",
        ),
        (
            config.privacy.max_grad_norm > 0,
            f"privacy.max_grad_norm={config.privacy.max_grad_norm}: must be > 0",
        ),
        (
            config.privacy.automatic_clipping is None
            or 1e-6 <= config.privacy.automatic_clipping < float("inf"),
            f"privacy.automatic_clipping={config.privacy.automatic_clipping}: must be a number "
            "in [1e-6, ∞) (γ of C/(‖g‖+γ); Bu et al. use 0.01) or null for Opacus's clipping",
        ),
        (
            config.privacy.automatic_clipping is None or config.privacy.clipping != "ghost",
            "privacy.automatic_clipping with privacy.clipping=ghost: ghost clipping computes "
            "its scale inside Opacus; use privacy.clipping=hooks",
        ),
        (
            config.privacy.noise_multiplier is None or config.privacy.noise_multiplier >= 0,
            f"privacy.noise_multiplier={config.privacy.noise_multiplier}: must be >= 0 or null",
        ),
        (
            config.secagg.clip_range > 0,
            f"secagg.clip_range={config.secagg.clip_range}: must be > 0",
        ),
        (
            not config.secagg.mixed_ranks or config.secagg.clip_range >= 1.0,
            f"secagg.mixed_ranks=true with secagg.clip_range={config.secagg.clip_range}: the "
            "0/1 rank-slot indicators need clip_range >= 1; set secagg.clip_range=1.0",
        ),
        (
            not config.secagg.enabled or config.federation.min_sites >= 2,
            "secagg.enabled=true needs federation.min_sites >= 2 (a sum of one site is that site)",
        ),
    ]
    return _name_problems(config) + [message for ok, message in checks if not ok]


def ray_head(address: str) -> tuple[str, int] | None:
    """Host and port of a ``federation.ray_address`` of the form ``HOST:PORT`` (port
    1..65535, an IPv6 host in brackets, ``[::1]:6379``, as Ray parses it); None otherwise
    (``auto``, a ``ray://`` client URL, a malformed address)."""
    host, _, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]  # IPv6: its colons are inside the brackets
    elif ":" in host:
        return None
    if not host or any(c in host for c in "[]/") or not port.isdigit():
        return None
    return (host, int(port)) if 0 < int(port) < 65536 else None


def validate(config: FedPeftConfig) -> None:
    """Raise one :class:`ConfigError` listing every problem in ``config``."""
    problems = _problems(config)
    if problems:
        listing = "\n  - ".join(problems)
        raise ConfigError(f"Invalid configuration ({len(problems)} problem(s)):\n  - {listing}")


def as_dict(config: FedPeftConfig) -> dict[str, Any]:
    """The configuration as plain nested dicts (for JSON reports)."""
    out = cast(dict[str, Any], OmegaConf.to_container(OmegaConf.structured(config)))
    return out


@dataclass(frozen=True)
class RunSettings:
    """What a submitted run asks for: the configuration, and whether it continues a federation."""

    config: FedPeftConfig
    resume_from: str | None  # run directory of the federation to continue; None: a new one


def read_run_config(run_config: Mapping[str, Any]) -> RunSettings:
    """The one place that reads Flower's ``run_config``.

    The coordinator submits ``flwr run . FED --run-config 'overrides="k=v k2=v2"'``; the
    ServerApp and every ClientApp compose the same ``conf/`` with the same overrides. With
    ``resume-from="/path/to/run"`` (read by the ServerApp only) the federation whose run
    directory that is continues after its last finished round. ``config`` carries a whole
    composed configuration as YAML instead of overrides (``fedpeft simulate`` sends the
    object it checked, :mod:`fedpeft.simulation`).
    """
    keys = (RUN_OVERRIDES, RUN_RESUME_FROM, RUN_CONFIG)
    values = {key: run_config.get(key, "") for key in keys}
    for key, value in values.items():
        if not isinstance(value, str):
            raise ConfigError(
                f"run config {key}={value!r} must be a string, got {type(value).__name__}; "
                f"quote it: --run-config '{key}=\"...\"'"
            )
    if values[RUN_CONFIG].strip():
        if values[RUN_OVERRIDES].strip():
            raise ConfigError(
                f"run config sets both {RUN_CONFIG} (a whole configuration) and "
                f"{RUN_OVERRIDES}={values[RUN_OVERRIDES]!r}; send one of them"
            )
        config = from_yaml(values[RUN_CONFIG])
    else:
        config = _compose_cached(tuple(shlex.split(values[RUN_OVERRIDES])))
    return RunSettings(config=config, resume_from=values[RUN_RESUME_FROM].strip() or None)


def from_run_config(run_config: Mapping[str, Any]) -> FedPeftConfig:
    """The configuration of :func:`read_run_config` (all a ClientApp needs)."""
    return read_run_config(run_config).config


@functools.lru_cache(maxsize=8)
def _compose_cached(overrides: tuple[str, ...]) -> FedPeftConfig:
    return compose_config(overrides)
