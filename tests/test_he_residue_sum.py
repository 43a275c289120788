"""The residue sum (the server's secure-sum primitive) against SEAL itself.

The server no longer loads ``packed`` ciphertexts into SEAL: it parses SEAL's bytes
and adds residues with numpy (:mod:`flwr_ext.he.residue_sum`). These tests check
that (1) the sum is SEAL's sum, residue for residue, through the lazy modular
reduction; (2) every ciphertext SEAL's ``load`` plus the profile checks refused is
refused here too, in particular a well-formed ciphertext with one residue ``>= q``
(SEAL's ``is_valid_for``); (3) a refused reply leaves the sum exactly as it was;
(4) the chunk digest is what its docstring says. Real SEAL ciphertexts throughout.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from flwr_ext.he import (
    CiphertextSum,
    InvalidCiphertextError,
    create_keys,
    encrypt_record,
    load_keys,
)
from flwr_ext.he.codec import EncryptedHeader, chunk_digest, chunks, pack
from flwr_ext.he.residue_sum import CiphertextLevel, ResidueSum
from flwr_ext.he.seal_raw import SealFormatError, parse_ciphertext
from flwr_ext.he.wire import CiphertextError, get_wire

N = 8192
#: Offset of the first residue in SEAL's uncompressed ciphertext bytes: object
#: header 16, parms_id 32, metadata 41, the data array's header 16 and count 8.
RESIDUES = 113


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    files = create_keys(tmp_path_factory.mktemp("default"), "default")
    return load_keys(files.secret), load_keys(files.server)


def _update(secret, seed: int) -> ArrayRecord:
    """A 20,000-value update: three ciphertexts in wire ``packed``."""
    values = np.random.default_rng(seed).uniform(-1, 1, 20_000)
    return encrypt_record(
        ArrayRecord({"w": Array(values)}), secret, 1.0, num_clients=32
    )


def _seal_sum(server, records: list[ArrayRecord]) -> np.ndarray:
    """The same sum computed by SEAL's own evaluator: ``(chunks, 2, k, N)``."""
    wire = get_wire("packed")
    total = None
    for record in records:
        blobs = chunks(record, EncryptedHeader.from_record(record))
        loaded = [wire.load(server, blob, N) for blob in blobs]
        if total is None:
            total = loaded
        else:
            for acc, ciphertext in zip(total, loaded, strict=True):
                server.seal().evaluator.add_inplace(acc, ciphertext)
    assert total is not None
    return np.stack(
        [
            parse_ciphertext(blob, expected_k=2, expected_n=N).polys
            for blob in wire.dump(server, total)
        ]
    )


def _summed(total: CiphertextSum) -> np.ndarray:
    result = total.result()
    assert result is not None
    return np.stack(
        [
            parse_ciphertext(blob, expected_k=2, expected_n=N).polys
            for blob in chunks(result, EncryptedHeader.from_record(result))
        ]
    )


def _tamper_last(record: ArrayRecord, edit) -> ArrayRecord:
    """Edit the last chunk's bytes; the digest is recomputed (it proves nothing)."""
    header = EncryptedHeader.from_record(record)
    blobs = chunks(record, header)
    data = bytearray(blobs[-1])
    edit(data)
    blobs[-1] = bytes(data)
    return pack(header, blobs)


def _seal_refuses(server, blob: bytes) -> bool:
    """What the server did before: SEAL's load plus the profile checks."""
    try:
        get_wire("packed").load(server, blob, N)
    except CiphertextError:
        return True
    return False


def test_residue_sum_is_seals_sum_through_lazy_reduction_and_a_rollback(keys):
    """40 updates (far more than the 16 unreduced terms a uint64 holds: their
    residues add up to about 20 q > 2^64), one refused half-way after 17: the
    result equals SEAL's sum of the 40 good ones exactly."""
    secret, server = keys
    good = [_update(secret, seed) for seed in range(20)] * 2
    bad = _tamper_last(_update(secret, 99), lambda d: d.__setitem__(-1, 0xFF))
    total = CiphertextSum(server, None, "packed")
    for index, record in enumerate(good):
        total.add(record, f"node {index}")
        if index == 16:
            with pytest.raises(InvalidCiphertextError, match=r"node 99.*range"):
                total.add(bad, "node 99")
    assert total.count == 40
    np.testing.assert_array_equal(_summed(total), _seal_sum(server, good))


@pytest.mark.parametrize("poly", [0, 1])
@pytest.mark.parametrize("prime", [0, 1])
@pytest.mark.parametrize("value", ["q", "2^64-1"])
def test_a_residue_out_of_range_is_refused_with_an_exact_rollback(
    keys, poly, prime, value
):
    """The attack: a well-formed ciphertext (right level, scale, sizes, digest)
    with one residue >= its prime. SEAL's load refused it; so must the sum, and
    the chunks of that reply already added must be subtracted again exactly."""
    secret, server = keys
    q = [int(m.value()) for m in server.seal().context.first_context_data().parms()
         .coeff_modulus()]  # fmt: skip
    residue = q[prime] if value == "q" else 2**64 - 1
    offset = RESIDUES + 8 * ((poly * 2 + prime) * N + 1234)

    def edit(data: bytearray) -> None:
        data[offset : offset + 8] = struct.pack("<Q", residue)

    records = [_update(secret, seed) for seed in range(3)]
    bad = _tamper_last(records[2], edit)
    assert _seal_refuses(server, chunks(bad, EncryptedHeader.from_record(bad))[-1])
    total = CiphertextSum(server, None, "packed")
    total.add(records[0], "node 1")
    total.add(records[1], "node 2")
    with pytest.raises(
        InvalidCiphertextError, match=f"node 3.*range for prime {prime}"
    ):
        total.add(bad, "node 3")
    assert total.count == 2
    np.testing.assert_array_equal(_summed(total), _seal_sum(server, records[:2]))
    # the first reply refused: nothing summed, nothing kept
    fresh = CiphertextSum(server, None, "packed")
    with pytest.raises(InvalidCiphertextError, match="range"):
        fresh.add(bad, "node 3")
    assert fresh.count == 0 and fresh.result() is None


def _field(offset: int, fmt: str, value):
    def edit(data: bytearray) -> None:
        struct.pack_into(fmt, data, offset, value)

    return edit


TAMPERED = {
    "parms_id": _field(16, "<Q", 12345),
    "not NTT": _field(48, "<B", 0),
    "3 polynomials": _field(49, "<Q", 3),
    "degree 4096": _field(57, "<Q", 4096),
    "1 prime": _field(65, "<Q", 1),
    "scale 2^40": _field(73, "<d", 2.0**40),
    "correction factor 2": _field(81, "<Q", 2),
    "residue count": _field(105, "<Q", 2 * 2 * N - 1),
    "not SEAL": _field(0, "<H", 0xBEEF),
    "truncated": lambda d: d.__delitem__(slice(-8, None)),
    "one word more": lambda d: d.extend(b"\0" * 8),
}


@pytest.mark.parametrize("damage", sorted(TAMPERED))
def test_whatever_seal_refused_the_residue_sum_refuses(keys, damage):
    """Every ciphertext SEAL's load plus the profile checks refused (the server's
    checks before the residue sum) is refused, with a valid digest, and the sum
    is untouched."""
    secret, server = keys
    records = [_update(secret, seed) for seed in range(2)]
    bad = _tamper_last(records[1], TAMPERED[damage])
    blob = chunks(bad, EncryptedHeader.from_record(bad))[-1]
    level = CiphertextLevel.of_context(server.seal().context, server.profile.scale)
    total = ResidueSum(level, 3)
    with pytest.raises(CiphertextError):
        total.check(blob, "the ciphertext")
    # SEAL ignores bytes after the size its header declares; here a chunk is
    # exactly one ciphertext
    assert _seal_refuses(server, blob) == (damage != "one word more")
    good = CiphertextSum(server, None, "packed")
    good.add(records[0], "node 1")
    with pytest.raises(InvalidCiphertextError, match="node 2"):
        good.add(bad, "node 2")
    np.testing.assert_array_equal(_summed(good), _seal_sum(server, records[:1]))


def test_the_untouched_ciphertext_passes_both(keys):
    secret, server = keys
    record = _update(secret, 5)
    blob = chunks(record, EncryptedHeader.from_record(record))[-1]
    level = CiphertextLevel.of_context(server.seal().context, server.profile.scale)
    assert not _seal_refuses(server, blob)
    ResidueSum(level, 3).check(blob, "the ciphertext")


def _reference_digest(data: bytes) -> int:
    padded = data + b"\0" * (-len(data) % 8)
    words = struct.unpack(f"<{len(padded) // 8}Q", padded)
    return (len(data) + sum((2 * (i % 2**18) + 1) * w for i, w in enumerate(words))) % (
        2**64
    )


@pytest.mark.parametrize("length", [0, 1, 7, 8, 9, 1000, 262_257])
def test_chunk_digest_is_its_formula(length):
    data = np.random.default_rng(length).bytes(length)
    assert chunk_digest(data) == _reference_digest(data)
    assert chunk_digest(memoryview(data)) == _reference_digest(data)


def test_the_digest_catches_swapped_words_and_bit_flips(keys):
    """A plain sum of the words would miss two words exchanging places."""
    secret, server = keys
    record = _update(secret, 7)
    header = EncryptedHeader.from_record(record)
    blob = bytearray(chunks(record, header)[-1])
    a, b = RESIDUES + 8 * 10, RESIDUES + 8 * 5000
    swapped = bytearray(blob)
    swapped[a : a + 8], swapped[b : b + 8] = blob[b : b + 8], blob[a : a + 8]
    assert swapped != blob
    assert chunk_digest(bytes(swapped)) != chunk_digest(bytes(blob))
    flipped = bytearray(blob)
    flipped[RESIDUES + 3] ^= 0x10
    assert chunk_digest(bytes(flipped)) != chunk_digest(bytes(blob))
    arrays = dict(record.items())
    key = f"ckks-{header.num_chunks - 1:05d}"
    arrays[key] = Array("uint8", (len(swapped),), arrays[key].stype, bytes(swapped))
    total = CiphertextSum(server, None, "packed")
    with pytest.raises(InvalidCiphertextError, match="digest mismatch"):
        total.add(ArrayRecord(arrays), "node 4")


@pytest.mark.parametrize("mode", [1, 2])
def test_a_compression_bomb_is_refused_before_it_expands(mode):
    """A SEAL header announcing zlib (1) or zstd (2) over 64 MiB of zeros: the
    parser stops at the size a ciphertext of the expected shape takes."""
    import zlib

    import zstandard

    zeros = b"\0" * (64 << 20)
    body = zlib.compress(zeros, 9) if mode == 1 else zstandard.compress(zeros, 19)
    blob = struct.pack("<HBBBBHQ", 0xA15E, 16, 4, 1, mode, 0, 16 + len(body)) + body
    assert len(blob) < 1 << 20
    with pytest.raises(SealFormatError, match="size limit"):
        parse_ciphertext(blob, expected_k=2, expected_n=N)
