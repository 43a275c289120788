"""Byzantine attacks, to test a defence: update functions and a client mod."""

from .adaptive import (
    line_search,
    mimic,
    mimic_direction,
    minmax,
    minsum,
    optimal_alie,
    optimal_ipm,
)
from .mod import (
    MOD_ATTACKS,
    OMNISCIENT_MOD_ATTACKS,
    TARGET_RULES,
    byzantine_mod,
    configured_attack,
    flip_labels_if_attacking,
)
from .updates import (
    alie,
    alie_z,
    gaussian_noise,
    inflate_weight,
    ipm,
    label_flip,
    non_finite,
    scaling,
    sign_flip,
)

__all__ = [
    "MOD_ATTACKS",
    "OMNISCIENT_MOD_ATTACKS",
    "TARGET_RULES",
    "alie",
    "alie_z",
    "byzantine_mod",
    "configured_attack",
    "flip_labels_if_attacking",
    "gaussian_noise",
    "inflate_weight",
    "ipm",
    "label_flip",
    "line_search",
    "mimic",
    "mimic_direction",
    "minmax",
    "minsum",
    "non_finite",
    "optimal_alie",
    "optimal_ipm",
    "scaling",
    "sign_flip",
]
