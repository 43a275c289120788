"""``flwr-ext keys``: create, inspect and use CKKS key sets for secure aggregation.

``flwr-ext keys create --out DIR [--profile default|compact]``
    Writes ``DIR/secret-context.ckks`` (mode 0600: the data owners' context with the
    secret key - copy it to every SuperNode over a channel the server does not
    control), ``DIR/server-context.ckks`` (the server's context: parameters only, no
    key of any kind) and ``DIR/fingerprint.txt``. A new DIR is created 0700. Existing
    key files are kept unless ``--force``, which *replaces* them - a symlink planted
    at a key file's name is replaced, never written through.

``flwr-ext keys inspect FILE``
    Prints the profile, the fingerprint and whether FILE holds a secret key (read
    from the context itself, not only from the header).

``flwr-ext keys decrypt --context SECRET MODEL --out OUT.npz``
    Decrypts an encrypted final model saved by the ServerApp
    (:func:`flwr_ext.he.save_encrypted_model`) into a plain ``.npz`` (mode 0600;
    an existing OUT is kept unless ``--force``). Like every flwr-ext decryption
    the values are flooded and rounded (:mod:`flwr_ext.he.flooding`), so the file
    can be shared without revealing the key; decrypting the same model again
    writes the same values.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..he import PROFILES, create_keys, decrypt_model_file, load_keys, read_key_header

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``keys`` sub-command and its ``create``/``inspect``/``decrypt``."""
    parser = subparsers.add_parser(
        "keys",
        help="create and inspect CKKS key sets; decrypt an encrypted final model",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="keys_command", required=True)

    create = actions.add_parser(
        "create", help="create a key set: secret context, server context, fingerprint"
    )
    create.add_argument("--out", type=Path, required=True, help="output folder")
    create.add_argument(
        "--profile",
        choices=sorted(PROFILES),
        default="default",
        help="CKKS parameters: default (N=8192, [60, 60, 60], 2^100, |aggregate| "
        "<= 2^18) or compact (N=4096, [47, 46, 16], 2^83, |aggregate| <= 256)",
    )
    create.add_argument(
        "--force",
        action="store_true",
        help="replace existing key files (never through a symlink)",
    )
    create.set_defaults(handler=_create)

    inspect = actions.add_parser(
        "inspect", help="print profile, fingerprint and whether a file is secret"
    )
    inspect.add_argument("file", type=Path, help="a .ckks context file")
    inspect.set_defaults(handler=_inspect)

    decrypt = actions.add_parser(
        "decrypt", help="decrypt an encrypted model file to a plain .npz"
    )
    decrypt.add_argument("model", type=Path, help="encrypted model file")
    decrypt.add_argument(
        "--context", type=Path, required=True, help="secret-context.ckks"
    )
    decrypt.add_argument("--out", type=Path, required=True, help="output .npz file")
    decrypt.add_argument(
        "--force", action="store_true", help="replace an existing output file"
    )
    decrypt.set_defaults(handler=_decrypt)


#: ``flwr-ext keys --help``: plain text (the module docstring is reST for Sphinx).
DESCRIPTION = """\
Create, inspect and use CKKS key sets for secure aggregation.

  flwr-ext keys create --out DIR [--profile default|compact] [--force]
      Writes DIR/secret-context.ckks (mode 0600: the data owners' context with
      the secret key; copy it to every SuperNode over a channel the server does
      not control), DIR/server-context.ckks (the server's context: parameters
      only, no key of any kind) and DIR/fingerprint.txt.

  flwr-ext keys inspect FILE
      Prints the profile, the fingerprint and whether FILE holds a secret key
      (read from the context itself, not only from the header).

  flwr-ext keys decrypt MODEL --context SECRET --out OUT.npz
      Decrypts an encrypted final model saved by the ServerApp into a plain
      .npz (original array names, shapes and dtypes).
"""


def _create(args: argparse.Namespace) -> int:
    try:
        files = create_keys(args.out, args.profile, overwrite=args.force)
    except FileExistsError as err:  # main() reports ValueErrors as input errors
        raise ValueError(
            f"{args.out} already holds a key set; refusing to overwrite it. Add "
            "--force to create a new key set (every party then needs the new files)"
        ) from err
    profile = PROFILES[args.profile]
    print(f"Created CKKS key set, profile {profile.describe()}")
    print(f"  fingerprint:    {files.fingerprint}")
    print(f"  secret context: {files.secret}  (mode 0600; data owners only)")
    print(f"  server context: {files.server}  (no secret key; for the server)")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    header = read_key_header(args.file)
    keys = load_keys(args.file)
    print(f"file:        {args.file}")
    print(f"profile:     {keys.profile.describe()}")
    print(f"fingerprint: {keys.fingerprint}")
    print(
        "secret key:  "
        + ("yes (data owners only: never give this file to the server)"
           if keys.has_secret else "no (safe for the server)")
    )  # fmt: skip
    print(f"created:     {header.get('created', 'unknown')}")
    return 0


def _decrypt(args: argparse.Namespace) -> int:
    try:
        decrypted = decrypt_model_file(
            args.model, args.context, args.out, overwrite=args.force
        )
    except FileExistsError as err:  # main() reports ValueErrors as clean errors
        raise ValueError(f"{err} (pass --force to replace it)") from err
    print(
        f"Decrypted {len(decrypted.arrays)} arrays "
        f"({sum(a.numpy().size for a in decrypted.arrays.values())} values, "
        f"{decrypted.contributions} contributions in the last round) to {args.out}"
    )
    return 0
