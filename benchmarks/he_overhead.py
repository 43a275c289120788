"""What CKKS secure aggregation costs: bytes, time, memory and error per configuration.

One run measures, for a ~1M-parameter float32 model (4 arrays, |x| <= 10) and 10
clients with unequal ``num-examples``:

- ``plaintext`` - Flower's own FedAvg path: ``Array`` serialisation on the client,
  ``aggregate_arrayrecords`` (what ``FedAvg.aggregate_train`` calls) on the server;
- ``default`` / ``compact`` profiles with each wire format - ``packed`` (flwr-ext's
  default: raw SEAL, complex packing, full symmetric ciphertexts), ``tenseal`` (one
  TenSEAL vector per N/2 values) and ``seeded`` (``packed`` with seeded uplink
  ciphertexts) - through flwr-ext's real codec
  (:func:`flwr_ext.he.encrypt_record`, :class:`flwr_ext.he.CiphertextSum`,
  :func:`flwr_ext.he.decrypt_record`);
- ``threshold`` and ``Flower SecAgg+`` - multiparty CKKS with no key holder and
  Flower's own SecAgg+ on the same models and clients, in the same run
  (:func:`benchmarks.threshold_overhead.bench_threshold` and
  :func:`~benchmarks.threshold_overhead.bench_secaggplus`, printed as a second
  table with their own columns: partial decryptions, rounds of interaction);
  ``--skip-threshold`` leaves them out;
- ``flare-style`` - NVIDIA FLARE's configuration rebuilt with TenSEAL: N=8192,
  coefficient moduli [60, 40, 40], scale 2^40, a public-key context with
  relinearisation keys, one ``CKKSVector`` per tensor (pre-scaled by the client's
  weight), the server summing and multiplying by 1/sum(w).

Columns: uplink and downlink bytes per parameter; client encrypt + serialise time,
server time per client (parse, check, deserialise, add), server finalisation
(serialising the sum; FLARE-style: also the 1/sum(w) multiplication) and key
holder decryption time, all in seconds per 1M parameters on one core; the
server's peak memory above the replies it already holds; the max absolute error of
the decrypted weighted average (float64, before any cast to the model's dtype)
against the exact float64 average.

Times are CPU seconds of the (single-threaded) benchmark process, so that other
processes on a shared machine do not inflate them; each is the median over
``--repeats`` (default 3) full repetitions. The load average and the run's overall
wall-clock / CPU ratio are printed with the table.

Run from the repository root::

    python -m benchmarks.he_overhead                  # ~3 minutes on one core
    python -m benchmarks.he_overhead --params 100000  # quick smoke run
"""

from __future__ import annotations

import os

# One core: numpy's BLAS must not use the other one (TenSEAL gets n_threads=1).
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import pickle  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict  # noqa: E402
from flwr.serverapp.strategy.strategy_utils import (  # noqa: E402
    aggregate_arrayrecords,
)

from flwr_ext.he import (  # noqa: E402
    CiphertextSum,
    create_keys,
    encrypt_record,
    load_keys,
)
from flwr_ext.he._native import quiet_native_stdout  # noqa: E402
from flwr_ext.he.codec import EncryptedHeader, chunks, decrypt_average  # noqa: E402
from flwr_ext.he.wire import _scratch_file  # noqa: E402

CLIENTS = 10


@dataclass
class Row:
    """One configuration's measurements (times in s per 1M parameters)."""

    name: str
    up_bytes_per_param: float
    down_bytes_per_param: float
    client_encrypt_s: float
    server_per_client_s: float
    server_finalize_s: float
    decrypt_s: float
    server_peak_mb: float
    max_abs_error: float
    mean_relative_error: float
    key_material_bytes: int
    bare_server_per_client_s: float = float("nan")


# ------------------------------------------------------------------- helpers
def _shapes(params: int) -> list[tuple[int, ...]]:
    """Return a 4-array MLP-like layout with about ``params`` parameters."""
    hidden = max(8, round(params / 1001))
    return [(hidden, 784), (hidden,), (216, hidden), (216,)]


def make_models(params: int, seed: int) -> tuple[list[ArrayRecord], list[int]]:
    """Ten float32 models with |x| <= 10 and unequal example counts."""
    rng = np.random.default_rng(seed)
    models = [
        ArrayRecord(
            {
                f"layer{i}": Array(rng.uniform(-10, 10, shape).astype(np.float32))
                for i, shape in enumerate(_shapes(params))
            }
        )
        for _ in range(CLIENTS)
    ]
    counts = [int(c) for c in rng.integers(100, 1000, CLIENTS)]
    return models, counts


def flat(record: ArrayRecord) -> np.ndarray:
    """Concatenate a record's arrays as float64."""
    return np.concatenate(
        [a.numpy().astype(np.float64).ravel() for a in record.values()]
    )


def exact_average(models: list[ArrayRecord], counts: list[int]) -> np.ndarray:
    """Return the exact float64 weighted average all rows are compared with."""
    total = float(sum(counts))
    out = np.zeros(sum(a.numpy().size for a in models[0].values()))
    for model, count in zip(models, counts, strict=True):
        out += flat(model) * (count / total)
    return out


def _bias(values: np.ndarray, expected: np.ndarray) -> float:
    """Mean relative error where ``|expected| > 1``: a systematic bias shows here."""
    mask = np.abs(expected) > 1
    return float(np.mean((values[mask] - expected[mask]) / expected[mask]))


def record_bytes(record: ArrayRecord) -> int:
    """Bytes an ArrayRecord puts on the wire (its arrays' payloads)."""
    return sum(len(a.data) for a in record.values())


def _reset_peak() -> int:
    """Reset the process's peak RSS (Linux); return the current RSS in bytes."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return -1
    return _status("VmRSS")


def _status(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return -1


def _peak_above(baseline: int) -> float:
    """Peak RSS above ``baseline`` since the last reset, in MB (nan if unknown)."""
    if baseline < 0:
        return float("nan")
    return max(0, _status("VmHWM") - baseline) / 1e6


def _clock() -> float:
    """Return this process's CPU seconds (the benchmark is single-threaded).

    On a shared machine, unlike wall-clock time, other processes' load does not
    inflate it.
    """
    return time.process_time()


def _timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = _clock()
    out = fn()
    return _clock() - start, out


@dataclass
class _Repeat:
    encrypt: float
    server: float
    finalize: float
    decrypt: float
    up: float
    down: float
    error: float
    bias: float


def _summarise(
    name: str, repeats: list[_Repeat], params: int, keys: int, peak_mb: float
) -> Row:
    per_m = 1e6 / params
    med = statistics.median
    return Row(
        name=name,
        up_bytes_per_param=repeats[0].up / params,
        down_bytes_per_param=repeats[0].down / params,
        client_encrypt_s=med(r.encrypt for r in repeats) * per_m,
        server_per_client_s=med(r.server for r in repeats) * per_m,
        server_finalize_s=med(r.finalize for r in repeats) * per_m,
        decrypt_s=med(r.decrypt for r in repeats) * per_m,
        server_peak_mb=peak_mb,
        max_abs_error=max(r.error for r in repeats),
        mean_relative_error=statistics.mean(r.bias for r in repeats),
        key_material_bytes=keys,
    )


# ------------------------------------------------------------ configurations
def bench_plaintext(models, counts, expected, repeats: int) -> Row:
    """Flower's FedAvg path: Array serialisation + aggregate_arrayrecords."""
    params = expected.size
    results = []
    for _ in range(repeats):
        replies, enc = [], []
        for model, count in zip(models, counts, strict=True):
            seconds, record = _timed(
                lambda m=model: ArrayRecord({k: Array(a.numpy()) for k, a in m.items()})
            )
            enc.append(seconds)
            replies.append(
                RecordDict({"arrays": record,
                            "metrics": MetricRecord({"num-examples": count})})
            )  # fmt: skip
        seconds, aggregate = _timed(
            lambda r=replies: aggregate_arrayrecords(r, "num-examples")
        )
        if not results:
            pairs = zip(replies, counts, strict=True)
            payload = [(count, _raw(reply["arrays"])) for reply, count in pairs]
            peak = measure_server_peak("plaintext", payload)
        results.append(
            _Repeat(
                encrypt=statistics.mean(enc),
                server=seconds / CLIENTS,
                finalize=0.0,
                decrypt=0.0,
                up=record_bytes(replies[0]["arrays"]),
                down=record_bytes(aggregate),
                error=float(np.abs(flat(aggregate) - expected).max()),
                bias=_bias(flat(aggregate), expected),
            )
        )
    return _summarise("plaintext (Flower FedAvg)", results, params, 0, peak)


def bench_ckks(profile: str, wire: str, models, counts, expected, repeats, key_dir):
    """flwr-ext's codec, streaming sum and decryption."""
    files = create_keys(Path(key_dir) / f"{profile}-{wire}", profile)
    secret, server = load_keys(files.secret), load_keys(files.server)
    results, replies, bare = [], [], []
    for _ in range(repeats):
        result, replies = _ckks_repeat(secret, server, wire, models, counts, expected)
        results.append(result)
        # the bare library calls right after ours, under the same load
        bare.append(_BARE[wire](server, replies))
    payload = (str(files.server), wire, [_raw(reply) for reply in replies])
    peak = measure_server_peak("ckks", payload)
    row = _summarise(f"{profile} / {wire}", results, expected.size, 0, peak)
    if bare:
        row.bare_server_per_client_s = statistics.median(bare) * 1e6 / expected.size
    return row


def _bare_tenseal_add(server, replies) -> float:
    """CPU s per client of TenSEAL alone: ``ckks_vector_from`` + ``add_``.

    The floor under flwr-ext's server step (which adds the header, CRC32 and
    profile checks) on the same replies, measured right after it.
    """
    import tenseal as ts

    blobs = [chunks(r, EncryptedHeader.from_record(r)) for r in replies]
    start = _clock()
    total = [ts.ckks_vector_from(server.context, b) for b in blobs[0]]
    for reply in blobs[1:]:
        for acc, blob in zip(total, reply, strict=True):
            acc.add_(ts.ckks_vector_from(server.context, blob))
    return (_clock() - start) / len(replies)


def _bare_seal_add(server, replies) -> float:
    """CPU s per client of SEAL alone: ``Ciphertext.load`` + ``add_inplace``.

    The floor under the ``packed`` and ``seeded`` wires' server step, through the
    same ``sealapi`` bindings and one scratch file, without flwr-ext's checks.
    """
    seal = server.seal()
    blobs = [chunks(r, EncryptedHeader.from_record(r)) for r in replies]
    with _scratch_file() as scratch:

        def load(blob: bytes):
            scratch.write(blob)
            ciphertext = seal.sealapi.Ciphertext()
            ciphertext.load(seal.context, scratch.path)
            return ciphertext

        start = _clock()
        total = [load(b) for b in blobs[0]]
        for reply in blobs[1:]:
            for acc, blob in zip(total, reply, strict=True):
                seal.evaluator.add_inplace(acc, load(blob))
        return (_clock() - start) / len(replies)


_BARE = {"packed": _bare_seal_add, "seeded": _bare_seal_add,
         "tenseal": _bare_tenseal_add}  # fmt: skip


def _ckks_repeat(
    secret, server, wire, models, counts, expected
) -> tuple[_Repeat, list[ArrayRecord]]:
    unit = float(np.mean(counts))  # what weight_unit=None settles on
    replies, encrypt_s = [], []
    for model, count in zip(models, counts, strict=True):
        start = _clock()
        replies.append(
            encrypt_record(model, secret, count / unit, num_clients=CLIENTS, wire=wire)
        )
        encrypt_s.append(_clock() - start)
    total = CiphertextSum(server, None, wire)
    start = _clock()
    for i, reply in enumerate(replies):
        total.add(reply, f"client {i}")
    server_s = _clock() - start
    start = _clock()
    aggregate = total.result()
    finalize_s = _clock() - start
    start = _clock()
    values = _decrypt_float64(aggregate, secret)
    decrypt_s = _clock() - start
    result = _Repeat(
        encrypt=statistics.mean(encrypt_s),
        server=server_s / CLIENTS,
        finalize=finalize_s,
        decrypt=decrypt_s,
        up=record_bytes(replies[0]),
        down=record_bytes(aggregate),
        error=float(np.abs(values - expected).max()),
        bias=_bias(values, expected),
    )
    return result, replies


def _decrypt_float64(record: ArrayRecord, keys) -> np.ndarray:
    """Return the released (flooded, rounded) average, before the float32 cast."""
    average, _, _, _ = decrypt_average(record, keys, "aggregate")
    return average


def bench_flare_style(models, counts, expected, repeats) -> Row:
    """NVIDIA FLARE's parameters, rebuilt with TenSEAL (see the module docstring)."""
    import tenseal as ts

    with quiet_native_stdout():
        context = ts.context(
            ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 40, 40], n_threads=1
        )
        context.global_scale = 2**40
        context.generate_relin_keys()
        public = context.serialize(save_secret_key=False)
        server_context = ts.context_from(public, n_threads=1)
    results, replies = [], []
    for _ in range(repeats):
        result, replies = _flare_repeat(
            ts, context, server_context, models, counts, expected
        )
        results.append(result)
    peak = measure_server_peak("flare", (public, float(sum(counts)), replies))
    name = "FLARE-style [60,40,40], x 1/sum(w)"
    return _summarise(name, results, expected.size, len(public), peak)


def _flare_repeat(
    ts, context, server_context, models, counts, expected
) -> tuple[_Repeat, list[list[bytes]]]:
    total_weight = float(sum(counts))
    replies, encrypt_s = [], []
    for model, count in zip(models, counts, strict=True):
        start = _clock()
        with quiet_native_stdout():  # one CKKSVector per tensor, as FLARE does
            replies.append(
                [
                    ts.ckks_vector(context, a.numpy().ravel() * count).serialize()
                    for a in model.values()
                ]
            )
        encrypt_s.append(_clock() - start)
    start = _clock()
    server_s, out = _flare_server(ts, server_context, replies, total_weight)
    finalize_s = _clock() - start - server_s
    start = _clock()
    with quiet_native_stdout():
        values = np.concatenate(
            [np.asarray(ts.ckks_vector_from(context, b).decrypt()) for b in out]
        )
    decrypt_s = _clock() - start
    result = _Repeat(
        encrypt=statistics.mean(encrypt_s),
        server=server_s / CLIENTS,
        finalize=finalize_s,
        decrypt=decrypt_s,
        up=sum(len(b) for b in replies[0]),
        down=sum(len(b) for b in out),
        error=float(np.abs(values - expected).max()),
        bias=_bias(values, expected),
    )
    return result, replies


def _flare_server(ts, server_context, replies, total_weight):
    """Sum the per-tensor vectors, multiply by 1 / sum(w); return (sum s, bytes)."""
    start = _clock()
    total = None
    with quiet_native_stdout():
        for blobs in replies:
            vectors = [ts.ckks_vector_from(server_context, b) for b in blobs]
            if total is None:
                total = vectors
            else:
                for acc, vector in zip(total, vectors, strict=True):
                    acc.add_(vector)
    server_s = _clock() - start
    with quiet_native_stdout():  # the server-side multiplication by 1 / sum(w)
        out = [(acc * (1.0 / total_weight)).serialize() for acc in total]
    return server_s, out


# ------------------------------------------------------------ peak memory
def _raw(record: ArrayRecord) -> list[tuple]:
    return [(k, a.dtype, a.shape, a.stype, a.data) for k, a in record.items()]


def _record(raw: list[tuple]) -> ArrayRecord:
    return ArrayRecord({k: Array(d, tuple(sh), st, data) for k, d, sh, st, data in raw})


def measure_server_peak(kind: str, payload: object) -> float:
    """Peak RSS of the server step above the replies it holds, in a fresh process.

    A fresh interpreter (``spawn``) first loads the replies, then resets its peak
    RSS and aggregates; freed memory of earlier configurations cannot hide the
    cost. Returns MB, or nan where the peak cannot be reset.
    """
    with tempfile.NamedTemporaryFile(suffix=".pkl", delete=False) as handle:
        pickle.dump((kind, payload), handle)
    try:
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            return float(pool.apply(_peak_worker, (handle.name,)))
    finally:
        os.unlink(handle.name)


def _peak_worker(path: str) -> float:
    with open(path, "rb") as handle:
        kind, payload = pickle.load(handle)
    if kind == "plaintext":
        replies = [RecordDict({"arrays": _record(raw),
                               "metrics": MetricRecord({"num-examples": count})})
                   for count, raw in payload]  # fmt: skip
        baseline = _reset_peak()
        aggregate_arrayrecords(replies, "num-examples")
    elif kind == "ckks":
        context_path, wire, raws = payload
        server = load_keys(context_path)
        replies = [_record(raw) for raw in raws]
        total = CiphertextSum(server, None, wire)
        baseline = _reset_peak()
        for i, reply in enumerate(replies):
            total.add(reply, f"client {i}")
        total.result()
    else:
        import tenseal as ts

        public, total_weight, replies = payload
        server_context = ts.context_from(public, n_threads=1)
        baseline = _reset_peak()
        _flare_server(ts, server_context, replies, total_weight)
    return _peak_above(baseline)


# -------------------------------------------------------------------- output
def markdown(rows: Sequence[Row], params: int) -> str:
    """Return the results table in Markdown."""
    lines = [
        f"| configuration ({params:,} params, {CLIENTS} clients) | uplink B/param | "
        "downlink B/param | client encrypt + serialise (s / 1M) | server per "
        "client (ms / 1M) | server finalise (s / 1M) | decrypt (s / 1M) | server "
        "peak above replies (MB) | max abs error |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.name} | {r.up_bytes_per_param:.1f} | {r.down_bytes_per_param:.1f} "
            f"| {r.client_encrypt_s:.3f} | {r.server_per_client_s * 1e3:.1f} | "
            f"{r.server_finalize_s:.3f} | {r.decrypt_s:.3f} | "
            f"{r.server_peak_mb:.0f} | {r.max_abs_error:.1e} |"
        )
    return "\n".join(lines)


def plot(rows: Sequence[Row], path: Path) -> None:
    """Bar charts of uplink bytes, encryption time and server time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.name.replace(" (Flower FedAvg)", "").replace(", x 1/sum(w)", "")
             for r in rows]  # fmt: skip
    panels = [
        ("uplink bytes / parameter", [r.up_bytes_per_param for r in rows]),
        ("client encrypt + serialise, s / 1M params",
         [r.client_encrypt_s for r in rows]),
        ("server time per client, ms / 1M params",
         [r.server_per_client_s * 1e3 for r in rows]),
    ]  # fmt: skip
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colors = [
        "#888888" if r.name.startswith("plaintext")
        else "#d8703b" if r.name.startswith("FLARE")
        else "#3b7dd8"
        for r in rows
    ]  # fmt: skip
    for ax, (title, values) in zip(axes, panels, strict=True):
        ax.barh(names, values, color=colors[: len(values)])
        ax.set_title(title, fontsize=10)
        ax.invert_yaxis()
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:.3g}", va="center", fontsize=8)
        ax.margins(x=0.25)
    for ax in axes[1:]:
        ax.set_yticklabels([])
    fig.suptitle("CKKS secure aggregation overhead (grey: plaintext, orange: "
                 "FLARE-style)", fontsize=11)  # fmt: skip
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _json_row(row: Row) -> dict[str, object]:
    """Return a row for JSON (strict JSON has no NaN: "not measured" is null)."""
    return _json_dict(asdict(row))


def _json_dict(row: dict[str, object]) -> dict[str, object]:
    return {k: None if isinstance(v, float) and v != v else v
            for k, v in row.items()}  # fmt: skip


def _uptime() -> str:
    """``uptime``'s line (time, load averages), for the record next to the times."""
    import subprocess

    try:
        return subprocess.run(
            ["uptime"], capture_output=True, text=True, check=False, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        load = os.getloadavg()
        return f"load average: {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}"


_CONFIGS = [("default", "packed"), ("compact", "packed"),
            ("default", "tenseal"), ("compact", "tenseal"),
            ("default", "seeded"), ("compact", "seeded")]  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Run every configuration and print (and optionally write) the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", type=Path, default=None, help="folder for he-overhead.json/.png"
    )
    parser.add_argument(
        "--configs",
        default=",".join(f"{p}/{w}" for p, w in _CONFIGS),
        help="comma-separated PROFILE/WIRE configurations to run (default: all)",
    )
    parser.add_argument(
        "--skip-flare", action="store_true", help="leave out the FLARE-style row"
    )
    parser.add_argument(
        "--skip-threshold",
        action="store_true",
        help="leave out the threshold-CKKS and Flower SecAgg+ rows",
    )
    args = parser.parse_args(argv)
    configs = [tuple(c.strip().split("/", 1)) for c in args.configs.split(",")]
    unknown = [c for c in configs if c not in _CONFIGS]
    if unknown:
        parser.error(f"unknown configurations {unknown}; choose from {_CONFIGS}")
    if args.repeats < 1 or args.params < 10_000:
        parser.error("--repeats must be >= 1 and --params >= 10000")
    load_before, uptime_before = os.getloadavg(), _uptime()
    started, started_cpu = time.perf_counter(), time.process_time()
    models, counts = make_models(args.params, args.seed)
    expected = exact_average(models, counts)
    params = expected.size
    print(f"{params:,} parameters, {CLIENTS} clients, counts {counts}", flush=True)
    rows = [bench_plaintext(models, counts, expected, args.repeats)]
    print(markdown(rows, params), flush=True)
    with tempfile.TemporaryDirectory() as key_dir:
        for profile, wire in configs:
            row = bench_ckks(
                profile, wire, models, counts, expected, args.repeats, key_dir
            )
            rows.append(row)
            print(markdown(rows[-1:], params).split("\n")[-1], flush=True)
    if not args.skip_flare:
        rows.append(bench_flare_style(models, counts, expected, args.repeats))
    threshold_rows: list[dict[str, object]] = []
    if not args.skip_threshold:
        # Imported here: benchmarks.threshold_overhead imports this module.
        from benchmarks import threshold_overhead

        threshold_rows = [
            threshold_overhead.bench_threshold(models, counts, args.repeats),
            threshold_overhead.bench_secaggplus(models, counts),
        ]
    load_after, uptime_after = os.getloadavg(), _uptime()
    cpu = time.process_time() - started_cpu
    table = markdown(rows, params)
    note = (
        f"\nmedian of {args.repeats} repetitions; load average "
        f"{load_before[0]:.2f} before, {load_after[0]:.2f} after; "
        f"{platform.processor() or platform.machine()}, Python "
        f"{platform.python_version()}; {time.perf_counter() - started:.0f} s total, "
        f"wall-clock / CPU time {(time.perf_counter() - started) / cpu:.2f}; "
        + (
            ""
            if args.skip_flare
            else "FLARE-style public context with relinearisation keys: "
            f"{rows[-1].key_material_bytes / 1e6:.2f} MB; "
        )
        + "mean relative error (|x| > 1): "
        + ", ".join(f"{r.name} {r.mean_relative_error:.1e}" for r in rows)
        + "; bare library load + add on the same replies, without flwr-ext's "
        "checks (ms / 1M / client; TenSEAL ckks_vector_from + add_ for tenseal, "
        "SEAL Ciphertext.load + add_inplace for packed/seeded): "
        + ", ".join(
            f"{r.name} {r.bare_server_per_client_s * 1e3:.1f}"
            for r in rows
            if r.bare_server_per_client_s == r.bare_server_per_client_s
        )
    )
    print("\n" + table + note)
    if threshold_rows:
        from benchmarks import threshold_overhead

        print("\n" + threshold_overhead.markdown(threshold_rows, params))
    print(f"uptime before: {uptime_before}\nuptime after:  {uptime_after}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        command = " ".join(sys.argv[1:] if argv is None else argv)
        results = {
            "command": f"python -m benchmarks.he_overhead {command}".strip(),
            "params": params, "clients": CLIENTS, "counts": counts,
            "repeats": args.repeats, "load_before": load_before,
            "load_after": load_after, "uptime_before": uptime_before,
            "uptime_after": uptime_after, "rows": [_json_row(r) for r in rows],
            "threshold_rows": [_json_dict(r) for r in threshold_rows],
        }  # fmt: skip
        (args.out / "he-overhead.json").write_text(json.dumps(results, indent=2))
        plot(rows, args.out / "img" / "he-overhead.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
