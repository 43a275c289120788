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
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

from flwr.app import ConfigRecord

__all__ = [
    "KEY_DECRYPT_REQUEST",
    "METRIC_CONTRIBUTIONS",
    "METRIC_TOTAL_WEIGHT",
    "Announcement",
    "ClientSettings",
]

KEY_PROFILE = "ckks-profile"
KEY_FINGERPRINT = "ckks-fingerprint"
KEY_WIRE = "ckks-wire"
KEY_WEIGHT_UNIT = "ckks-weight-unit"
KEY_WEIGHT_KEY = "ckks-weight-key"
KEY_NUM_CLIENTS = "ckks-num-clients"
#: Set (True) in the ConfigRecord of a request to decrypt an aggregate.
KEY_DECRYPT_REQUEST = "ckks-decrypt-request"

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
        try:
            announcement = cls(
                profile=str(config[KEY_PROFILE]),
                fingerprint=str(config[KEY_FINGERPRINT]),
                wire=str(config[KEY_WIRE]),
                weight_unit=float(config[KEY_WEIGHT_UNIT]),  # type: ignore[arg-type]
                weight_key=str(config[KEY_WEIGHT_KEY]),
                num_clients=int(config[KEY_NUM_CLIENTS]),  # type: ignore[call-overload]
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(
                f"the server's CKKS settings in the train config are incomplete or "
                f"malformed ({err!r})"
            ) from err
        if not math.isfinite(announcement.weight_unit) or announcement.weight_unit <= 0:
            raise ValueError(
                f"{KEY_WEIGHT_UNIT} must be finite and > 0, got "
                f"{announcement.weight_unit}"
            )
        if announcement.num_clients < 1:
            raise ValueError(
                f"{KEY_NUM_CLIENTS} must be >= 1, got {announcement.num_clients}"
            )
        return announcement


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
            min_clients = int(minimum)  # type: ignore[call-overload]
        except (TypeError, ValueError):
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
