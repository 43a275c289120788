"""``ckks_mod``: a Flower client mod that keeps the client's update encrypted.

Add it to an existing ClientApp; the ClientApp's own code does not change::

    from flwr_ext.mods import ckks_mod

    app = ClientApp(mods=[ckks_mod])          # ckks_mod first (outermost)

and point each SuperNode at the data owners' secret context::

    flower-supernode ... --node-config "ckks-context='/secure/secret-context.ckks'"

(in Flower's Simulation Engine, whose simulated nodes only get ``partition-id`` and
``num-partitions``: ``export FLWR_EXT_CKKS_CONTEXT=/secure/secret-context.ckks``).

What it does, per message:

- **Incoming** train/evaluate instruction carrying the encrypted global model:
  checks the key fingerprint, decrypts it with the secret key and divides by the
  weight slot, so the ClientApp receives an ordinary plaintext ArrayRecord.
- **Outgoing** train reply: pre-scales the model by the client's weight
  (``num-examples / ckks-weight-unit``), checks the profile's magnitude bound, and
  replaces the ArrayRecord with ciphertexts. Nothing is sent in plaintext: if the
  server did not announce homomorphic aggregation (no ``ckks-*`` keys in the train
  config), if the server uses another key set, or if a value is too large, the
  reply is an error that says why, and the update never leaves the node.
- **Outgoing** evaluate reply to an encrypted instruction: any ArrayRecord is
  removed (it would reveal the decrypted global model to the server).
- A **decryption request** from ``HomomorphicAggregation(mode="decrypt-aggregate")``
  is answered by the mod itself, only on nodes that opted in
  (``ckks-decrypt-for-server=true``) and only for sums of at least
  ``ckks-decrypt-min-clients`` updates (default 2), at most
  ``ckks-decrypt-budget`` times per run (default 1024); the released average and
  total weight are flooded and rounded (:mod:`flwr_ext.he.flooding`), so they do
  not reveal the secret key. The ClientApp never sees the request.

Order of mods: ``ckks_mod`` must be the *first* (outermost) mod, so that every other
mod (e.g. ``distributed_dp_mod``, which clips and adds a noise share) sees and
produces plaintext, and the update is encrypted last, just before it leaves.

The secret context is loaded once per process with ``n_threads=1``
(:func:`flwr_ext.he.load_keys`).
"""

from __future__ import annotations

import math
from logging import ERROR, INFO, WARNING

from flwr.app import (
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.app.message_type import MessageType
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode
from flwr.supercore import log

from ..he import (
    BoundExceededError,
    CkksKeys,
    DecryptedModel,
    InvalidCiphertextError,
    KeyMismatchError,
    decrypt_record,
    encrypt_record,
    is_encrypted,
    load_keys,
)
from ..he.codec import EncryptedHeader
from ..he.flooding import BudgetExhaustedError, charge_release
from ..he.protocol import (
    ENV_CONTEXT,
    KEY_DECRYPT_REQUEST,
    METRIC_CONTRIBUTIONS,
    METRIC_TOTAL_WEIGHT,
    NODE_CONTEXT,
    NODE_DECRYPT_FOR_SERVER,
    Announcement,
    ClientSettings,
)

__all__ = ["CkksModError", "ckks_mod"]

_NAME = "ckks_mod"


class CkksModError(Exception):
    """A precondition of ckks_mod failed; the message becomes the error reply."""


def ckks_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Decrypt the incoming global model and encrypt the outgoing train reply.

    See the module docstring for the behaviour and the settings it reads.
    """
    category = msg.metadata.message_type.split(".", 1)[0]
    try:
        config = _single_config(msg)
        if config is not None and config.get(KEY_DECRYPT_REQUEST) is True:
            return _answer_decrypt_request(msg, context)
        announcement = Announcement.read(config or {})
        encrypted_in = [
            key for key, rec in msg.content.array_records.items() if is_encrypted(rec)
        ]
        if category == MessageType.TRAIN and announcement is None:
            raise CkksModError(
                "the server did not announce homomorphic aggregation (no "
                "'ckks-profile' in the train config): refusing to send the update "
                "in plaintext. Wrap the server strategy in "
                "flwr_ext.strategy.HomomorphicAggregation, or remove ckks_mod."
            )
        if announcement is None and not encrypted_in:
            return call_next(msg, context)  # plaintext evaluate/query: nothing to do

        keys = _secret_keys(context)
        if announcement is not None:
            keys.check_matches(
                announcement.profile, announcement.fingerprint, "the server's key"
            )
        for key in encrypted_in:
            decrypted = decrypt_record(
                msg.content.array_records[key], keys, what="the global model"
            )
            msg.content.array_records[key] = decrypted.arrays
    except (CkksModError, ValueError) as err:
        return _error_reply(msg, str(err))

    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    if category == MessageType.TRAIN:
        assert announcement is not None
        try:
            return _encrypt_reply(reply, keys, announcement, context)
        except (CkksModError, ValueError) as err:
            return _error_reply(msg, str(err))
    if encrypted_in and reply.content.array_records:
        log(
            WARNING,
            "%s: removed %d ArrayRecord(s) from the %s reply: the decrypted global "
            "model must not go back to the server",
            _NAME,
            len(reply.content.array_records),
            category,
        )
        for key in list(reply.content.array_records):
            del reply.content.array_records[key]
    return reply


def _single_config(msg: Message) -> ConfigRecord | None:
    """Return the ConfigRecord with ``ckks-*`` keys (or the only one), if any."""
    records = list(msg.content.config_records.values())
    for record in records:
        if any(str(k).startswith("ckks-") for k in record):
            return record
    return records[0] if len(records) == 1 else None


def _secret_keys(context: Context) -> CkksKeys:
    settings = ClientSettings.from_node(context.node_config)
    if settings.context_path is None:
        raise CkksModError(
            "no secret context configured: set node config "
            f"{NODE_CONTEXT}='/path/secret-context.ckks' (flower-supernode "
            f"--node-config) or, in Flower's Simulation Engine, the environment "
            f"variable {ENV_CONTEXT}"
        )
    try:
        keys = load_keys(settings.context_path)
    except FileNotFoundError as err:
        raise CkksModError(str(err)) from err
    keys.require_secret()
    return keys


def _encrypt_reply(
    reply: Message, keys: CkksKeys, announcement: Announcement, context: Context
) -> Message:
    records = reply.content.array_records
    if len(records) != 1:
        raise CkksModError(
            f"the train reply must hold exactly one ArrayRecord to encrypt, got "
            f"{len(records)} ({sorted(records)})"
        )
    key, record = next(iter(records.items()))
    count = _claimed_weight(reply, announcement.weight_key)
    weight = count / announcement.weight_unit
    settings = ClientSettings.from_node(context.node_config)
    try:
        encrypted = encrypt_record(
            record,
            keys,
            weight,
            num_clients=announcement.num_clients,
            wire=announcement.wire,
            decryptor=settings.decrypt_for_server,
        )
    except BoundExceededError as err:
        log(ERROR, "%s: %s", _NAME, err)
        raise CkksModError(str(err)) from err
    reply.content.array_records[key] = encrypted
    return reply


def _claimed_weight(reply: Message, weight_key: str) -> float:
    metric_records = list(reply.content.metric_records.values())
    values = [m[weight_key] for m in metric_records if weight_key in m]
    if len(values) != 1:
        raise CkksModError(
            f"the train reply needs exactly one MetricRecord entry '{weight_key}' "
            f"(the client's weight), found {len(values)}"
        )
    value = values[0]
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise CkksModError(
            f"the client's weight '{weight_key}' must be a finite number > 0, "
            f"got {value!r}"
        )
    return float(value)


def _answer_decrypt_request(msg: Message, context: Context) -> Message:
    """Decrypt an aggregate for the server (opt-in nodes only)."""
    settings = ClientSettings.from_node(context.node_config)
    if not settings.decrypt_for_server:
        raise CkksModError(
            "this node has not opted in to decrypt aggregates for the server (node "
            f"config {NODE_DECRYPT_FOR_SERVER}=true)"
        )
    records = msg.content.array_records
    if len(records) != 1:
        raise CkksModError("a decryption request must carry one encrypted record")
    record = next(iter(records.values()))
    header = EncryptedHeader.from_record(record)
    if header.kind != "model":
        raise CkksModError(
            f"refusing to decrypt a {header.kind!r}: only aggregates are decrypted "
            "for the server"
        )
    keys = _secret_keys(context)
    try:
        decrypted = decrypt_record(record, keys, what="the aggregate to decrypt")
    except (InvalidCiphertextError, KeyMismatchError) as err:
        raise CkksModError(str(err)) from err
    if decrypted.contributions < settings.decrypt_min_clients:
        raise CkksModError(
            f"refusing to decrypt an aggregate of {decrypted.contributions} "
            f"update(s): this node decrypts sums of at least "
            f"{settings.decrypt_min_clients} (node config ckks-decrypt-min-clients)"
        )
    # decrypt_record flooded and rounded the values; count the release.
    if settings.decrypt_budget > keys.profile.flood_releases:
        raise CkksModError(
            f"ckks-decrypt-budget={settings.decrypt_budget} exceeds the "
            f"{keys.profile.flood_releases} releases profile "
            f"{keys.profile.name!r} floods for"
        )
    try:
        used = charge_release(context.state, settings.decrypt_budget)
    except BudgetExhaustedError as err:
        raise CkksModError(str(err)) from err
    log(
        INFO,
        "%s: decrypted an aggregate of %d updates for the server (flooded, noise "
        "std %.1e per summed value; release %d of %d this run)",
        _NAME,
        decrypted.contributions,
        decrypted.noise_std,
        used,
        settings.decrypt_budget,
    )
    return Message(content=_decryption_content(decrypted), reply_to=msg)


def _decryption_content(decrypted: DecryptedModel) -> RecordDict:
    """Reply to a decryption request: the average, its weight and count."""
    return RecordDict(
        {
            "arrays": decrypted.arrays,
            "metrics": MetricRecord(
                {
                    METRIC_TOTAL_WEIGHT: float(decrypted.total_weight),
                    METRIC_CONTRIBUTIONS: int(decrypted.contributions),
                }
            ),
        }
    )


def _error_reply(msg: Message, reason: str) -> Message:
    log(ERROR, "%s: %s", _NAME, reason)
    return Message(
        Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=f"{_NAME}: {reason}"),
        reply_to=msg,
    )
