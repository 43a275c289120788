"""The site's side of threshold CKKS (called by :func:`flwr_ext.mods.ckks_mod`).

A site holds one secret share per key set, in ``<share dir>/<key set>.share``
(mode 0600; created at the key-generation round, reloaded after a restart). The
share directory is the node config ``ckks-threshold-dir`` on a SuperNode, or the
environment variable ``FLWR_EXT_CKKS_THRESHOLD_DIR`` in Flower's Simulation Engine
(its simulated nodes get only ``partition-id``; the file is then
``<dir>/<key set>-site<partition-id>.share``).

What a site answers, and what it refuses (each refusal is an error reply naming
the rule; nothing secret is in it):

- ``keygen``: its public share ``p_i`` for the announced seed.
- ``train``: the ClientApp trains on the plaintext global model; the mod encrypts
  the reply (pre-scaled by ``num-examples / weight unit``, plus a weight and a
  count slot) under the collective public key. Nothing leaves in plaintext.
- ``sum`` (a query, e.g. the apps' feature statistics): the ClientApp answers with
  one MetricRecord; the mod encrypts all its numbers as one vector (plus a count
  slot) and sends only that and the layout (key names and lengths).
- ``decrypt``: its flooded partial decryption of each aggregate chunk, only
  for a key set it holds a share of, only for an aggregate the server says holds
  at least the site's ``policy-min-contributions`` (default 2) updates, and only
  once per round (a second request for the same or an earlier round is refused:
  a replay).
"""

from __future__ import annotations

import json
import math
import os
from logging import INFO
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore import log

from ..he.profiles import BoundExceededError
from ..he.threshold import (
    SecretShare,
    ThresholdContext,
    ThresholdError,
    common_polynomial,
    encrypt_values,
    encryptor,
)
from ..he.threshold_protocol import (
    KEY_CONTRIBUTIONS,
    KEY_DIGESTS,
    KEY_KEYSET,
    KEY_LAYOUT,
    KEY_ROUND,
    KEY_SCALE_BITS,
    KEY_SEED,
    KEY_SITE_NAME,
    OP_DECRYPT,
    OP_KEYGEN,
    OP_SUM,
    EncryptedUpdate,
    TrainAnnouncement,
    check_keyset,
    encode_update,
    metrics_to_vector,
    read_residue_record,
    residue_record,
)
from ..records import flatten
from .site_policy import SitePolicy, SitePolicyError

__all__ = ["NODE_THRESHOLD_DIR", "ENV_THRESHOLD_DIR", "handle_threshold"]

NODE_THRESHOLD_DIR = "ckks-threshold-dir"
ENV_THRESHOLD_DIR = "FLWR_EXT_CKKS_THRESHOLD_DIR"
NODE_MIN_CONTRIBUTIONS = "policy-min-contributions"
_NAME = "ckks_mod (threshold)"

_CONTEXT: ThresholdContext | None = None


def _context() -> ThresholdContext:
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = ThresholdContext()
    return _CONTEXT


def handle_threshold(
    msg: Message,
    context: Context,
    call_next: ClientAppCallable,
    config: ConfigRecord,
    op: str,
) -> Message:
    """Answer one threshold-CKKS instruction (see the module docstring).

    Raises :class:`ThresholdError` (``ckks_mod`` turns it into an error reply).
    A secure sum comes as a query; every other operation as a train message.
    """
    is_query = msg.metadata.message_type.split(".", 1)[0] == "query"
    if is_query != (op == OP_SUM):
        raise ThresholdError(f"threshold operation '{op}' in the wrong message type")
    if op == OP_KEYGEN:
        return _keygen(msg, context, config)
    if op == OP_DECRYPT:
        return _decrypt(msg, context, config)
    if op == OP_SUM:
        return _sum(msg, context, call_next, config)
    return _train(msg, context, call_next, config)


def _share_path(context: Context, keyset: str) -> Path:
    directory = context.node_config.get(NODE_THRESHOLD_DIR) or os.environ.get(
        ENV_THRESHOLD_DIR
    )
    if not directory:
        raise ThresholdError(
            "no threshold share directory configured: set node config "
            f"{NODE_THRESHOLD_DIR}='/secure/dir' (flower-supernode --node-config) "
            f"or, in Flower's Simulation Engine, the environment variable "
            f"{ENV_THRESHOLD_DIR}"
        )
    path = Path(str(directory))
    if not path.is_dir():
        raise ThresholdError(f"the threshold share directory {path} does not exist")
    if NODE_THRESHOLD_DIR in context.node_config:
        return path / f"{keyset}.share"
    partition = context.node_config.get("partition-id")
    if isinstance(partition, bool) or not isinstance(partition, int):
        raise ThresholdError(
            f"{ENV_THRESHOLD_DIR} needs the node config 'partition-id' (set by "
            "Flower's Simulation Engine) to name this site's share file"
        )
    return path / f"{keyset}-site{partition}.share"


def _keygen(msg: Message, context: Context, config: ConfigRecord) -> Message:
    keyset = check_keyset(config.get(KEY_KEYSET))
    seed = config.get(KEY_SEED)
    if not isinstance(seed, bytes) or len(seed) != 32:
        raise ThresholdError("the key-generation request needs a 32-byte seed")
    ctx = _context()
    path = _share_path(context, keyset)
    if path.exists():
        share = SecretShare.load(ctx, path)  # a restart: same share, fresh error
    else:
        share = SecretShare.generate(ctx)
        share.save(path)
    public = share.public_share(common_polynomial(ctx, seed))
    site = str(context.node_config.get("site-name", ""))[:64]
    log(INFO, "%s: public key share sent for key set %s", _NAME, keyset[:8])
    return Message(
        RecordDict(
            {
                "public-share": residue_record("p", [public]),
                "config": ConfigRecord({KEY_SITE_NAME: site}),
            }
        ),
        reply_to=msg,
    )


def _train(
    msg: Message, context: Context, call_next: ClientAppCallable, config: ConfigRecord
) -> Message:
    announcement = TrainAnnouncement.read(config)
    ctx = _context()
    _share_path(context, announcement.keyset)  # fail before training if unset
    encrypt = encryptor(ctx, announcement.public_key)
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    records = reply.content.array_records
    if len(records) != 1:
        raise ThresholdError(
            f"the train reply must hold exactly one ArrayRecord to encrypt, got "
            f"{len(records)}"
        )
    key, record = next(iter(records.items()))
    weight = _claimed_weight(reply, announcement.weight_key) / announcement.weight_unit
    values, _ = flatten(record)
    vector = np.concatenate([values * weight, [weight, 1.0]])
    bound = 2.0 ** (
        sum(ctx.profile.coeff_mod_bit_sizes[:-1]) - ctx.profile.scale_bits - 2
    )
    limit = bound / announcement.num_clients
    largest = float(np.max(np.abs(vector)))
    if not math.isfinite(largest) or largest > limit:
        raise BoundExceededError(
            f"a pre-scaled value of {largest:.3g} exceeds this round's per-client "
            f"bound {limit:.3g} (the aggregate would wrap around); lower the weight "
            "unit's inverse or the model's magnitude"
        )
    update = EncryptedUpdate(
        announcement.keyset, vector.shape[0], encrypt_values(ctx, encrypt, vector)
    )
    reply.content.array_records[key] = encode_update(update)
    return reply


def _sum(
    msg: Message, context: Context, call_next: ClientAppCallable, config: ConfigRecord
) -> Message:
    announcement = TrainAnnouncement.read(config)
    ctx = _context()
    scale_bits = config.get(KEY_SCALE_BITS)
    if (
        isinstance(scale_bits, bool)
        or not isinstance(scale_bits, int)
        or not 30 <= scale_bits <= ctx.profile.scale_bits
    ):
        raise ThresholdError(
            f"'{KEY_SCALE_BITS}' must be an integer in [30, {ctx.profile.scale_bits}]"
        )
    _share_path(context, announcement.keyset)
    encrypt = encryptor(ctx, announcement.public_key)
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    records = list(reply.content.metric_records.values())
    if len(records) != 1:
        raise ThresholdError(
            f"a secure-sum reply must hold exactly one MetricRecord, got {len(records)}"
        )
    layout, values = metrics_to_vector(records[0])
    vector = np.concatenate([values, [1.0]])  # the count slot
    data_bits = sum(ctx.profile.coeff_mod_bit_sizes[:-1])
    limit = 2.0 ** (data_bits - scale_bits - 2) / announcement.num_clients
    largest = float(np.max(np.abs(vector)))
    if largest > limit:
        raise ThresholdError(
            f"a value of magnitude {largest:.3g} exceeds the secure sum's per-site "
            f"bound {limit:.3g} at scale 2^{scale_bits}"
        )
    update = EncryptedUpdate(
        announcement.keyset,
        vector.shape[0],
        encrypt_values(ctx, encrypt, vector, scale_bits=scale_bits),
    )
    return Message(
        RecordDict(
            {
                "sum": encode_update(update),
                "config": ConfigRecord({KEY_LAYOUT: json.dumps(layout)}),
            }
        ),
        reply_to=msg,
    )


def _claimed_weight(reply: Message, weight_key: str) -> float:
    values = [
        m[weight_key] for m in reply.content.metric_records.values() if weight_key in m
    ]
    if len(values) != 1:
        raise ThresholdError(f"the train reply needs exactly one '{weight_key}'")
    value = values[0]
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (math.isfinite(value) and value > 0)
    ):
        raise ThresholdError(f"'{weight_key}' must be a finite number > 0")
    return float(value)


def _decrypt(msg: Message, context: Context, config: ConfigRecord) -> Message:
    keyset = check_keyset(config.get(KEY_KEYSET))
    server_round = config.get(KEY_ROUND)
    contributions = config.get(KEY_CONTRIBUTIONS)
    for name, value in ((KEY_ROUND, server_round), (KEY_CONTRIBUTIONS, contributions)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ThresholdError(f"'{name}' must be an integer >= 0")
    minimum = _min_contributions(context)
    if contributions < minimum:  # type: ignore[operator]
        raise ThresholdError(
            f"refusing to help decrypt an aggregate of {contributions!r} update(s): "
            f"this site's policy needs at least {minimum} "
            f"(node config {NODE_MIN_CONTRIBUTIONS})"
        )
    ctx = _context()
    path = _share_path(context, keyset)
    if not path.exists():
        raise ThresholdError(f"this site holds no share of key set {keyset[:8]}")
    share = SecretShare.load(ctx, path)
    records = msg.content.array_records
    if len(records) != 1:
        raise ThresholdError("a decryption request carries one ArrayRecord of c1s")
    record = next(iter(records.values()))
    count = len(record)
    if not 1 <= count <= ctx.profile.max_decryptions - share.decryptions_used:
        raise ThresholdError(
            f"{count} chunks to decrypt: more than this share's remaining budget "
            f"({ctx.profile.max_decryptions - share.decryptions_used})"
        )
    c1s = read_residue_record(ctx, record, "c1", expected=count)
    share.claim_round(int(server_round))  # type: ignore[arg-type]
    partials = share.partial_decrypt_all(c1s)
    log(
        INFO,
        "%s: partial decryption %d of an aggregate (%d updates, %d chunks)",
        _NAME,
        server_round,
        contributions,
        count,
    )
    return Message(
        RecordDict(
            {
                "shares": residue_record("h", [p.share for p in partials]),
                "config": ConfigRecord(
                    {
                        KEY_DIGESTS: json.dumps(
                            [p.ciphertext_digest.hex() for p in partials]
                        )
                    }
                ),
                "metrics": MetricRecord({"decryptions-used": share.decryptions_used}),
            }
        ),
        reply_to=msg,
    )


def _min_contributions(context: Context) -> int:
    """Return the site policy's ``policy-min-contributions`` (see SitePolicy)."""
    try:
        return SitePolicy.from_node_config(context.node_config).min_contributions
    except SitePolicyError as err:
        raise ThresholdError(str(err)) from err
