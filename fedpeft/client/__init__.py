"""Site side: the ClientApp, local training and evaluation, site resources.

The training names are loaded on first use (PEP 562): importing ``fedpeft.client`` (as
Flower does to reach :mod:`fedpeft.client.app`) must not import torch, see that module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedpeft.client.train import EvalResult, TrainResult, evaluate_local, train_local

__all__ = ["EvalResult", "TrainResult", "evaluate_local", "train_local"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from fedpeft.client import train

        return getattr(train, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
