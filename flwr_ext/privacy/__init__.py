"""Differential privacy building blocks: accounting, calibration, noise, DP-SGD.

Every ε flwr-ext reports says whose data it protects (:class:`PrivacyUnit`: one
client, or one record), under which neighbouring relation and sampling, and which
accountant computed it (Opacus's PRV or RDP; see :mod:`.accountant` for why).

- :mod:`.accountant` - :class:`PrivacyAccountant`, cumulative (ε, δ) with state
  that can be saved and restored with a run.
- :mod:`.calibration` - the noise multiplier for a target (ε, δ, rounds, q).
- :mod:`.clipping` - L2 clipping and adaptive clipping (Andrew et al. 2021).
- :mod:`.noise` - generators seeded from the OS's CSPRNG (never ``np.random``).
- :mod:`.dpsgd` - record-level DP-SGD in a ClientApp with a cumulative ε.
- :mod:`.silo_metrics` - server side of record-level DP: max ε over silos.
- :mod:`.keys` - metric and config keys (``dp-client-*``, ``dp-record-*``).

The Flower-facing pieces live in :class:`flwr_ext.strategy.DPFedAvg`,
:class:`flwr_ext.strategy.DistributedDP` and :func:`flwr_ext.mods.distributed_dp_mod`.
"""

from . import (
    _opacus,  # noqa: F401 - Opacus without its root-logger handler
    keys,
)
from .accountant import (
    ACCOUNTANTS,
    RDP_ORDERS,
    Neighbouring,
    PrivacyAccountant,
    PrivacySpent,
    PrivacyUnit,
    compute_epsilon,
)
from .calibration import (
    calibrate_noise_multiplier,
    effective_noise_multiplier,
    update_noise_multiplier,
)
from .clipping import AdaptiveClipNorm, clip_to_norm, l2_norm
from .dpsgd import (
    PrivacyBudgetExhaustedError,
    PrivateTraining,
    SiloPrivacy,
    make_private,
    silo_privacy,
    silo_privacy_metrics,
)
from .noise import add_gaussian_noise, secure_generator, secure_torch_generator
from .silo_metrics import aggregate_silo_metrics

__all__ = [
    "ACCOUNTANTS",
    "RDP_ORDERS",
    "AdaptiveClipNorm",
    "Neighbouring",
    "PrivacyAccountant",
    "PrivacyBudgetExhaustedError",
    "PrivacySpent",
    "PrivacyUnit",
    "PrivateTraining",
    "SiloPrivacy",
    "add_gaussian_noise",
    "aggregate_silo_metrics",
    "calibrate_noise_multiplier",
    "clip_to_norm",
    "compute_epsilon",
    "effective_noise_multiplier",
    "keys",
    "l2_norm",
    "make_private",
    "secure_generator",
    "secure_torch_generator",
    "silo_privacy",
    "silo_privacy_metrics",
    "update_noise_multiplier",
]
