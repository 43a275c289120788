"""Decrypt a CKKS run's results at a hospital: the final model and its scaler.

Under ``secure-aggregation = "ckks"`` the coordinator's results folder holds the
final model and the pooled feature statistics as ciphertexts only
(``final_model.ckks-model``, ``feature-mean.ckks-model``,
``feature-spread.ckks-model``). A hospital with the consortium's secret context
turns them into what a plaintext run writes::

    python -m hospital_diagnostics.decrypt --context secret-context.ckks RESULTS_DIR

which creates ``RESULTS_DIR/decrypted/`` with ``final_model.pt``,
``final_model.npz`` and ``preprocessing.json`` (feature mean and scale filled in).
Keep that folder at the hospital: it is the plaintext model. The work is done by
:mod:`flwr_ext.appkit.ckks_results`, shared with the other app templates.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from flwr_ext.appkit.ckks_results import decrypt_main
from flwr_ext.appkit.ckks_results import decrypt_results as _decrypt_results

__all__ = ["NOTE", "decrypt_results", "main"]

#: How to use the decrypted model (written into preprocessing.json).
NOTE = (
    "model input = (x - feature-mean) / feature-scale, columns in 'features' "
    "order; output = logit of malignant"
)


def decrypt_results(results: Path, secret_context: Path) -> Path:
    """Decrypt model and scaler of ``results`` into ``results/decrypted``."""
    return _decrypt_results(results, secret_context, note=NOTE)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point."""
    return decrypt_main(argv, note=NOTE)


if __name__ == "__main__":  # pragma: no cover - command line
    sys.exit(main())
