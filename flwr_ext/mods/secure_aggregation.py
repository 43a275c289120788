"""``secure_aggregation_mod``: apply ``ckks_mod`` when the run or the site asks for it.

:func:`flwr_ext.mods.ckks_mod` fails closed: on a train instruction from a server
that did not announce homomorphic aggregation it refuses to send the update. An app
template that offers ``secure-aggregation = "none" | "ckks"`` in its run config
therefore cannot list ``ckks_mod`` unconditionally. This mod decides per message:

- if the **site** has a secret context configured (node config ``ckks-context``,
  or ``FLWR_EXT_CKKS_CONTEXT`` in simulation) or a threshold share folder (node
  config ``ckks-threshold-dir``, or ``FLWR_EXT_CKKS_THRESHOLD_DIR``), ``ckks_mod``
  always runs: a hospital that provisioned keys never sends an update in
  plaintext, whatever the run config says (a coordinator cannot downgrade it by
  submitting ``secure-aggregation="none"``);
- else, if the **run config** says ``secure-aggregation = "ckks"`` or
  ``"ckks-threshold"``, ``ckks_mod`` runs too - and answers with its clear
  error when the site lacks a secret context (``ckks``) or a share folder
  (``ckks-threshold``: node config ``ckks-threshold-dir``);
- else the message goes straight to the ClientApp.

The QUERY messages of the encrypted statistics round
(:mod:`flwr_ext.appkit.encrypted_stats`, marked :data:`ENCRYPTED_STATS_QUERY`)
always go straight to the ClientApp, which encrypts and decrypts them itself.

Put it first in ``ClientApp(mods=[...])``, where ``ckks_mod`` belongs.
"""

from __future__ import annotations

import os

from flwr.app import Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode

from ..he.protocol import ClientSettings
from .ckks import ckks_mod
from .threshold_ckks import ENV_THRESHOLD_DIR, NODE_THRESHOLD_DIR

#: ``secure-aggregation`` run-config values that route messages through ckks_mod.
CKKS_RUN_MODES = ("ckks", "ckks-threshold")

__all__ = [
    "CKKS_RUN_MODES",
    "ENCRYPTED_STATS_QUERY",
    "is_encrypted_stats_query",
    "secure_aggregation_mod",
    "site_requires_ckks",
]

#: Value of ``config["query"]`` in the encrypted statistics round's QUERY messages.
ENCRYPTED_STATS_QUERY = "feature-stats-ckks"


def is_encrypted_stats_query(msg: Message) -> bool:
    """Return True if ``msg`` is a QUERY of the encrypted statistics round."""
    config = msg.content.config_records.get("config")
    return config is not None and config.get("query") == ENCRYPTED_STATS_QUERY


def site_requires_ckks(context: Context) -> bool:
    """Return True if this site has a CKKS secret context or share folder."""
    if context.node_config.get(NODE_THRESHOLD_DIR) or os.environ.get(ENV_THRESHOLD_DIR):
        return True
    return ClientSettings.from_node(context.node_config).context_path is not None


def secure_aggregation_mod(
    msg: Message, context: Context, call_next: ClientAppCallable
) -> Message:
    """Route the message through ``ckks_mod`` when the site or the run asks."""
    try:
        wanted = site_requires_ckks(context) or (
            str(context.run_config.get("secure-aggregation", "none")).lower()
            in CKKS_RUN_MODES
        )
    except ValueError as err:  # malformed ckks-* node config
        return Message(
            Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=f"ckks: {err}"),
            reply_to=msg,
        )
    if wanted and is_encrypted_stats_query(msg):
        # The ClientApp encrypts and decrypts these itself (encrypted_stats).
        return call_next(msg, context)
    if wanted:
        return ckks_mod(msg, context, call_next)
    return call_next(msg, context)
