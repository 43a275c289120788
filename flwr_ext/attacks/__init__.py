"""Byzantine attacks, to test a defence: update functions and a client mod."""

from .mod import MOD_ATTACKS, byzantine_mod, configured_attack, flip_labels_if_attacking
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
    "alie",
    "alie_z",
    "byzantine_mod",
    "configured_attack",
    "flip_labels_if_attacking",
    "gaussian_noise",
    "inflate_weight",
    "ipm",
    "label_flip",
    "non_finite",
    "scaling",
    "sign_flip",
]
