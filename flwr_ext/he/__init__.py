"""CKKS secure aggregation with TenSEAL: keys, the codec, the ciphertext sum.

TenSEAL is imported here and nowhere else in flwr-ext (lazily, on first use).

- :mod:`~flwr_ext.he.profiles` - CKKS parameter profiles and their magnitude bounds.
- :mod:`~flwr_ext.he.keys` - create, load (once, ``n_threads=1``) and fingerprint
  the data owners' secret context and the server's keyless context.
- :mod:`~flwr_ext.he.wire` - three wire formats: packed SEAL, TenSEAL vectors,
  seeded SEAL.
- :mod:`~flwr_ext.he.codec` - ArrayRecord <-> encrypted ArrayRecord (weight slot,
  manifest, fingerprint).
- :mod:`~flwr_ext.he.accumulate` - streaming in-place sum at the server.
- :mod:`~flwr_ext.he.flooding` - the noise every released decryption carries
  (sized for 30-bit statistical security), rounding, the per-run budget.
- :mod:`~flwr_ext.he.model_file` - save the encrypted final model, decrypt it.

The Flower pieces built on these live in :mod:`flwr_ext.mods.ckks` (client mod) and
:mod:`flwr_ext.strategy.homomorphic` (server wrapper). The threat model is in
``docs/secure-aggregation.md``.
"""

from .accumulate import CiphertextSum
from .codec import (
    DecryptedModel,
    EncryptedHeader,
    InvalidCiphertextError,
    decrypt_record,
    encrypt_record,
    is_encrypted,
)
from .keys import (
    SECRET_FILE,
    SERVER_FILE,
    CkksKeys,
    KeyFiles,
    KeyMismatchError,
    create_keys,
    load_keys,
    read_key_header,
)
from .model_file import decrypt_model_file, load_encrypted_model, save_encrypted_model
from .profiles import PROFILES, BoundExceededError, Profile, check_bound, get_profile
from .wire import WIRES, CiphertextError

__all__ = [
    "PROFILES",
    "SECRET_FILE",
    "SERVER_FILE",
    "WIRES",
    "BoundExceededError",
    "CiphertextError",
    "CiphertextSum",
    "CkksKeys",
    "DecryptedModel",
    "EncryptedHeader",
    "InvalidCiphertextError",
    "KeyFiles",
    "KeyMismatchError",
    "Profile",
    "check_bound",
    "create_keys",
    "decrypt_model_file",
    "decrypt_record",
    "encrypt_record",
    "get_profile",
    "is_encrypted",
    "load_encrypted_model",
    "load_keys",
    "read_key_header",
    "save_encrypted_model",
]
