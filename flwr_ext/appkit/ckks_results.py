"""Decrypt a CKKS run's results folder at a data owner: model and feature scaler.

Under ``secure-aggregation = "ckks"`` the coordinator's results folder holds the
final model and the pooled feature statistics as ciphertexts only
(``final_model.ckks-model``; ``feature-mean.ckks-model`` and
``feature-spread.ckks-model`` from :mod:`flwr_ext.appkit.encrypted_stats`). A site
holding the consortium's secret context turns them into what a plaintext run
writes - ``final_model.pt``, ``final_model.npz`` and a ``preprocessing.json``
with the feature mean and scale filled in - in ``RESULTS/decrypted/``.

An app exposes it as a command with :func:`decrypt_main`::

    # bank_fraud/decrypt.py
    def main(argv=None):
        return decrypt_main(argv, note="model input = ...; output = logit of fraud")

Keep the ``decrypted`` folder at the site: it is the plaintext model.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from ..safe_files import atomic_open, create_private_dir, write_text

__all__ = ["decrypt_main", "decrypt_results"]


def decrypt_results(
    results: Path, secret_context: Path, *, note: str = "", overwrite: bool = False
) -> Path:
    """Decrypt the model and scaler of ``results`` into ``results/decrypted``.

    Parameters
    ----------
    results : Path
        A run's results folder holding ``final_model.ckks-model`` and
        ``preprocessing.json`` (and, after the encrypted statistics round, the
        encrypted scaler).
    secret_context : Path
        The data owners' ``secret-context.ckks``.
    note : str, optional
        Replaces ``preprocessing.json``'s ``note`` once the scaler is filled in
        (how to turn a row into the model's input).
    overwrite : bool (default: False)
        Replace an earlier decryption's files. The ``decrypted`` folder is
        ``0700`` and its files ``0600`` (the plaintext model), written atomically
        and never through a symlink.

    Returns
    -------
    Path
        The ``decrypted`` folder.

    Raises
    ------
    FileNotFoundError
        If the folder holds no encrypted model (a plaintext run needs no
        decryption).
    """
    import numpy as np
    import torch

    from ..he import decrypt_model_file
    from .encrypted_stats import decrypt_scaler

    results = Path(results)
    encrypted = results / "final_model.ckks-model"
    if not encrypted.is_file():
        raise FileNotFoundError(
            f"{encrypted} does not exist: is {results} the results folder of a run "
            "with secure-aggregation='ckks'?"
        )
    out = create_private_dir(results / "decrypted", fresh=not overwrite, claim=True)
    model = decrypt_model_file(
        encrypted, secret_context, out / "final_model.npz", overwrite=overwrite
    )
    with atomic_open(out / "final_model.pt", "wb", overwrite=overwrite) as handle:
        torch.save(model.arrays.to_torch_state_dict(), handle)
    recipe = json.loads((results / "preprocessing.json").read_text())
    if (results / "feature-mean.ckks-model").exists():
        scaler = decrypt_scaler(results, secret_context)
        recipe["feature-mean"] = [float(v) for v in np.asarray(scaler.mean)]
        recipe["feature-scale"] = [float(v) for v in np.asarray(scaler.scale)]
        if note:
            recipe["note"] = note
    write_text(
        out / "preprocessing.json",
        json.dumps(recipe, indent=2) + "\n",
        overwrite=overwrite,
    )
    return out


def decrypt_main(argv: Sequence[str] | None = None, *, note: str = "") -> int:
    """Command line: ``RESULTS --context secret-context.ckks``; return 0."""
    parser = argparse.ArgumentParser(
        description="Decrypt a CKKS run's final model and feature scaler into "
        "RESULTS/decrypted (run it at a data owner, with the secret context)."
    )
    parser.add_argument("results", type=Path, help="the run's results folder")
    parser.add_argument(
        "--context", type=Path, required=True, help="secret-context.ckks"
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace an earlier decryption in RESULTS/decrypted",
    )
    args = parser.parse_args(argv)
    out = decrypt_results(args.results, args.context, note=note, overwrite=args.force)
    print(f"decrypted model and preprocessing written to {out}")
    return 0
