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

_LOCK = threading.RLock()


class _Redirect:
    """State of the redirect: nesting depth, the saved fd, /dev/null's fd."""

    depth = 0
    target = -1
    saved = -1
    devnull = -1


def tenseal() -> ModuleType:
    """Import TenSEAL on first use (importing flwr_ext starts nothing)."""
    import tenseal as ts

    return ts


@contextlib.contextmanager
def quiet_native_stdout() -> Iterator[None]:
    """Send what native code writes to fd 1 to /dev/null for the block's duration.

    Python-level output is flushed first and restored afterwards. The redirect is
    process-wide, so one thread holds it at a time (others wait), and it is kept
    short (one encode or load loop). Nested uses in one thread - including
    generators that hold it while suspended - only count a depth: the outermost
    enter redirects and the last exit restores, in whatever order they exit.
    """
    _LOCK.acquire()
    try:
        if _Redirect.depth == 0:
            _start_redirect()
        _Redirect.depth += 1
        try:
            yield
        finally:
            _Redirect.depth -= 1
            if _Redirect.depth == 0:
                _stop_redirect()
    finally:
        _LOCK.release()


def _start_redirect() -> None:
    try:
        target = sys.stdout.fileno() if sys.stdout is not None else 1
    except (AttributeError, OSError, ValueError):  # e.g. pytest's capture objects
        target = 1
    try:
        if sys.stdout is not None:
            sys.stdout.flush()
        saved = os.dup(target)
        if _Redirect.devnull < 0:
            _Redirect.devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(_Redirect.devnull, target)
    except OSError:  # no usable fd 1 (embedded interpreter): nothing to guard
        _Redirect.target = _Redirect.saved = -1
        return
    _Redirect.target, _Redirect.saved = target, saved


def _stop_redirect() -> None:
    if _Redirect.saved < 0:
        return
    os.dup2(_Redirect.saved, _Redirect.target)
    os.close(_Redirect.saved)
    _Redirect.target = _Redirect.saved = -1
