"""The in-process grid for tests; it lives in :mod:`fedpeft.testing` (benchmarks use it too)."""

from fedpeft.testing import InProcessGrid, Tamper

__all__ = ["InProcessGrid", "Tamper"]
