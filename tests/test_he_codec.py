"""The CKKS codec, the three wire formats, the streaming sum and encrypted model files.

Real TenSEAL/SEAL ciphertexts throughout; keys are created once per module.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from flwr_ext.cli import main
from flwr_ext.he import (
    BoundExceededError,
    CiphertextSum,
    InvalidCiphertextError,
    KeyMismatchError,
    create_keys,
    decrypt_model_file,
    decrypt_record,
    encrypt_record,
    is_encrypted,
    load_encrypted_model,
    load_keys,
    save_encrypted_model,
)
from flwr_ext.he.codec import (
    META_KEY,
    STYPE_CIPHERTEXT,
    EncryptedHeader,
    chunks,
    iter_chunks,
    pack,
)
from flwr_ext.records import Manifest

WIRES = ["packed", "tenseal", "seeded"]


@pytest.fixture(scope="module")
def keysets(tmp_path_factory):
    out = {}
    for profile in ("default", "compact"):
        files = create_keys(tmp_path_factory.mktemp(profile), profile)
        out[profile] = (load_keys(files.secret), load_keys(files.server), files)
    return out


def model(rng: np.random.Generator, scale: float = 1.0) -> ArrayRecord:
    """Three arrays of mixed dtypes; 9801 values: several ciphertexts in every
    profile and wire format (at most 8192 values per ciphertext)."""
    return ArrayRecord(
        {
            "conv.weight": Array((rng.standard_normal((80, 120)) * scale).astype("f4")),
            "fc.bias": Array((rng.standard_normal(200) * scale).astype(np.float64)),
            "bn.num_batches_tracked": Array(np.array(7, dtype=np.int64)),
        }
    )


def weighted_average(records, weights):
    total = sum(weights)
    return {
        key: sum(
            w * r[key].numpy().astype(np.float64)
            for r, w in zip(records, weights, strict=True)
        )
        / total
        for key in records[0]
    }


@pytest.mark.parametrize("profile", ["default", "compact"])
@pytest.mark.parametrize("wire", WIRES)
def test_sum_of_encrypted_updates_decrypts_to_weighted_average(keysets, profile, wire):
    secret, server, _ = keysets[profile]
    rng = np.random.default_rng(1)
    records = [model(rng) for _ in range(3)]
    weights = [0.5, 1.0, 2.5]
    total = CiphertextSum(server, None, wire)
    for record, weight in zip(records, weights, strict=True):
        encrypted = encrypt_record(record, secret, weight, num_clients=3, wire=wire)
        total.add(encrypted, "test")
    result = total.result()
    assert EncryptedHeader.from_record(result).kind == "model"
    decrypted = decrypt_record(result, secret)
    assert decrypted.contributions == 3
    assert decrypted.total_weight == pytest.approx(4.0, abs=1e-6)
    expected = weighted_average(records, weights)
    # Same keys, same order, same shapes and dtypes as the plaintext model.
    assert list(decrypted.arrays.keys()) == list(records[0].keys())
    for key, array in decrypted.arrays.items():
        value = array.numpy()
        assert value.dtype == records[0][key].numpy().dtype
        assert value.shape == records[0][key].numpy().shape
        tolerance = 1e-5 if value.dtype == np.float32 else 1e-6
        np.testing.assert_allclose(value, expected[key], atol=tolerance, rtol=0)
    assert int(decrypted.arrays["bn.num_batches_tracked"].numpy()) == 7


@pytest.mark.parametrize("profile", ["default", "compact"])
@pytest.mark.parametrize("wire", WIRES)
def test_ten_clients_within_ten_stay_within_1e_minus_6(keysets, profile, wire):
    """The issue's accuracy target: 10 clients, |x| <= 10, max abs error <= 1e-6."""
    secret, server, _ = keysets[profile]
    rng = np.random.default_rng(2)
    vectors = [rng.uniform(-10, 10, 20_000) for _ in range(10)]
    total = CiphertextSum(server, None, wire)
    for vector in vectors:
        record = ArrayRecord({"x": Array(vector)})
        encrypted = encrypt_record(record, secret, 1.0, num_clients=10, wire=wire)
        total.add(encrypted, "client")
    decrypted = decrypt_record(total.result(), secret).arrays["x"].numpy()
    assert np.abs(decrypted - np.mean(vectors, axis=0)).max() <= 1e-6


@pytest.mark.parametrize("wire", WIRES)
def test_encrypted_record_carries_only_ciphertexts_and_a_header(keysets, wire):
    secret, _, files = keysets["default"]
    record = model(np.random.default_rng(3))
    encrypted = encrypt_record(record, secret, 1.0, wire=wire)
    assert is_encrypted(encrypted) and not is_encrypted(record)
    header = EncryptedHeader.from_record(encrypted)
    assert header.fingerprint == secret.fingerprint
    assert header.profile == "default"
    assert header.manifest == Manifest.from_arrayrecord(record)
    # meta + ciphertext chunks, nothing else; no context, no key on the wire
    assert next(iter(encrypted.keys())) == META_KEY
    assert {a.stype for k, a in encrypted.items() if k != META_KEY} == {
        STYPE_CIPHERTEXT
    }
    meta = json.loads(encrypted[META_KEY].data)
    assert set(meta) == {
        "format", "kind", "profile", "fingerprint", "wire", "manifest",
        "num_chunks", "decryptor", "digest",
    }  # fmt: skip
    secret_bytes = files.secret.read_bytes()[-4096:]
    server_bytes = files.server.read_bytes()[-64:]
    for array in encrypted.values():
        assert secret_bytes not in array.data and server_bytes not in array.data


def test_flower_cannot_mistake_ciphertexts_for_plaintext(keysets):
    """Averaging ciphertext bytes (e.g. a bare FedAvg) fails loudly."""
    secret, _, _ = keysets["default"]
    encrypted = encrypt_record(model(np.random.default_rng(4)), secret, 1.0)
    with pytest.raises(TypeError, match="Unsupported serialization type"):
        encrypted.to_numpy_ndarrays()


@pytest.mark.parametrize("profile", ["default", "compact"])
def test_packed_wire_halves_tenseal_and_seeded_halves_packed_uplink(keysets, profile):
    secret, _, _ = keysets[profile]
    record = ArrayRecord({"x": Array(np.random.default_rng(5).normal(size=40_000))})

    def size(wire):
        encrypted = encrypt_record(record, secret, 1.0, wire=wire)
        return sum(len(a.data) for a in encrypted.values())

    # two reals per slot: half the ciphertexts of one TenSEAL vector per N/2 values
    assert size("packed") < 0.55 * size("tenseal")
    # a seed instead of the second polynomial
    assert size("seeded") < 0.55 * size("packed")


@pytest.mark.parametrize("profile", ["default", "compact"])
def test_values_beyond_the_bound_fail_before_encryption(keysets, profile):
    secret, _, _ = keysets[profile]
    bound = secret.profile.bound
    ok = ArrayRecord({"x": Array(np.full(10, bound / 4 * 0.99))})
    encrypt_record(ok, secret, 1.0, num_clients=4)
    too_big = ArrayRecord({"x": Array(np.full(10, bound / 4 * 1.01))})
    with pytest.raises(BoundExceededError) as info:
        encrypt_record(too_big, secret, 1.0, num_clients=4)
    message = str(info.value)
    assert "per-client budget" in message and "weight_unit" in message
    # the weight counts too: the same values with weight 2 overflow
    with pytest.raises(BoundExceededError):
        encrypt_record(ok, secret, 2.0, num_clients=4)


def test_nan_and_bad_weights_are_refused(keysets):
    secret, _, _ = keysets["default"]
    with pytest.raises(BoundExceededError, match="NaN or Inf"):
        encrypt_record(ArrayRecord({"x": Array(np.array([1.0, np.nan]))}), secret, 1.0)
    record = ArrayRecord({"x": Array(np.ones(3))})
    for weight in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite and > 0"):
            encrypt_record(record, secret, weight)


def test_server_context_cannot_encrypt_or_decrypt(keysets):
    secret, server, _ = keysets["default"]
    record = ArrayRecord({"x": Array(np.ones(3))})
    with pytest.raises(ValueError, match="no secret key"):
        encrypt_record(record, server, 1.0)
    with pytest.raises(ValueError, match="no secret key"):
        decrypt_record(encrypt_record(record, secret, 1.0), server)


def test_wrong_key_and_wrong_profile_name_both_fingerprints(keysets, tmp_path):
    secret, server, _ = keysets["default"]
    other = load_keys(create_keys(tmp_path, "default").secret)
    encrypted = encrypt_record(ArrayRecord({"x": Array(np.ones(3))}), other, 1.0)
    for holder in (secret, server):
        with pytest.raises(KeyMismatchError) as info:
            if holder.has_secret:
                decrypt_record(encrypted, holder)
            else:
                CiphertextSum(holder, None, "packed").add(encrypted, "node 3")
        assert other.fingerprint in str(info.value)
        assert holder.fingerprint in str(info.value)
    _, compact_server, _ = keysets["compact"]
    encrypted = encrypt_record(ArrayRecord({"x": Array(np.ones(3))}), secret, 1.0)
    with pytest.raises(KeyMismatchError, match=r"profile 'default'.*profile 'compact'"):
        CiphertextSum(compact_server, None, "packed").add(encrypted, "node 3")


def _replace_chunk(
    record: ArrayRecord, index: int, data: bytes, fix_checksum: bool = False
) -> ArrayRecord:
    """Swap one ciphertext; with ``fix_checksum`` the header's digest matches it."""
    header = EncryptedHeader.from_record(record)
    blobs = chunks(record, header)
    blobs[index] = data
    if fix_checksum:
        return pack(header, blobs)
    arrays = dict(record.items())
    arrays[f"ckks-{index:05d}"] = Array("uint8", (len(data),), STYPE_CIPHERTEXT, data)
    return ArrayRecord(arrays)


@pytest.mark.parametrize("wire", WIRES)
@pytest.mark.parametrize(
    "damage", ["truncate", "flip", "empty", "swap-profile", "truncate-digest-ok"]
)
def test_damaged_reply_is_rejected_without_touching_the_sum(keysets, wire, damage):
    secret, server, _ = keysets["default"]
    rng = np.random.default_rng(6)
    records = [model(rng) for _ in range(3)]
    encrypted = [encrypt_record(r, secret, 1.0, num_clients=3, wire=wire)
                 for r in records]  # fmt: skip
    last = EncryptedHeader.from_record(encrypted[2]).num_chunks - 1
    blob = encrypted[2][f"ckks-{last:05d}"].data
    if damage == "truncate":
        bad = _replace_chunk(encrypted[2], last, blob[: len(blob) // 2])
    elif damage == "flip":
        flipped = bytearray(blob)
        flipped[len(flipped) // 2] ^= 0xFF
        bad = _replace_chunk(encrypted[2], last, bytes(flipped))
    elif damage == "truncate-digest-ok":  # SEAL itself must reject it
        bad = _replace_chunk(
            encrypted[2], last, blob[: len(blob) - 64], fix_checksum=True
        )
    elif damage == "empty":
        bad = _replace_chunk(encrypted[2], last, b"")
    else:  # a well-formed ciphertext of the other profile
        compact_secret = keysets["compact"][0]
        foreign = encrypt_record(
            ArrayRecord({"x": Array(np.ones(3))}), compact_secret, 1.0, wire=wire
        )
        bad = _replace_chunk(
            encrypted[2], last, foreign["ckks-00000"].data, fix_checksum=True
        )
    total = CiphertextSum(server, None, wire)
    total.add(encrypted[0], "node 1")
    total.add(encrypted[1], "node 2")
    with pytest.raises(InvalidCiphertextError, match="node 3"):
        total.add(bad, "node 3")
    assert total.count == 2
    decrypted = decrypt_record(total.result(), secret)
    expected = weighted_average(records[:2], [1.0, 1.0])
    np.testing.assert_allclose(
        decrypted.arrays["fc.bias"].numpy(), expected["fc.bias"], atol=1e-6
    )


def test_structural_damage_is_reported(keysets):
    secret, server, _ = keysets["default"]
    encrypted = encrypt_record(model(np.random.default_rng(7)), secret, 1.0)
    arrays = dict(encrypted.items())
    del arrays["ckks-00001"]
    with pytest.raises(InvalidCiphertextError, match="chunks"):
        EncryptedHeader.from_record(ArrayRecord(arrays))
    arrays = dict(encrypted.items())
    arrays[META_KEY] = Array("uint8", (3,), arrays[META_KEY].stype, b"{x]")
    with pytest.raises(InvalidCiphertextError, match="corrupted"):
        EncryptedHeader.from_record(ArrayRecord(arrays))
    plain = model(np.random.default_rng(7))
    with pytest.raises(InvalidCiphertextError, match="ckks_mod"):
        EncryptedHeader.from_record(plain)
    # another model structure than the round's global model
    other = encrypt_record(ArrayRecord({"x": Array(np.ones(3))}), secret, 1.0)
    total = CiphertextSum(server, Manifest.from_arrayrecord(plain), "packed")
    with pytest.raises(InvalidCiphertextError, match="different structure"):
        total.add(other, "node 9")
    # a wire format other than the round's
    with pytest.raises(InvalidCiphertextError, match="wire format"):
        CiphertextSum(server, None, "seeded").add(encrypted, "node 9")


@pytest.mark.parametrize("wire", WIRES)
def test_native_code_prints_nothing_to_stdout(keysets, capfd, wire):
    secret, server, _ = keysets["compact"]
    record = ArrayRecord({"x": Array(np.random.default_rng(8).normal(size=30_000))})
    total = CiphertextSum(server, None, wire)
    total.add(encrypt_record(record, secret, 1.0, wire=wire), "n")
    decrypt_record(total.result(), secret)
    captured = capfd.readouterr()
    assert captured.out == ""


def test_encrypted_model_file_round_trip_and_cli_decrypt(keysets, tmp_path, capsys):
    secret, server, files = keysets["default"]
    rng = np.random.default_rng(9)
    records = [model(rng) for _ in range(2)]
    total = CiphertextSum(server, None, "packed")
    for record in records:
        total.add(encrypt_record(record, secret, 3.0, num_clients=2), "n")
    path = save_encrypted_model(total.result(), tmp_path / "final.ckks-model")
    assert is_encrypted(load_encrypted_model(path))
    decrypted = decrypt_model_file(path, files.secret)
    expected = weighted_average(records, [1.0, 1.0])
    np.testing.assert_allclose(
        decrypted.arrays["conv.weight"].numpy(), expected["conv.weight"], atol=1e-5
    )
    out = tmp_path / "final.npz"
    code = main(["keys", "decrypt", str(path), "--context", str(files.secret),
                 "--out", str(out)])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    with np.load(out) as npz:
        assert list(npz.keys()) == list(records[0].keys())
        np.testing.assert_allclose(npz["fc.bias"], expected["fc.bias"], atol=1e-6)
        assert npz["conv.weight"].dtype == np.float32
    # the server's context cannot decrypt it
    assert main(["keys", "decrypt", str(path), "--context", str(files.server),
                 "--out", str(out)]) == 2  # fmt: skip
    assert "secret-context.ckks" in capsys.readouterr().err
    # a truncated file is a clear error
    (tmp_path / "cut").write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated"):
        load_encrypted_model(tmp_path / "cut")
    with pytest.raises(ValueError, match=r"plaintext|ckks_mod"):
        save_encrypted_model(records[0], tmp_path / "plain.ckks-model")


def test_a_failed_addition_half_way_is_rolled_back_exactly(keysets):
    """A well-formed ciphertext at another scale loads; SEAL refuses to add it.

    It is the *last* chunk, so every earlier chunk was already added when the
    addition fails: they must be subtracted again, leaving the sum untouched.
    """
    import tenseal as ts

    secret, server, _ = keysets["default"]
    rng = np.random.default_rng(10)
    records = [model(rng) for _ in range(3)]
    encrypted = [
        encrypt_record(r, secret, 1.0, num_clients=3, wire="tenseal") for r in records
    ]
    header = EncryptedHeader.from_record(encrypted[2])
    blobs = chunks(encrypted[2], header)
    last_size = header.num_values - secret.profile.slots * (len(blobs) - 1)
    other_scale = secret.context.copy()
    other_scale.global_scale = 2**30
    blobs[-1] = ts.ckks_vector(other_scale, np.zeros(last_size)).serialize()
    bad = pack(header, blobs)  # valid checksums: only SEAL can object
    total = CiphertextSum(server, None, "tenseal")
    total.add(encrypted[0], "node 1")
    total.add(encrypted[1], "node 2")
    with pytest.raises(InvalidCiphertextError, match=r"node 3.*cannot be added"):
        total.add(bad, "node 3")
    assert total.count == 2
    decrypted = decrypt_record(total.result(), secret)
    assert decrypted.contributions == 2
    expected = weighted_average(records[:2], [1.0, 1.0])
    for key in ("conv.weight", "fc.bias"):
        np.testing.assert_allclose(
            decrypted.arrays[key].numpy(), expected[key], atol=1e-5
        )


def test_quiet_native_stdout_swallows_tenseal_warnings_and_restores(keysets, capfd):
    """TenSEAL prints to fd 1 for vectors longer than a ciphertext; the guard hides it.

    Uses the warning itself (first without the guard, to show it is real), then
    checks nested enters/exits in non-LIFO order (suspended generators) restore fd 1.
    """
    import tenseal as ts

    from flwr_ext.he._native import quiet_native_stdout

    secret, _, _ = keysets["compact"]
    too_long = np.zeros(secret.profile.slots + 1)
    ts.ckks_vector(secret.context, too_long)
    assert "does not fit in a single ciphertext" in capfd.readouterr().out

    with quiet_native_stdout():
        ts.ckks_vector(secret.context, too_long)
    print("after")
    assert capfd.readouterr().out == "after\n"

    def holder():
        with quiet_native_stdout():
            yield

    first, second = holder(), holder()
    next(first)
    next(second)
    first.close()  # exits before the inner one: fd 1 must stay redirected
    ts.ckks_vector(secret.context, too_long)
    second.close()
    print("restored")
    assert capfd.readouterr().out == "restored\n"


def test_a_flip_in_a_middle_chunk_stops_the_stream_there(keysets):
    secret, _, _ = keysets["default"]
    big = ArrayRecord({"w": Array(np.linspace(-1, 1, 5 * 8192).astype(np.float32))})
    encrypted = encrypt_record(big, secret, 1.0)
    header = EncryptedHeader.from_record(encrypted)
    assert header.num_chunks >= 5
    assert len(chunks(encrypted, header)) == header.num_chunks
    flipped = bytearray(encrypted["ckks-00003"].data)
    flipped[100] ^= 0x01
    bad = _replace_chunk(encrypted, 3, bytes(flipped))
    seen = []
    with pytest.raises(InvalidCiphertextError, match="ciphertext 3 is corrupted"):
        for blob in iter_chunks(bad, header):
            seen.append(blob)
    assert len(seen) == 3


@pytest.mark.parametrize("wire", ["packed", "seeded"])
def test_raw_seal_wires_leave_no_scratch_file_behind(keysets, wire):
    """sealapi moves bytes through private temporary files; none may outlive a call,
    not even when a reply is rejected half-way."""
    from flwr_ext.he.wire import _ScratchFile

    scratch = _ScratchFile()
    directory = Path(scratch.path).parent
    assert Path(scratch.path).stat().st_mode & 0o777 == 0o600
    scratch.write(b"0123456789")
    scratch.write(b"abc")  # shorter: the file must shrink, not keep a tail
    assert Path(scratch.path).read_bytes() == b"abc"
    scratch.close()
    assert not Path(scratch.path).exists()

    mine = f"flwr-ext-ckks-{os.getpid()}-*"  # other processes may run beside us
    before = set(directory.glob(mine))
    secret, server, _ = keysets["default"]
    rng = np.random.default_rng(11)
    good = encrypt_record(model(rng), secret, 1.0, num_clients=2, wire=wire)
    header = EncryptedHeader.from_record(good)
    blob = good["ckks-00001"].data
    bad = _replace_chunk(good, 1, blob[: len(blob) // 2], fix_checksum=True)
    total = CiphertextSum(server, None, wire)
    total.add(good, "node 1")
    with pytest.raises(InvalidCiphertextError, match="node 2"):
        total.add(bad, "node 2")
    decrypt_record(total.result(), secret)
    assert header.num_chunks > 1
    assert set(directory.glob(mine)) == before


@pytest.mark.parametrize("profile", ["default", "compact"])
def test_packed_ciphertexts_travel_uncompressed_only_when_zstd_stored_raw_blocks(
    keysets, profile
):
    """60-bit residues do not compress: send them without zstd's frame.

    SEAL saves with zstd, which keeps random residues as raw blocks; the packed
    wire unwraps them (SEAL loads the result about twice as fast). ``compact``'s
    47-bit residues do compress, and stay compressed.
    """
    from flwr_ext.he.seal_raw import uncompressed
    from flwr_ext.he.wire import get_wire

    secret, server, _ = keysets[profile]
    values = np.random.default_rng(5).uniform(-1, 1, 3000)
    blobs = get_wire("packed").encrypt(secret, values)
    mode = blobs[0][5]  # SEAL header byte 5: 0 = none, 2 = zstd
    assert mode == (0 if profile == "default" else 2)
    assert all(uncompressed(blob) == blob for blob in blobs)  # nothing left to do
    total = CiphertextSum(server, None, "packed")
    record = ArrayRecord({"x": Array(values)})
    total.add(encrypt_record(record, secret, 1.0, wire="packed"), "c")
    decrypted = decrypt_record(total.result(), secret)
    np.testing.assert_allclose(decrypted.arrays["x"].numpy(), values, atol=1e-5)
    # Truncated or foreign frames are returned unchanged, never half-parsed.
    assert uncompressed(b"\x5e\xa1" + b"\x00" * 30) == b"\x5e\xa1" + b"\x00" * 30
    zstd_header = bytearray(blobs[0][:16])
    zstd_header[5] = 2
    broken = bytes(zstd_header) + b"\x28\xb5\x2f\xfd\xa0\x00"
    assert uncompressed(broken) == broken
