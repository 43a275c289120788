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
  weight slot, so the ClientApp receives an ordinary plaintext ArrayRecord. Only
  aggregates are decrypted: a ciphertext marked as one client's update is refused,
  and so is an aggregate whose count slot is below the site's minimum (node config
  ``policy-min-contributions``, an int >= 2, default 2) or whose weight and count
  slots differ from what the server says it summed (``ckks-model-weight``,
  ``ckks-model-contributions``): the error reply says ``the aggregate failed the
  check`` and the server rolls back to its last good model.
- **Outgoing** train reply: pre-scales the model by the client's weight
  (``num-examples / ckks-weight-unit``), checks the profile's magnitude bound, and
  replaces the ArrayRecord with ciphertexts. Nothing is sent in plaintext: if the
  server did not announce homomorphic aggregation (no ``ckks-*`` keys in the train
  config), if the server uses another key set, or if a value is too large, the
  reply is an error that says why, and the update never leaves the node.
- **Outgoing** evaluate reply to an encrypted instruction: any ArrayRecord is
  removed (it would reveal the decrypted global model to the server).
- **Threshold CKKS** (:class:`flwr_ext.strategy.ThresholdHomomorphicAggregation`):
  key generation, encryption under the collective public key and partial
  decryptions are answered by :mod:`flwr_ext.mods.threshold_ckks`.
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
from collections.abc import Mapping
from logging import ERROR, INFO, WARNING
from typing import NoReturn

from flwr.app import (
    ArrayRecord,
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
from ..he.codec import EncryptedHeader, check_chunk_bytes
from ..he.flooding import BudgetExhaustedError, charge_release
from ..he.protocol import (
    AGGREGATE_REJECTED,
    ENV_CONTEXT,
    KEY_DECRYPT_REQUEST,
    METRIC_CONTRIBUTIONS,
    METRIC_TOTAL_WEIGHT,
    NODE_CONTEXT,
    NODE_DECRYPT_FOR_SERVER,
    NODE_DECRYPT_MIN_CLIENTS,
    Announcement,
    ClientSettings,
    ModelClaims,
)
from ..he.threshold_protocol import read_op
from .site_policy import SitePolicy, SitePolicyError
from .threshold_ckks import handle_threshold

__all__ = [
    "AggregateRejectedError",
    "CkksModError",
    "ckks_mod",
    "site_min_contributions",
]

_NAME = "ckks_mod"


#: Node-config key: the fewest contributions an aggregate must hold before this
#: site decrypts it (an int >= 2; default 2). The same key as the site policy.
NODE_MIN_CONTRIBUTIONS = "policy-min-contributions"
#: Tolerance of the weight-slot check: ``|slot - claimed| <= WEIGHT_RTOL * claimed
#: + WEIGHT_ATOL * contributions``. CKKS errs by ~1e-9 (``default``) to ~3e-8
#: (``compact``) per contribution; a sum made with another key set decrypts to
#: values spread over +-2^19, so it passes with probability ~1e-11.
WEIGHT_RTOL = 1e-5
WEIGHT_ATOL = 1e-6


class CkksModError(Exception):
    """A precondition of ckks_mod failed; the message becomes the error reply."""


class AggregateRejectedError(CkksModError):
    """A decrypted aggregate failed the weight/count check (server rolls back)."""


def site_min_contributions(node_config: Mapping[str, object]) -> int:
    """Return the site's minimum number of contributions per decrypted aggregate.

    The site policy's ``policy-min-contributions`` (int >= 2, default 2; see
    :class:`flwr_ext.mods.site_policy.SitePolicy`): the site decrypts only
    ciphertexts marked as aggregates (kind ``"model"``) whose count slot says they
    sum at least this many updates, so a server cannot have it decrypt one
    client's update.

    Raises
    ------
    CkksModError
        If the site's policy is malformed (the message names the key).
    """
    try:
        return SitePolicy.from_node_config(node_config).min_contributions
    except SitePolicyError as err:
        raise CkksModError(str(err)) from err


def _decrypt_aggregate(
    record: ArrayRecord,
    keys: CkksKeys,
    what: str,
    minimum: int,
    claims: ModelClaims | None,
    minimum_from: str = NODE_MIN_CONTRIBUTIONS,
) -> DecryptedModel:
    """Decrypt an aggregate and check its kind, count and weight slots.

    Refuses (:class:`CkksModError`) one client's update (kind ``"update"``) before
    decrypting it, and (:class:`AggregateRejectedError`) an aggregate whose count
    slot is below ``minimum`` or whose weight or count slot differs from what the
    server says it summed (``claims``) - the signature of a reply encrypted under
    another key set, or with another weight than its sender claimed.

    The error that goes back to the server carries no decrypted value: exact
    decryptions of crafted ciphertexts leak the secret key (Li-Micciancio), so the
    slots' values are logged on this node only.
    """
    header = EncryptedHeader.from_record(record)
    if header.kind != "model":
        raise CkksModError(
            f"refusing to decrypt {what}: it is marked as one client's "
            f"{header.kind!r}, not an aggregate"
        )
    header.check_keys(keys, what)
    check_chunk_bytes(record, header, keys, what)
    try:
        decrypted = decrypt_record(record, keys, what=what)
    except KeyMismatchError:
        raise
    except InvalidCiphertextError as err:
        _reject(
            f"{what} does not decrypt to a valid aggregate (its weight slot is "
            "not a positive number, or a ciphertext is damaged)",
            str(err),
        )
    count, weight = decrypted.contributions, decrypted.total_weight
    detail = f"{what}: weight slot {weight:.9g}, count slot {count}"
    if weight > keys.profile.bound:
        _reject(
            f"{what} has a weight slot beyond the profile's bound: the sum wrapped "
            "around or was made with another key",
            detail,
        )
    if count < minimum:
        _reject(
            f"refusing {what}: this site decrypts aggregates of at least {minimum} "
            f"updates (node config {minimum_from}), and it sums fewer",
            detail,
        )
    if claims is not None and (
        count != claims.contributions
        or abs(weight - claims.weight)
        > WEIGHT_RTOL * claims.weight + WEIGHT_ATOL * claims.contributions
    ):
        _reject(
            f"the weight or count slot of {what} differs from what the server "
            f"summed ({claims.contributions} updates of total weight "
            f"{claims.weight:.9g}): a contribution was encrypted with another "
            "weight than claimed, or under another key set",
            detail,
        )
    return decrypted


def _reject(reason: str, detail: str) -> NoReturn:
    """Log ``detail`` (decrypted values) here; raise with ``reason`` only."""
    log(ERROR, "%s: %s (%s)", _NAME, AGGREGATE_REJECTED, detail)
    raise AggregateRejectedError(f"{AGGREGATE_REJECTED}: {reason}")


def ckks_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Decrypt the incoming global model and encrypt the outgoing train reply.

    See the module docstring for the behaviour and the settings it reads.
    """
    category = msg.metadata.message_type.split(".", 1)[0]
    try:
        config = _single_config(msg)
        threshold_op = (
            read_op(config)
            if category in (MessageType.TRAIN, MessageType.QUERY)
            else None
        )
        if threshold_op is not None:
            assert config is not None
            return handle_threshold(msg, context, call_next, config, threshold_op)
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
        if encrypted_in:
            claims = ModelClaims.read(config or {})
            minimum = site_min_contributions(context.node_config)
        for key in encrypted_in:
            decrypted = _decrypt_aggregate(
                msg.content.array_records[key], keys, "the global model", minimum,
                claims,
            )  # fmt: skip
            msg.content.array_records[key] = decrypted.arrays
    except (CkksModError, ValueError) as err:  # ThresholdError is a ValueError
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
    config: Mapping[str, object] = _single_config(msg) or {}
    site_minimum = site_min_contributions(context.node_config)
    minimum = max(settings.decrypt_min_clients, site_minimum)
    try:
        decrypted = _decrypt_aggregate(
            record,
            keys,
            "the aggregate to decrypt",
            minimum,
            ModelClaims.read(config),
            NODE_MIN_CONTRIBUTIONS
            if site_minimum >= settings.decrypt_min_clients
            else NODE_DECRYPT_MIN_CLIENTS,
        )
    except (InvalidCiphertextError, KeyMismatchError) as err:
        raise CkksModError(str(err)) from err
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
