"""Encrypted model files: the server saves the final model, a key holder decrypts it.

Under :class:`~flwr_ext.strategy.HomomorphicAggregation` the global model stays
encrypted at the server, so ``Result.arrays`` of ``strategy.start(...)`` is an
encrypted record. The ServerApp writes it with :func:`save_encrypted_model`; any data
owner decrypts it to a plain ``.npz`` (one array per model array, original names,
shapes and dtypes) with::

    flwr-ext keys decrypt --context secret-context.ckks final.ckks-model --out final.npz

or :func:`decrypt_model_file` in Python. The file holds ciphertexts and their
header (profile, key fingerprint, manifest) only: it is as safe to store and copy as
the messages the server saw.

File format: ``MAGIC``, a 4-byte big-endian header length, a JSON header listing
``(key, stype, dtype, shape, length)`` per array, then the arrays' bytes in order.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

from ..safe_files import atomic_open, create_private_dir
from .codec import DecryptedModel, EncryptedHeader, decrypt_record
from .keys import load_keys

__all__ = [
    "decrypt_model_file",
    "load_encrypted_model",
    "save_encrypted_model",
]

MAGIC = b"FLWR-EXT-CKKS-MODEL\x00"
FORMAT_VERSION = 1


def save_encrypted_model(
    record: ArrayRecord, path: str | os.PathLike[str], *, overwrite: bool = False
) -> Path:
    """Write an encrypted record (e.g. ``result.arrays``) to ``path``.

    The file is written privately (mode 0600) and atomically under a random
    temporary name, never through a symlink (:mod:`flwr_ext.safe_files`); an
    existing file is refused unless ``overwrite``.

    Raises ``ValueError`` if ``record`` is not an encrypted record: a plaintext
    model should be saved as a plain file instead.
    """
    EncryptedHeader.from_record(record)  # refuses plaintext and malformed records
    entries, blobs = [], []
    for key, array in record.items():
        entries.append([key, array.stype, array.dtype, list(array.shape),
                        len(array.data)])  # fmt: skip
        blobs.append(array.data)
    header = json.dumps({"format": FORMAT_VERSION, "arrays": entries}).encode()
    target = Path(path)
    create_private_dir(target.parent)
    with atomic_open(target, "wb", overwrite=overwrite) as handle:
        handle.write(MAGIC + struct.pack(">I", len(header)) + header)
        for blob in blobs:
            handle.write(blob)
    return target


def load_encrypted_model(path: str | os.PathLike[str]) -> ArrayRecord:
    """Read a file written by :func:`save_encrypted_model`."""
    data = Path(path).read_bytes()
    if not data.startswith(MAGIC):
        raise ValueError(f"{path} is not an encrypted flwr-ext model file")
    pos = len(MAGIC)
    try:
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        header = json.loads(data[pos + 4 : pos + 4 + length])
        if header.get("format") != FORMAT_VERSION:
            raise ValueError(f"unsupported model file format {header.get('format')}")
        pos += 4 + length
        arrays = {}
        for key, stype, dtype, shape, size in header["arrays"]:
            if pos + size > len(data):
                raise ValueError("file is truncated")
            arrays[key] = Array(str(dtype), tuple(int(s) for s in shape), str(stype),
                                data[pos : pos + size])  # fmt: skip
            pos += size
    except (struct.error, UnicodeDecodeError, json.JSONDecodeError, KeyError,
            TypeError, ValueError) as err:  # fmt: skip
        raise ValueError(f"{path} is truncated or corrupted: {err}") from err
    if pos != len(data):
        raise ValueError(f"{path} has {len(data) - pos} unexpected trailing bytes")
    record = ArrayRecord(arrays)
    EncryptedHeader.from_record(record)
    return record


def decrypt_model_file(
    model_path: str | os.PathLike[str],
    secret_context: str | os.PathLike[str],
    out_path: str | os.PathLike[str] | None = None,
    *,
    overwrite: bool = False,
) -> DecryptedModel:
    """Decrypt an encrypted model file with a data owner's secret context.

    Parameters
    ----------
    model_path : path
        File written by :func:`save_encrypted_model`.
    secret_context : path
        ``secret-context.ckks`` of the same key set.
    out_path : path, optional
        Where to write the plaintext model as ``.npz`` (``numpy.load`` reads it;
        keys are the model's array names). Written 0600, atomically, never
        through a symlink; an existing file is refused unless ``overwrite``.

    Returns
    -------
    DecryptedModel
        The model, the total weight and the number of contributions.
    """
    keys = load_keys(secret_context)
    keys.require_secret()
    decrypted = decrypt_record(
        load_encrypted_model(model_path), keys, what=f"model file {model_path}"
    )
    if out_path is not None:
        target = Path(out_path)
        create_private_dir(target.parent)
        with atomic_open(target, "wb", overwrite=overwrite) as handle:
            named: dict[str, Any] = {k: v.numpy() for k, v in decrypted.arrays.items()}
            np.savez(handle, **named)
    return decrypted
