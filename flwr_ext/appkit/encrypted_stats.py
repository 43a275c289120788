"""Feature standardisation under CKKS: the server never sees a site's statistics.

With ``secure-aggregation = "ckks"`` the server must not learn any site's
individual contribution, and a site's feature means and variances describe its
patients (its case mix). :mod:`flwr_ext.appkit.standardisation` sends them in
plaintext; this module runs the same statistics round with the sums computed
under CKKS, using the data owners' key set (``flwr_ext.he``), so that only the
sites ever see the *pooled* mean and standard deviation, and the server sees
ciphertexts only.

Three QUERY exchanges, all before training (round 0):

1. ``mean`` - each site encrypts its training rows' per-feature mean, weighted
   by ``rows / weight-unit`` (the codec's weight slot); the server adds the
   ciphertexts (:class:`flwr_ext.he.CiphertextSum`).
2. ``spread`` - the server sends the encrypted sum to every site; each decrypts
   the pooled mean ``mu`` (refusing a "sum" of fewer than two sites, which would
   be one site's own statistics), and encrypts its rows' mean of
   ``((x - mu) / (|mu| + 1))**2`` - scaled by ``|mu| + 1``, which every site
   knows, so values stay within CKKS's magnitude bound; the server adds them.
3. ``finish`` - the server sends that sum; each site decrypts it, so
   ``scale = (|mu| + 1) * sqrt(pooled mean square)``, the pooled standard
   deviation, and keeps ``(mu, scale)`` in ``context.state`` for the run.

Every decryption here is flooded and rounded (:func:`flwr_ext.he.decrypt_record`,
:mod:`flwr_ext.he.flooding`): the pooled statistics end up in the sites' models
and in ``preprocessing.json``, which may be shared, and an exact CKKS decryption
would reveal the key. The flooding noise is seeded by the key and the
ciphertext, so every site - and :func:`decrypt_scaler` later - gets the same
values. The result equals the plaintext pooled standardisation up to CKKS
precision (measured on the WDBC features with the previous, unflooded default
profile: means within 2e-7 and standard deviations within 2e-5, relative; the
flooding noise of the current default profile is ~1e-12 absolute). A site that
misses the round (joins later) has no scaler and answers train/evaluate with an
error saying so.
The server can write the two encrypted sums next to the encrypted model
(:func:`save_encrypted_scaler`); a data owner decrypts them with
:func:`decrypt_scaler`.

Messages are plain QUERY messages that
:func:`flwr_ext.mods.secure_aggregation.secure_aggregation_mod` passes straight to the
ClientApp (``ckks_mod`` would otherwise decrypt the ciphertexts as a global model
and strip the encrypted reply).
"""

from __future__ import annotations

from logging import INFO, WARNING
from pathlib import Path
from typing import cast

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.supercore import log

from ..mods.secure_aggregation import ENCRYPTED_STATS_QUERY, is_encrypted_stats_query
from .standardisation import Standardizer, _wait_for_nodes, site_label

__all__ = [
    "ENCRYPTED_STATS_QUERY",
    "decrypt_scaler",
    "is_encrypted_stats_query",
    "reply_encrypted_stats",
    "request_encrypted_feature_stats",
    "save_encrypted_scaler",
    "scaler_from_state",
]

STEP_MEAN, STEP_SPREAD, STEP_FINISH = "mean", "spread", "finish"
STATE_KEY = "flwr-ext-feature-scaler"
_POOLED = "pooled"
_MIN_SITES = 2


# ------------------------------------------------------------------- client
def scaler_from_state(context: Context) -> Standardizer | None:
    """Return the scaler the encrypted statistics round left in ``context.state``."""
    record = context.state.config_records.get(STATE_KEY)
    if record is None:
        return None
    return Standardizer(
        np.asarray(record["mean"], dtype=np.float64),
        np.asarray(record["scale"], dtype=np.float64),
    )


def reply_encrypted_stats(
    msg: Message, context: Context, x_train: np.ndarray
) -> Message:
    """ClientApp side: answer one step of the encrypted statistics round.

    Raises
    ------
    ValueError
        On a key mismatch, a pooled sum of fewer than two sites, or values above
        the profile's magnitude bound (nothing is sent then).
    """
    from ..he import decrypt_record, encrypt_record, load_keys
    from ..he.protocol import ClientSettings

    config = msg.content.config_records["config"]
    step = str(config.get("step"))
    settings = ClientSettings.from_node(context.node_config)
    if settings.context_path is None:
        raise ValueError(
            "the encrypted statistics round needs this site's CKKS secret context: "
            "node config ckks-context (or FLWR_EXT_CKKS_CONTEXT in simulation)"
        )
    keys = load_keys(settings.context_path)
    keys.require_secret()
    keys.check_matches(
        str(config.get("ckks-profile")),
        str(config.get("ckks-fingerprint")),
        "the server's statistics request",
    )
    x = np.asarray(x_train, dtype=np.float64)
    weight = x.shape[0] / float(config["ckks-weight-unit"])  # type: ignore[arg-type]
    num_clients = int(cast(int, config["ckks-num-clients"]))
    wire = str(config["ckks-wire"])

    def encrypt(name: str, values: np.ndarray) -> RecordDict:
        record = ArrayRecord({name: Array(np.ascontiguousarray(values))})
        encrypted = encrypt_record(
            record, keys, weight, num_clients=num_clients, wire=wire
        )
        return RecordDict({"stats": encrypted})

    if step == STEP_MEAN:
        return Message(encrypt("mean", x.mean(axis=0)), reply_to=msg)
    pooled = decrypt_record(
        msg.content.array_records[_POOLED], keys, what="the pooled statistics"
    )
    if pooled.contributions < _MIN_SITES:
        raise ValueError(
            f"refusing a pooled statistic of {pooled.contributions} site(s): it "
            f"would be one site's own statistics (need >= {_MIN_SITES})"
        )
    if step == STEP_SPREAD:
        mean = pooled.arrays["mean"].numpy().astype(np.float64)
        unit = np.abs(mean) + 1.0
        context.state[STATE_KEY + "-mean"] = ConfigRecord(
            {"mean": [float(v) for v in mean]}
        )
        spread = np.mean(np.square((x - mean) / unit), axis=0)
        return Message(encrypt("spread", spread), reply_to=msg)
    if step == STEP_FINISH:
        saved = context.state.config_records.get(STATE_KEY + "-mean")
        if saved is None:
            raise ValueError("statistics round out of order: no pooled mean yet")
        mean = np.asarray(saved["mean"], dtype=np.float64)
        spread = pooled.arrays["spread"].numpy().astype(np.float64)
        scale = _scale(mean, spread)
        context.state[STATE_KEY] = ConfigRecord(
            {"mean": [float(v) for v in mean], "scale": [float(v) for v in scale]}
        )
        return Message(
            RecordDict({"metrics": MetricRecord({"scaler-ready": 1})}), reply_to=msg
        )
    raise ValueError(f"unknown statistics step {step!r}")


def _scale(mean: np.ndarray, spread: np.ndarray) -> np.ndarray:
    """Pooled standard deviation from the decrypted mean square; 1 if constant."""
    std = (np.abs(mean) + 1.0) * np.sqrt(np.maximum(spread, 0.0))
    tiny = 1e-12 * np.maximum(np.abs(mean), 1.0)
    return np.where(std > tiny, std, 1.0)


# ------------------------------------------------------------------- server
def request_encrypted_feature_stats(
    grid: Grid,
    server_context: str | Path,
    n_features: int,
    *,
    wire: str,
    min_nodes: int,
    timeout: float,
    weight_unit: float = 1024.0,
    wait_s: float = 300.0,
) -> tuple[ArrayRecord, ArrayRecord]:
    """ServerApp side: run the three steps; return the two encrypted sums.

    Returns the encrypted pooled means and mean squares (for
    :func:`save_encrypted_scaler`). Invalid or missing replies are logged with
    the node id and left out.

    Raises
    ------
    RuntimeError
        If fewer than ``max(min_nodes, 2)`` sites complete a step.
    """
    from ..he import CiphertextSum, load_keys
    from ..records import Manifest

    keys = load_keys(server_context)
    keys.require_no_secret()
    needed = max(min_nodes, _MIN_SITES)
    node_ids = _wait_for_nodes(grid, needed, wait_s)

    def config(step: str, num_clients: int) -> ConfigRecord:
        return ConfigRecord(
            {
                "query": ENCRYPTED_STATS_QUERY,
                "step": step,
                "ckks-profile": keys.profile.name,
                "ckks-fingerprint": keys.fingerprint,
                "ckks-wire": wire,
                "ckks-weight-unit": float(weight_unit),
                "ckks-num-clients": int(num_clients),
            }
        )

    def exchange(step: str, targets: list[int], extra: ArrayRecord | None):
        messages = []
        for node_id in targets:
            content = RecordDict({"config": config(step, len(targets))})
            if extra is not None:
                content[_POOLED] = extra
            messages.append(
                Message(content, dst_node_id=node_id, message_type=MessageType.QUERY)
            )
        replies = list(grid.send_and_receive(messages, timeout=timeout))
        answered = {int(r.metadata.src_node_id) for r in replies}
        for node_id in sorted(set(targets) - answered):
            log(
                WARNING,
                "encrypted feature statistics (%s): no reply from %s within %.0f s",
                step,
                site_label(grid, node_id),
                timeout,
            )
        return replies

    def summed(
        step: str, name: str, replies: list[Message]
    ) -> tuple[ArrayRecord, list[int]]:
        manifest = Manifest.from_arrayrecord(
            ArrayRecord({name: Array(np.zeros(n_features, dtype=np.float64))})
        )
        total = CiphertextSum(keys, manifest, wire)
        added: list[int] = []
        for reply in replies:
            node_id = int(reply.metadata.src_node_id)
            if node_id in added:
                continue
            if reply.has_error():
                log(
                    WARNING,
                    "encrypted feature statistics (%s): %s replied with an error: %s",
                    step,
                    site_label(grid, node_id),
                    reply.error.reason,
                )
                continue
            try:
                total.add(
                    reply.content.array_records["stats"], site_label(grid, node_id)
                )
                added.append(node_id)
            except (KeyError, ValueError) as err:
                log(
                    WARNING,
                    "encrypted feature statistics (%s): reply from %s dropped: %s",
                    step,
                    site_label(grid, node_id),
                    err,
                )
        result = total.result()
        if result is None or len(added) < needed:
            failed = [site_label(grid, int(r.metadata.src_node_id)) for r in replies]
            failed = [
                f for f in failed if f not in {site_label(grid, n) for n in added}
            ]
            raise RuntimeError(
                f"encrypted feature statistics ({step}): {len(added)} valid "
                f"replies, need {needed} (min-nodes); failed: "
                f"{', '.join(failed) or 'none'}; see the warnings above"
            )
        return result, added

    means, sites = summed(STEP_MEAN, "mean", exchange(STEP_MEAN, node_ids, None))
    spreads, sites = summed(STEP_SPREAD, "spread", exchange(STEP_SPREAD, sites, means))
    ready = [
        int(r.metadata.src_node_id)
        for r in exchange(STEP_FINISH, sites, spreads)
        if not r.has_error()
    ]
    if len(ready) < needed:
        raise RuntimeError(
            f"encrypted feature statistics: {len(ready)} sites hold the scaler, "
            f"need {needed}"
        )
    log(
        INFO,
        "encrypted feature statistics: %d sites hold the pooled scaler; the "
        "server saw ciphertexts only",
        len(ready),
    )
    return means, spreads


def save_encrypted_scaler(
    means: ArrayRecord, spreads: ArrayRecord, directory: Path
) -> list[Path]:
    """Write the encrypted pooled statistics next to the encrypted model."""
    from ..he import save_encrypted_model

    return [
        save_encrypted_model(means, directory / "feature-mean.ckks-model"),
        save_encrypted_model(spreads, directory / "feature-spread.ckks-model"),
    ]


def decrypt_scaler(directory: Path, secret_context: str | Path) -> Standardizer:
    """Decrypt the pooled scaler from a results folder (data owner side)."""
    from ..he import decrypt_model_file

    mean = decrypt_model_file(directory / "feature-mean.ckks-model", secret_context)
    spread = decrypt_model_file(directory / "feature-spread.ckks-model", secret_context)
    mu = mean.arrays["mean"].numpy().astype(np.float64)
    return Standardizer(mu, _scale(mu, spread.arrays["spread"].numpy()))
