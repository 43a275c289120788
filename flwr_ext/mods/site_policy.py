"""The site-side privacy policy: floors a site sets that no server can lower.

A hospital or a bank runs the ClientApp on its own SuperNode; the coordinator runs the
ServerApp. Every setting that protects the site's data - how much noise its update
carries, whether it may leave unencrypted, how few contributions an aggregate may hold
before the site decrypts it - would otherwise come from the coordinator's run config
and strategy. A :class:`SitePolicy`, read from the site's **node config** (set by the
site's own administrator when starting ``flower-supernode``), puts floors under those
settings. The site's mods enforce them against any instruction; a violation is an
error reply that names the policy key and never carries the site's data.

Keys (default in brackets) and what each stops:

``policy-min-noise-multiplier`` [0.5]
    A server asking ``distributed_dp_mod`` for too little noise (e.g. std
    ``1e-300``: the exact update would leave the site). The site checks
    ``z_site = (sigma / C) * sqrt(k) >= floor``, with sigma the noise std and C the
    clip norm it is told to apply, and ``k = policy-min-contributions`` when
    ``policy-require-ckks`` guarantees that the update leaves encrypted (only
    aggregates of at least k updates are ever decrypted), else ``k = 1`` (the
    server could see the noised update itself). ``0`` turns the floor off.
``policy-max-clipping-norm`` [unset]
    A clip norm C larger than the site accepts (how far one update may move the
    model).
``policy-min-contributions`` [2]
    Decrypting or releasing an "aggregate" of fewer contributions (one client's
    update relabelled as a sum). An integer >= 2.
``policy-require-ckks`` [false]
    Any ArrayRecord leaving the site in plaintext: a train instruction that does
    not announce CKKS (single-key, or threshold CKKS's collective public key) is
    refused before training, and a reply holding a plaintext array is replaced by
    an error reply (the update never leaves). Threshold CKKS's key-generation and
    partial-decryption exchanges are answered by ``ckks_mod`` alone (the ClientApp
    never runs) and carry no data array: they pass, and are not train rounds.
``policy-require-dp`` [false]
    A train round without distributed DP: the instruction must carry DP settings
    meeting the floors, and the reply the markers that ``distributed_dp_mod`` ran.
``policy-max-train-rounds`` [0 = no limit]
    Answering more train instructions than this in one run (each is a release).
``policy-redact-errors`` [true]
    An exception raised in the ClientApp reaching the coordinator with its message
    (which may quote data, e.g. numpy's ``could not convert string to float:
    'P-1234'``): the reply names only the exception type; message and traceback go
    to the site's own log. Errors written to be shared (flwr-ext's data errors: a
    code, a column, a line) pass.

Any other ``policy-*`` key is refused (a misspelt floor must not be silently ignored).
Values are TOML in the node config (``--node-config "policy-require-ckks=true
policy-min-noise-multiplier=1.0"``); a bad value fails the site's first message with
an error naming the key and the value.

Use: put :func:`site_policy_mod` **first** (outermost) in the ClientApp's mods, so it
sees the instruction before anything else and the reply last, just before it leaves::

    app = ClientApp(mods=[site_policy_mod, secure_aggregation_mod, distributed_dp_mod])

:func:`flwr_ext.mods.distributed_dp_mod` reads the same policy for its noise floor (so
the floor holds even without ``site_policy_mod``, with the defaults above).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from logging import ERROR, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message
from flwr.app.message_type import MessageType
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode
from flwr.supercore import log

from ..he.codec import META_KEY, STYPE_CIPHERTEXT, STYPE_META  # no TenSEAL import
from ..he.protocol import KEY_DECRYPT_REQUEST, KEY_PROFILE, METRIC_CONTRIBUTIONS
from ..he.threshold import ThresholdError
from ..he.threshold_protocol import META as THRESHOLD_META
from ..he.threshold_protocol import (
    OP_DECRYPT,
    OP_KEYGEN,
    OP_TRAIN,
    is_threshold_update,
    read_op,
)
from ..privacy import keys

__all__ = [
    "POLICY_PREFIX",
    "ShareableError",
    "PolicyViolationError",
    "SitePolicy",
    "SitePolicyError",
    "site_policy_mod",
]

_NAME = "site_policy_mod"
#: Every node-config key of the policy starts with this.
POLICY_PREFIX = "policy-"

KEY_MIN_NOISE_MULTIPLIER = "policy-min-noise-multiplier"
KEY_MAX_CLIPPING_NORM = "policy-max-clipping-norm"
KEY_MIN_CONTRIBUTIONS = "policy-min-contributions"
KEY_REQUIRE_CKKS = "policy-require-ckks"
KEY_REQUIRE_DP = "policy-require-dp"
KEY_MAX_TRAIN_ROUNDS = "policy-max-train-rounds"
KEY_REDACT_ERRORS = "policy-redact-errors"

_CKKS_STYPES = frozenset({STYPE_META, STYPE_CIPHERTEXT})
_THRESHOLD_CHUNK = re.compile(r"ct-\d{5}")

#: Relative slack when comparing the server's floats with a floor (z * C / sqrt(t)
#: computed on the server and squared back here loses a few ulps).
_RTOL = 1e-9
_STATE_KEY = "flwr-ext-site-policy"


class ShareableError(ValueError):
    """An error from site code whose message was written to be sent to the server.

    Raise it (instead of ``ValueError``) for messages that hold nothing about the
    site's data - a missing setting, a non-finite global model - so that they
    reach the coordinator even under ``policy-redact-errors``. Any exception with
    a ``public_reason`` string attribute is treated the same way (e.g.
    :class:`flwr_ext.appkit.tabular.SchemaError`).
    """

    @property
    def public_reason(self) -> str:
        """The message that may leave the site."""
        return str(self)


class SitePolicyError(ValueError):
    """The site's own policy (node config) is invalid; names the key and value."""


class PolicyViolationError(ValueError):
    """An instruction or reply breaks the site's policy; names the policy key.

    The message is written to be sent to the server: it names the key and the
    server-chosen values, never anything about the site's data.
    """

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"refused by the site's policy {key}: {reason}")
        self.key = key


@dataclass(frozen=True)
class SitePolicy:
    """A site's privacy floors (see the module docstring for each key).

    Attributes
    ----------
    min_noise_multiplier : float
        Floor on ``z_site = (sigma / C) * sqrt(k)`` for distributed DP, >= 0.
    max_clipping_norm : float or None
        Ceiling on the clip norm C a server may ask for; None: no ceiling.
    min_contributions : int
        Fewest contributions an aggregate must hold before this site decrypts or
        releases it, >= 2.
    require_ckks : bool
        No ArrayRecord leaves the site in plaintext.
    require_dp : bool
        Every train reply is clipped and noised by ``distributed_dp_mod``.
    max_train_rounds : int
        Most train instructions answered per run (0: no limit).
    redact_errors : bool
        Exceptions from the ClientApp reach the server as their type only.
    """

    min_noise_multiplier: float = 0.5
    max_clipping_norm: float | None = None
    min_contributions: int = 2
    require_ckks: bool = False
    require_dp: bool = False
    max_train_rounds: int = 0
    redact_errors: bool = True

    def __post_init__(self) -> None:
        problems = _problems(self)
        if problems:
            raise SitePolicyError(
                "invalid site policy (node config): " + "; ".join(problems)
            )

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, object]) -> SitePolicy:
        """Parse and validate the ``policy-*`` keys of a site's node config.

        Missing keys take the safe defaults. Raises :class:`SitePolicyError` that
        names every bad key and its value, including unknown ``policy-*`` keys.
        """
        values: dict[str, object] = {}
        problems: list[str] = []
        known = {_key(f.name): f.name for f in fields(cls)}
        for key in node_config:
            if not isinstance(key, str) or not key.startswith(POLICY_PREFIX):
                continue
            if key not in known:
                problems.append(
                    f"unknown key {key}={node_config[key]!r} (known: {sorted(known)})"
                )
                continue
            try:
                values[known[key]] = _PARSERS[known[key]](node_config[key])
            except ValueError as err:
                problems.append(f"{key}={node_config[key]!r} {err}")
        if problems:
            raise SitePolicyError(
                "invalid site policy (node config): " + "; ".join(problems)
            )
        return cls(**values)  # type: ignore[arg-type]

    @property
    def credited_contributions(self) -> int:
        """k: contributions this site's update is guaranteed to be mixed with.

        ``min_contributions`` when the update leaves only encrypted (the site and
        every decrypting site refuse smaller aggregates), else 1.
        """
        return self.min_contributions if self.require_ckks else 1

    def check_dp(self, clipping_norm: float, noise_stddev: float) -> None:
        """Refuse distributed-DP settings below the site's floors.

        Parameters
        ----------
        clipping_norm : float
            C, the L2 norm the update is clipped to (finite, > 0).
        noise_stddev : float
            sigma, std of the Gaussian noise the site adds per coordinate.

        Raises
        ------
        PolicyViolationError
            Naming ``policy-max-clipping-norm`` or ``policy-min-noise-multiplier``.
        """
        if (
            self.max_clipping_norm is not None
            and clipping_norm > self.max_clipping_norm
        ):
            raise PolicyViolationError(
                KEY_MAX_CLIPPING_NORM,
                f"the server asked for clipping norm {clipping_norm:g} > "
                f"{self.max_clipping_norm:g}",
            )
        k = self.credited_contributions
        z_site = noise_stddev / clipping_norm * math.sqrt(k)
        if z_site < self.min_noise_multiplier * (1 - _RTOL):
            raise PolicyViolationError(
                KEY_MIN_NOISE_MULTIPLIER,
                f"the server asked for noise std {noise_stddev:.6g} at clipping norm "
                f"{clipping_norm:.6g}: noise multiplier {z_site:.6g} (counting "
                f"{k} contribution(s)) < {self.min_noise_multiplier:g}",
            )


def _key(name: str) -> str:
    return POLICY_PREFIX + name.replace("_", "-")


def _number(value: object) -> float:
    if isinstance(value, bool):
        raise ValueError("must be a number, not a boolean")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ValueError("must be a number") from None
    if not isinstance(value, int | float):
        raise ValueError("must be a number")
    try:
        number = float(value)
    except OverflowError:
        raise ValueError("must be a finite number") from None
    if not math.isfinite(number):
        raise ValueError("must be a finite number")
    return number


def _integer(value: object) -> int:
    number = _number(value)
    if number != int(number):
        raise ValueError("must be an integer")
    return int(number)


def _boolean(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in {"true", "false"}:
        return value.strip().lower() == "true"
    raise ValueError("must be true or false")


def _optional_number(value: object) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return _number(value)


_PARSERS = {
    "min_noise_multiplier": _number,
    "max_clipping_norm": _optional_number,
    "min_contributions": _integer,
    "require_ckks": _boolean,
    "require_dp": _boolean,
    "max_train_rounds": _integer,
    "redact_errors": _boolean,
}


def _problems(policy: SitePolicy) -> list[str]:
    problems = []
    z = policy.min_noise_multiplier
    if isinstance(z, bool) or not isinstance(z, int | float) or not z >= 0:
        problems.append(f"{KEY_MIN_NOISE_MULTIPLIER}={z!r} must be a number >= 0")
    elif not math.isfinite(z):
        problems.append(f"{KEY_MIN_NOISE_MULTIPLIER}={z!r} must be finite")
    c = policy.max_clipping_norm
    if c is not None and (
        isinstance(c, bool)
        or not isinstance(c, int | float)
        or not math.isfinite(c)
        or c <= 0
    ):
        problems.append(f"{KEY_MAX_CLIPPING_NORM}={c!r} must be a finite number > 0")
    m = policy.min_contributions
    if isinstance(m, bool) or not isinstance(m, int) or m < 2:
        problems.append(
            f"{KEY_MIN_CONTRIBUTIONS}={m!r} must be an integer >= 2 (an aggregate "
            "of one contribution is that contribution)"
        )
    r = policy.max_train_rounds
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        problems.append(f"{KEY_MAX_TRAIN_ROUNDS}={r!r} must be an integer >= 0")
    for name in ("require_ckks", "require_dp", "redact_errors"):
        if not isinstance(getattr(policy, name), bool):
            problems.append(f"{_key(name)}={getattr(policy, name)!r} must be a bool")
    return problems


# ------------------------------------------------------------------ the mod
def site_policy_mod(
    msg: Message, context: Context, call_next: ClientAppCallable
) -> Message:
    """Enforce the site's :class:`SitePolicy` on the instruction and on the reply.

    Put it first (outermost) in ``ClientApp(mods=[...])``. Incoming, it refuses
    (before anything trains) a train instruction that does not announce CKKS while
    ``policy-require-ckks``, that lacks DP settings meeting the floors while
    ``policy-require-dp``, or that exceeds ``policy-max-train-rounds``. Outgoing, it
    replaces by an error reply any reply that holds a plaintext array while
    ``policy-require-ckks``, a train reply without the DP markers while
    ``policy-require-dp``, and a decrypted aggregate of fewer than
    ``policy-min-contributions``. It never raises.

    Returns
    -------
    Message
        The inner reply, or an error reply (``MOD_FAILED_PRECONDITION``) naming
        the policy key.
    """
    try:
        policy = SitePolicy.from_node_config(context.node_config)
    except SitePolicyError as err:
        return _error(msg, str(err))
    try:
        category = str(msg.metadata.message_type).split(".", 1)[0]
        train = category == MessageType.TRAIN
        configs = list(msg.content.config_records.values())
        # ckks_mod answers a decryption request whatever the message type
        decrypt_request = any(c.get(KEY_DECRYPT_REQUEST) is True for c in configs)
        threshold_op = _threshold_op(configs)
        # threshold key generation / partial decryption: ckks_mod answers alone
        protocol_only = threshold_op in (OP_KEYGEN, OP_DECRYPT)
        train_round = train and not decrypt_request and not protocol_only
        if train_round:
            _check_train_instruction(
                policy, configs, context, threshold=threshold_op == OP_TRAIN
            )
    except PolicyViolationError as err:
        return _error(msg, str(err))

    try:
        reply = call_next(msg, context)
    except Exception as err:  # the ClientApp raised: keep its message at the site
        return _exception_reply(msg, err, policy)
    if not isinstance(reply, Message) or reply.has_error():
        return reply
    try:
        if decrypt_request:
            _check_decryption_reply(policy, msg, reply)
        elif protocol_only:
            _check_protocol_reply(str(threshold_op), reply)
        else:
            if policy.require_ckks:
                _check_no_plaintext(reply)
            if train and policy.require_dp:
                _check_dp_markers(policy, reply)
    except PolicyViolationError as err:
        return _error(msg, str(err))
    if train_round:
        _count_train_round(context)
    return reply


def _threshold_op(configs: list[ConfigRecord]) -> str | None:
    """Return the threshold-CKKS operation an instruction announces, if any.

    A malformed one is left to ``ckks_mod``, which refuses it; here it counts as
    none (so a train instruction is checked as one).
    """
    for config in configs:
        try:
            op = read_op(config)
        except ThresholdError:
            return None
        if op is not None:
            return op
    return None


#: Threshold operation -> the one ArrayRecord ckks_mod answers it with, and the
#: prefix of its arrays (a public key share; flooded partial decryptions).
_PROTOCOL_REPLIES = {OP_KEYGEN: ("public-share", "p"), OP_DECRYPT: ("shares", "h")}


def _check_protocol_reply(op: str, reply: Message) -> None:
    """Refuse a key-generation / decryption reply that ckks_mod did not write.

    Such instructions carry no update to train on; if the reply holds anything
    else than ckks_mod's answer, the ClientApp ran on it (ckks_mod is not in the
    pipeline) and its reply - possibly a plaintext model - must not leave,
    whatever the policy (it was not checked as a train round either).
    """
    name, prefix = _PROTOCOL_REPLIES[op]
    records = reply.content.array_records
    pattern = re.compile(rf"{prefix}-\d{{5}}")
    if list(records) != [name] or not all(
        pattern.fullmatch(key) for key in records[name]
    ):
        raise PolicyViolationError(
            KEY_REQUIRE_CKKS,
            f"a threshold-CKKS '{op}' instruction was answered by the ClientApp, "
            "not by ckks_mod (add ckks_mod / secure_aggregation_mod); the reply "
            "was not sent",
        )


def _check_train_instruction(
    policy: SitePolicy,
    configs: list[ConfigRecord],
    context: Context,
    *,
    threshold: bool = False,
) -> None:
    announced = threshold or any(KEY_PROFILE in c for c in configs)
    if policy.require_ckks and not announced:
        raise PolicyViolationError(
            KEY_REQUIRE_CKKS,
            "the train instruction does not announce CKKS secure aggregation "
            "('ckks-profile' missing); this site sends no update in plaintext",
        )
    if policy.require_dp:
        dp = [c for c in configs if keys.DDP_CLIPPING_NORM in c]
        if len(dp) != 1:
            raise PolicyViolationError(
                KEY_REQUIRE_DP,
                "the train instruction carries no distributed-DP settings "
                f"('{keys.DDP_CLIPPING_NORM}', '{keys.DDP_NOISE_STDDEV}'); wrap the "
                "server strategy in flwr_ext.strategy.DistributedDP",
            )
        clip, stddev = _dp_values(KEY_REQUIRE_DP, dp[0])
        policy.check_dp(clip, stddev)
    if policy.max_train_rounds and _train_rounds(context) >= policy.max_train_rounds:
        raise PolicyViolationError(
            KEY_MAX_TRAIN_ROUNDS,
            f"this site has answered {policy.max_train_rounds} train instruction(s) "
            "in this run, its limit",
        )


def _dp_values(policy_key: str, record: Mapping[str, object]) -> tuple[float, float]:
    values = []
    for key in (keys.DDP_CLIPPING_NORM, keys.DDP_NOISE_STDDEV):
        value = record.get(key)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value <= 0
        ):
            raise PolicyViolationError(
                policy_key, f"'{key}' must be a finite number > 0, got {value!r}"
            )
        values.append(float(value))
    return values[0], values[1]


def _is_ciphertext_record(record: ArrayRecord) -> bool:
    """Return True if every array of ``record`` is CKKS metadata or a ciphertext.

    Single-key records mark each array's stype; a threshold-CKKS update (written
    by ``ckks_mod``) is its metadata array plus ``ct-NNNNN`` byte blobs.
    """
    if is_threshold_update(record):
        return all(
            name == THRESHOLD_META or _THRESHOLD_CHUNK.fullmatch(name) is not None
            for name in record
        ) and all(array.dtype == "uint8" for array in record.values())
    if META_KEY not in record:
        return False
    return all(array.stype in _CKKS_STYPES for array in record.values())


def _check_no_plaintext(reply: Message) -> None:
    plaintext = [
        name
        for name, record in reply.content.array_records.items()
        if not _is_ciphertext_record(record)
    ]
    if plaintext:
        log(
            WARNING,
            "%s: the reply holds plaintext ArrayRecord(s) %s; replaced by an error "
            "reply (%s)",
            _NAME,
            plaintext,
            KEY_REQUIRE_CKKS,
        )
        raise PolicyViolationError(
            KEY_REQUIRE_CKKS,
            f"the reply held {len(plaintext)} plaintext ArrayRecord(s); it was not "
            "sent (add ckks_mod / secure_aggregation_mod and a secret context)",
        )


def _check_dp_markers(policy: SitePolicy, reply: Message) -> None:
    if not reply.content.array_records:
        return  # nothing released
    markers = [
        m for m in reply.content.metric_records.values() if keys.DDP_CLIPPING_NORM in m
    ]
    if len(markers) != 1:
        raise PolicyViolationError(
            KEY_REQUIRE_DP,
            "the train reply was not clipped and noised by distributed_dp_mod (add "
            "it to the ClientApp's mods); it was not sent",
        )
    clip, stddev = _dp_values(KEY_REQUIRE_DP, markers[0])
    policy.check_dp(clip, stddev)


def _check_decryption_reply(policy: SitePolicy, msg: Message, reply: Message) -> None:
    """Let a decrypted aggregate leave only if it sums enough contributions."""
    incoming = list(msg.content.array_records.values())
    if len(incoming) != 1 or not _is_ciphertext_record(incoming[0]):
        raise PolicyViolationError(
            KEY_MIN_CONTRIBUTIONS,
            "a decryption request must carry exactly one encrypted aggregate",
        )
    counts = [
        m[METRIC_CONTRIBUTIONS]
        for m in reply.content.metric_records.values()
        if METRIC_CONTRIBUTIONS in m
    ]
    count = counts[0] if len(counts) == 1 else None
    if (
        isinstance(count, bool)
        or not isinstance(count, int | float)
        or not count >= policy.min_contributions
    ):
        raise PolicyViolationError(
            KEY_MIN_CONTRIBUTIONS,
            f"the decrypted aggregate holds {count!r} contribution(s) < "
            f"{policy.min_contributions}; it was not sent",
        )


def _train_rounds(context: Context) -> int:
    record = context.state.config_records.get(_STATE_KEY)
    value = record.get("train-rounds", 0) if record is not None else 0
    return int(value) if isinstance(value, int) else 0


def _count_train_round(context: Context) -> None:
    context.state.config_records[_STATE_KEY] = ConfigRecord(
        {"train-rounds": _train_rounds(context) + 1}
    )


def _exception_reply(msg: Message, err: Exception, policy: SitePolicy) -> Message:
    """Turn an exception from the ClientApp into a reply that leaks nothing.

    Exceptions written to be shared carry ``public_reason`` (flwr-ext's data
    errors); their full ``detail`` stays in the site's log. Others are sent as their
    type only when ``policy-redact-errors`` (the default).
    """
    detail = getattr(err, "detail", None)
    public = getattr(err, "public_reason", None)
    log(
        ERROR,
        "%s: the ClientApp raised %s: %s",
        _NAME,
        type(err).__name__,
        detail if isinstance(detail, str) else err,
        exc_info=err,
    )
    if isinstance(public, str):
        reason = f"{type(err).__name__}: {public}"
    elif policy.redact_errors:
        reason = (
            f"{type(err).__name__} raised in the ClientApp; the site's log has the "
            f"details ({KEY_REDACT_ERRORS})"
        )
    else:
        reason = f"{type(err).__name__}: {err}"
    return Message(
        Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg
    )


def _error(msg: Message, reason: str) -> Message:
    log(ERROR, "%s: %s", _NAME, reason)
    return Message(
        Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=f"{_NAME}: {reason}"),
        reply_to=msg,
    )
