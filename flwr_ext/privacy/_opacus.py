"""Import Opacus without its logging side effect.

``opacus.utils.module_utils`` calls :func:`logging.basicConfig` when it is
imported, which gives the *root* logger a stderr handler if it has none. Flower's
``flwr`` logger propagates to the root, so from then on every ServerApp and
ClientApp log line is printed twice (once by Flower's handler, once as
``12/06/2026 01:54:46:INFO:...``) - also in ``flwr log``. A library must not
configure logging (that is the application's call): importing this module (after
or before Opacus) imports Opacus and removes exactly that handler - the stream
handler with Opacus's format - and leaves any handler the application configured.
Every flwr-ext module that imports Opacus imports this one first.
"""

from __future__ import annotations

import logging

import opacus.utils.module_utils  # noqa: F401 - calls logging.basicConfig

__all__: list[str] = []

_OPACUS_FORMAT = "%(asctime)s:%(levelname)s:%(message)s"

for _handler in list(logging.getLogger().handlers):
    _format = getattr(_handler.formatter, "_fmt", None)
    if isinstance(_handler, logging.StreamHandler) and _format == _OPACUS_FORMAT:
        logging.getLogger().removeHandler(_handler)
