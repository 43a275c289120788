"""Import Opacus without letting it configure the application's logging.

``opacus.utils.module_utils`` calls :func:`logging.basicConfig` when it is
imported, which adds a handler to the *root* logger if it has none. Flower's own
logger (``flwr``) propagates to the root, so after that import every ServerApp
and ClientApp log line is printed twice: once by Flower's handler, once by the
root handler Opacus added. A library must not configure logging (that is the
application's call), so :func:`import_opacus` imports Opacus and removes exactly
the root handlers that this import added - a handler the application installed
before or after is left alone.
"""

from __future__ import annotations

import logging
import sys

__all__ = ["import_opacus"]


def import_opacus() -> None:
    """Import ``opacus`` (if not yet imported) and undo its ``basicConfig``."""
    if "opacus" in sys.modules:
        return  # imported before flwr-ext: whoever imported it owns the logging
    root = logging.getLogger()
    before = list(root.handlers)
    import opacus  # noqa: F401  (the import is the point)

    for handler in list(root.handlers):
        if handler not in before:
            root.removeHandler(handler)
