"""CKKS key sets: create them, write them to files, load them once, fingerprint them.

Who holds what
--------------
``flwr-ext keys create --out DIR`` writes two files:

- ``DIR/secret-context.ckks`` (mode 0600) - the **data owners'** context: CKKS
  parameters and the secret key. Every client (hospital, bank) gets a copy through
  a channel the server does not control. It encrypts updates and decrypts the
  global model.
- ``DIR/server-context.ckks`` - the **server's** context: the parameters only. No
  secret key, no public key, no relinearisation or Galois keys: the add-only server
  needs none of them (it can add ciphertexts but can neither decrypt nor encrypt).

Both files carry the same *fingerprint*, a hash of the parameters and a random
key-set id drawn at creation. Every encrypted message carries the fingerprint of
the key that made it, so a client or server holding a different key set fails with
an error that names both fingerprints (decrypting with the wrong key would silently
return garbage). The fingerprint detects mismatched files; it is not a signature.

File format: ``MAGIC``, a 4-byte big-endian header length, a JSON header (format
version, profile, fingerprint, ``secret`` flag), then TenSEAL's serialised context.

The keys are symmetric-only (TenSEAL ``ENCRYPTION_TYPE.SYMMETRIC``): the data owners
hold the secret key anyway, symmetric encryption is about twice as fast as
public-key encryption here, and without a public key the server cannot encrypt
chosen values to mix into an aggregate.

Every TenSEAL context is loaded with ``n_threads=1`` (TenSEAL otherwise starts
``cpu_count`` threads per context) and cached per file, so a client process loads
its context once, not once per message.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import stat
import struct
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from logging import WARNING
from pathlib import Path
from typing import Any

from flwr.supercore import log

from ..safe_files import create_private_dir, write_bytes, write_text
from ._native import quiet_native_stdout, tenseal
from .profiles import PROFILES, Profile, get_profile

__all__ = [
    "SECRET_FILE",
    "SERVER_FILE",
    "CkksKeys",
    "KeyFiles",
    "KeyMismatchError",
    "create_keys",
    "load_keys",
    "read_key_header",
]

MAGIC = b"FLWR-EXT-CKKS\x00"
FORMAT_VERSION = 1
SECRET_FILE = "secret-context.ckks"
SERVER_FILE = "server-context.ckks"
FINGERPRINT_FILE = "fingerprint.txt"
_HEADER_LIMIT = 1 << 20


class KeyMismatchError(ValueError):
    """Two parties use different key sets or profiles; the message names both.

    Its ``public_reason`` (key fingerprints and the fix, no local path) may leave
    the site in an error reply even when the site redacts errors
    (:class:`flwr_ext.mods.site_policy.SitePolicy`): the coordinator needs it to
    tell which site holds the wrong key set.
    """

    def __init__(self, message: str, public_reason: str | None = None) -> None:
        super().__init__(message)
        self.public_reason = message if public_reason is None else public_reason


@dataclass(frozen=True)
class KeyFiles:
    """Paths written by :func:`create_keys`."""

    secret: Path
    server: Path
    fingerprint: str


class CkksKeys:
    """A loaded CKKS context with its profile and fingerprint.

    Attributes
    ----------
    context : tenseal.Context
        TenSEAL context (``n_threads=1``); holds the secret key iff ``has_secret``.
    profile : Profile
        The CKKS parameters.
    fingerprint : str
        Identifies the key set, e.g. ``"3f2a-9c1e-7b4d-8a60-12ab"``.
    has_secret : bool
        Whether this context can decrypt (data owners only).
    source : str
        Where it was loaded from (a path or ``"<bytes>"``), for error messages.
    """

    def __init__(
        self,
        context: Any,
        profile: Profile,
        fingerprint: str,
        source: str,
    ) -> None:
        self.context = context
        self.profile = profile
        self.fingerprint = fingerprint
        self.source = source
        self.has_secret = bool(context.is_private())
        self._seal: Any = None

    def __repr__(self) -> str:
        kind = "secret" if self.has_secret else "server (no secret key)"
        return (
            f"CkksKeys({kind}, profile={self.profile.name}, "
            f"fingerprint={self.fingerprint}, source={self.source})"
        )

    def check_matches(self, profile_name: str, fingerprint: str, what: str) -> None:
        """Raise :class:`KeyMismatchError` unless ``what`` used this key set.

        ``what`` names the other side, e.g. ``"the reply from node 7"``.
        """
        if profile_name != self.profile.name or fingerprint != self.fingerprint:
            ours = f"key {self.fingerprint} (profile {self.profile.name!r}"
            theirs = (
                f"{what} was made with CKKS key {fingerprint} (profile "
                f"{profile_name!r}), but this party holds "
            )
            fix = (
                ". Every data owner and the server must use files from the same "
                "`flwr-ext keys create` run."
            )
            raise KeyMismatchError(
                f"{theirs}{ours}, from {self.source}){fix}",
                public_reason=f"{theirs}{ours}){fix}",
            )

    def require_secret(self) -> None:
        """Raise ``ValueError`` unless this context can decrypt."""
        if not self.has_secret:
            raise ValueError(
                f"{self.source} is the server's context (no secret key); data owners "
                f"need {SECRET_FILE} from the same `flwr-ext keys create` run."
            )

    def require_no_secret(self) -> None:
        """Raise ``ValueError`` if this context holds the secret key (server side)."""
        if self.has_secret:
            raise ValueError(
                f"{self.source} holds the secret key: the server must never have it. "
                f"Give the server {SERVER_FILE} (no secret key) instead."
            )

    def seal(self) -> SealHandles:
        """Raw SEAL objects for the seeded wire format (created on first use)."""
        if self._seal is None:
            self._seal = SealHandles(self)
        return self._seal


class SealHandles:
    """SEAL context, encoder, evaluator (and, with the secret key, en/decryptor).

    Built from a TenSEAL context through ``tenseal.sealapi`` (the SEAL bindings
    TenSEAL ships), so both wire formats use the same key files.
    """

    def __init__(self, keys: CkksKeys) -> None:
        from tenseal import sealapi

        self.sealapi = sealapi
        self.context = keys.context.seal_context().data
        self.encoder = sealapi.CKKSEncoder(self.context)
        self.evaluator = sealapi.Evaluator(self.context)
        self.encryptor = None
        self.decryptor = None
        self._flood_key: bytes | None = None
        self._secret_key: Any = None
        if keys.has_secret:
            secret_key = keys.context.secret_key().data
            self._secret_key = secret_key
            self.encryptor = sealapi.Encryptor(self.context, secret_key)
            self.decryptor = sealapi.Decryptor(self.context, secret_key)

    def flood_key(self) -> bytes:
        """32 secret bytes that seed the flooding noise (data owners only).

        A hash of the secret key's coefficients: every data owner derives the same
        bytes, the server (no secret key) cannot. Decrypting the same ciphertext
        therefore floods it with the same noise everywhere
        (:func:`flwr_ext.he.codec.decrypt_record`).
        """
        if self._secret_key is None:
            raise ValueError("only a context with the secret key can seed flooding")
        if self._flood_key is None:
            plain = self._secret_key.data()
            digest = hashlib.blake2b(b"flwr-ext flood key v1\x00", digest_size=32)
            for index in range(plain.coeff_count()):
                digest.update(int(plain[index]).to_bytes(8, "little"))
            self._flood_key = digest.digest()
        return self._flood_key


# --------------------------------------------------------------------- creation
def _fingerprint(profile: Profile, key_id: bytes) -> str:
    digest = hashlib.sha256(
        b"flwr-ext ckks key set v1\x00"
        + json.dumps(profile.to_dict(), sort_keys=True).encode()
        + key_id
    ).hexdigest()[:20]
    return "-".join(digest[i : i + 4] for i in range(0, 20, 4))


def _pack(header: dict[str, Any], body: bytes) -> bytes:
    encoded = json.dumps(header, sort_keys=True).encode()
    return MAGIC + struct.pack(">I", len(encoded)) + encoded + body


def _write_new(path: Path, data: bytes, mode: int, overwrite: bool) -> None:
    """Write a key file privately and atomically, never through a symlink.

    With ``overwrite`` an existing file - or a symlink planted at its name - is
    *replaced* by the new file (:mod:`flwr_ext.safe_files`), never written through.
    """
    try:
        write_bytes(path, data, overwrite=overwrite, file_mode=mode)
    except FileExistsError:
        raise FileExistsError(
            f"{path} exists; refusing to overwrite a key file (pass overwrite=True "
            "if you really want a new key set: every party needs new files)"
        ) from None


def create_keys(
    out_dir: str | os.PathLike[str],
    profile: str = "default",
    *,
    overwrite: bool = False,
) -> KeyFiles:
    """Create a CKKS key set and write the secret and the server context files.

    Parameters
    ----------
    out_dir : path
        Folder to write into (created if missing).
    profile : {"default", "compact"}
        CKKS parameters, see :mod:`flwr_ext.he.profiles`.
    overwrite : bool (default: False)
        Replace existing key files. Off by default: a new key set makes every
        existing encrypted model undecryptable.

    Returns
    -------
    KeyFiles
        Paths of ``secret-context.ckks`` (mode 0600), ``server-context.ckks`` and
        the fingerprint (also written to ``fingerprint.txt``).
    """
    prof = get_profile(profile)
    ts = tenseal()
    out = create_private_dir(out_dir)
    with quiet_native_stdout():
        context = ts.context(
            ts.SCHEME_TYPE.CKKS,
            prof.poly_modulus_degree,
            coeff_mod_bit_sizes=list(prof.coeff_mod_bit_sizes),
            encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC,
            n_threads=1,
        )
        context.global_scale = prof.scale
        secret_body = context.serialize(
            save_public_key=False,
            save_secret_key=True,
            save_galois_keys=False,
            save_relin_keys=False,
        )
        server_body = context.serialize(
            save_public_key=False,
            save_secret_key=False,
            save_galois_keys=False,
            save_relin_keys=False,
        )
    fingerprint = _fingerprint(prof, secrets.token_bytes(32))
    header = {
        "format": FORMAT_VERSION,
        "profile": prof.to_dict(),
        "fingerprint": fingerprint,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "tenseal": getattr(ts, "__version__", "unknown"),
    }
    secret_path, server_path = out / SECRET_FILE, out / SERVER_FILE
    existing = [p for p in (secret_path, server_path) if p.exists() or p.is_symlink()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{existing[0]} exists; refusing to overwrite a key file (pass "
            "overwrite=True if you really want a new key set: every party needs "
            "new files)"
        )
    _write_new(secret_path, _pack({**header, "secret": True}, secret_body), 0o600,
               overwrite)  # fmt: skip
    _write_new(server_path, _pack({**header, "secret": False}, server_body), 0o644,
               overwrite)  # fmt: skip
    write_text(out / FINGERPRINT_FILE, f"{fingerprint}\n", overwrite=True,
               file_mode=0o644)  # fmt: skip
    return KeyFiles(secret_path, server_path, fingerprint)


# ---------------------------------------------------------------------- loading
def _split(data: bytes, source: str) -> tuple[dict[str, Any], bytes]:
    if data and MAGIC.startswith(data):
        raise ValueError(f"{source} is truncated ({len(data)} bytes)")
    if not data.startswith(MAGIC):
        raise ValueError(
            f"{source} is not a flwr-ext CKKS key file (create one with "
            "`flwr-ext keys create --out DIR`)"
        )
    pos = len(MAGIC)
    if len(data) < pos + 4:
        raise ValueError(f"{source} is truncated (no header)")
    (length,) = struct.unpack(">I", data[pos : pos + 4])
    if length > _HEADER_LIMIT or len(data) < pos + 4 + length:
        raise ValueError(f"{source} is truncated or corrupted (bad header length)")
    try:
        header = json.loads(data[pos + 4 : pos + 4 + length])
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{source} has a corrupted header: {err}") from err
    if not isinstance(header, dict) or header.get("format") != FORMAT_VERSION:
        raise ValueError(
            f"{source} has key file format {header.get('format')!r} "
            f"(this flwr-ext reads format {FORMAT_VERSION})"
            if isinstance(header, dict)
            else f"{source} has a corrupted header"
        )
    return header, data[pos + 4 + length :]


def _profile_from_header(header: dict[str, Any], source: str) -> Profile:
    stored = header.get("profile", {})
    name = stored.get("name") if isinstance(stored, dict) else None
    if name not in PROFILES or PROFILES[name].to_dict() != stored:
        raise ValueError(
            f"{source} declares CKKS parameters {stored!r}, which match no profile "
            f"of this flwr-ext ({sorted(PROFILES)})"
        )
    return PROFILES[name]


def read_key_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Return the JSON header of a key file without loading the context."""
    source = str(path)
    with open(path, "rb") as handle:
        head = handle.read(len(MAGIC) + 4 + _HEADER_LIMIT)
    header, _ = _split(head, source)
    return header


_CACHE: dict[tuple[str, int, int], CkksKeys] = {}
_CACHE_LOCK = threading.Lock()


def load_keys(source: str | os.PathLike[str] | bytes) -> CkksKeys:
    """Load a key file (or its bytes) into a TenSEAL context with ``n_threads=1``.

    Files are cached by (real path, mtime, size): loading the same file again in a
    process returns the same object. The secret flag of the header must agree with
    the context itself, and the parameters must match the declared profile.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ValueError
        If it is not a flwr-ext key file, is truncated or corrupted, or its
        parameters disagree with its header.
    """
    if isinstance(source, bytes):
        return _load_bytes(source, "<bytes>")
    path = Path(source)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"CKKS key file {path} not found (create the key set with "
            "`flwr-ext keys create --out DIR`)"
        ) from None
    key = (str(path.resolve()), info.st_mtime_ns, info.st_size)
    with _CACHE_LOCK:
        cached = _CACHE.get(key)
        if cached is not None:
            return cached
        keys = _load_bytes(path.read_bytes(), str(path))
        if keys.has_secret and info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            log(
                WARNING,
                "CKKS secret context %s is readable by other users (mode %o); "
                "run `chmod 600 %s`",
                path,
                stat.S_IMODE(info.st_mode),
                path,
            )
        _CACHE[key] = keys
        return keys


def _load_bytes(data: bytes, source: str) -> CkksKeys:
    header, body = _split(data, source)
    profile = _profile_from_header(header, source)
    fingerprint = header.get("fingerprint")
    if not isinstance(fingerprint, str) or not fingerprint:
        raise ValueError(f"{source} has no fingerprint in its header")
    ts = tenseal()
    try:
        with quiet_native_stdout():
            context = ts.context_from(body, n_threads=1)
    except (ValueError, RuntimeError, TypeError) as err:
        raise ValueError(
            f"{source}: the TenSEAL context is truncated or corrupted ({err})"
        ) from err
    _check_parameters(context, profile, source)
    keys = CkksKeys(context, profile, fingerprint, source)
    if keys.has_secret != bool(header.get("secret")):
        raise ValueError(
            f"{source}: header says secret={header.get('secret')!r} but the context "
            f"{'holds' if keys.has_secret else 'lacks'} a secret key"
        )
    return keys


def _check_parameters(context: Any, profile: Profile, source: str) -> None:
    import tenseal.sealapi  # noqa: F401 - registers SEAL's Modulus type

    data = context.seal_context().data.key_context_data()
    degree = int(data.parms().poly_modulus_degree())
    bits = [int(m.bit_count()) for m in data.parms().coeff_modulus()]
    if degree != profile.poly_modulus_degree or tuple(bits) != (
        profile.coeff_mod_bit_sizes
    ):
        raise ValueError(
            f"{source}: context has N={degree}, moduli {bits}, but its header "
            f"declares profile {profile.describe()}"
        )
    context.global_scale = profile.scale
