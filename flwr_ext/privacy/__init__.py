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

Names are resolved on first use (PEP 562): ``from flwr_ext.privacy import keys``
or the accountant does not import the DP-SGD helper's Opacus engine and torch.

The Flower-facing pieces live in :class:`flwr_ext.strategy.DPFedAvg`,
:class:`flwr_ext.strategy.DistributedDP` and :func:`flwr_ext.mods.distributed_dp_mod`.
"""

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

if TYPE_CHECKING:
    from . import keys
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

_EXPORTS = {
    "ACCOUNTANTS": "accountant",
    "AdaptiveClipNorm": "clipping",
    "Neighbouring": "accountant",
    "PrivacyAccountant": "accountant",
    "PrivacyBudgetExhaustedError": "dpsgd",
    "PrivacySpent": "accountant",
    "PrivacyUnit": "accountant",
    "PrivateTraining": "dpsgd",
    "RDP_ORDERS": "accountant",
    "SiloPrivacy": "dpsgd",
    "add_gaussian_noise": "noise",
    "aggregate_silo_metrics": "silo_metrics",
    "calibrate_noise_multiplier": "calibration",
    "clip_to_norm": "clipping",
    "compute_epsilon": "accountant",
    "effective_noise_multiplier": "calibration",
    "keys": "keys",
    "l2_norm": "clipping",
    "make_private": "dpsgd",
    "secure_generator": "noise",
    "secure_torch_generator": "noise",
    "silo_privacy": "dpsgd",
    "silo_privacy_metrics": "dpsgd",
    "update_noise_multiplier": "calibration",
}
__all__ = [
    "ACCOUNTANTS",
    "AdaptiveClipNorm",
    "Neighbouring",
    "PrivacyAccountant",
    "PrivacyBudgetExhaustedError",
    "PrivacySpent",
    "PrivacyUnit",
    "PrivateTraining",
    "RDP_ORDERS",
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
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)
