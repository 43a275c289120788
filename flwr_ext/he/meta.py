"""Total parsing of an encrypted record's ``ckks-meta`` JSON (hostile input).

The ``ckks-meta`` array of an encrypted ArrayRecord is written by whoever sent the
message: a client (its update), the server (the global model it sends down), or a
decrypting node. Every field is therefore parsed here, once, by code that raises
only :class:`MetaError` (a ``ValueError``): a list, ``null`` or a string instead of
an object, ``1e400`` or ``NaN`` where an integer belongs, a 5,000-digit integer,
100,000 nested brackets, a dtype numpy does not know or cannot aggregate, a
negative or astronomically large shape. Every count and size is bounded *before*
anything sized by it is allocated: the caller compares ``num_chunks`` with the
number of arrays the record really holds, and the model size with what the
profile's ciphertexts can carry, arithmetically.

The bounds are far above any model flwr-ext is meant for (a 2^36-value model is
a terabyte of ciphertexts) and far below what would exhaust memory while parsing.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["MAX_META_BYTES", "MetaError", "ParsedMeta", "parse_meta"]

#: Largest ``ckks-meta`` accepted (bytes); a manifest of 10,000 arrays fits easily.
MAX_META_BYTES = 4 * 2**20
#: Largest number of ciphertexts in one record (2^20 x 8192 values ~ 8.6e9 values).
MAX_CHUNKS = 2**20
#: Largest number of values a manifest may declare.
MAX_VALUES = 2**36
#: Largest rank of one array (numpy's own limit is 64).
MAX_RANK = 32
#: Longest string field (profile, fingerprint, wire, kind, array name).
MAX_STRING = 1024
#: dtype strings a manifest may hold: ``Manifest.from_arrayrecord`` writes
#: ``numpy.dtype.str`` of a float or integer array, e.g. ``<f4``, ``|u1``, ``<i8``.
_DTYPE = re.compile(r"[<>|=]?[fiu][1248]")
_REQUIRED = ("format", "kind", "profile", "fingerprint", "wire", "manifest",
             "num_chunks", "digest")  # fmt: skip


class MetaError(ValueError):
    """The ``ckks-meta`` of an encrypted record is malformed (says which field)."""


@dataclass(frozen=True)
class ParsedMeta:
    """The fields of a well-formed ``ckks-meta``, each checked and typed.

    ``manifest`` is a dict ``{"keys", "dtypes", "ranks", "shapes"}`` of plain
    lists that :meth:`flwr_ext.records.Manifest.from_dict` accepts as they are.
    """

    format: int
    kind: str
    profile: str
    fingerprint: str
    wire: str
    manifest: dict[str, list[Any]]
    num_chunks: int
    decryptor: bool
    checksums: tuple[int, ...]
    num_values: int


def _reject_constant(name: str) -> float:
    raise MetaError(f"'{name}' is not a number JSON allows")


def _int(value: object, field: str, low: int, high: int) -> int:
    # bool is an int subclass; 1e400 parses as float('inf'): both are refused
    if isinstance(value, bool) or not isinstance(value, int):
        raise MetaError(f"'{field}' must be an integer, got {type(value).__name__}")
    if not low <= value <= high:
        raise MetaError(f"'{field}' must be in [{low}, {high}], got {value}")
    return value


def _str(value: object, field: str) -> str:
    if not isinstance(value, str):
        raise MetaError(f"'{field}' must be a string, got {type(value).__name__}")
    if len(value) > MAX_STRING:
        raise MetaError(f"'{field}' is longer than {MAX_STRING} characters")
    return value


def _list(value: object, field: str) -> list[Any]:
    if not isinstance(value, list):
        raise MetaError(f"'{field}' must be a list, got {type(value).__name__}")
    return value


def _manifest(value: object) -> tuple[dict[str, list[Any]], int]:
    if not isinstance(value, dict):
        raise MetaError(f"'manifest' must be an object, got {type(value).__name__}")
    try:
        keys = _list(value["keys"], "manifest.keys")
        dtypes = _list(value["dtypes"], "manifest.dtypes")
        ranks = _list(value["ranks"], "manifest.ranks")
        dims = _list(value["shapes"], "manifest.shapes")
    except KeyError as err:
        raise MetaError(f"'manifest' has no {err}") from None
    if not len(keys) == len(dtypes) == len(ranks):
        raise MetaError("'manifest' keys, dtypes and ranks differ in length")
    names = [_str(k, "manifest.keys") for k in keys]
    if len(set(names)) != len(names):
        raise MetaError("'manifest' names an array twice")
    for dtype in dtypes:
        text = _str(dtype, "manifest.dtypes")
        if not _DTYPE.fullmatch(text):
            raise MetaError(
                f"'manifest.dtypes' holds {text[:40]!r}: only float and integer "
                "dtypes are aggregated"
            )
        np.dtype(text)  # cannot fail for the pattern above; documents the intent
    rank_list = [_int(r, "manifest.ranks", 0, MAX_RANK) for r in ranks]
    if sum(rank_list) != len(dims):
        raise MetaError(
            f"'manifest' ranks add up to {sum(rank_list)} but it lists "
            f"{len(dims)} dimensions"
        )
    dim_list = [_int(d, "manifest.shapes", 0, MAX_VALUES) for d in dims]
    total, pos = 0, 0
    for rank in rank_list:
        total += math.prod(dim_list[pos : pos + rank])
        pos += rank
        if total > MAX_VALUES:
            raise MetaError(f"'manifest' declares more than {MAX_VALUES} values")
    manifest = {"keys": names, "dtypes": list(dtypes), "ranks": rank_list,
                "shapes": dim_list}  # fmt: skip
    return manifest, total


def parse_meta(raw: bytes, format_version: int) -> ParsedMeta:
    """Parse and check the ``ckks-meta`` bytes; raise only :class:`MetaError`.

    Parameters
    ----------
    raw : bytes
        The bytes of the ``ckks-meta`` array, as received.
    format_version : int
        The only ``format`` this flwr-ext reads.
    """
    if not isinstance(raw, bytes | bytearray):
        raise MetaError("'ckks-meta' holds no bytes")
    if len(raw) > MAX_META_BYTES:
        raise MetaError(f"'ckks-meta' is larger than {MAX_META_BYTES} bytes")
    try:
        data = json.loads(bytes(raw).decode("utf-8"), parse_constant=_reject_constant)
    except MetaError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise MetaError(f"'ckks-meta' is not JSON ({type(err).__name__})") from None
    if not isinstance(data, dict):
        raise MetaError(f"'ckks-meta' must be an object, got {type(data).__name__}")
    missing = [key for key in _REQUIRED if key not in data]
    if missing:
        raise MetaError(f"'ckks-meta' lacks {missing}")
    version = data["format"]
    if isinstance(version, bool) or version != format_version:
        raise MetaError(
            f"encrypted record format {str(version)[:20]!r}, this flwr-ext reads "
            f"format {format_version}"
        )
    kind = _str(data["kind"], "kind")
    if kind not in ("update", "model"):
        raise MetaError(f"unknown kind {kind[:40]!r}")
    num_chunks = _int(data["num_chunks"], "num_chunks", 1, MAX_CHUNKS)
    checksums = _list(data["digest"], "digest")
    if len(checksums) != num_chunks:
        raise MetaError(
            f"'ckks-meta' lists {len(checksums)} digests for {num_chunks} chunks"
        )
    decryptor = data.get("decryptor", False)
    if not isinstance(decryptor, bool):
        raise MetaError("'decryptor' must be true or false")
    manifest, num_values = _manifest(data["manifest"])
    return ParsedMeta(
        format=format_version,
        kind=kind,
        profile=_str(data["profile"], "profile"),
        fingerprint=_str(data["fingerprint"], "fingerprint"),
        wire=_str(data["wire"], "wire"),
        manifest=manifest,
        num_chunks=num_chunks,
        decryptor=decryptor,
        checksums=tuple(_int(c, "digest", 0, 2**64 - 1) for c in checksums),
        num_values=num_values,
    )
