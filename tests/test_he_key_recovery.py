"""The Li-Micciancio passive key-recovery attack on ``mode="decrypt-aggregate"``.

CKKS decryption is approximate: a ciphertext ``(c0, c1)`` decrypts to
``c0 + c1 * s = m + e`` (mod q), where ``e`` - the sum of the clients' encryption
errors - depends on the secret key ``s``. A data owner who releases the *exact*
decryption hands the server ``m + e``: the server re-encodes the released values
with the same encoder and scale, and solves ``s = (m + e - c0) / c1`` coefficient by
coefficient (the ciphertext is in NTT form, one residue per prime, so the division
is pointwise mod each prime). Li and Micciancio, "On the security of homomorphic
encryption on approximate numbers", EUROCRYPT 2021.

The server here is honest-but-curious: it runs :class:`HomomorphicAggregation` as
written, with real ``ckks_mod`` clients on an :class:`InProcessGrid` (real Flower
Messages through Flower's protobuf), and only looks at what crosses its grid: the
clients' encrypted replies, the encrypted sum it sends for decryption, and the
decrypted average plus ``ckks-total-weight`` it gets back. With the recovered key
it decrypts one client's individual update.

Before flooding (commit b2482d6), the float64 case recovered all 8,192 key
coefficients and decrypted an individual update to within ~1e-8. With flooding
(:mod:`flwr_ext.he.flooding`) the recovered "key" is garbage for float32 and
float64 models alike. ``test_the_attack_recovers_the_key_from_an_exact_decryption``
is the positive control: the same solver, fed the exact decryption, finds the key.

The test reads and writes SEAL's serialisation itself (uncompressed), so it does
not depend on the helpers it tests.
"""

from __future__ import annotations

import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg

from flwr_ext.he import SECRET_FILE, SERVER_FILE, load_keys
from flwr_ext.he.wire import get_wire
from flwr_ext.inprocess import InProcessGrid
from flwr_ext.mods import ckks_mod
from flwr_ext.records import Manifest, flatten
from flwr_ext.strategy import HomomorphicAggregation

NODES = (1, 2, 3)
DECRYPTOR = 2
#: 10,000 values: the first packed ciphertext holds 8,192 model values and nothing
#: else, so the release determines every one of its slots.
SHAPE = (100, 100)


def update_of(pid: int, dtype) -> np.ndarray:
    """Client ``pid``'s trained model: |values| <= 10."""
    rng = np.random.default_rng(100 + pid)
    return rng.uniform(-10, 10, size=SHAPE).astype(dtype)


def num_examples(pid: int) -> int:
    return 300 + 200 * pid


def make_app(dtype) -> ClientApp:
    app = ClientApp(mods=[ckks_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        arrays = ArrayRecord({"w": Array(update_of(pid, dtype))})
        metrics = MetricRecord({"num-examples": num_examples(pid)})
        return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)

    return app


class CuriousGrid(InProcessGrid):
    """An InProcessGrid that keeps a copy of everything the server sends/receives."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sent: list[Message] = []
        self.received: list[Message] = []

    def push_messages(self, messages):
        messages = list(messages)
        self.sent.extend(messages)
        return super().push_messages(messages)

    def pull_messages(self, message_ids):
        replies = list(super().pull_messages(message_ids))
        self.received.extend(replies)
        return replies


def run_one_round(keys_dir: Path, dtype) -> CuriousGrid:
    secret = str(keys_dir / SECRET_FILE)
    grid = CuriousGrid(
        {n: make_app(dtype) for n in NODES},
        node_configs={
            n: {
                "partition-id": n - 1,
                "ckks-context": secret,
                "ckks-decrypt-for-server": n == DECRYPTOR,
            }
            for n in NODES
        },
    )
    strategy = HomomorphicAggregation(
        FedAvg(fraction_evaluate=0.0), keys_dir / SERVER_FILE, mode="decrypt-aggregate"
    )
    initial = ArrayRecord({"w": Array(np.zeros(SHAPE, dtype=dtype))})
    strategy.start(grid=grid, initial_arrays=initial, num_rounds=1)
    return grid


# ------------------------------------------------------------ raw SEAL, by hand
def _moduli(keys) -> list[int]:
    parms = keys.seal().context.first_context_data().parms()
    return [int(m.value()) for m in parms.coeff_modulus()]


def _load_ciphertext(keys, blob: bytes):
    return get_wire("packed").load(keys, blob, keys.profile.poly_modulus_degree)


def _coefficients(obj, rows: int, n: int) -> np.ndarray:
    """A SEAL Ciphertext/Plaintext's data as Python ints, shape (rows, n)."""
    values = [obj[i] for i in range(rows * n)]
    return np.array(values, dtype=object).reshape(rows, n)


def _seal_header(template: bytes, size: int) -> bytes:
    header = bytearray(template[:16])
    header[5] = 0  # compr_mode_type::none
    header[8:16] = struct.pack("<Q", size)
    return bytes(header)


def _plaintext(keys, ntt_residues: np.ndarray, parms_id, scale: float):
    """Load a SEAL Plaintext (NTT form) holding ``ntt_residues`` (k, N)."""
    seal = keys.seal()
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "p")
        probe = seal.sealapi.Plaintext()
        seal.encoder.encode([0.0], scale, probe)
        probe.save(path)
        template = Path(path).read_bytes()
        data = np.array([int(v) for v in ntt_residues.ravel()], dtype=np.uint64)
        dyn = _seal_header(template, 24 + data.nbytes)
        dyn += struct.pack("<Q", data.size) + data.tobytes()
        members = struct.pack("<4Q", *parms_id)
        members += struct.pack("<Qd", data.size, scale) + dyn
        Path(path).write_bytes(_seal_header(template, 16 + len(members)) + members)
        plain = seal.sealapi.Plaintext()
        plain.load(seal.context, path)
    return plain


# -------------------------------------------------------------------- the attack
def solve_key(keys, ciphertext, released: np.ndarray) -> np.ndarray:
    """``s = (encode(released) - c0) / c1`` mod each prime, in NTT form, (k, N)."""
    n = keys.profile.poly_modulus_degree
    k = int(ciphertext.coeff_modulus_size())
    c = _coefficients(ciphertext, 2 * k, n)
    c0, c1 = c[:k], c[k:]
    seal = keys.seal()
    half = n // 2
    slots = released[:half] + 1j * released[half:n]
    plain = seal.sealapi.Plaintext()
    seal.encoder.encode(slots.tolist(), float(ciphertext.scale), plain)
    m = _coefficients(plain, k, n)
    s = np.empty((k, n), dtype=object)
    for i, q in enumerate(_moduli(keys)[:k]):
        for j in range(n):
            s[i, j] = (m[i, j] - c0[i, j]) * pow(int(c1[i, j]), -1, q) % q
    return s


def decrypt_with(keys, ciphertext, s: np.ndarray) -> np.ndarray:
    """Decrypt a packed ciphertext with a recovered key; return its N reals."""
    n = keys.profile.poly_modulus_degree
    k = int(ciphertext.coeff_modulus_size())
    c = _coefficients(ciphertext, 2 * k, n)
    m = np.empty((k, n), dtype=object)
    for i, q in enumerate(_moduli(keys)[:k]):
        m[i] = (c[i] + c[k + i] * s[i]) % q
    plain = _plaintext(keys, m, ciphertext.parms_id(), float(ciphertext.scale))
    slots = np.asarray(keys.seal().encoder.decode_complex(plain))
    return np.concatenate([slots.real, slots.imag])


def true_key(keys_dir: Path, k: int, n: int) -> np.ndarray:
    secret = load_keys(keys_dir / SECRET_FILE)
    return _coefficients(secret.context.secret_key().data.data(), k, n)


def server_view(grid: CuriousGrid):
    """What the server saw: the encrypted sum, the release, one client's update.

    Returns the released values times the released total weight (what the first
    ciphertext of the sum decrypted to, if the release is exact), the first
    ciphertext of the sum and of client 3's update, and client 3's weight
    (its plaintext ``num-examples`` over the announced weight unit).
    """

    def is_request(m: Message) -> bool:
        config = m.content.config_records.get("config")
        return config is not None and config.get("ckks-decrypt-request") is True

    request = next(m for m in grid.sent if is_request(m))

    def is_release(m: Message) -> bool:
        metrics = m.content.metric_records.get("metrics", {})
        return not m.has_error() and "ckks-total-weight" in metrics

    def is_victims_update(m: Message) -> bool:
        if m.metadata.src_node_id != 3 or m.has_error():
            return False
        return "ckks-meta" in m.content["arrays"]

    answer = next(m for m in grid.received if is_release(m))
    victim = next(m for m in grid.received if is_victims_update(m))
    average = answer.content["arrays"]
    manifest = Manifest.from_arrayrecord(average)
    vector, _ = flatten(average, manifest)
    total_weight = float(answer.content["metrics"]["ckks-total-weight"])
    summed = request.content["arrays"]["ckks-00000"].data
    individual = victim.content["arrays"]["ckks-00000"].data
    instruction = next(m for m in grid.sent if m.metadata.dst_node_id == 3)
    unit = float(instruction.content["config"]["ckks-weight-unit"])
    weight = float(victim.content["metrics"]["num-examples"]) / unit
    return vector * total_weight, summed, individual, weight


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_server_cannot_recover_the_key_from_the_decrypted_aggregate(keys_dir, dtype):
    grid = run_one_round(keys_dir, dtype)
    released, summed, individual, weight = server_view(grid)
    server = load_keys(keys_dir / SERVER_FILE)
    n = server.profile.poly_modulus_degree
    total = _load_ciphertext(server, summed)
    k = int(total.coeff_modulus_size())
    s = solve_key(server, total, released[:n])

    matches = float(np.mean(s == true_key(keys_dir, k, n)))
    guess = decrypt_with(server, _load_ciphertext(server, individual), s) / weight
    truth = update_of(3 - 1, dtype).ravel()[:n].astype(np.float64)
    error = float(np.max(np.abs(guess - truth)))
    # Recovered nothing: (almost) no key coefficient right, and the "decryption"
    # of client 3's update is noise many orders of magnitude above the update.
    assert matches < 0.01, f"{matches:.1%} of the key's NTT coefficients recovered"
    assert not np.isfinite(error) or error > 1e3 * float(np.max(np.abs(truth))), (
        f"client 3's update decrypted with the recovered key to within {error:g}"
    )


def test_the_attack_recovers_the_key_from_an_exact_decryption(keys_dir):
    """Positive control: fed the exact ``m + e``, the solver finds every coefficient."""
    grid = run_one_round(keys_dir, np.float64)
    _, summed, individual, weight = server_view(grid)
    server = load_keys(keys_dir / SERVER_FILE)
    secret = load_keys(keys_dir / SECRET_FILE)
    n = server.profile.poly_modulus_degree
    total = _load_ciphertext(server, summed)
    k = int(total.coeff_modulus_size())
    exact = secret.seal().sealapi.Plaintext()
    secret.seal().decryptor.decrypt(_load_ciphertext(secret, summed), exact)
    m_plus_e = _coefficients(exact, k, n)
    c = _coefficients(total, 2 * k, n)
    s = np.empty((k, n), dtype=object)
    for i, q in enumerate(_moduli(server)[:k]):
        for j in range(n):
            s[i, j] = (m_plus_e[i, j] - c[i, j]) * pow(int(c[k + i, j]), -1, q) % q
    assert np.array_equal(s, true_key(keys_dir, k, n))
    guess = decrypt_with(server, _load_ciphertext(server, individual), s) / weight
    np.testing.assert_allclose(guess, update_of(2, np.float64).ravel()[:n], atol=1e-6)
