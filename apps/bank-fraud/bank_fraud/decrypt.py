"""Decrypt a CKKS run's results at a bank: the final model and its scaler.

Under ``secure-aggregation = "ckks"`` the coordinator never holds the model or
the pooled feature statistics in plaintext. A bank with the consortium's secret
context turns them into what a plaintext run writes::

    python -m bank_fraud.decrypt --context secret-context.ckks RESULTS_DIR

which creates ``RESULTS_DIR/decrypted/`` with ``final_model.pt``,
``final_model.npz`` and ``preprocessing.json`` (feature mean and scale filled
in; the decision threshold was chosen in plaintext and is already there). Keep
that folder at the bank: it is the plaintext model.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from flwr_ext.appkit.ckks_results import decrypt_main

__all__ = ["NOTE", "main"]

#: How to use the decrypted model (written into preprocessing.json).
NOTE = (
    "model input = (x' - feature-mean) / feature-scale with x' = log(1 + x) for "
    "log1p-columns, columns in 'features' order; output = logit of fraud; flag a "
    "transaction when sigmoid(logit) >= threshold"
)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point."""
    return decrypt_main(argv, note=NOTE)


if __name__ == "__main__":  # pragma: no cover - command line
    sys.exit(main())
