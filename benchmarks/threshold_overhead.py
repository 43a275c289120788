"""What threshold CKKS costs next to Flower's SecAgg+, for the same model and clients.

One run measures, for a ~1M-parameter float32 model (|x| <= 10, the layout of
``benchmarks/he_overhead.py``) and 10 clients with unequal ``num-examples``:

- ``threshold`` - flwr-ext's multiparty CKKS (:mod:`flwr_ext.he.threshold`) through
  its real codec: each client encrypts its pre-scaled update with the collective
  public key (:func:`~flwr_ext.he.threshold.encrypt_values`,
  :func:`~flwr_ext.he.threshold_protocol.encode_update`); the server parses,
  checks and adds (:func:`~flwr_ext.he.threshold_protocol.decode_update`,
  :class:`~flwr_ext.he.residue_sum.ResidueSum`, what the strategy runs), sends
  each of 10 sites the sum's
  ``c1``; each site computes its flooded partial decryption
  (:meth:`~flwr_ext.he.threshold.SecretShare.partial_decrypt_all`); the server combines
  and decodes (:func:`~flwr_ext.he.threshold.combine`).
- ``secagg+`` - Flower's own SecAgg+ (``SecAggPlusWorkflow`` + ``secaggplus_mod``,
  the legacy workflow; 10 shares, threshold 6, clipping range 10) on Flower's real
  ``DefaultWorkflow`` over :class:`~flwr_ext.inprocess.InProcessGrid` (every message
  through Flower's protobuf serialisation), the same model and clients.

Columns: uplink / downlink bytes per parameter per client (threshold: the encrypted
update up; the plaintext global model plus the collective public key, which every
train instruction carries, down; SecAgg+: every stage's messages, from the grid's
byte counters), client time, server time per client and
per round, one site's partial decryption, all CPU seconds per 1M parameters (the
benchmark process is single-threaded; other processes' load does not inflate CPU
time), rounds of interaction per training round, and the max absolute error of the
average against the exact float64 weighted average.

Run from the repository root::

    python -m benchmarks.threshold_overhead                  # a few minutes
    python -m benchmarks.threshold_overhead --params 100000  # quick smoke run
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from flwr.app import ArrayRecord  # noqa: E402

from benchmarks.he_overhead import (  # noqa: E402
    CLIENTS,
    exact_average,
    flat,
    make_models,
    record_bytes,
)
from flwr_ext.he import threshold as T  # noqa: E402, N812
from flwr_ext.he.residue_sum import CiphertextLevel, ResidueSum  # noqa: E402
from flwr_ext.he.threshold_protocol import (  # noqa: E402
    EncryptedUpdate,
    decode_update,
    encode_update,
    read_residue_record,
    residue_record,
)

SITES = CLIENTS


def _cpu() -> float:
    return time.process_time()


def bench_threshold(models: list[ArrayRecord], counts: list[int], repeats: int) -> dict:
    """One row: collective keys, encrypt, sum, 10 partial decryptions, combine."""
    context = T.ThresholdContext()
    unit = 100.0
    params = sum(a.numpy().size for a in models[0].values())
    expected = exact_average(models, counts)
    with tempfile.TemporaryDirectory() as directory:
        a = T.common_polynomial(context, os.urandom(32))
        shares = [T.SecretShare.generate(context) for _ in range(SITES)]
        for i, share in enumerate(shares):
            share.save(Path(directory) / f"site{i}.share")
        public_key = T.collective_public_key(
            context, a, [s.public_share(a) for s in shares]
        )
        encryptor = T.encryptor(context, public_key)
        runs = []
        for _ in range(repeats):
            runs.append(
                _threshold_repeat(context, encryptor, shares, models, counts, unit)
            )
    per_m = 1e6 / params
    med = statistics.median
    values = runs[-1]["average"]
    return {
        "name": "threshold (N-of-N, 10 sites)",
        "up_bytes_per_param": runs[0]["up"] / params,
        # each train instruction: the plaintext global model + the public key
        "down_bytes_per_param": (record_bytes(models[0]) + len(public_key)) / params,
        "client_encrypt_s": med(r["encrypt"] for r in runs) * per_m,
        "server_per_client_s": med(r["server"] for r in runs) * per_m,
        "server_round_s": med(r["round"] for r in runs) * per_m,
        "site_partial_decrypt_s": med(r["partial"] for r in runs) * per_m,
        "partial_down_bytes_per_param": runs[0]["c1_bytes"] / params,
        "partial_up_bytes_per_param": runs[0]["share_bytes"] / params,
        "interaction_rounds": 2,
        "max_abs_error": float(np.max(np.abs(values - expected))),
    }


def _threshold_repeat(context, encryptor, shares, models, counts, unit) -> dict:
    encrypt = server = 0.0
    up = 0
    size = flat(models[0]).shape[0]
    level = CiphertextLevel.of_context(context.context, context.scale)
    total = ResidueSum(level, -(-(size + 2) // context.n))
    for model, count in zip(models, counts, strict=True):
        start = _cpu()
        weight = count / unit
        vector = np.concatenate([flat(model) * weight, [weight, 1.0]])
        record = encode_update(
            EncryptedUpdate(
                "0" * 32,
                vector.shape[0],
                T.encrypt_values(context, encryptor, vector),
            )
        )
        encrypt += _cpu() - start
        up = record_bytes(record)
        start = _cpu()
        update = decode_update(context, record, expected_values=size + 2)
        total.add(update.ciphertexts)
        server += _cpu() - start
    start = _cpu()
    raws = total.raw()
    c1_record = residue_record("c1", [raw.polys[1] for raw in raws])
    round_time = _cpu() - start
    partial_times = []
    share_bytes = 0
    all_partials = []
    for share in shares:
        start = _cpu()
        c1s = read_residue_record(context, c1_record, "c1", expected=len(raws))
        partials = share.partial_decrypt_all(c1s)
        share_record = residue_record("h", [p.share for p in partials])
        partial_times.append(_cpu() - start)
        share_bytes = record_bytes(share_record)
        all_partials.append(partials)
    start = _cpu()
    values = []
    for index, raw in enumerate(raws):
        slots = T.combine(
            context, raw, [p[index] for p in all_partials], expected_sites=len(shares)
        )
        values.append(T.unpack(slots, context.n))
    vector = np.concatenate(values)
    average = vector[:size] / vector[size]
    round_time += _cpu() - start
    return {
        "encrypt": encrypt / len(models),
        "server": server / len(models),
        "round": round_time,
        "partial": statistics.median(partial_times),
        "up": up,
        "c1_bytes": record_bytes(c1_record),
        "share_bytes": share_bytes,
        "average": average,
    }


def bench_secaggplus(models: list[ArrayRecord], counts: list[int]) -> dict:
    """One row: Flower's SecAgg+ (legacy workflow) on the same models and clients."""
    from flwr.app import Context, RecordDict
    from flwr.client import ClientApp, NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.common import ndarrays_to_parameters
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.strategy import FedAvg as LegacyFedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

    from flwr_ext.inprocess import InProcessGrid

    params = sum(a.numpy().size for a in models[0].values())
    vectors = [flat(m).astype(np.float32) for m in models]
    client_cpu = {"s": 0.0}

    class Client(NumPyClient):
        def __init__(self, index: int) -> None:
            self.index = index

        def fit(self, parameters, config):
            return [vectors[self.index]], counts[self.index], {}

    def client_fn(context: Context):
        return Client(int(context.node_config["partition-id"])).to_client()

    app = ClientApp(client_fn=client_fn, mods=[secaggplus_mod])

    def timed_app(message, context):
        start = _cpu()
        try:
            return app(message, context)
        finally:
            client_cpu["s"] += _cpu() - start

    grid = InProcessGrid(
        {i + 1: timed_app for i in range(CLIENTS)},
        node_configs={i + 1: {"partition-id": i} for i in range(CLIENTS)},
    )
    calls = {"n": 0}
    push = grid.push_messages

    def counting_push(messages):
        calls["n"] += 1
        return push(messages)

    grid.push_messages = counting_push  # type: ignore[method-assign]
    strategy = LegacyFedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=CLIENTS,
        min_available_clients=CLIENTS,
        initial_parameters=ndarrays_to_parameters([np.zeros(params, np.float32)]),
    )
    context = LegacyContext(
        context=Context(
            run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}
        ),
        config=ServerConfig(num_rounds=1),
        strategy=strategy,
    )
    workflow = DefaultWorkflow(
        fit_workflow=SecAggPlusWorkflow(
            num_shares=CLIENTS,
            reconstruction_threshold=CLIENTS // 2 + 1,
            clipping_range=10.0,
        )
    )
    start = _cpu()
    workflow(grid, context)
    total = _cpu() - start
    expected = exact_average(models, counts)
    per_m = 1e6 / params
    server = total - client_cpu["s"]
    return {
        "name": "Flower SecAgg+ (legacy workflow)",
        "up_bytes_per_param": grid.bytes_up / CLIENTS / params,
        "down_bytes_per_param": grid.bytes_down / CLIENTS / params,
        "client_encrypt_s": client_cpu["s"] / CLIENTS * per_m,
        "server_per_client_s": server / CLIENTS * per_m,
        "server_round_s": server * per_m,
        "site_partial_decrypt_s": float("nan"),
        "partial_down_bytes_per_param": float("nan"),
        "partial_up_bytes_per_param": float("nan"),
        "interaction_rounds": calls["n"],
        "max_abs_error": _secagg_error(context, expected),
    }


def _secagg_error(context, expected: np.ndarray) -> float:
    """Max abs error of the global model the legacy workflow keeps in its state."""
    from flwr.server.workflow.constant import MAIN_PARAMS_RECORD

    record = context.state.array_records[MAIN_PARAMS_RECORD]
    values = np.concatenate([a.numpy().ravel() for a in record.values()])
    return float(np.max(np.abs(values.astype(np.float64) - expected)))


def markdown(rows: Sequence[dict], params: int) -> str:
    """Return the table for docs/secure-aggregation.md."""
    head = (
        "| configuration | up B/param | down B/param | client s/1M | server s/1M "
        "per client | server s/1M per round | site partial decryption s/1M | "
        "partial-decryption B/param down / up | rounds of interaction | "
        "max abs error |\n|" + "---|" * 10
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['up_bytes_per_param']:.1f} | "
            f"{r['down_bytes_per_param']:.1f} | {r['client_encrypt_s']:.3f} | "
            f"{r['server_per_client_s']:.4f} | {r['server_round_s']:.3f} | "
            f"{r['site_partial_decrypt_s']:.3f} | "
            f"{r['partial_down_bytes_per_param']:.1f} / "
            f"{r['partial_up_bytes_per_param']:.1f} | {r['interaction_rounds']} | "
            f"{r['max_abs_error']:.2e} |"
        )
    return "\n".join(lines) + f"\n\n({params:,} parameters, {CLIENTS} clients)\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--out", type=Path, default=Path("docs/threshold-overhead.json")
    )
    args = parser.parse_args(argv)
    models, counts = make_models(args.params, seed=0)
    params = sum(a.numpy().size for a in models[0].values())
    wall = time.perf_counter()
    cpu = _cpu()
    rows = [
        bench_threshold(models, counts, args.repeats),
        bench_secaggplus(models, counts),
    ]
    load = os.getloadavg()
    print(markdown(rows, params))
    print(
        f"load average {load[0]:.2f} / {load[1]:.2f}; "
        f"wall {time.perf_counter() - wall:.0f} s, CPU {_cpu() - cpu:.0f} s"
    )
    args.out.write_text(
        json.dumps(
            {
                "command": "python -m benchmarks.threshold_overhead "
                + " ".join(argv if argv is not None else sys.argv[1:]),
                "params": params,
                "clients": CLIENTS,
                "load_average": load,
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
