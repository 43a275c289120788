"""``distributed_dp_mod``: each client clips its update and adds its share of noise.

The client half of distributed DP (server half:
:class:`flwr_ext.strategy.DistributedDP`). On a TRAIN instruction the mod reads, from
the instruction's ConfigRecord,

- ``ddp-clipping-norm`` - the clip norm C,
- ``ddp-noise-stddev`` - this client's noise share, ``z * C / sqrt(t)``,
- ``ddp-weight-key`` - the name of the weight metric (default ``num-examples``),

remembers the global model it received, lets the ClientApp train, and then on the
reply: computes the update (reply model minus received model), scales it to L2 norm
at most C, adds i.i.d. Gaussian noise of the given std from an OS-seeded generator
(:mod:`flwr_ext.privacy.noise`), writes back ``global + noised update``, sets the
weight metric to 1 (so the aggregate is a uniform mean and no client can buy
influence with a large claimed dataset), and adds the markers
``ddp-clipping-norm``/``ddp-noise-stddev`` to the reply's MetricRecord so the server
can check that the mod ran. The update's norm never leaves the client.

The site, not the server, decides how little noise is enough: the values are
checked against the site's privacy policy
(:class:`flwr_ext.mods.site_policy.SitePolicy`, read from the node config), whose
default floor ``policy-min-noise-multiplier = 0.5``
holds even when the site sets no policy key. A server asking for std ``1e-300`` - or
for any std below ``floor * C / sqrt(k)`` - gets an error reply naming the policy
key, and the update is never released.

If the values are missing, invalid or below the site's floors, or the reply is not
a single finite model shaped like the global model, the mod returns an error reply
that says why and the update never leaves the node unprotected.

Order of mods: list it **after** the encrypting mod, so that it runs on the
plaintext update before encryption::

    app = ClientApp(mods=[ckks_mod, distributed_dp_mod])

Flower applies mods outermost-first on the way in, and the reply passes the
innermost mod first on the way out: ``ckks_mod`` decrypts the global model, this mod
records it, the ClientApp trains, this mod clips and noises, ``ckks_mod`` encrypts.
Other message types (evaluate, queries) pass through untouched.
"""

from __future__ import annotations

import math
from logging import ERROR

import numpy as np
from flwr.app import Context, Error, Message, MetricRecord
from flwr.app.message_type import MessageType
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode
from flwr.supercore import log

from ..privacy import keys
from ..privacy.clipping import clip_to_norm
from ..privacy.noise import add_gaussian_noise, secure_generator
from ..records import Manifest, flatten, unflatten
from .site_policy import SitePolicy, SitePolicyError

__all__ = ["distributed_dp_mod"]

_NAME = "distributed_dp_mod"


class _ModError(ValueError):
    """A precondition of the mod failed; the reason goes into the error reply."""


def distributed_dp_mod(
    msg: Message, context: Context, call_next: ClientAppCallable
) -> Message:
    """Clip this client's update and add its Gaussian noise share (TRAIN only).

    Parameters
    ----------
    msg : Message
        The instruction from the server.
    context : Context
        The ClientApp's context (passed on unchanged).
    call_next : ClientAppCallable
        The next mod, or the ClientApp.

    Returns
    -------
    Message
        The ClientApp's reply with a clipped, noised model and weight 1, or an
        error reply (``MOD_FAILED_PRECONDITION``) saying what was wrong.
    """
    if not _is_train(msg):
        return call_next(msg, context)
    try:
        policy = SitePolicy.from_node_config(context.node_config)
        clip, stddev, weight_key = _settings(msg)
        policy.check_dp(clip, stddev)  # PolicyViolation names the policy key
        array_records = msg.content.array_records
        if len(array_records) != 1:
            raise _ModError(
                "the train instruction must carry exactly one ArrayRecord (the "
                f"global model), got {len(array_records)}"
            )
        received = next(iter(array_records.values()))
        manifest = Manifest.from_arrayrecord(received)
        global_vector, _ = flatten(received, manifest, dtype=np.float64)
        if not np.isfinite(global_vector).all():
            raise _ModError("the global model in the instruction has NaN or Inf values")
    except (_ModError, SitePolicyError, TypeError, ValueError) as err:
        return _error(msg, str(err))
    except Exception as err:  # hostile input: nothing may escape the mod
        return _error(msg, f"malformed train instruction ({type(err).__name__})")

    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    try:
        _privatise(reply, manifest, global_vector, clip, stddev, weight_key)
    except (_ModError, TypeError, ValueError) as err:
        return _error(msg, str(err))
    except Exception as err:  # never release an update we failed to privatise
        return _error(msg, f"could not privatise the reply ({type(err).__name__})")
    return reply


def _is_train(msg: Message) -> bool:
    message_type = msg.metadata.message_type
    return message_type == MessageType.TRAIN or message_type.startswith(
        MessageType.TRAIN + "."
    )


def _settings(msg: Message) -> tuple[float, float, str]:
    """Read C, the noise std and the weight key from the instruction's config."""
    records = [
        record
        for record in msg.content.config_records.values()
        if keys.DDP_CLIPPING_NORM in record or keys.DDP_NOISE_STDDEV in record
    ]
    if len(records) != 1:
        raise _ModError(
            f"the train instruction has {len(records)} ConfigRecords with "
            f"'{keys.DDP_CLIPPING_NORM}'/'{keys.DDP_NOISE_STDDEV}' (expected one). "
            "Wrap the server strategy in flwr_ext.strategy.DistributedDP, which "
            "sends them"
        )
    config = records[0]
    values = []
    for key in (keys.DDP_CLIPPING_NORM, keys.DDP_NOISE_STDDEV):
        value = config.get(key)
        if (
            value is None
            or isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value <= 0
        ):
            raise _ModError(
                f"the train config's '{key}' must be a finite number > 0, got {value!r}"
            )
        values.append(float(value))
    weight_key = config.get(keys.DDP_WEIGHT_KEY, "num-examples")
    if not isinstance(weight_key, str) or not weight_key:
        raise _ModError(
            f"the train config's '{keys.DDP_WEIGHT_KEY}' must be a metric name, "
            f"got {weight_key!r}"
        )
    return values[0], values[1], weight_key


def _privatise(
    reply: Message,
    manifest: Manifest,
    global_vector: np.ndarray,
    clip: float,
    stddev: float,
    weight_key: str,
) -> None:
    """Clip and noise the reply's model in place; set weight 1 and markers."""
    array_records = reply.content.array_records
    if len(array_records) != 1:
        raise _ModError(
            "the ClientApp's train reply must carry exactly one ArrayRecord (the "
            f"trained model), got {len(array_records)}"
        )
    key, record = next(iter(array_records.items()))
    mismatch = manifest.describe_mismatch(record)
    if mismatch is not None:
        raise _ModError(
            f"the ClientApp's model does not match the global model: {mismatch}"
        )
    update, _ = flatten(record, manifest, dtype=np.float64)
    if not np.isfinite(update).all():
        raise _ModError("the ClientApp's model has NaN or Inf values")
    update -= global_vector
    clip_to_norm(update, clip)
    add_gaussian_noise(update, stddev, secure_generator())
    reply.content.array_records[key] = unflatten(global_vector + update, manifest)

    metric_records = reply.content.metric_records
    if len(metric_records) > 1:
        raise _ModError(
            "the ClientApp's train reply must carry at most one MetricRecord, got "
            f"{len(metric_records)} ({sorted(metric_records)})"
        )
    if metric_records:
        metrics = next(iter(metric_records.values()))
    else:
        metrics = MetricRecord()
        reply.content.metric_records["metrics"] = metrics
    metrics[weight_key] = 1
    metrics[keys.DDP_CLIPPING_NORM] = clip
    metrics[keys.DDP_NOISE_STDDEV] = stddev


def _error(msg: Message, reason: str) -> Message:
    log(ERROR, "%s: %s", _NAME, reason)
    return Message(
        Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=f"{_NAME}: {reason}"),
        reply_to=msg,
    )
