"""What the server wrapper and the client mod tell each other (config keys, settings).

Server -> client, in the train instruction's ConfigRecord (an :class:`Announcement`):

=====================  ==========================================================
``ckks-profile``       profile of the server's key set
``ckks-fingerprint``   fingerprint of the server's key set
``ckks-wire``          wire format for this run (``tenseal`` or ``seeded``)
``ckks-weight-unit``   examples per weight unit: a client's weight is
                       ``num-examples / weight-unit``
``ckks-weight-key``    MetricRecord key of the client's example count
``ckks-num-clients``   replies summed this round (each client may use
                       ``1 / num-clients`` of the profile's magnitude bound)
=====================  ==========================================================

With an encrypted global model (train and evaluate instructions, and decryption
requests), the server also says what it summed into it (a :class:`ModelClaims`),
so that every key holder can check the decrypted weight and count slots:

================================  ================================================
``ckks-model-contributions``      updates the server added into this model
``ckks-model-weight``             sum of their weights (``num-examples`` claims
                                  divided by the weight unit), i.e. the expected
                                  weight slot
================================  ================================================

A key holder that finds a different weight or count (a client that encrypted
another weight than it claimed, or under another key set while claiming the
right fingerprint, corrupts the sum) refuses the model with an error reply whose
reason contains :data:`AGGREGATE_REJECTED`; the server then rolls back to the last
good global model (:class:`flwr_ext.strategy.HomomorphicAggregation`).

Client settings (node config on a SuperNode; environment variables in Flower's
Simulation Engine, whose simulated nodes only get ``partition-id`` and
``num-partitions``):

==============================  =====================================  ============
node config                     environment variable                   meaning
==============================  =====================================  ============
``ckks-context``                ``FLWR_EXT_CKKS_CONTEXT``              path of
                                                                       ``secret-context.ckks``
``ckks-decrypt-for-server``     ``FLWR_EXT_CKKS_DECRYPT_FOR_SERVER``   opt in to
                                                                       decrypt
                                                                       aggregates
``ckks-decrypt-min-clients``    ``FLWR_EXT_CKKS_DECRYPT_MIN_CLIENTS``  refuse sums
                                                                       of fewer
                                                                       updates
``ckks-decrypt-budget``         ``FLWR_EXT_CKKS_DECRYPT_BUDGET``       most
                                                                       decryptions
                                                                       released per
                                                                       run
==============================  =====================================  ============

The site's minimum number of contributions for *any* decryption (the global model
as well as decryption requests), node config ``policy-min-contributions`` (an int
>= 2, default 2), is read by :func:`flwr_ext.mods.ckks.site_min_contributions`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

from flwr.app import ConfigRecord

__all__ = [
    "AGGREGATE_REJECTED",
    "KEY_DECRYPT_REQUEST",
    "METRIC_CONTRIBUTIONS",
    "METRIC_TOTAL_WEIGHT",
    "Announcement",
    "ClientSettings",
    "ModelClaims",
]

KEY_PROFILE = "ckks-profile"
KEY_FINGERPRINT = "ckks-fingerprint"
KEY_WIRE = "ckks-wire"
KEY_WEIGHT_UNIT = "ckks-weight-unit"
KEY_WEIGHT_KEY = "ckks-weight-key"
KEY_NUM_CLIENTS = "ckks-num-clients"
#: Set (True) in the ConfigRecord of a request to decrypt an aggregate.
KEY_DECRYPT_REQUEST = "ckks-decrypt-request"
KEY_MODEL_CONTRIBUTIONS = "ckks-model-contributions"
KEY_MODEL_WEIGHT = "ckks-model-weight"

#: In the reason of an error reply from a key holder whose decrypted aggregate
#: failed the weight/count check; the server rolls back when it sees it.
AGGREGATE_REJECTED = "the aggregate failed the check"
#: Most replies one round can sum (bounds a hostile ``ckks-num-clients``).
MAX_NUM_CLIENTS = 1_000_000

#: MetricRecord keys of a decryption reply.
METRIC_TOTAL_WEIGHT = "ckks-total-weight"
METRIC_CONTRIBUTIONS = "ckks-contributions"

NODE_CONTEXT = "ckks-context"
ENV_CONTEXT = "FLWR_EXT_CKKS_CONTEXT"
NODE_DECRYPT_FOR_SERVER = "ckks-decrypt-for-server"
ENV_DECRYPT_FOR_SERVER = "FLWR_EXT_CKKS_DECRYPT_FOR_SERVER"
NODE_DECRYPT_MIN_CLIENTS = "ckks-decrypt-min-clients"
ENV_DECRYPT_MIN_CLIENTS = "FLWR_EXT_CKKS_DECRYPT_MIN_CLIENTS"
DEFAULT_DECRYPT_MIN_CLIENTS = 2
NODE_DECRYPT_BUDGET = "ckks-decrypt-budget"
ENV_DECRYPT_BUDGET = "FLWR_EXT_CKKS_DECRYPT_BUDGET"
#: Decryptions a node releases to the server per run unless its config says less
#: (or more, up to the profile's ``flood_releases``).
DEFAULT_DECRYPT_BUDGET = 1024


@dataclass(frozen=True)
class Announcement:
    """The server's CKKS settings for one training round."""

    profile: str
    fingerprint: str
    wire: str
    weight_unit: float
    weight_key: str
    num_clients: int

    def write(self, config: ConfigRecord) -> None:
        """Add the ``ckks-*`` keys to a train ConfigRecord."""
        config[KEY_PROFILE] = self.profile
        config[KEY_FINGERPRINT] = self.fingerprint
        config[KEY_WIRE] = self.wire
        config[KEY_WEIGHT_UNIT] = float(self.weight_unit)
        config[KEY_WEIGHT_KEY] = self.weight_key
        config[KEY_NUM_CLIENTS] = int(self.num_clients)

    @classmethod
    def read(cls, config: Mapping[str, object]) -> Announcement | None:
        """Parse the ``ckks-*`` keys; None if there are none.

        Raises ``ValueError`` if they are present but incomplete or malformed.
        """
        if KEY_PROFILE not in config:
            return None
        missing = [
            key
            for key in (KEY_FINGERPRINT, KEY_WIRE, KEY_WEIGHT_UNIT, KEY_WEIGHT_KEY,
                        KEY_NUM_CLIENTS)
            if key not in config
        ]  # fmt: skip
        if missing:
            raise ValueError(
                f"the server's CKKS settings in the train config are incomplete "
                f"(no {missing})"
            )
        return cls(
            profile=_text(config[KEY_PROFILE], KEY_PROFILE),
            fingerprint=_text(config[KEY_FINGERPRINT], KEY_FINGERPRINT),
            wire=_text(config[KEY_WIRE], KEY_WIRE),
            weight_unit=_positive(config[KEY_WEIGHT_UNIT], KEY_WEIGHT_UNIT),
            weight_key=_text(config[KEY_WEIGHT_KEY], KEY_WEIGHT_KEY),
            num_clients=_count(config[KEY_NUM_CLIENTS], KEY_NUM_CLIENTS, 1),
        )


@dataclass(frozen=True)
class ModelClaims:
    """What the server summed into the encrypted global model it sends.

    Attributes
    ----------
    contributions : int
        Updates added (the expected count slot).
    weight : float
        Sum of their weights in weight units (the expected weight slot).
    """

    contributions: int
    weight: float

    def write(self, config: ConfigRecord) -> None:
        """Add the ``ckks-model-*`` keys to a ConfigRecord."""
        config[KEY_MODEL_CONTRIBUTIONS] = int(self.contributions)
        config[KEY_MODEL_WEIGHT] = float(self.weight)

    @classmethod
    def read(cls, config: Mapping[str, object]) -> ModelClaims | None:
        """Parse the ``ckks-model-*`` keys (None if absent); ``ValueError`` if bad."""
        if KEY_MODEL_CONTRIBUTIONS not in config and KEY_MODEL_WEIGHT not in config:
            return None
        if KEY_MODEL_CONTRIBUTIONS not in config or KEY_MODEL_WEIGHT not in config:
            raise ValueError(
                f"the server sent only one of {KEY_MODEL_CONTRIBUTIONS} and "
                f"{KEY_MODEL_WEIGHT}"
            )
        return cls(
            contributions=_count(
                config[KEY_MODEL_CONTRIBUTIONS], KEY_MODEL_CONTRIBUTIONS, 1
            ),
            weight=_positive(config[KEY_MODEL_WEIGHT], KEY_MODEL_WEIGHT),
        )


def _text(value: object, key: str) -> str:
    if not isinstance(value, str) or not value or len(value) > 1024:
        raise ValueError(f"the server's {key} must be a non-empty string")
    return value


def _positive(value: object, key: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"the server's {key} must be a finite number > 0")
    return float(value)


def _count(value: object, key: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"the server's {key} must be an integer")
    if not low <= value <= MAX_NUM_CLIENTS:
        raise ValueError(
            f"the server's {key} must be in [{low}, {MAX_NUM_CLIENTS}], got {value}"
        )
    return value


def _truthy(value: object) -> bool:
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class ClientSettings:
    """A data owner's CKKS settings, from node config or the environment.

    Attributes
    ----------
    context_path : str or None
        Path of the secret context; None if not configured.
    decrypt_for_server : bool
        Whether this node decrypts aggregates for the server on request.
    decrypt_min_clients : int
        Fewest contributions an aggregate must hold before this node decrypts it.
    decrypt_budget : int
        Most aggregates this node decrypts for the server per run (each release
        is flooded; the flooding is sized for the profile's ``flood_releases``
        over the key set's lifetime, see :mod:`flwr_ext.he.flooding`).
    """

    context_path: str | None
    decrypt_for_server: bool
    decrypt_min_clients: int
    decrypt_budget: int = DEFAULT_DECRYPT_BUDGET

    @classmethod
    def from_node(
        cls,
        node_config: Mapping[str, object],
        environ: Mapping[str, str] | None = None,
    ) -> ClientSettings:
        """Read node config first, then the environment (simulation)."""
        env = os.environ if environ is None else environ
        path = node_config.get(NODE_CONTEXT, env.get(ENV_CONTEXT))
        opt_in = node_config.get(
            NODE_DECRYPT_FOR_SERVER, env.get(ENV_DECRYPT_FOR_SERVER, False)
        )
        minimum = node_config.get(
            NODE_DECRYPT_MIN_CLIENTS,
            env.get(ENV_DECRYPT_MIN_CLIENTS, DEFAULT_DECRYPT_MIN_CLIENTS),
        )
        try:
            min_clients = int(str(minimum).strip())
        except ValueError:
            raise ValueError(
                f"{NODE_DECRYPT_MIN_CLIENTS} must be an integer, got {minimum!r}"
            ) from None
        if min_clients < 1:
            raise ValueError(
                f"{NODE_DECRYPT_MIN_CLIENTS} must be >= 1, got {min_clients}"
            )
        budget = _positive_int(
            node_config.get(
                NODE_DECRYPT_BUDGET,
                env.get(ENV_DECRYPT_BUDGET, DEFAULT_DECRYPT_BUDGET),
            ),
            NODE_DECRYPT_BUDGET,
        )
        return cls(
            context_path=str(path) if path not in (None, "") else None,
            decrypt_for_server=_truthy(opt_in),
            decrypt_min_clients=min_clients,
            decrypt_budget=budget,
        )


def _positive_int(value: object, name: str) -> int:
    """``value`` as an int >= 1 (ints or their decimal strings only)."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and value.strip().isdigit():
        number = int(value.strip())
    else:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if number < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {number}")
    return number
