"""What an attack does to a robust rule, round by round: one run of the robustness grid.

Runs one federation of :mod:`benchmarks.robustness` (same data, model, seeds and
attackers) and prints, for every round, lengths in units of ``|mean(honest)|``
(the honest clients' mean update of that round) and cosines with it:

- ``agg``: the robust aggregate the server's rule made of all replies (the
  inner strategy's server step comes after it);
- ``honest-only``: the same rule on the honest replies alone (what it would do
  without attackers);
- ``byz``: the update the first Byzantine client sent;
- ``min h`` and ``f-th h``: the smallest and the ``f``-th smallest honest
  update (is the attacker's update smaller than every honest one?).

The rule is the wrapper's own pre-aggregation and rule with its state of that
moment (:func:`benchmarks._targets.target_aggregator`), read and never changed;
the run itself is untouched. Run from the repository root::

    python -m benchmarks.round_diagnosis --attack ipm-opt-evasive --seed 0
        --strategy ours-trimmed-mean-arc-f4-nnm-fedavgm09-lr05 --fraction 0.3

(one command line).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterable, Sequence

import numpy as np
from flwr.app import Message

from benchmarks._federation import ATTACKS, RunSpec, _vector, run_federation
from benchmarks._strategies import strategy_config
from benchmarks._targets import target_aggregator

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strategy", required=True)
    parser.add_argument("--attack", required=True, choices=ATTACKS)
    parser.add_argument("--fraction", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args(argv)
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    flwr_logger.setLevel(logging.ERROR)  # Flower logs every round; restored below
    try:
        return _diagnose(args)
    finally:
        flwr_logger.setLevel(level)


def _diagnose(args: argparse.Namespace) -> int:
    config = strategy_config(args.strategy)
    spec = RunSpec(
        args.strategy, args.attack, args.fraction, args.seed, args.rounds,
        alpha=args.alpha,
    )  # fmt: skip
    f = spec.num_byzantine
    rows: list[tuple[float, ...]] = []

    def factory(n: int, num_byzantine: int, fraction: float):
        strategy = config.build(n, num_byzantine, fraction)
        rule = target_aggregator(strategy)
        original = strategy.aggregate_train
        current: dict[str, object] = {}  # the round's global model, flattened
        configure = strategy.configure_train

        def configure_train(server_round, arrays, config, grid) -> Iterable[Message]:
            current["keys"] = keys = tuple(arrays.keys())
            current["vector"] = _vector(arrays, keys)
            return configure(server_round, arrays, config, grid)

        def aggregate_train(server_round: int, replies: Iterable[Message]):
            replies = list(replies)
            ok = [r for r in replies if not r.has_error() and r.content.array_records]
            byz_ids = set(range(1, f + 1)) if args.attack != "none" else set()
            updates = {  # each reply's update (model - global model), in order
                r.metadata.src_node_id: _vector(
                    next(iter(r.content.array_records.values())), current["keys"]
                )
                - current["vector"]
                for r in ok
            }
            honest = np.stack([u for i, u in updates.items() if i not in byz_ids])
            everyone = np.stack(list(updates.values()))
            mean = honest.mean(axis=0)
            scale = float(np.linalg.norm(mean)) or 1.0
            agg = np.asarray(rule(everyone), dtype=np.float64)
            alone = np.asarray(rule(honest), dtype=np.float64)
            norms = np.sort(np.linalg.norm(honest, axis=1))
            byz = [u for i, u in updates.items() if i in byz_ids]
            byz_norm = float(np.linalg.norm(byz[0])) if byz else np.nan

            def cos(x: np.ndarray) -> float:
                denominator = float(np.linalg.norm(x)) * scale
                return float(x @ mean) / denominator if denominator else np.nan

            rows.append(
                (
                    server_round,
                    np.linalg.norm(agg) / scale,
                    cos(agg),
                    np.linalg.norm(alone) / scale,
                    cos(alone),
                    byz_norm / scale,
                    norms[0] / scale,
                    norms[min(max(f, 1), len(norms)) - 1] / scale,
                )
            )
            return original(server_round, replies)

        strategy.configure_train = configure_train  # type: ignore[method-assign]
        strategy.aggregate_train = aggregate_train  # type: ignore[method-assign]
        return strategy

    result = run_federation(spec, factory, client_momentum=config.client_momentum)
    print(
        f"{args.strategy}, {args.attack}, f = {f} of {spec.num_clients}, "
        f"seed {args.seed}, alpha {args.alpha}: final accuracy {result.accuracy} "
        f"({result.status}{': ' + result.error if result.error else ''})"
    )
    print("round  |agg|  cos(agg)  |honest-only|  cos  |byz|  min h  f-th h")
    for row in rows:
        print(f"{row[0]:5d} " + " ".join(f"{v:7.3f}" for v in row[1:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
