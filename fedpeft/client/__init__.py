"""Site side: the ClientApp, local training and evaluation, site resources."""

from fedpeft.client.train import EvalResult, TrainResult, evaluate_local, train_local

__all__ = ["EvalResult", "TrainResult", "evaluate_local", "train_local"]
