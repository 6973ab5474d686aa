"""Coordinator side: the ServerApp round loop, aggregation strategies, run directory."""

from fedpeft.server.strategies import STRATEGIES, Strategy, make_strategy

__all__ = ["STRATEGIES", "Strategy", "make_strategy"]
