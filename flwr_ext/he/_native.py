"""Keep TenSEAL/SEAL's C++ output out of the user's log, and import TenSEAL lazily.

TenSEAL's C++ code writes warnings (e.g. "The input does not fit in a single
ciphertext...") straight to file descriptor 1, bypassing Python's ``sys.stdout`` and
logging. flwr-ext never triggers them (it chunks vectors to the slot count), and
wraps every native call that could print in :func:`quiet_native_stdout` so a future
TenSEAL message cannot end up in a Flower log either.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator
from types import ModuleType

__all__ = ["quiet_native_stdout", "tenseal"]

_LOCK = threading.Lock()
_DEVNULL: list[int] = []  # one fd for /dev/null, opened on first use


def tenseal() -> ModuleType:
    """Import TenSEAL on first use (importing flwr_ext starts nothing)."""
    import tenseal as ts

    return ts


@contextlib.contextmanager
def quiet_native_stdout() -> Iterator[None]:
    """Send what native code writes to fd 1 to /dev/null for the block's duration.

    Python-level output is flushed first and restored afterwards. The redirect is
    process-wide, so it is held by one thread at a time and kept short (one encode
    or decode loop).
    """
    try:
        fd = sys.stdout.fileno() if sys.stdout is not None else 1
    except (AttributeError, OSError, ValueError):  # e.g. pytest's capture objects
        fd = 1
    with _LOCK:
        try:
            if sys.stdout is not None:
                sys.stdout.flush()
            saved = os.dup(fd)
        except OSError:  # no usable fd 1 (embedded interpreter): nothing to guard
            yield
            return
        try:
            if not _DEVNULL:
                _DEVNULL.append(os.open(os.devnull, os.O_WRONLY))
            os.dup2(_DEVNULL[0], fd)
            yield
        finally:
            os.dup2(saved, fd)
            os.close(saved)
