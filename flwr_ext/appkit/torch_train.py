"""Local training and scoring of a small PyTorch binary classifier at one site.

The loop every tabular app needs, written once: mini-batch SGD with momentum on
the binary cross-entropy of a model that outputs one logit per row, with
FedProx's proximal term when the server sends ``proximal-mu``
(:func:`train_binary`), and record-level DP-SGD (Opacus, through
:func:`flwr_ext.privacy.make_private`) when the run asks for it
(:func:`train_binary_dp`).

Run-config options: :data:`TRAINING_OPTIONS` and :data:`DPSGD_OPTIONS`.

Determinism: batches are drawn from a ``torch.Generator`` seeded with
``(seed, round, site)``, and ``torch`` is limited to one thread per ClientApp
(several ClientApps share the machine's cores in simulation).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, Context
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .config import Option

__all__ = [
    "DPSGD_OPTIONS",
    "TRAINING_OPTIONS",
    "TrainResult",
    "arrays_to_model",
    "loss_of",
    "model_to_arrays",
    "predict_proba",
    "train_binary",
    "train_binary_dp",
]

#: Run-config options of local training.
TRAINING_OPTIONS: tuple[Option, ...] = (
    Option("num-server-rounds", int, 5, "federated rounds", min=1),
    Option(
        "local-epochs", int, 2, "passes over a site's training rows per round", min=1
    ),
    Option(
        "learning-rate",
        float,
        0.05,
        "local SGD learning rate",
        min=0.0,
        min_exclusive=True,
    ),
    Option("batch-size", int, 32, "local mini-batch size (rows)", min=1),
    Option(
        "seed", int, 42, "seed for partitions, splits, batches and the model", min=0
    ),
)

#: Run-config options of record-level DP-SGD at each site.
DPSGD_OPTIONS: tuple[Option, ...] = (
    Option("dp-sgd", bool, False, "record-level DP-SGD (Opacus) at every site"),
    Option(
        "dp-sgd-epsilon",
        float,
        4.0,
        "DP-SGD: target epsilon per site over the whole run",
        min=0.0,
        min_exclusive=True,
    ),
    Option(
        "dp-sgd-delta",
        float,
        1e-5,
        "DP-SGD: delta (keep below 1 / rows of the smallest site)",
        min=0.0,
        max=1.0,
        min_exclusive=True,
        max_exclusive=True,
    ),
    Option(
        "dp-sgd-max-grad-norm",
        float,
        1.0,
        "DP-SGD: per-example gradient clipping norm",
        min=0.0,
        min_exclusive=True,
    ),
)


@dataclass(frozen=True)
class TrainResult:
    """What one round of local training did.

    Attributes
    ----------
    loss : float
        Mean training loss over the last local epoch.
    steps : int
        Optimiser steps taken.
    metrics : dict
        Extra metrics for the train reply (e.g. ``epsilon`` under DP-SGD).
    """

    loss: float
    steps: int
    metrics: dict[str, float]


def model_to_arrays(model: nn.Module) -> ArrayRecord:
    """Return the model's state dict as an ArrayRecord (float32 tensors)."""
    return ArrayRecord(model.state_dict())


def arrays_to_model(model: nn.Module, arrays: ArrayRecord) -> None:
    """Load an ArrayRecord into ``model``; a clear error if shapes differ."""
    state = arrays.to_torch_state_dict()
    expected = model.state_dict()
    if set(state) != set(expected) or any(
        tuple(state[k].shape) != tuple(expected[k].shape) for k in expected
    ):
        got = {k: tuple(v.shape) for k, v in state.items()}
        want = {k: tuple(v.shape) for k, v in expected.items()}
        raise ValueError(
            f"received model arrays {got} do not match this site's model {want}; "
            "do all sites use the same feature columns?"
        )
    model.load_state_dict(state, strict=True)


def _generator(seed: int, server_round: int, site: int) -> torch.Generator:
    mixed = np.random.SeedSequence([seed, server_round, site]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(mixed))


def train_binary(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    learning_rate: float,
    batch_size: int,
    seed: int,
    server_round: int,
    site: int,
    proximal_mu: float = 0.0,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> TrainResult:
    """Train ``model`` in place on one site's rows (plain, non-private SGD).

    Parameters
    ----------
    model : nn.Module
        Outputs one logit per row, shape ``(n, 1)`` or ``(n,)``.
    x, y : np.ndarray
        ``(n, d)`` float32 standardised features; ``(n,)`` labels in {0, 1}.
    epochs, learning_rate, batch_size : int, float, int
        Local passes, SGD step size (momentum 0.9), rows per batch.
    seed, server_round, site : int
        Seed the batch order (reproducible, different per round and site).
    proximal_mu : float (default: 0.0)
        FedProx: adds ``mu / 2 * ||w - w_global||^2`` with ``w_global`` the
        weights the round started from.
    loss_fn : callable, optional
        ``(logits (n,), float targets (n,)) -> mean loss``, e.g. a weighted or
        focal loss for rare positives (the bank app's ``bank_fraud.losses``).
        Default: unweighted binary cross-entropy.
    """
    torch.set_num_threads(1)
    features = torch.as_tensor(x, dtype=torch.float32)
    labels = torch.as_tensor(y, dtype=torch.float32)
    generator = _generator(seed, server_round, site)
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=0.9)
    start = [p.detach().clone() for p in model.parameters()]
    if loss_fn is None:
        loss_fn = nn.BCEWithLogitsLoss()
    model.train()
    steps, last_epoch_loss = 0, float("nan")
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        total, rows = 0.0, 0
        for begin in range(0, len(labels), batch_size):
            batch = order[begin : begin + batch_size]
            optimizer.zero_grad()
            logits = model(features[batch]).reshape(-1)
            loss = loss_fn(logits, labels[batch])
            objective = loss
            if proximal_mu > 0:
                drift = sum(
                    torch.sum((p - p0) ** 2)
                    for p, p0 in zip(model.parameters(), start, strict=True)
                )
                objective = loss + 0.5 * proximal_mu * drift
            objective.backward()
            optimizer.step()
            steps += 1
            total += float(loss.detach()) * len(batch)
            rows += len(batch)
        last_epoch_loss = total / max(rows, 1)
    return TrainResult(last_epoch_loss, steps, {})


def train_binary_dp(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    context: Context,
    *,
    epochs: int,
    learning_rate: float,
    batch_size: int,
    num_rounds: int,
    target_epsilon: float,
    target_delta: float,
    max_grad_norm: float,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> TrainResult:
    """Train ``model`` in place with record-level DP-SGD (Opacus).

    :func:`flwr_ext.privacy.make_private` wraps model, optimiser and data: batches
    are Poisson-sampled with expected size ``batch_size``, every example's
    gradient is clipped to ``max_grad_norm`` and Gaussian noise is added at each
    step, with the noise multiplier calibrated once so that ``num_rounds`` rounds
    of ``epochs`` epochs reach ``target_epsilon`` at ``target_delta`` per record.
    The account lives in ``context.state`` and continues across rounds; a round
    that would exceed the target raises
    :class:`flwr_ext.privacy.PrivacyBudgetExhaustedError` before touching data.

    FedProx's proximal term is not offered here: its gradient does not depend on
    the data, but Opacus clips per-example gradients of the loss only, and mixing
    the two would need care the app does not need.

    Returns
    -------
    TrainResult
        ``metrics`` holds the silo's cumulative ``dp-record-epsilon``,
        ``dp-record-delta``, ``dp-record-noise-multiplier`` and ``dp-record-steps``.
        ``loss`` is the mean loss of the last epoch's (noised-model) batches; it
        is computed from the data outside DP-SGD, so it is not covered by epsilon.
    """
    # Imported here, not at the top: Opacus adds ~1.4 s to every ClientApp
    # process (a SuperNode starts one per message), and only dp-sgd=true runs
    # need it.
    from ..privacy.dpsgd import make_private, silo_privacy_metrics

    torch.set_num_threads(1)
    dataset = TensorDataset(
        torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32)
    )
    loader = DataLoader(dataset, batch_size=batch_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=0.9)
    private = make_private(
        model,
        optimizer,
        loader,
        context,
        target_epsilon=target_epsilon,
        target_delta=target_delta,
        epochs_per_round=epochs,
        num_rounds=num_rounds,
        max_grad_norm=max_grad_norm,
    )
    loss_fn = loss_fn or nn.BCEWithLogitsLoss()
    # Opacus's per-example hooks make PyTorch warn once per backward pass that
    # the inputs need no gradient - true, and expected: silence that message only.
    warnings.filterwarnings(
        "ignore", message="Full backward hook is firing", category=UserWarning
    )
    private.model.train()
    steps, last_epoch_loss = 0, float("nan")
    for _ in range(epochs):
        total, rows = 0.0, 0
        for features, labels in private.data_loader:
            private.optimizer.zero_grad()
            if len(labels):
                loss = loss_fn(private.model(features).reshape(-1), labels)
                loss.backward()
                total += float(loss.detach()) * len(labels)
                rows += len(labels)
            # An empty Poisson batch is still a DP-SGD step: the optimiser adds
            # the noise and the accountant counts it.
            private.optimizer.step()
            steps += 1
        last_epoch_loss = total / rows if rows else float("nan")
    return TrainResult(last_epoch_loss, steps, dict(silo_privacy_metrics(context)))


@torch.no_grad()
def predict_proba(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """Return ``sigmoid(logit)`` per row as a float64 ``(n,)`` array."""
    model.eval()
    logits = model(torch.as_tensor(x, dtype=torch.float32)).reshape(-1)
    return torch.sigmoid(logits.double()).numpy()


def loss_of(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    """Mean binary cross-entropy of ``model`` on ``(x, y)``."""
    with torch.no_grad():
        model.eval()
        logits = model(torch.as_tensor(x, dtype=torch.float32)).reshape(-1)
        return float(
            nn.functional.binary_cross_entropy_with_logits(
                logits, torch.as_tensor(y, dtype=torch.float32)
            )
        )
