"""Sites train where their node config says: CPU here, the GPU (bf16 autocast) when there is one."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedpeft import constants as K
from fedpeft.client.site import load_site
from fedpeft.client.train import (
    DPSettings,
    autocast,
    evaluate_local,
    forward_losses,
    make_loader,
    train_local,
)
from fedpeft.model import get_flat
from tests.conftest import tiny_config

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _site(cls_csv: Path, device: str):  # type: ignore[no-untyped-def]
    config = tiny_config("classification", cls_csv)
    return load_site(config, {K.NODE_DATA_PATH: str(cls_csv), K.NODE_DEVICE: device})


def test_no_autocast_off_cuda(cls_csv: Path) -> None:
    site = _site(cls_csv, "cpu")
    assert site.device.type == "cpu"
    assert not isinstance(autocast(site.device), torch.autocast)
    pad = int(site.loaded.tokenizer.pad_token_id)
    batch = next(
        iter(make_loader(site.data.train, batch_size=4, pad_id=pad, shuffle=False, seed=0))
    )
    site.loaded.peft_model.eval()  # no dropout: the two passes must see the same network
    plain, _ = forward_losses(site.loaded, site.loaded.peft_model, batch, site.device)
    mixed, logits = forward_losses(
        site.loaded, site.loaded.peft_model, batch, site.device, mixed_precision=True
    )
    site.loaded.peft_model.train()
    assert logits.dtype == torch.float32 and torch.equal(plain, mixed)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("private", [False, True])
def test_a_site_trains_and_evaluates_on_its_gpu(cls_csv: Path, private: bool) -> None:
    site = _site(cls_csv, "auto")
    assert site.device.type == "cuda"
    model = site.loaded.peft_model
    assert all(p.device.type == "cuda" for p in model.parameters())
    start = get_flat(model, site.loaded.layout)
    result = train_local(
        site.loaded,
        site.data.train,
        global_flat=start,
        trained_names=list(site.loaded.layout.names),
        config=site.config.train,
        device=site.device,
        seed=1,
        dp=DPSettings(noise_multiplier=0.5, max_grad_norm=1.0) if private else None,
    )
    assert result.delta.dtype == np.float32 and np.all(np.isfinite(result.delta))
    assert np.abs(result.delta).max() > 0 and math.isfinite(result.train_loss)
    # bf16 autocast never leaks into what is kept: weights stay float32.
    assert all(p.dtype == torch.float32 for p in model.parameters())
    evaluated = evaluate_local(
        site.loaded, site.data.test, global_flat=start, batch_size=8, device=site.device
    )
    assert math.isfinite(evaluated.loss) and 0.0 <= evaluated.accuracy <= 1.0
    if torch.cuda.is_bf16_supported():
        with autocast(site.device):
            assert torch.get_autocast_dtype("cuda") == torch.bfloat16
