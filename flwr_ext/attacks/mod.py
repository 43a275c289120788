"""``byzantine_mod``: a Flower client mod that makes a ClientApp Byzantine.

Add it to any ClientApp (``ClientApp(mods=[byzantine_mod])``); it does nothing
unless the node's ``node_config`` names an attack, so the same app runs honest and
Byzantine nodes side by side in Flower's Simulation or Deployment Engine::

    flwr run . --federation-config "num-supernodes=10"      # all honest
    flower-supernode ... --node-config "attack='sign-flip'"  # this node attacks

Configuration
-------------
In a deployment, each SuperNode's ``--node-config`` says whether it attacks:

attack : str
    One of :data:`MOD_ATTACKS` (``"none"`` or absent: honest).
attack-strength : float, optional
    The attack's parameter: sign-flip scale (default 1), scaling factor (10),
    gaussian-noise std (1), ipm epsilon (2), weight-inflation factor (100).
    ``0`` (what an app declares as its default) means the attack's default: no
    attack is meaningful at strength 0, and a declared default of, say, 1.0 would
    silently turn ``scaling`` into no attack at all.
attack-seed : int, optional
    Seed for gaussian-noise (default: fresh OS entropy every round).

In Flower's Simulation Engine every node's ``node_config`` holds only
``partition-id`` and ``num-partitions``, so the same keys may come from the *run*
config instead, together with ``attack-partition-ids`` (e.g. ``"0,3"``): the
partitions listed there attack, the others stay honest. A node's own config wins.

Flower refuses a run-config key the app does not declare (``flwr run`` answers
"[code: 15] Invalid run configuration." without naming it), so an app that wants
``-c 'attack="nan"'`` must declare the three keys in its ``pyproject.toml``
(:data:`RUN_CONFIG_TOML`)::

    [tool.flwr.app.config]
    attack = "none"
    attack-strength = 0.0
    attack-partition-ids = ""

The mod names a key that is missing (``attack`` without ``attack-partition-ids``
attacks nobody, and would otherwise do so silently).

Without help the mod sees only its own node's update, so ``ipm`` here uses that
update as its estimate of the honest mean (a non-omniscient variant).

Omniscient mode (simulations only)
----------------------------------
The adaptive attacks of :mod:`flwr_ext.attacks.adaptive` read every honest update
of the round: ``alie``, ``minmax``, ``minsum``, ``mimic``, ``alie-opt`` and
``ipm-opt``. To run them in a Flower simulation, set ``attack-share-dir`` (an
absolute path, in the run config or every node's config): every node that runs
the mod, honest or not, then writes its own trained update of the round to
``<dir>/run-<run_id>/round-<r>/node-<node_id>.npy`` after training, and a Byzantine
node builds its attack from every update found there once it has waited up to
``attack-wait-s`` seconds (default 0) for ``num-partitions`` of them (nodes train
in some order: an attacker that trains early sees fewer updates; the robustness
benchmark instead gives its adversary every update, see
``benchmarks/_federation.py``). Without ``attack-share-dir`` these attacks make the
node reply with an error that says so. Never set it in a real deployment: it
publishes every update.

``alie-opt`` and ``ipm-opt`` line-search their strength against the server's rule,
named by ``attack-target-rule`` (one of :data:`TARGET_RULES`, default ``"mean"``)
with ``attack-target-f`` Byzantine clients (default: ``num-partitions // 5``).
``alie-opt-evasive`` and ``ipm-opt-evasive`` do the same with every candidate
stripped of its component against the last server step
(:func:`flwr_ext.attacks.adaptive.evade_opposition`), which defeats a server that
drops updates pointing against its own previous step. Any client can compute that
step: it is the difference of the last two global models it received, which the
mod keeps in ``context.state`` (the first round an attacker takes part in has no
previous model, so there the evasive attack equals the plain one).
``label-flip`` poisons the data, which a mod cannot reach: the ClientApp applies it
through :func:`flip_labels_if_attacking`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from logging import WARNING
from pathlib import Path
from typing import cast

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode
from flwr.supercore import log

from ..aggregation import (
    AggregationRule,
    CenteredClippingRule,
    CoordinateMedian,
    GeometricMedianRule,
    KrumRule,
    MedianNormEqualization,
    NearestNeighborMixing,
    PreAggregation,
    PreAggregationChain,
    TrimmedMeanRule,
    WeightedMean,
)
from ..records import flatten, unflatten
from . import adaptive
from . import updates as attack_fns

__all__ = [
    "MOD_ATTACKS",
    "OMNISCIENT_MOD_ATTACKS",
    "RUN_CONFIG_KEYS",
    "RUN_CONFIG_TOML",
    "TARGET_RULES",
    "byzantine_mod",
    "configured_attack",
    "flip_labels_if_attacking",
]

_UpdateAttack = Callable[[np.ndarray, float, np.random.Generator], np.ndarray]

_UPDATE_ATTACKS: dict[str, tuple[float, _UpdateAttack]] = {
    "sign-flip": (1.0, lambda u, s, _: attack_fns.sign_flip(u, s)),
    "scaling": (10.0, lambda u, s, _: attack_fns.scaling(u, s)),
    "gaussian-noise": (1.0, lambda u, s, rng: attack_fns.gaussian_noise(u, s, rng)),
    "ipm": (2.0, lambda u, s, _: attack_fns.ipm(u[None, :], s)),
    "nan": (math.nan, lambda u, _s, _r: attack_fns.non_finite(u, math.nan)),
    "inf": (math.inf, lambda u, _s, _r: attack_fns.non_finite(u, math.inf)),
}
_OTHER_ATTACKS = {"weight-inflation": 100.0, "label-flip": math.nan, "none": math.nan}


class _PreAggregated(AggregationRule):
    """``rule`` after ``pre`` as one rule: a wrapper's chain, as attackers see it."""

    def __init__(self, pre: PreAggregation, rule: AggregationRule) -> None:
        self.pre, self.rule = pre, rule

    def _aggregate(self, updates: np.ndarray, weights: np.ndarray) -> np.ndarray:
        return self.rule.aggregate(self.pre.transform(updates, weights), weights)


def _recommended(n: int, f: int) -> AggregationRule:
    """docs/robustness.md's chain: norm equalization, NNM(f), trimmed mean f / n."""
    chain = PreAggregationChain([MedianNormEqualization(), NearestNeighborMixing(f)])
    return _PreAggregated(chain, TrimmedMeanRule(min(f / n, 0.49)))


#: The attack-target-rule names ``alie-opt`` and ``ipm-opt`` line-search against:
#: ``(n, f) -> rule``.
TARGET_RULES: dict[str, Callable[[int, int], AggregationRule]] = {
    "mean": lambda n, f: WeightedMean(),
    "median": lambda n, f: CoordinateMedian(),
    "trimmed-mean": lambda n, f: TrimmedMeanRule(min(f / n, 0.49)),
    "krum": lambda n, f: KrumRule(f, num_selected=1),
    "multi-krum": lambda n, f: KrumRule(f),
    "geometric-median": lambda n, f: GeometricMedianRule(),
    "centered-clipping": lambda n, f: CenteredClippingRule(),
    "trimmed-mean-normeq-nnm": _recommended,
}

_Omniscient = Callable[
    [np.ndarray, np.ndarray, int, AggregationRule, "np.ndarray | None"], np.ndarray
]
#: Omniscient attacks: (honest (h, d), own update (d,), f, target rule, last
#: server step (d,) or None) -> update.
_OMNISCIENT_ATTACKS: dict[str, _Omniscient] = {
    "alie": lambda h, _u, f, _r, _s: attack_fns.alie(h, f),
    "minmax": lambda h, _u, _f, _r, _s: adaptive.minmax(h),
    "minsum": lambda h, _u, _f, _r, _s: adaptive.minsum(h),
    "mimic": lambda h, _u, _f, _r, _s: h[adaptive.mimic(h)].copy(),
    "alie-opt": lambda h, _u, f, r, _s: adaptive.optimal_alie(h, f, _uniform(r)),
    "ipm-opt": lambda h, _u, f, r, _s: adaptive.optimal_ipm(h, f, _uniform(r)),
    "alie-opt-evasive": lambda h, _u, f, r, step: adaptive.optimal_alie(
        h, f, _uniform(r), reference=step
    ),
    "ipm-opt-evasive": lambda h, _u, f, r, step: adaptive.optimal_ipm(
        h, f, _uniform(r), reference=step
    ),
}
#: Attacks that need the last server step (kept in ``context.state``).
_STEP_ATTACKS = frozenset({"alie-opt-evasive", "ipm-opt-evasive"})
#: ``context.state`` key of the last global model an evasive attacker received.
PREVIOUS_GLOBAL_KEY = "byzantine-mod-previous-global"

#: Attacks that need ``attack-share-dir`` (see "Omniscient mode").
OMNISCIENT_MOD_ATTACKS: tuple[str, ...] = tuple(_OMNISCIENT_ATTACKS)

#: Attack names the mod accepts in ``node_config["attack"]``.
MOD_ATTACKS: tuple[str, ...] = (
    tuple(_UPDATE_ATTACKS) + OMNISCIENT_MOD_ATTACKS + tuple(_OTHER_ATTACKS)
)


def _uniform(rule: AggregationRule) -> adaptive.Aggregator:
    return lambda rows: rule.aggregate(rows, np.ones(rows.shape[0]))


#: Run-config keys the mod reads in simulation; an app declares them all.
RUN_CONFIG_KEYS: tuple[str, ...] = ("attack", "attack-strength", "attack-partition-ids")

#: The lines an app adds to its ``pyproject.toml`` to accept them.
RUN_CONFIG_TOML = """[tool.flwr.app.config]
attack = "none"
attack-strength = 0.0
attack-partition-ids = \"\"
"""


def configured_attack(context: Context) -> tuple[str, float]:
    """Return ``(attack, strength)`` from the node config (``("none", nan)`` if unset).

    Raises
    ------
    ValueError
        On an unknown attack name or a non-numeric strength, naming the valid
        choices.
    """
    source, where = _attack_source(context)
    name = str(source.get("attack", "none")).strip().lower()
    if name not in MOD_ATTACKS:
        raise ValueError(
            f"{where} attack={name!r} is not an attack; choose one of "
            f"{', '.join(MOD_ATTACKS)}"
        )
    if name in _UPDATE_ATTACKS:
        default = _UPDATE_ATTACKS[name][0]
    else:
        default = _OTHER_ATTACKS.get(name, math.nan)
    raw = source.get("attack-strength", default)
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        raise ValueError(f"{where} attack-strength must be a number, got {raw!r}")
    return name, default if raw == 0 else float(raw)


def _attack_source(context: Context) -> tuple[Mapping[str, object], str]:
    """Where this node's attack settings come from (see the module docstring)."""
    if "attack" in context.node_config:
        return context.node_config, "node_config"
    run_config = context.run_config
    if "attack" not in run_config:
        others = [k for k in RUN_CONFIG_KEYS[1:] if k in run_config]
        if others:
            raise ValueError(
                f"run_config has {', '.join(others)} but no 'attack': declare "
                "all of attack, attack-strength and attack-partition-ids in the "
                "app's [tool.flwr.app.config]"
            )
        return {}, "node_config"
    if "attack-partition-ids" not in run_config:
        if str(run_config["attack"]).strip().lower() in ("", "none"):
            return {}, "run_config"
        raise ValueError(
            f"run_config attack={run_config['attack']!r} but no "
            "'attack-partition-ids', so no partition would attack: declare "
            'attack-partition-ids = "" in the app\'s [tool.flwr.app.config] and '
            "set it, e.g. -c 'attack-partition-ids=\"0,3\"'"
        )
    raw_ids = str(run_config.get("attack-partition-ids", "")).replace(" ", "")
    try:
        ids = {int(part) for part in raw_ids.split(",") if part}
    except ValueError as err:
        raise ValueError(
            f"run_config attack-partition-ids={raw_ids!r} must be comma-separated "
            "partition ids, e.g. '0,3'"
        ) from err
    if context.node_config.get("partition-id") in ids:
        return run_config, "run_config"
    return {}, "run_config"


def flip_labels_if_attacking(
    labels: np.ndarray, context: Context, num_classes: int
) -> np.ndarray:
    """Return flipped labels if this node's config says ``attack='label-flip'``."""
    name, _ = configured_attack(context)
    if name != "label-flip":
        return labels
    return attack_fns.label_flip(labels, num_classes)


def byzantine_mod(
    msg: Message, context: Context, call_next: ClientAppCallable
) -> Message:
    """Apply the node's configured attack to its train replies."""
    try:
        name, strength = configured_attack(context)
    except ValueError as err:
        return Message(
            Error(
                code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                reason=f"byzantine_mod: {err}",
            ),
            reply_to=msg,
        )
    reply = call_next(msg, context)
    if msg.metadata.message_type != MessageType.TRAIN or reply.has_error():
        return reply
    try:
        share = _share_dir(context, msg)
    except ValueError as err:
        return Message(
            Error(
                code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                reason=f"byzantine_mod: {err}",
            ),
            reply_to=msg,
        )
    if share is None and name in _OMNISCIENT_ATTACKS:
        return Message(
            Error(
                code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                reason=f"byzantine_mod: attack={name!r} reads every honest update "
                "of the round: set attack-share-dir (simulations only)",
            ),
            reply_to=msg,
        )
    if share is None and name in ("none", "label-flip"):
        return reply
    if name == "weight-inflation":
        return _inflate(reply, strength)
    return _attack_arrays(msg, reply, name, strength, context, share)


def _last_server_step(context: Context, global_vec: np.ndarray) -> np.ndarray | None:
    """Return ``global - previous global`` and remember ``global`` for next round.

    ``None`` when this node has no previous global model of the same size (its
    first round, or the model changed shape).
    """
    kept = context.state.array_records.get(PREVIOUS_GLOBAL_KEY)
    step = None
    if kept is not None and "vector" in kept:
        previous = np.asarray(kept["vector"].numpy(), dtype=np.float64)
        if previous.shape == global_vec.shape:
            step = global_vec - previous
    context.state[PREVIOUS_GLOBAL_KEY] = ArrayRecord(
        {"vector": Array(np.array(global_vec, dtype=np.float64))}
    )
    return step


def _inflate(reply: Message, factor: float) -> Message:
    content = RecordDict(dict(reply.content.items()))
    for key, metrics in reply.content.metric_records.items():
        inflated = MetricRecord(dict(metrics.items()))
        if "num-examples" in inflated:
            inflated["num-examples"] = attack_fns.inflate_weight(
                float(cast(float, inflated["num-examples"])), factor
            )
        content[key] = inflated
    reply.content = content
    return reply


def _share_dir(context: Context, msg: Message) -> Path | None:
    """Return the round's folder of shared updates (None: no share dir)."""
    raw = context.node_config.get(
        "attack-share-dir", context.run_config.get("attack-share-dir")
    )
    if raw is None or raw == "":
        return None
    path = Path(str(raw))
    if not path.is_absolute():
        raise ValueError(f"attack-share-dir must be an absolute path, got {raw!r}")
    round_ = _server_round(msg)
    return path / f"run-{int(context.run_id)}" / f"round-{round_}"


def _server_round(msg: Message) -> int:
    config = msg.content.config_records.get("config")
    raw = config.get("server-round", 0) if config is not None else 0
    if isinstance(raw, bool) or not isinstance(raw, int):
        return 0
    return int(raw)


def _shared_updates(
    folder: Path, own: np.ndarray, context: Context, wait_s: float
) -> np.ndarray:
    """Every update of the round in ``folder`` with ``own``'s shape, ``(h, d)``."""
    raw = context.node_config.get("num-partitions", 0)
    wanted = raw if isinstance(raw, int) and not isinstance(raw, bool) else 0
    deadline = time.monotonic() + wait_s
    while True:
        files = sorted(folder.glob("node-*.npy"))
        if len(files) >= wanted or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    rows = [own]
    for file in files:
        if file.name == f"node-{int(context.node_id)}.npy":
            continue
        try:
            row = np.load(file, allow_pickle=False)
        except (OSError, ValueError):
            continue  # a node still writing it: the attack uses the others
        if row.shape == own.shape and row.dtype == np.float64:
            rows.append(row)
    return np.stack(rows)


def _publish(folder: Path, update: np.ndarray, context: Context) -> None:
    """Write this node's update for the Byzantine nodes of a simulation to read."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"node-{int(context.node_id)}.npy"
    partial = folder / f".node-{int(context.node_id)}.tmp.npy"
    np.save(partial, update, allow_pickle=False)
    partial.replace(final)  # readers never see a half-written file


def _target_rule(context: Context, num_honest: int) -> tuple[AggregationRule, int]:
    source, where = _attack_source(context)
    name = str(source.get("attack-target-rule", "mean")).strip().lower()
    if name not in TARGET_RULES:
        raise ValueError(
            f"{where} attack-target-rule={name!r}; choose one of "
            f"{', '.join(TARGET_RULES)}"
        )
    n = int(context.node_config.get("num-partitions", num_honest) or num_honest)
    raw_f = source.get("attack-target-f", max(1, n // 5))
    if isinstance(raw_f, bool) or not isinstance(raw_f, int) or raw_f < 1:
        raise ValueError(f"{where} attack-target-f must be an integer >= 1")
    return TARGET_RULES[name](max(n, num_honest + raw_f), raw_f), int(raw_f)


def _attack_arrays(
    msg: Message,
    reply: Message,
    name: str,
    strength: float,
    context: Context,
    share: Path | None = None,
) -> Message:
    if len(msg.content.array_records) != 1 or len(reply.content.array_records) != 1:
        log(WARNING, "byzantine_mod: expected one ArrayRecord each way; not attacking")
        return reply
    sent = next(iter(msg.content.array_records.values()))
    key, returned = next(iter(reply.content.array_records.items()))
    # The reply's own manifest: a client answers in its model's dtypes (float32)
    # even when the server sent float64 (Flower's FedAdam does).
    model_vec, manifest = flatten(returned)
    if set(sent.keys()) != set(manifest.keys) or any(
        tuple(sent[s.key].shape) != s.shape for s in manifest.specs
    ):
        log(WARNING, "byzantine_mod: reply and instruction arrays differ; no attack")
        return reply
    global_vec = np.concatenate(
        [np.asarray(sent[k].numpy(), dtype=np.float64).ravel() for k in manifest.keys]
    )
    seed = _attack_source(context)[0].get("attack-seed")
    config = msg.content.config_records.get("config")
    round_ = config.get("server-round", 0) if config is not None else 0
    rng = np.random.default_rng(
        None if seed is None else [int(cast(int, seed)), int(cast(int, round_))]
    )
    own = model_vec - global_vec
    if share is not None:
        # Every node publishes its own trained update, attackers included (the
        # colluders know each other's), so num-partitions files can appear.
        _publish(share, own, context)
        if name in ("none", "label-flip"):
            return reply
    if name in _OMNISCIENT_ATTACKS:
        assert share is not None
        source = _attack_source(context)[0]
        wait = source.get("attack-wait-s", 0.0)
        honest = _shared_updates(
            share, own, context, float(wait) if isinstance(wait, (int, float)) else 0
        )
        try:
            rule, f = _target_rule(context, honest.shape[0])
        except ValueError as err:
            return Message(
                Error(
                    code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                    reason=f"byzantine_mod: {err}",
                ),
                reply_to=msg,
            )
        step = _last_server_step(context, global_vec) if name in _STEP_ATTACKS else None
        attacked = _OMNISCIENT_ATTACKS[name](honest, own, f, rule, step)
    else:
        attacked = _UPDATE_ATTACKS[name][1](own, strength, rng)
    with np.errstate(invalid="ignore", over="ignore"):
        poisoned: ArrayRecord = unflatten(global_vec + attacked, manifest)
    content = RecordDict(dict(reply.content.items()))
    content[key] = poisoned
    reply.content = content
    return reply
