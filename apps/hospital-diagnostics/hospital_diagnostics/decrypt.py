"""Decrypt a CKKS run's results at a hospital: the final model and its scaler.

Under ``secure-aggregation = "ckks"`` the coordinator's results folder holds the
final model and the pooled feature statistics as ciphertexts only
(``final_model.ckks-model``, ``feature-mean.ckks-model``,
``feature-spread.ckks-model``). A hospital with the consortium's secret context
turns them into what a plaintext run writes::

    python -m hospital_diagnostics.decrypt --context secret-context.ckks RESULTS_DIR

which creates ``RESULTS_DIR/decrypted/`` with ``final_model.pt``,
``final_model.npz`` and ``preprocessing.json`` (feature mean and scale filled in).
Keep that folder at the hospital: it is the plaintext model.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["decrypt_results", "main"]


def decrypt_results(results: Path, secret_context: Path) -> Path:
    """Decrypt model and scaler of ``results`` into ``results/decrypted``."""
    import numpy as np
    import torch

    from flwr_ext.appkit.encrypted_stats import decrypt_scaler
    from flwr_ext.he import decrypt_model_file

    results = Path(results)
    out = results / "decrypted"
    out.mkdir(exist_ok=True)
    model = decrypt_model_file(
        results / "final_model.ckks-model", secret_context, out / "final_model.npz"
    )
    torch.save(model.arrays.to_torch_state_dict(), out / "final_model.pt")
    recipe = json.loads((results / "preprocessing.json").read_text())
    if (results / "feature-mean.ckks-model").exists():
        scaler = decrypt_scaler(results, secret_context)
        recipe["feature-mean"] = [float(v) for v in np.asarray(scaler.mean)]
        recipe["feature-scale"] = [float(v) for v in np.asarray(scaler.scale)]
        recipe["note"] = (
            "model input = (x - feature-mean) / feature-scale, columns in "
            "'features' order; output = logit of malignant"
        )
    (out / "preprocessing.json").write_text(json.dumps(recipe, indent=2) + "\n")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", type=Path, help="the run's results folder")
    parser.add_argument(
        "--context", type=Path, required=True, help="secret-context.ckks"
    )
    args = parser.parse_args(argv)
    out = decrypt_results(args.results, args.context)
    print(f"decrypted model and preprocessing written to {out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
