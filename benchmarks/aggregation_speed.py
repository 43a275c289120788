"""Time and peak memory of one ``aggregate_train`` call: flwr-ext vs Flower.

Each measurement is one call of a strategy's real ``aggregate_train`` on real reply
Messages (built from the strategy's own ``configure_train`` instructions), for a
float32 model of ``--params`` parameters and ``--clients`` replies. Flower's
``FedTrimmedAvg``, ``FedMedian`` and ``Bulyan`` pop the arrays out of the replies
they aggregate, so every call gets freshly built replies (building them is not
timed). Ours and Flower's equivalent alternate call by call, so background load
hits both alike; the ratio is ``median(ours) / median(Flower)`` from the same run.

Peak memory is measured in a separate call under ``tracemalloc`` (numpy reports
its buffers to it): the highest traced allocation during the call above what was
allocated before it, i.e. the strategy's working memory, not the replies.

Run from the repository root::

    python -m benchmarks.aggregation_speed                # both default sizes
    python -m benchmarks.aggregation_speed --repeats 9 --sizes 20x1000000
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    FedAvg,
    FedAvgM,
    FedMedian,
    FedTrimmedAvg,
    Strategy,
)
from flwr.serverapp.strategy import Krum as FlowerKrum
from flwr.serverapp.strategy import MultiKrum as FlowerMultiKrum

from flwr_ext.aggregation import (
    AdaptiveRobustClipping,
    Bucketing,
    MedianNormEqualization,
    NearestNeighborMixing,
    PreAggregationChain,
    WeightedMean,
)
from flwr_ext.inprocess import InProcessGrid
from flwr_ext.strategy import (
    CenteredClipping,
    GeometricMedian,
    Krum,
    Median,
    MultiKrum,
    RobustAggregation,
    TrimmedMean,
)

#: Upper bound of issue 2 for one aggregation of 20 clients x 1M parameters.
MAX_SECONDS_20X1M = 1.0


@dataclass(frozen=True)
class Pair:
    """Our strategy and the Flower strategy it is compared with.

    ``equivalent`` is True when Flower ships the same rule (then ours must be at
    least as fast); False for a reference comparison (e.g. against FedAvg).
    """

    name: str
    ours: Callable[[int, int], Strategy]
    flower: Callable[[int, int], Strategy]
    flower_name: str
    equivalent: bool


def _fedavg(_n: int, _f: int) -> Strategy:
    return FedAvg(fraction_evaluate=0.0)


PAIRS: tuple[Pair, ...] = (
    # Not a robust rule and not a drop-in strategy: the price of what every
    # robust strategy does before its rule (validate each reply, build the
    # update matrix, cast back), against FedAvg's running sum that checks nothing.
    Pair(
        "Mean",
        lambda n, f: RobustAggregation(FedAvg(), WeightedMean()),
        _fedavg,
        "FedAvg",
        False,
    ),
    Pair(
        "Krum",
        lambda n, f: Krum(num_byzantine=f),
        lambda n, f: FlowerKrum(num_malicious_nodes=f),
        "Krum",
        True,
    ),
    Pair(
        "MultiKrum",
        lambda n, f: MultiKrum(num_byzantine=f),
        lambda n, f: FlowerMultiKrum(num_malicious_nodes=f, num_nodes_to_select=n - f),
        "MultiKrum",
        True,
    ),
    Pair(
        "TrimmedMean",
        lambda n, f: TrimmedMean(beta=f / n),
        lambda n, f: FedTrimmedAvg(beta=f / n),
        "FedTrimmedAvg",
        True,
    ),
    Pair("Median", lambda n, f: Median(), lambda n, f: FedMedian(), "FedMedian", True),
    Pair(
        "TrimmedMean + NNM",
        lambda n, f: TrimmedMean(beta=f / n, pre_aggregation="nnm", num_byzantine=f),
        lambda n, f: FedTrimmedAvg(beta=f / n),
        "FedTrimmedAvg",
        False,
    ),
    Pair("GeometricMedian", lambda n, f: GeometricMedian(), _fedavg, "FedAvg", False),
    Pair("CenteredClipping", lambda n, f: CenteredClipping(), _fedavg, "FedAvg", False),
    # The configurations of issue 13 (stateful centre, ARC, bucketing, chains).
    Pair(
        "CC (previous, q=0.4) + ARC",
        lambda n, f: CenteredClipping(
            centre="previous",
            radius_quantile=0.4,
            pre_aggregation=AdaptiveRobustClipping(f),
        ),
        _fedavg,
        "FedAvg",
        False,
    ),
    Pair(
        "TrimmedMean + ARC + NNM",
        lambda n, f: TrimmedMean(
            beta=f / n,
            pre_aggregation=PreAggregationChain(
                [AdaptiveRobustClipping(f), NearestNeighborMixing(f)]
            ),
        ),
        lambda n, f: FedTrimmedAvg(beta=f / n),
        "FedTrimmedAvg",
        False,
    ),
    # The recommendation since server momentum (docs/robustness.md); one call
    # is FedAvgM's first round (its momentum starts as the first step).
    Pair(
        "TrimmedMean + ARC (f + 4) + NNM, FedAvgM",
        lambda n, f: TrimmedMean(
            FedAvgM(server_learning_rate=0.5, server_momentum=0.9),
            beta=f / n,
            pre_aggregation=PreAggregationChain(
                [AdaptiveRobustClipping(f + 4), NearestNeighborMixing(f)]
            ),
        ),
        lambda n, f: FedTrimmedAvg(beta=f / n),
        "FedTrimmedAvg",
        False,
    ),
    # The recommendation since norm equalization (docs/robustness.md).
    Pair(
        "TrimmedMean + norm equalization + NNM, FedAvgM",
        lambda n, f: TrimmedMean(
            FedAvgM(server_learning_rate=0.5, server_momentum=0.9),
            beta=f / n,
            pre_aggregation=PreAggregationChain(
                [MedianNormEqualization(), NearestNeighborMixing(f)]
            ),
        ),
        lambda n, f: FedTrimmedAvg(beta=f / n),
        "FedTrimmedAvg",
        False,
    ),
    Pair(
        "Median + Bucketing",
        lambda n, f: Median(pre_aggregation=Bucketing(2)),
        lambda n, f: FedMedian(),
        "FedMedian",
        False,
    ),
)


class _Grid:
    """The node list a strategy's ``configure_train`` samples from."""

    def __init__(self, n: int) -> None:
        self.ids = list(range(1, n + 1))

    def get_node_ids(self) -> list[int]:
        return list(self.ids)


def model_shapes(num_params: int) -> dict[str, tuple[int, ...]]:
    """Shapes of a two-layer model with exactly ``num_params`` parameters."""
    hidden = 800
    inputs = max(1, (num_params * 4 // 5) // hidden)
    rest = num_params - inputs * hidden - hidden
    outputs = rest // hidden
    shapes = {
        "fc1.weight": (hidden, inputs),
        "fc1.bias": (hidden,),
        "fc2.weight": (outputs, hidden),
    }
    remainder = rest - outputs * hidden
    if remainder:
        shapes["fc2.bias"] = (remainder,)
    assert sum(int(np.prod(s)) for s in shapes.values()) == num_params
    return shapes


class Workload:
    """A global model and ``n`` client models, as numpy arrays (float32)."""

    def __init__(self, n: int, num_params: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        shapes = model_shapes(num_params)
        self.n = n
        self.num_params = num_params
        self.global_arrays = {
            k: rng.normal(0, 0.05, s).astype(np.float32) for k, s in shapes.items()
        }
        self.clients = [
            {
                k: (v + rng.normal(0, 0.01, v.shape)).astype(np.float32)
                for k, v in self.global_arrays.items()
            }
            for _ in range(n)
        ]
        self.num_examples = rng.integers(50, 500, n).tolist()

    def global_record(self) -> ArrayRecord:
        """Return the global model as a fresh ArrayRecord."""
        return ArrayRecord({k: Array(v) for k, v in self.global_arrays.items()})

    def replies(self, strategy: Strategy) -> list[Message]:
        """Fresh reply Messages to ``strategy``'s own instructions."""
        instructions = sorted(
            strategy.configure_train(
                1, self.global_record(), ConfigRecord(), _Grid(self.n)
            ),
            key=lambda m: m.metadata.dst_node_id,
        )
        return [
            Message(
                RecordDict(
                    {
                        "arrays": ArrayRecord({k: Array(v) for k, v in model.items()}),
                        "metrics": MetricRecord({"num-examples": int(size)}),
                    }
                ),
                reply_to=instruction,
            )
            for instruction, model, size in zip(
                instructions, self.clients, self.num_examples, strict=True
            )
        ]


def _one_call(strategy: Strategy, workload: Workload) -> float:
    replies = workload.replies(strategy)
    gc.collect()
    started = time.perf_counter()
    arrays, _ = strategy.aggregate_train(1, replies)
    seconds = time.perf_counter() - started
    if arrays is None:
        raise RuntimeError(f"{type(strategy).__name__} returned no model")
    return seconds


def _peak_bytes(strategy: Strategy, workload: Workload) -> int:
    replies = workload.replies(strategy)
    gc.collect()
    tracemalloc.start()
    before, _ = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    strategy.aggregate_train(1, replies)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak - before


@dataclass
class Row:
    """Measurements of one pair at one size."""

    pair: Pair
    n: int
    num_params: int
    ours_s: list[float]
    flower_s: list[float]
    ours_peak: int
    flower_peak: int

    @property
    def ratio(self) -> float:
        """``median(ours) / median(Flower)``."""
        return statistics.median(self.ours_s) / statistics.median(self.flower_s)


def measure(pair: Pair, workload: Workload, repeats: int) -> Row:
    """Alternate ours and Flower's ``repeats`` times, then measure peak memory."""
    f = workload.n // 5
    ours_s, flower_s = [], []
    for _ in range(repeats):
        ours_s.append(_one_call(pair.ours(workload.n, f), workload))
        flower_s.append(_one_call(pair.flower(workload.n, f), workload))
    return Row(
        pair,
        workload.n,
        workload.num_params,
        ours_s,
        flower_s,
        _peak_bytes(pair.ours(workload.n, f), workload),
        _peak_bytes(pair.flower(workload.n, f), workload),
    )


def _spread(values: list[float]) -> str:
    """``median (min-max)`` in seconds."""
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def table(rows: Sequence[Row]) -> str:
    """Markdown table of all rows."""
    lines = [
        "| clients x params | ours | s: median (min-max) | Flower | "
        "s: median (min-max) | ratio | peak MB ours | peak MB Flower |",
        "|---|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        mark = "" if r.pair.equivalent else " (reference)"
        lines.append(
            f"| {r.n} x {r.num_params:,} | {r.pair.name} | {_spread(r.ours_s)} | "
            f"{r.pair.flower_name}{mark} | {_spread(r.flower_s)} | "
            f"{r.ratio:.2f} | {r.ours_peak / 2**20:.0f} | {r.flower_peak / 2**20:.0f} |"
        )
    return "\n".join(lines)


def verdicts(rows: Sequence[Row]) -> list[str]:
    """Check the issue's speed targets on these rows; one line per target."""
    out = []
    for r in rows:
        if r.pair.equivalent:
            ok = r.ratio <= 1.0
            out.append(
                f"{r.pair.name} vs {r.pair.flower_name} at {r.n}x{r.num_params}: "
                f"ratio {r.ratio:.2f} ({'ok' if ok else 'SLOWER than Flower'})"
            )
        if r.n == 20 and r.num_params == 1_000_000:
            median = statistics.median(r.ours_s)
            ok = median <= MAX_SECONDS_20X1M
            out.append(
                f"{r.pair.name} at 20x1M: {median:.3f} s "
                f"({'ok' if ok else 'over'} the {MAX_SECONDS_20X1M} s limit)"
            )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.aggregation_speed",
        description=__doc__.split("\n")[0],
    )
    parser.add_argument(
        "--sizes",
        nargs="+",
        default=["20x1000000", "100x100000"],
        help="CLIENTSxPARAMS (default: 20x1000000 100x100000)",
    )
    parser.add_argument("--repeats", type=int, default=7, help="calls per strategy")
    parser.add_argument(
        "--pairs",
        nargs="+",
        default=[p.name for p in PAIRS],
        help="subset of: " + ", ".join(p.name for p in PAIRS),
    )
    args = parser.parse_args(argv)
    if args.repeats < 5:
        parser.error("--repeats must be >= 5 (the median of fewer is too noisy)")
    pairs = [p for p in PAIRS if p.name in args.pairs]
    InProcessGrid({1: lambda m, c: m})  # sets the task identity Messages need
    import logging

    logging.getLogger("flwr").setLevel(logging.ERROR)

    rows = []
    started = time.perf_counter()
    for size in args.sizes:
        n, num_params = (int(x) for x in size.lower().split("x"))
        workload = Workload(n, num_params)
        for pair in pairs:
            rows.append(measure(pair, workload, args.repeats))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    command = "python -m benchmarks.aggregation_speed " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    print()
    print(f"<!-- `{command.strip()}`, {time.perf_counter() - started:.0f} s -->")
    print(table(rows))
    print()
    for line in verdicts(rows):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
