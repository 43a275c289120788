"""What a site keeps on its own disk so that it can rejoin a run after a restart.

Flower keeps a ClientApp's ``context.state`` in the SuperNode's memory: a
SuperNode that crashes and is restarted comes back with an empty state. Most of
what a site needs arrives again with the next instruction (the global model;
in plaintext runs the feature scaler, in every round's config). One thing does
not: under CKKS the pooled feature scaler was decrypted *by the site* in the
encrypted statistics round (:mod:`flwr_ext.appkit.encrypted_stats`), and the
server never held it in plaintext. Without it a restarted site could only answer
"no feature scaler" for the rest of the run.

So a site whose SuperNode has node config ``state-dir='/abs/folder'`` writes the
scaler, once it holds it, to ``<state-dir>/run-<run id>-feature-scaler.json``
(folder 0700, file 0600, never through a symlink) and reads it back when its
``context.state`` has none. The file holds the *pooled* mean and standard
deviation that every site of the run already knows - nothing of the site's own
data - and nothing new travels to the server: the site simply keeps what it had.

The same holds for a site's **DP-SGD privacy account** (the history of its
noisy steps, in ``context.state``): lost with a restart, the site would start
counting ε from zero again and report less privacy loss than it has spent.
:func:`keep_state` / :func:`restore_state` keep named records (``ConfigRecord``) of
``context.state`` in ``<state-dir>/run-<run id>-state.json`` (0600) and put them
back after a restart.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context

from .standardisation import Standardizer

__all__ = [
    "STATE_DIR_KEY",
    "keep_state",
    "load_scaler",
    "restore_state",
    "save_scaler",
    "state_dir",
]

#: Node-config key of the folder where a site keeps its run state.
STATE_DIR_KEY = "state-dir"


def state_dir(context: Context) -> Path | None:
    """Return the site's state folder from node config ``state-dir``; None if unset.

    Raises
    ------
    ValueError
        If ``state-dir`` is not an absolute path.
    """
    value = context.node_config.get(STATE_DIR_KEY)
    if value in (None, ""):
        return None
    path = Path(str(value)).expanduser()
    if not path.is_absolute():
        raise ValueError(
            f"node config {STATE_DIR_KEY}={value!r} must be an absolute path (the "
            "ClientApp does not run in your folder)"
        )
    return path


def _scaler_file(context: Context, folder: Path) -> Path:
    return folder / f"run-{int(context.run_id)}-feature-scaler.json"


def save_scaler(context: Context, scaler: Standardizer) -> Path | None:
    """Keep ``scaler`` for this run in the site's state folder, if it has one.

    Written to a fresh temporary name created exclusively (0600, no symlink
    followed), then renamed over the run's file.
    """
    folder = _private_folder(context)
    if folder is None:
        return None
    target = _scaler_file(context, folder)
    data = {
        "run-id": int(context.run_id),
        "mean": [float(v) for v in scaler.mean],
        "scale": [float(v) for v in scaler.scale],
    }
    _write_private(target, json.dumps(data).encode())
    return target


def _private_folder(context: Context) -> Path | None:
    folder = state_dir(context)
    if folder is None:
        return None
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    if folder.is_symlink():
        raise ValueError(f"state-dir {folder} is a symlink; refusing to write there")
    return folder


def _write_private(target: Path, data: bytes) -> None:
    """Write ``data`` to a fresh exclusive 0600 file, then rename it to ``target``."""
    temporary = target.parent / f".{target.name}.{os.getpid()}.{os.urandom(4).hex()}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    handle = os.open(temporary, flags, 0o600)
    try:
        os.write(handle, data)
        os.fsync(handle)
    finally:
        os.close(handle)
    os.replace(temporary, target)


def _read_private(path: Path) -> bytes | None:
    try:
        handle = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return None
    except OSError as err:
        raise ValueError(f"cannot read the kept state {path}: {err}") from err
    with os.fdopen(handle, "rb") as stream:
        return stream.read(1 << 24)


def _state_file(context: Context, folder: Path) -> Path:
    return folder / f"run-{int(context.run_id)}-state.json"


def keep_state(context: Context, keys: tuple[str, ...]) -> Path | None:
    """Keep the records ``keys`` of ``context.state`` on disk (0600).

    Values must be JSON types (numbers, strings, booleans, lists of them).
    Nothing happens without node config ``state-dir``.
    """
    folder = _private_folder(context)
    if folder is None:
        return None
    records: dict[str, dict[str, object]] = {}
    for key in keys:
        record = context.state.config_records.get(key)
        if record is not None:
            records[key] = dict(record.items())
    target = _state_file(context, folder)
    data = {"run-id": int(context.run_id), "records": records}
    try:
        payload = json.dumps(data, allow_nan=False).encode()
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"state {sorted(records)} cannot be kept as JSON: {err}"
        ) from err
    _write_private(target, payload)
    return target


def restore_state(context: Context, keys: tuple[str, ...]) -> list[str]:
    """Put kept records ``keys`` back into ``context.state`` where it has none.

    Returns the keys restored (after a restart). Raises ``ValueError`` if the
    kept file is not valid.
    """
    folder = state_dir(context)
    if folder is None:
        return []
    path = _state_file(context, folder)
    raw = _read_private(path)
    if raw is None:
        return []
    try:
        data = json.loads(raw)
        if int(data["run-id"]) != int(context.run_id):
            raise ValueError("it belongs to another run")
        records = data["records"]
        if not isinstance(records, dict):
            raise ValueError("'records' is not an object")
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"the kept state {path} is not valid: {err}") from err
    restored = []
    for key in keys:
        if key in records and key not in context.state.config_records:
            context.state[key] = ConfigRecord(records[key])
            restored.append(key)
    return restored


def load_scaler(context: Context) -> Standardizer | None:
    """Return the scaler this site kept for this run, or None if it kept none.

    Raises
    ------
    ValueError
        If the file exists but is not a valid scaler of this run.
    """
    folder = state_dir(context)
    if folder is None:
        return None
    path = _scaler_file(context, folder)
    raw = _read_private(path)
    if raw is None:
        return None
    try:
        data = json.loads(raw)
        if int(data["run-id"]) != int(context.run_id):
            raise ValueError("it belongs to another run")
        mean = np.asarray(data["mean"], dtype=np.float64)
        scale = np.asarray(data["scale"], dtype=np.float64)
        if mean.ndim != 1 or mean.shape != scale.shape:
            raise ValueError("mean and scale differ in shape")
        if not (np.isfinite(mean).all() and np.isfinite(scale).all()):
            raise ValueError("it holds NaN or Inf")
        if not (scale > 0).all():
            raise ValueError("a scale is not positive")
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"the kept feature scaler {path} is not valid: {err}") from err
    return Standardizer(mean, scale)
