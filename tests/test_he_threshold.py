"""Multiparty CKKS primitives (flwr_ext.he.threshold): real SEAL, real flooding.

Correctness against plaintext sums, NTT equality with SEAL's own transform, and the
security properties a curious server or colluding sites could break: any n - 1
shares decrypt nothing, the Li-Micciancio key recovery works on unflooded shares
(so the test can fail) and recovers nothing from flooded ones, shares bound to their
ciphertext, replays refused, the decryption budget enforced, share files private.
"""

from __future__ import annotations

import contextlib
import os
import stat

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flwr_ext.he import threshold as T  # noqa: N812
from flwr_ext.he.rns import (
    centered,
    modmul,
    reduce_signed,
    sample_gaussian_residues,
)
from flwr_ext.he.seal_raw import (
    SealFormatError,
    ciphertext_bytes,
    parse_ciphertext,
    uncompressed,
)
from flwr_ext.he.wire import _scratch_file

NUM_SITES = 3
NUM_CLIENTS = 10
NUM_VALUES = 9000  # two ciphertexts at N = 8192


@pytest.fixture(scope="module")
def context() -> T.ThresholdContext:
    return T.ThresholdContext()


@pytest.fixture(scope="module")
def federation(context):
    """Three sites, a collective key, ten clients' encrypted vectors and their sum."""
    a = T.common_polynomial(context, os.urandom(32))
    sites = [T.SecretShare.generate(context) for _ in range(NUM_SITES)]
    public_key = T.collective_public_key(context, a, [s.public_share(a) for s in sites])
    encryptor = T.encryptor(context, public_key)
    rng = np.random.default_rng(7)
    clients = [rng.uniform(-10, 10, NUM_VALUES) for _ in range(NUM_CLIENTS)]
    encrypted = [T.encrypt_values(context, encryptor, v) for v in clients]
    evaluator = context.sealapi.Evaluator(context.context)
    aggregate = []
    with _scratch_file() as scratch:
        for j in range(len(encrypted[0])):
            total = _load(context, scratch, encrypted[0][j])
            for blobs in encrypted[1:]:
                evaluator.add_inplace(total, _load(context, scratch, blobs[j]))
            total.save(scratch.path)
            aggregate.append(scratch.read())
    return {
        "sites": sites,
        "clients": clients,
        "encrypted": encrypted,
        "aggregate": aggregate,
        "public_key": public_key,
    }


def _load(context, scratch, blob):
    ciphertext = context.sealapi.Ciphertext()
    scratch.write(blob)
    ciphertext.load(context.context, scratch.path)
    return ciphertext


def _partials(context, blob, sites):
    raw = T.split_ciphertext(context, blob)
    return raw, [s.partial_decrypt(raw.polys[1]) for s in sites]


def _decrypt(context, blobs, sites, count):
    values = []
    for blob in blobs:
        raw, partials = _partials(context, blob, sites)
        slots = T.combine(context, raw, partials, expected_sites=len(sites))
        values.append(T.unpack(slots, context.n))
    return np.concatenate(values)[:count]


def test_ntt_equals_seals_transform(context):
    rng = np.random.default_rng(0)
    coefficients = rng.integers(-1000, 1000, context.n)
    rows = np.stack([reduce_signed(coefficients, q) for q in context.data_moduli])
    raw = ciphertext_bytes(
        context.data_parms_id, np.stack([rows, rows]), ntt_form=False
    )
    evaluator = context.sealapi.Evaluator(context.context)
    with _scratch_file() as scratch:
        ciphertext = _load(context, scratch, raw)
        evaluator.transform_to_ntt_inplace(ciphertext)
        ciphertext.save(scratch.path)
        seal_ntt = parse_ciphertext(
            scratch.read(), expected_k=context.k, expected_n=context.n
        ).polys[0]
    ours = context.data_ntt.forward(rows)
    np.testing.assert_array_equal(ours, seal_ntt)
    np.testing.assert_array_equal(context.data_ntt.inverse(ours), rows)


def test_modmul_is_exact_for_60_bit_primes(context):
    rng = np.random.default_rng(1)
    for q in context.key_moduli:
        a = rng.integers(0, q, 5000, dtype=np.uint64)
        b = rng.integers(0, q, 5000, dtype=np.uint64)
        expected = [int(x) * int(y) % q for x, y in zip(a, b, strict=True)]
        assert modmul(a, b, q).tolist() == expected


def test_the_decrypted_sum_equals_the_plaintext_sum(context, federation):
    decrypted = _decrypt(
        context, federation["aggregate"], federation["sites"], NUM_VALUES
    )
    truth = np.sum(federation["clients"], axis=0)
    # The mean of ten clients within 1e-5 (the bound), |values| <= 10.
    assert np.max(np.abs(decrypted / NUM_CLIENTS - truth / NUM_CLIENTS)) < 1e-5


def test_any_n_minus_1_shares_decrypt_nothing(context, federation):
    blob = federation["aggregate"][0]
    truth = np.sum(federation["clients"], axis=0)[: context.n]
    sites = federation["sites"]
    for missing in range(NUM_SITES):
        present = [s for i, s in enumerate(sites) if i != missing]
        raw, partials = _partials(context, blob, present)
        slots = T.combine(context, raw, partials, expected_sites=len(present))
        garbage = T.unpack(slots, context.n)
        # c0 + c1 (s - s_missing) is uniform mod q: values astronomically far off.
        assert np.median(np.abs(garbage - truth)) > 1e6


def test_combine_names_a_missing_a_foreign_and_a_replayed_share(context, federation):
    blob, other = federation["aggregate"][0], federation["aggregate"][1]
    sites = federation["sites"]
    raw, partials = _partials(context, blob, sites)
    with pytest.raises(T.ThresholdError, match="every site's share is needed"):
        T.combine(context, raw, partials[:2], expected_sites=NUM_SITES)
    foreign = sites[2].partial_decrypt(T.split_ciphertext(context, other).polys[1])
    with pytest.raises(T.ThresholdError, match="another ciphertext"):
        T.combine(context, raw, [*partials[:2], foreign], expected_sites=NUM_SITES)
    with pytest.raises(T.ThresholdError, match="duplicate"):
        T.combine(context, raw, [*partials[:2], partials[0]], expected_sites=NUM_SITES)


def _key_recovery(context, blob, released_poly):
    """Li-Micciancio: s = (m - c0) / c1 in NTT form, from an exact decryption."""
    raw = parse_ciphertext(blob, expected_k=context.k, expected_n=context.n)
    c0, c1 = raw.polys
    q = context.data_moduli[0]
    inverse = np.array([pow(int(x), -1, q) for x in c1[0]], dtype=np.uint64)
    difference = np.where(
        released_poly[0] >= c0[0],
        released_poly[0] - c0[0],
        released_poly[0] + (np.uint64(q) - c0[0]),
    )
    guess_ntt = modmul(difference, inverse, q)
    coefficients = context.data_ntt.inverse(
        np.stack([guess_ntt, np.zeros_like(guess_ntt)])
    )[0]
    return centered(coefficients, q)


def _share_key_coefficients(share):
    return share._coefficients


def test_key_recovery_works_without_flooding_and_fails_with_it(context, federation):
    blob = federation["aggregate"][0]
    sites = federation["sites"]
    raw = parse_ciphertext(blob, expected_k=context.k, expected_n=context.n)
    true_key = sum(_share_key_coefficients(s) for s in sites)
    # One site's partial decryption without flooding: h = c1 * s_i exactly. The
    # attack recovers that site's share from it (the test can fail).
    unflooded = np.stack(
        [
            modmul(raw.polys[1][j], sites[0]._ntt[j], q)
            for j, q in enumerate(context.data_moduli)
        ]
    )
    zero_c0 = np.zeros_like(raw.polys[0])
    recovered = _key_recovery(
        context,
        ciphertext_bytes(context.data_parms_id, np.stack([zero_c0, raw.polys[1]])),
        unflooded,
    )
    np.testing.assert_array_equal(recovered, _share_key_coefficients(sites[0]))
    # The same attack on what the server really receives: a flooded share...
    flooded = sites[0].partial_decrypt(raw.polys[1]).share
    recovered = _key_recovery(
        context,
        ciphertext_bytes(context.data_parms_id, np.stack([zero_c0, raw.polys[1]])),
        flooded,
    )
    assert np.mean(recovered == _share_key_coefficients(sites[0])) < 0.01
    assert np.max(np.abs(recovered)) > 2**40
    # ... and on the released aggregate (c0 + sum of flooded shares).
    _, partials = _partials(context, blob, sites)
    # the server re-encodes the released values: the best it can know of m
    slots = T.combine(context, raw, partials, expected_sites=NUM_SITES)
    plain = context.sealapi.Plaintext()
    context.encoder.encode(slots.tolist(), raw.scale, plain)
    with _scratch_file() as scratch:
        plain.save(scratch.path)
        reencoded = _plaintext_residues(context, scratch.read())
    recovered = _key_recovery(context, blob, reencoded)
    assert np.mean(recovered == true_key) < 0.01


def _plaintext_residues(context, data):
    from flwr_ext.he.seal_raw import _body

    body = _body(data, "plaintext")
    array = _body(body[32 + 16 :], "plaintext data")
    values = np.frombuffer(array, dtype="<u8", offset=8).astype(np.uint64)
    return values.reshape(context.k, context.n)


def test_flooding_is_sized_for_30_bits_and_keeps_1e_5(context):
    profile = context.profile
    assert profile.security_bits >= 30
    sigma = profile.flooding_sigma()
    bound = profile.error_bound()
    n, q = profile.poly_modulus_degree, profile.max_decryptions
    # Pinsker on the Gaussian shift: B sqrt(NQ) / (2 sigma) <= 2^-lambda
    assert bound * np.sqrt(n * q) / (2 * sigma) <= 2.0**-profile.security_bits
    # one decoded value's noise, 10 sites: 5.5 sigma over 1M values stays < 1e-5
    assert 5.5 * profile.value_noise_std(10) < 1e-5
    # 128-bit security: HE standard, N=8192 -> at most 218 bits of modulus
    assert sum(profile.coeff_mod_bit_sizes) <= 218


def test_flood_residues_are_gaussian_with_full_integer_resolution():
    q = (1 << 61) - 1  # a prime above every sample: residues show the integers
    residues = sample_gaussian_residues(200_000, 2.0**58, (q,))[0]
    samples = centered(residues, q)
    # no residue class modulo the float grid is favoured: low bits are uniform
    low = samples & 0xFF
    counts = np.bincount(low.astype(np.int64), minlength=256)
    assert counts.min() > 0.8 * counts.mean()
    assert abs(np.std(samples.astype(np.float64)) / 2.0**58 - 1) < 0.02


@pytest.mark.parametrize("sigma", [0.0, 3.2, 1000.0, 2.0**45, 2.0**61.2, 2.0**70])
def test_flood_residues_are_one_integer_in_every_prime(context, sigma):
    """Each prime's residue comes from the same integer ``f`` (CRT over the data
    primes gives a centred value of Gaussian size, not a random 120-bit one), at
    every step size the split into table entry and low part takes."""
    moduli = context.data_moduli
    residues = sample_gaussian_residues(context.n, sigma, moduli, count=3)
    assert residues.shape == (3, len(moduli), context.n)
    product = int(np.prod([int(q) for q in moduli], dtype=object))
    values = []
    for poly in residues:
        for i in range(0, context.n, 97):  # a sample of coefficients, exact CRT
            total = 0
            for j, q in enumerate(moduli):
                rest = product // q
                total += int(poly[j, i]) * rest * pow(rest, -1, q)
            total %= product
            values.append(total - product if total > product // 2 else total)
    assert max(abs(v) for v in values) <= max(8 * sigma, 1)
    if sigma >= 1000:
        spread = float(np.std(np.array(values, dtype=np.float64)))
        assert abs(spread / sigma - 1) < 0.15


def test_the_decryption_budget_is_enforced_and_persisted(context, tmp_path):
    profile = T.ThresholdProfile(max_decryptions=2)
    small = T.ThresholdContext(profile)
    share = T.SecretShare.generate(small)
    path = tmp_path / "share.key"
    share.save(path)
    a = T.common_polynomial(small, os.urandom(32))
    encryptor = T.encryptor(
        small, T.collective_public_key(small, a, [share.public_share(a)])
    )
    blob = T.encrypt_values(small, encryptor, np.ones(10))[0]
    c1 = T.split_ciphertext(small, blob).polys[1]
    share.partial_decrypt(c1)
    reloaded = T.SecretShare.load(small, path)
    assert reloaded.decryptions_used == 1
    reloaded.partial_decrypt(c1)
    with pytest.raises(T.ThresholdError, match="create a new key set"):
        reloaded.partial_decrypt(c1)


def test_share_files_are_private_and_never_followed(context, tmp_path):
    share = T.SecretShare.generate(context)
    path = tmp_path / "share.key"
    share.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(FileExistsError):
        share.save(path)  # never over an existing file
    link = tmp_path / "link.key"
    link.symlink_to(tmp_path / "elsewhere.key")
    with pytest.raises(OSError):
        share.save(link)
    assert not (tmp_path / "elsewhere.key").exists()
    path.chmod(0o644)
    with pytest.raises(T.ThresholdError, match="readable by others"):
        T.SecretShare.load(context, path)
    assert "coefficients" not in repr(share) and str(share.decryptions_used) in repr(
        share
    )


def test_the_servers_objects_hold_no_share(context, federation):
    """What the server holds (collective public key, aggregate, partial
    decryptions) never contains a site's share: no residue row of any of them
    equals a share in NTT or coefficient form."""
    sites = federation["sites"]
    held = [
        parse_ciphertext(
            federation["public_key"],
            expected_k=len(context.key_moduli),
            expected_n=context.n,
        ).polys
    ]
    held += [
        parse_ciphertext(b, expected_k=context.k, expected_n=context.n).polys
        for b in federation["aggregate"]
    ]
    _, partials = _partials(context, federation["aggregate"][0], sites)
    held += [p.share[None] for p in partials]
    for site in sites:
        secret_rows = [site._ntt[j] for j in range(context.k)] + [
            reduce_signed(site._coefficients, q) for q in context.data_moduli
        ]
        for polys in held:
            for row in polys.reshape(-1, context.n):
                for secret in secret_rows:
                    assert np.mean(row == secret) < 0.01


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=600), cut=st.integers(0, 200))
def test_parse_ciphertext_refuses_anything_malformed(context, data, cut):
    """Hostile bytes: only SealFormatError escapes (random, truncated, bit-flipped)."""
    real = ciphertext_bytes(
        context.data_parms_id, np.zeros((2, context.k, context.n), dtype=np.uint64)
    )
    for candidate in (data, real[:cut], real[: len(real) - cut] + data):
        with contextlib.suppress(SealFormatError):
            parse_ciphertext(candidate, expected_k=context.k, expected_n=context.n)


def _seal_saved(context) -> bytes:
    """A ciphertext as SEAL itself saves it (zstd, raw blocks)."""
    rng = np.random.default_rng(9)
    polys = np.stack(
        [
            rng.integers(0, q, (2, context.n), dtype=np.uint64)
            for q in context.data_moduli
        ],
        axis=1,
    )
    ciphertext = context.sealapi.Ciphertext()
    with _scratch_file() as scratch:
        scratch.write(ciphertext_bytes(context.data_parms_id, polys))
        ciphertext.load(context.context, scratch.path)
        ciphertext.save(scratch.path)
        saved = scratch.read()
    assert saved[5] == 2  # zstd: what the raw-block reader is for
    return saved


def test_zstd_raw_blocks_read_as_seal_wrote_them(context):
    """The raw-block reader, the zstd decoder and SEAL agree on SEAL's own bytes;
    the uncompressed copy loads in SEAL and parses to the same residues."""
    import zstandard

    saved = _seal_saved(context)
    fast = parse_ciphertext(saved, expected_k=context.k, expected_n=context.n)
    plain = uncompressed(saved)
    assert plain[5] == 0 and len(plain) < len(saved)
    again = parse_ciphertext(plain, expected_k=context.k, expected_n=context.n)
    np.testing.assert_array_equal(fast.polys, again.polys)
    loaded = context.sealapi.Ciphertext()
    with _scratch_file() as scratch:
        scratch.write(plain)
        loaded.load(context.context, scratch.path)
        loaded.save(scratch.path)
        resaved = scratch.read()
    np.testing.assert_array_equal(
        parse_ciphertext(resaved, expected_k=context.k, expected_n=context.n).polys,
        fast.polys,
    )
    # a frame with compressed blocks goes through the decoder, same residues
    body = bytes(zstandard.ZstdDecompressor().decompressobj().decompress(saved[16:]))
    recompressed = zstandard.ZstdCompressor(level=3).compress(body)
    header = bytearray(saved[:16])
    header[8:16] = (16 + len(recompressed)).to_bytes(8, "little")
    other = bytes(header) + recompressed
    assert uncompressed(other) == other or uncompressed(other)[5] == 0
    np.testing.assert_array_equal(
        parse_ciphertext(other, expected_k=context.k, expected_n=context.n).polys,
        fast.polys,
    )


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    position=st.integers(16, 40),
    value=st.integers(0, 255),
    cut=st.integers(0, 60),
    tail=st.binary(max_size=40),
)
def test_hostile_zstd_frames_only_raise_seal_format_errors(
    context, position, value, cut, tail
):
    """Mutated frame headers, block headers, truncations and trailing bytes:
    parse raises only SealFormatError; uncompressed returns bytes that are either
    the input or a well-formed uncompressed object."""
    saved = _SAVED.setdefault("blob", _seal_saved(context))
    mutated = bytearray(saved)
    mutated[position] = value
    for candidate in (
        bytes(mutated),
        saved[: len(saved) - cut] if cut else saved,
        saved + tail,
    ):
        with contextlib.suppress(SealFormatError):
            parse_ciphertext(candidate, expected_k=context.k, expected_n=context.n)
        converted = uncompressed(candidate)
        if converted is not candidate:
            assert converted[5] == 0
            assert int.from_bytes(converted[8:16], "little") == len(converted)


_SAVED: dict[str, bytes] = {}


@pytest.mark.parametrize(
    ("chunks", "zero"), [(1, None), (1, "all"), (2, None), (17, None), (16, "tail")]
)
def test_the_seal_share_path_equals_the_numpy_arithmetic(context, chunks, zero):
    """partial_decrypt lets SEAL do c1 * s_i and the flood's NTT, up to 16 chunks
    per SEAL ciphertext (a single chunk, or c1s of zeros that SEAL would call
    transparent, padded): the same residues as the exact numpy modmul and NTT
    (SEAL's order and roots), chunk by chunk."""
    rng = np.random.default_rng(5)
    share = T.SecretShare.generate(context)

    def residues() -> np.ndarray:
        return np.stack(
            [
                rng.integers(0, q, (chunks, context.n), dtype=np.uint64)
                for q in context.data_moduli
            ],
            axis=1,
        )

    c1s, floods = residues(), residues()
    if zero == "all":
        c1s[:] = 0
    elif zero == "tail":
        c1s[1:] = 0
    floods[0, :, :3] = 0  # zeros and the largest residues go through SEAL too
    floods[0, :, 3] = np.array(context.data_moduli, dtype=np.uint64) - np.uint64(1)
    with _scratch_file() as scratch:
        got = np.concatenate(
            [
                share._seal_shares(c1s[i : i + 16], floods[i : i + 16], scratch)
                for i in range(0, chunks, 16)
            ]
        )
    assert got.shape == (chunks, context.k, context.n)
    for index in range(chunks):
        expected_flood = context.data_ntt.forward(floods[index])
        expected = np.stack(
            [
                (modmul(c1s[index][j], share._ntt[j], q) + expected_flood[j])
                % np.uint64(q)
                for j, q in enumerate(context.data_moduli)
            ]
        )
        np.testing.assert_array_equal(got[index], expected)


def test_a_zero_c1_gets_the_flood_alone(context):
    """A hostile all-zero c1 is answered (c1 * s_i = 0: the flood alone, no
    information about s_i), never a SEAL exception."""
    share = T.SecretShare.generate(context)
    zeros = np.zeros((context.k, context.n), np.uint64)
    partials = share.partial_decrypt_all([zeros] * 17)
    assert len(partials) == 17
    assert all(np.any(p.share) for p in partials)
