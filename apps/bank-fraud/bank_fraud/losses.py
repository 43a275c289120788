"""Loss functions for rare-positive binary tasks (fraud, rare diagnoses).

With 0.5 % positives, plain binary cross-entropy is dominated by the negatives: a
mini-batch of 64 rows holds no positive two times out of three, and the model
learns mostly to say "legitimate". Two standard remedies, both on one logit per
row:

- **weighted** binary cross-entropy: a positive row's loss counts
  ``positive_weight`` times a negative's (``BCEWithLogitsLoss(pos_weight=...)``).
  ``positive_weight = negatives / positives`` balances the classes exactly;
  smaller values trade recall for calibration.
- **focal** loss (Lin et al., "Focal Loss for Dense Object Detection", ICCV
  2017): ``-alpha_t (1 - p_t)^gamma log(p_t)``, where ``p_t`` is the probability
  the model gives the true class and ``alpha_t`` is ``alpha`` for positives and
  ``1 - alpha`` for negatives. Easy, confidently-correct rows (most
  legitimate transactions) contribute almost nothing, so training concentrates
  on the hard ones. ``gamma = 0`` is alpha-weighted cross-entropy.

Which one is better is an empirical question per task;
``benchmarks/bank.py --losses`` measures it for the bank-fraud app (see
``docs/bank.md``). Every loss here returns the *mean* over the batch, the
reduction Opacus's DP-SGD expects.

Run-config options: :data:`LOSS_OPTIONS`; :func:`loss_from_settings` builds the
loss a site trains with.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from flwr_ext.appkit.config import Option

__all__ = [
    "LOSSES",
    "LOSS_OPTIONS",
    "LossFn",
    "balanced_positive_weight",
    "binary_loss",
    "focal_loss",
    "loss_from_settings",
]

#: ``(logits (n,), targets (n,) in {0, 1}) -> mean loss (0-d tensor)``.
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: Names :func:`binary_loss` accepts.
LOSSES = ("weighted", "focal", "bce")

#: Run-config options of the training loss.
LOSS_OPTIONS: tuple[Option, ...] = (
    Option(
        "loss",
        str,
        "weighted",
        "class-imbalance handling: 'weighted' cross-entropy, 'focal' loss, or "
        "plain 'bce'",
        choices=LOSSES,
    ),
    Option(
        "positive-weight",
        float,
        3.0,
        "weighted: loss weight of a positive row relative to a negative one; 0 "
        "= each site's own negatives/positives ratio",
        min=0.0,
    ),
    Option(
        "focal-gamma",
        float,
        2.0,
        "focal: focusing exponent gamma (0: alpha-weighted cross-entropy)",
        min=0.0,
    ),
    Option(
        "focal-alpha",
        float,
        0.75,
        "focal: weight of the positive class, alpha (negatives: 1 - alpha)",
        min=0.0,
        max=1.0,
        min_exclusive=True,
        max_exclusive=True,
    ),
)


def balanced_positive_weight(labels: np.ndarray, *, cap: float = 1000.0) -> float:
    """Return ``negatives / positives`` of ``labels`` (1.0 without positives).

    Capped at ``cap`` so a site with one positive in 10^5 rows cannot make a
    single row dominate its update.
    """
    labels = np.asarray(labels)
    positives = int(np.sum(labels == 1))
    if positives == 0:
        return 1.0
    return float(min(cap, (labels.size - positives) / positives))


def focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, *, gamma: float, alpha: float
) -> torch.Tensor:
    """Mean binary focal loss of ``logits`` (n,) against ``targets`` (n,) in {0, 1}.

    Computed from ``binary_cross_entropy_with_logits`` (numerically stable for
    any logit): ``p_t = exp(-bce)``.
    """
    targets = targets.to(logits.dtype)
    bce = nn.functional.binary_cross_entropy_with_logits(
        logits, targets, reduction="none"
    )
    p_t = torch.exp(-bce)
    alpha_t = alpha * targets + (1.0 - alpha) * (1.0 - targets)
    return (alpha_t * (1.0 - p_t) ** gamma * bce).mean()


def binary_loss(
    name: str,
    *,
    positive_weight: float = 1.0,
    gamma: float = 2.0,
    alpha: float = 0.75,
) -> LossFn:
    """Return the loss ``name`` as a function ``(logits, targets) -> mean loss``.

    Parameters
    ----------
    name : {"weighted", "focal", "bce"}
        Which loss.
    positive_weight : float (default: 1.0)
        ``weighted``: weight of a positive row's loss (> 0).
    gamma, alpha : float (defaults: 2.0, 0.75)
        ``focal``: focusing exponent (>= 0) and positive-class weight in (0, 1).

    Raises
    ------
    ValueError
        For an unknown name or an out-of-range parameter, naming it.
    """
    if name == "bce":
        return _Bce(1.0)
    if name == "weighted":
        if not positive_weight > 0 or not np.isfinite(positive_weight):
            raise ValueError(
                f"positive_weight must be a finite number > 0, got {positive_weight}"
            )
        return _Bce(float(positive_weight))
    if name == "focal":
        if not gamma >= 0 or not np.isfinite(gamma):
            raise ValueError(f"gamma must be a finite number >= 0, got {gamma}")
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        return _Focal(float(gamma), float(alpha))
    raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")


def loss_from_settings(settings: Mapping[str, Any], labels: np.ndarray) -> LossFn:
    """Return the loss a site trains with, from validated :data:`LOSS_OPTIONS`.

    ``labels`` are the site's training labels, used when ``positive-weight`` is 0
    (:func:`balanced_positive_weight`).
    """
    weight = settings["positive-weight"]
    if settings["loss"] == "weighted" and weight == 0:
        weight = balanced_positive_weight(labels)
    return binary_loss(
        settings["loss"],
        positive_weight=weight,
        gamma=settings["focal-gamma"],
        alpha=settings["focal-alpha"],
    )


class _Bce:
    """Weighted binary cross-entropy (a picklable callable with a readable repr)."""

    def __init__(self, positive_weight: float) -> None:
        self.positive_weight = positive_weight

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        weight = None
        if self.positive_weight != 1.0:
            weight = torch.tensor(self.positive_weight, dtype=logits.dtype)
        return nn.functional.binary_cross_entropy_with_logits(
            logits, targets.to(logits.dtype), pos_weight=weight
        )

    def __repr__(self) -> str:
        return f"weighted-bce(positive_weight={self.positive_weight:g})"


class _Focal:
    def __init__(self, gamma: float, alpha: float) -> None:
        self.gamma, self.alpha = gamma, alpha

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return focal_loss(logits, targets, gamma=self.gamma, alpha=self.alpha)

    def __repr__(self) -> str:
        return f"focal(gamma={self.gamma:g}, alpha={self.alpha:g})"
