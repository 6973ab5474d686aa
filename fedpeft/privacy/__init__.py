"""Privacy primitives and state, free of Flower: DP-SGD, accounting, secure aggregation.

- :mod:`~fedpeft.privacy.dp`: DP-SGD through Opacus on the adapter's trainable tensors.
- :mod:`~fedpeft.privacy.calibration`: noise calibration and ε from a history (Opacus).
- :mod:`~fedpeft.privacy.ledger`: a site's persistent privacy ledger.
- :mod:`~fedpeft.privacy.secagg`: the SecAgg+ protocol (with :mod:`~fedpeft.privacy.quantize`,
  :mod:`~fedpeft.privacy.shamir`, :mod:`~fedpeft.privacy.masking`).

Submodules are imported where used, so importing this package does not load Opacus.
"""

from fedpeft.privacy.errors import (
    BudgetExceededError,
    DPCompatibilityError,
    LedgerError,
    PrivacyConfigError,
    PrivacyError,
)

__all__ = [
    "BudgetExceededError",
    "DPCompatibilityError",
    "LedgerError",
    "PrivacyConfigError",
    "PrivacyError",
]
