"""Record-level DP inside a silo: turn a ClientApp's PyTorch training into DP-SGD.

**What ε protects here: one record (e.g. one patient's row) of one silo's training
set**, under the add-or-remove-one-record relation, with Poisson sampling of
records into batches (Opacus's ``DPDataLoader``). The guarantee covers everything
the silo releases that is computed from the trained model - its model updates and
hence every global model - across all rounds of the run. It does *not* cover what
the ClientApp computes from raw data outside DP-SGD: the dataset size it reports as
``num-examples``, and training loss or accuracy metrics. A record lives in one
silo, so the federation's record-level ε is the *maximum* over silos
(:func:`flwr_ext.privacy.aggregate_silo_metrics` logs it on the server).

Why a helper: the usual Opacus pattern in a Flower ClientApp creates a new
``PrivacyEngine`` every round, so the ε it reports covers one round only, however
many rounds the silo has trained. Here the accountant's
history lives in the ClientApp's ``context.state``, which Flower keeps for the whole
run, so every round continues the same account; the noise multiplier is calibrated
once, up front, for the planned number of rounds; and a round that would exceed the
target raises :class:`PrivacyBudgetExhaustedError` before any data is touched.

Usage in a ClientApp (``model`` is a fresh model with the global weights)::

    from flwr_ext.privacy import make_private, silo_privacy_metrics

    @app.train()
    def train(msg, context):
        model = Net()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        private = make_private(
            model, optimizer, train_loader, context,
            target_epsilon=4.0, target_delta=1e-5, epochs_per_round=1,
            num_rounds=context.run_config["num-server-rounds"], max_grad_norm=1.0,
        )
        for _ in range(1):
            for x, y in private.data_loader:
                private.optimizer.zero_grad()
                loss_fn(private.model(x), y).backward()
                private.optimizer.step()
        metrics = {"num-examples": len(train_set), **silo_privacy_metrics(context)}
        # Read the weights from `model` itself: Opacus trains it in place, while
        # private.model wraps it and prefixes its state_dict keys with "_module.".
        ...
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
from flwr.app import ConfigRecord, Context
from opacus import PrivacyEngine
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader

from . import _opacus  # noqa: F401 - undoes Opacus's basicConfig
from .accountant import ACCOUNTANTS, Neighbouring, PrivacyAccountant, PrivacyUnit
from .calibration import calibrate_noise_multiplier
from .keys import RECORD_DELTA, RECORD_EPSILON, RECORD_NOISE_MULTIPLIER, RECORD_STEPS
from .noise import secure_torch_generator
from .validation import check_choice, check_int, check_open_unit, check_positive

__all__ = [
    "STATE_KEY",
    "PrivacyBudgetExhaustedError",
    "PrivateTraining",
    "SiloPrivacy",
    "make_private",
    "silo_privacy",
    "silo_privacy_metrics",
]

#: Key of the ConfigRecord in ``context.state`` that holds the silo's account.
STATE_KEY = "flwr-ext-dp-sgd"


class PrivacyBudgetExhaustedError(RuntimeError):
    """Training one more round would take the silo past its target ε."""


class PrivateTraining(NamedTuple):
    """The DP-SGD training objects returned by :func:`make_private`.

    Train with these (never with the originals) for the guarantee to hold.
    """

    model: nn.Module
    optimizer: DPOptimizer
    data_loader: DataLoader


@dataclass(frozen=True)
class SiloPrivacy:
    """A silo's cumulative record-level privacy account.

    Attributes
    ----------
    epsilon : float
        Cumulative ε at ``delta`` over every DP-SGD step taken so far in the run.
    delta : float
        Target δ (per record).
    noise_multiplier : float
        Calibrated DP-SGD noise multiplier (noise std / ``max_grad_norm``).
    sample_rate : float
        Poisson sampling rate of records per step (1 / batches per epoch).
    steps : int
        DP-SGD steps taken so far.
    planned_steps : int
        Steps the noise was calibrated for (rounds x epochs x batches).
    rounds : int
        Rounds (calls of :func:`make_private`) so far.
    accountant : str
        ``"prv"`` or ``"rdp"`` (Opacus).
    """

    epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    planned_steps: int
    rounds: int
    accountant: str


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader,
    context: Context,
    *,
    target_epsilon: float,
    target_delta: float,
    epochs_per_round: int,
    num_rounds: int,
    max_grad_norm: float,
    accountant: str = "prv",
) -> PrivateTraining:
    """Make one round of a silo's training DP-SGD, continuing the run's account.

    Parameters
    ----------
    model : torch.nn.Module
        The model to train (with the global weights loaded). Opacus trains it in
        place; read the weights from it after training.
    optimizer : torch.optim.Optimizer
        Optimiser over ``model.parameters()``.
    data_loader : torch.utils.data.DataLoader
        The silo's training data; its batch size sets the expected batch size
        of the Poisson-sampled batches (sampling rate = 1 / len(data_loader)).
    context : flwr.app.Context
        The ClientApp's context; its ``state`` keeps the account across rounds.
    target_epsilon : float
        ε per record for the whole run (all ``num_rounds`` rounds), > 0.
    target_delta : float
        δ per record, in (0, 1); should be below 1 / (records in the silo).
    epochs_per_round : int
        Epochs the ClientApp trains per round (>= 1), used for calibration.
    num_rounds : int
        Rounds the silo is planned to train in (>= 1), used for calibration.
    max_grad_norm : float
        Per-example gradient clipping bound, > 0.
    accountant : {"prv", "rdp"} (default: "prv")
        Opacus accountant.

    Returns
    -------
    PrivateTraining
        ``(model, optimizer, data_loader)`` wrapped by Opacus.

    Raises
    ------
    ValueError
        For an out-of-range parameter, a model Opacus cannot train privately
        (e.g. BatchNorm), an empty loader, or settings that differ from the ones
        the run's account was started with.
    PrivacyBudgetExhaustedError
        If training this round as planned would exceed ``target_epsilon``.
    """
    target_epsilon = check_positive("target_epsilon", target_epsilon)
    target_delta = check_open_unit("target_delta", target_delta)
    epochs_per_round = check_int("epochs_per_round", epochs_per_round, 1)
    num_rounds = check_int("num_rounds", num_rounds, 1)
    max_grad_norm = check_positive("max_grad_norm", max_grad_norm)
    accountant = check_choice("accountant", accountant, ACCOUNTANTS)
    if not isinstance(context, Context):
        raise TypeError(
            f"context must be the ClientApp's flwr.app.Context, got "
            f"{type(context).__name__}"
        )
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise ValueError(
            "Opacus cannot train this model with per-example clipping: "
            + "; ".join(str(e) for e in errors)
            + ". Replace the offending layers (opacus.validators.ModuleValidator."
            "fix(model) swaps BatchNorm for GroupNorm) before make_private."
        )
    batches = len(data_loader)
    if batches == 0:
        raise ValueError("data_loader is empty: the silo has no training data")
    sample_rate = 1.0 / batches
    steps_per_round = epochs_per_round * batches
    planned_steps = num_rounds * steps_per_round

    settings: dict[str, float | int | str] = {
        "target-epsilon": target_epsilon,
        "target-delta": target_delta,
        "max-grad-norm": max_grad_norm,
        "sample-rate": sample_rate,
        "planned-steps": planned_steps,
        "accountant": accountant,
    }
    account, state = _load(context, settings)
    if state is None:
        noise_multiplier = calibrate_noise_multiplier(
            target_epsilon, target_delta, planned_steps, sample_rate, accountant
        )
        rounds = 0
    else:
        noise_multiplier = float(state["noise-multiplier"])  # type: ignore[arg-type]
        rounds = int(state["rounds"])  # type: ignore[arg-type]

    after = account.epsilon_after(noise_multiplier, sample_rate, steps_per_round)
    if after > target_epsilon * (1 + 1e-9):
        raise PrivacyBudgetExhaustedError(
            f"this silo has spent epsilon={account.get_epsilon():.4g} (delta="
            f"{target_delta:g}, per record) of its target_epsilon={target_epsilon}; "
            f"training round {rounds + 1} ({steps_per_round} DP-SGD steps) would "
            f"reach {after:.4g}. The run was planned for num_rounds={num_rounds}; "
            "stop it, or start a new account with a larger budget."
        )

    engine = PrivacyEngine(accountant=accountant)
    engine.accountant.history = list(account.history)
    # Poisson batch sampling and noise from OS-seeded generators: a user's
    # torch.manual_seed must not reproduce them.
    saved_generator = data_loader.generator
    data_loader.generator = secure_torch_generator()
    try:
        private_model, private_optimizer, private_loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=data_loader,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            poisson_sampling=True,
            noise_generator=secure_torch_generator(),
        )
    finally:
        data_loader.generator = saved_generator

    record = _state_record(settings, noise_multiplier, rounds + 1, account)
    context.state[STATE_KEY] = record
    accountant_hook = private_optimizer.step_hook

    def persist_after_step(optim: DPOptimizer) -> None:
        if accountant_hook is not None:
            accountant_hook(optim)
        account.load_state_dict(_history_state(account, engine.accountant.history))
        context.state[STATE_KEY] = _state_record(
            settings, noise_multiplier, rounds + 1, account
        )

    private_optimizer.attach_step_hook(persist_after_step)
    return PrivateTraining(private_model, private_optimizer, private_loader)


def silo_privacy(context: Context) -> SiloPrivacy | None:
    """Return the silo's cumulative record-level account (None before training)."""
    state = context.state.config_records.get(STATE_KEY)
    if state is None:
        return None
    account = PrivacyAccountant.from_state_dict(state)
    return SiloPrivacy(
        epsilon=account.get_epsilon(),
        delta=account.delta,
        noise_multiplier=float(state["noise-multiplier"]),  # type: ignore[arg-type]
        sample_rate=float(state["sample-rate"]),  # type: ignore[arg-type]
        steps=account.releases,
        planned_steps=int(state["planned-steps"]),  # type: ignore[arg-type]
        rounds=int(state["rounds"]),  # type: ignore[arg-type]
        accountant=account.accountant,
    )


def silo_privacy_metrics(context: Context) -> dict[str, float | int]:
    """Metrics for the train reply: the silo's cumulative ε, δ, z and steps.

    Keys: ``dp-record-epsilon``, ``dp-record-delta``,
    ``dp-record-noise-multiplier``, ``dp-record-steps`` (see
    :mod:`flwr_ext.privacy.keys`); the ε protects one record of this silo.

    Returns an empty dict before any DP-SGD training (so a reply never claims
    ε = 0 for a silo that did not train privately).
    """
    privacy = silo_privacy(context)
    if privacy is None:
        return {}
    return {
        RECORD_EPSILON: privacy.epsilon,
        RECORD_DELTA: privacy.delta,
        RECORD_NOISE_MULTIPLIER: privacy.noise_multiplier,
        RECORD_STEPS: privacy.steps,
    }


# ----------------------------------------------------------------- internals
def _load(
    context: Context, settings: Mapping[str, float | int | str]
) -> tuple[PrivacyAccountant, ConfigRecord | None]:
    state = context.state.config_records.get(STATE_KEY)
    if state is None:
        account = PrivacyAccountant(
            str(settings["accountant"]),
            delta=float(settings["target-delta"]),
            unit=PrivacyUnit.RECORD,
            neighbouring=Neighbouring.ADD_OR_REMOVE_ONE,
        )
        return account, None
    for key, value in settings.items():
        saved = state.get(key)
        same = (
            math.isclose(float(saved), float(value), rel_tol=1e-12)
            if isinstance(value, float | int) and isinstance(saved, float | int)
            else saved == value
        )
        if not same:
            raise ValueError(
                f"this silo's DP-SGD account was started with {key}={saved!r}, "
                f"now {key}={value!r}. The noise was calibrated for the first "
                "settings; changing them mid-run (e.g. a different batch size or "
                "dataset) would silently break the target. Keep them fixed for "
                "the run."
            )
    return PrivacyAccountant.from_state_dict(state), state


def _history_state(
    account: PrivacyAccountant, history: list[tuple[float, float, int]]
) -> dict[str, object]:
    state: dict[str, object] = dict(account.state_dict())
    state["noise-multipliers"] = [float(z) for z, _, _ in history]
    state["sampling-rates"] = [float(q) for _, q, _ in history]
    state["counts"] = [int(n) for _, _, n in history]
    return state


def _state_record(
    settings: Mapping[str, float | int | str],
    noise_multiplier: float,
    rounds: int,
    account: PrivacyAccountant,
) -> ConfigRecord:
    return ConfigRecord(
        {
            **account.state_dict(),
            **settings,
            "noise-multiplier": float(noise_multiplier),
            "rounds": int(rounds),
        }
    )
