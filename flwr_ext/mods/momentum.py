"""``momentum_mod``: each client sends its momentum instead of its raw update.

Worker momentum (Karimireddy, He and Jaggi, "Learning from History for Byzantine
Robust Optimization", ICML 2021; Allouah et al., "Fixing by Mixing", AISTATS 2023):
a client keeps ``m_t = beta * m_{t-1} + (1 - beta) * u_t``, where ``u_t`` is this
round's update (trained model minus the global model it received), and replies
with ``global + m_t``. Averaging over about ``1 / (1 - beta)`` rounds shrinks the
round-to-round noise of honest updates, the variance that time-coupled attacks
such as ALIE and IPM hide in; composed with any robust rule on the server, the
rule's error then shrinks with it. It changes nothing on the server: every
:class:`~flwr_ext.strategy.RobustAggregation` rule accepts it as is.

Configuration (the site decides; a server instruction cannot change it):

momentum-beta : float in [0, 1), optional
    From the node's ``node_config`` (``--node-config "momentum-beta=0.9"``), else
    from the run config, else :data:`DEFAULT_BETA`. ``0`` turns the mod off.

State: ``m`` lives in ``context.state`` under :data:`STATE_KEY`, one float64 array
per model array, so it survives between rounds of a run. The first round (no
state), or a global model whose arrays differ from the stored ones, starts again
from ``m = u``.

Failures are loud: an instruction or a reply that is not one model shaped like
the global model, or a non-finite trained model, becomes an error reply
(``MOD_FAILED_PRECONDITION``) that says why; the state is not changed then.
Evaluate and other messages pass through.

Order: list it after ``byzantine_mod`` and before any encrypting or DP mod, so
that the momentum is what gets attacked, clipped, noised or encrypted::

    app = ClientApp(mods=[momentum_mod])
"""

from __future__ import annotations

import math
from logging import ERROR

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Error, Message
from flwr.app.message_type import MessageType
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode
from flwr.supercore import log

from ..records import Manifest, flatten, unflatten

__all__ = ["DEFAULT_BETA", "STATE_KEY", "momentum_mod"]

_NAME = "momentum_mod"
#: ``beta`` when neither the node nor the run config sets ``momentum-beta``.
DEFAULT_BETA = 0.9
#: Key of the momentum ArrayRecord in ``context.state``.
STATE_KEY = "momentum_mod.m"


class _ModError(ValueError):
    """A precondition failed; the reason goes into the error reply."""


def momentum_mod(
    msg: Message, context: Context, call_next: ClientAppCallable
) -> Message:
    """Replace the trained model by ``global + momentum`` (TRAIN only).

    Parameters
    ----------
    msg : Message
        The server's instruction.
    context : Context
        The ClientApp's context; ``context.state`` holds the momentum.
    call_next : ClientAppCallable
        The next mod, or the ClientApp.

    Returns
    -------
    Message
        The reply with the momentum model, or an error reply saying what was
        wrong.
    """
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    try:
        beta = _beta(context)
        if beta == 0.0:
            return call_next(msg, context)
        records = msg.content.array_records
        if len(records) != 1:
            raise _ModError(
                "the train instruction must carry exactly one ArrayRecord (the "
                f"global model), got {len(records)}"
            )
        received = next(iter(records.values()))
        sent_manifest = Manifest.from_arrayrecord(received)
    except (_ModError, TypeError, ValueError) as err:
        return _error(msg, str(err))

    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    try:
        _apply(reply, received, sent_manifest, beta, context)
    except (_ModError, TypeError, ValueError) as err:
        return _error(msg, str(err))
    return reply


def _beta(context: Context) -> float:
    raw = context.node_config.get(
        "momentum-beta", context.run_config.get("momentum-beta", DEFAULT_BETA)
    )
    if (
        isinstance(raw, bool)
        or not isinstance(raw, int | float)
        or not math.isfinite(raw)
        or not 0.0 <= raw < 1.0
    ):
        raise _ModError(f"momentum-beta must be a number in [0, 1), got {raw!r}")
    return float(raw)


def _apply(
    reply: Message,
    received: ArrayRecord,
    sent_manifest: Manifest,
    beta: float,
    context: Context,
) -> None:
    records = reply.content.array_records
    if len(records) != 1:
        raise _ModError(
            "the ClientApp's train reply must carry exactly one ArrayRecord, got "
            f"{len(records)}"
        )
    key, trained = next(iter(records.items()))
    # Answer in the ClientApp's own dtypes (a server may send float64 for a
    # float32 model), but require the global model's names and shapes.
    manifest = Manifest.from_arrayrecord(trained)
    if manifest.keys != sent_manifest.keys or any(
        a.shape != b.shape
        for a, b in zip(manifest.specs, sent_manifest.specs, strict=True)
    ):
        raise _ModError("the ClientApp's model does not match the global model")
    model, _ = flatten(trained, manifest, dtype=np.float64)
    if not np.isfinite(model).all():
        raise _ModError("the ClientApp's model has NaN or Inf values")
    global_vector, _ = flatten(received, sent_manifest, dtype=np.float64)
    if not np.isfinite(global_vector).all():
        raise _ModError("the global model has NaN or Inf values")
    update = model - global_vector
    previous = _load(context, manifest)
    momentum = update if previous is None else beta * previous + (1 - beta) * update
    with np.errstate(over="ignore", invalid="ignore"):
        new_model = global_vector + momentum
    if not np.isfinite(new_model).all():
        raise _ModError("global model + momentum overflows")
    _store(context, manifest, momentum)
    reply.content.array_records[key] = unflatten(new_model, manifest)


def _load(context: Context, manifest: Manifest) -> np.ndarray | None:
    """Return the stored momentum as a float64 vector (None: absent or stale)."""
    record = context.state.get(STATE_KEY)
    if not isinstance(record, ArrayRecord) or tuple(record.keys()) != manifest.keys:
        return None
    parts = []
    for spec in manifest.specs:
        array = record[spec.key]
        if tuple(array.shape) != tuple(spec.shape) or array.dtype != "float64":
            return None
        parts.append(array.numpy().ravel())
    vector = np.concatenate(parts) if parts else np.zeros(0)
    return vector if np.isfinite(vector).all() else None


def _store(context: Context, manifest: Manifest, momentum: np.ndarray) -> None:
    arrays = {}
    offset = 0
    for spec in manifest.specs:
        size = spec.size
        arrays[spec.key] = Array(
            momentum[offset : offset + size].reshape(spec.shape).copy()
        )
        offset += size
    context.state[STATE_KEY] = ArrayRecord(arrays)


def _error(msg: Message, reason: str) -> Message:
    log(ERROR, "%s: %s", _NAME, reason)
    return Message(
        Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=f"{_NAME}: {reason}"),
        reply_to=msg,
    )
