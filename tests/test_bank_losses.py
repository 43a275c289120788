"""bank_fraud.losses: weighted and focal losses for rare positives."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from flwr_ext.appkit.config import ConfigSchema
from flwr_ext.appkit.torch_train import train_binary

APP = Path(__file__).resolve().parents[1] / "apps" / "bank-fraud"
sys.path.insert(0, str(APP))

from bank_fraud.losses import (  # noqa: E402
    LOSS_OPTIONS,
    balanced_positive_weight,
    binary_loss,
    focal_loss,
    loss_from_settings,
)

LOGITS = torch.tensor([-8.0, -1.0, 0.0, 2.0, 30.0, -30.0])
TARGETS = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 1.0])


def test_weighted_is_torchs_pos_weight_and_bce_is_plain():
    expected = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(7.0))(LOGITS, TARGETS)
    assert binary_loss("weighted", positive_weight=7.0)(LOGITS, TARGETS) == (
        pytest.approx(float(expected))
    )
    plain = nn.BCEWithLogitsLoss()(LOGITS, TARGETS)
    assert binary_loss("bce")(LOGITS, TARGETS) == pytest.approx(float(plain))


def test_focal_with_gamma_0_is_alpha_weighted_bce_and_down_weights_easy_rows():
    bce = nn.functional.binary_cross_entropy_with_logits(
        LOGITS, TARGETS, reduction="none"
    )
    alpha_t = 0.75 * TARGETS + 0.25 * (1 - TARGETS)
    assert float(focal_loss(LOGITS, TARGETS, gamma=0.0, alpha=0.75)) == (
        pytest.approx(float((alpha_t * bce).mean()))
    )
    easy = focal_loss(torch.tensor([-6.0]), torch.tensor([0.0]), gamma=2, alpha=0.5)
    hard = focal_loss(torch.tensor([2.0]), torch.tensor([0.0]), gamma=2, alpha=0.5)
    ratio_focal = float(easy / hard)
    ratio_bce = float(
        nn.functional.binary_cross_entropy_with_logits(torch.tensor([-6.0]),
                                                       torch.tensor([0.0]))
        / nn.functional.binary_cross_entropy_with_logits(torch.tensor([2.0]),
                                                         torch.tensor([0.0]))
    )  # fmt: skip
    assert ratio_focal < ratio_bce / 1000


def test_losses_are_finite_with_finite_gradients_at_extreme_logits():
    for loss in (binary_loss("focal"), binary_loss("weighted", positive_weight=50)):
        logits = LOGITS.clone().requires_grad_(True)
        value = loss(logits, TARGETS)
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(logits.grad).all()


def test_parameter_errors_name_the_parameter():
    with pytest.raises(ValueError, match="positive_weight"):
        binary_loss("weighted", positive_weight=0.0)
    with pytest.raises(ValueError, match="alpha"):
        binary_loss("focal", alpha=1.0)
    with pytest.raises(ValueError, match="gamma"):
        binary_loss("focal", gamma=-1.0)
    with pytest.raises(ValueError, match="choose one of"):
        binary_loss("hinge")


def test_balanced_weight_and_settings():
    labels = np.array([0] * 990 + [1] * 10)
    assert balanced_positive_weight(labels) == 99.0
    assert balanced_positive_weight(np.zeros(5)) == 1.0
    assert balanced_positive_weight(np.array([0] * 10**5 + [1])) == 1000.0
    schema = ConfigSchema(LOSS_OPTIONS)
    auto = loss_from_settings(schema.validate({"positive-weight": 0.0}), labels)
    assert "99" in repr(auto)
    focal = loss_from_settings(schema.validate({"loss": "focal"}), labels)
    assert repr(focal) == "focal(gamma=2, alpha=0.75)"


def test_train_binary_uses_the_given_loss():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 3)).astype(np.float32)
    y = (x[:, 0] > 1.8).astype(np.int64)  # ~4 % positives
    outputs = {}
    weighted = binary_loss("weighted", positive_weight=20)
    for name, loss in (("bce", None), ("weighted", weighted)):
        torch.manual_seed(0)
        model = nn.Linear(3, 1)
        train_binary(model, x, y, epochs=5, learning_rate=0.05, batch_size=32,
                     seed=0, server_round=1, site=0, loss_fn=loss)  # fmt: skip
        with torch.no_grad():
            outputs[name] = torch.sigmoid(model(torch.as_tensor(x))).mean().item()
    # Weighting positives 20x raises the predicted fraud probabilities.
    assert outputs["weighted"] > 2 * outputs["bce"]
