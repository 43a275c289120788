"""Lazy package attributes (PEP 562), so a package's front file stays light.

``flwr_ext.strategy`` re-exports DP wrappers (Opacus, torch) and the CKKS wrapper
(TenSEAL behind it); ``flwr_ext.privacy`` re-exports Opacus-based DP-SGD. A
package ``__init__`` that imported them all would make ``from flwr_ext.strategy
import TrimmedMean`` - or validating a run config in every ClientApp process -
load torch and Opacus (seconds per process). With :func:`lazy_exports`, the
``__init__`` maps each public name to the submodule defining it, and the submodule
is imported on first attribute access only.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    package: str, exports: Mapping[str, str], names: Iterable[str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """Return a module ``__getattr__`` and ``__dir__`` for lazy re-exports.

    Parameters
    ----------
    package : str
        The package's ``__name__``.
    exports : Mapping[str, str]
        Public name -> submodule (relative to ``package``, without the dot) that
        defines it. A name equal to its submodule's name re-exports the submodule.
    names : Iterable[str]
        The package's ``__all__``; it must list exactly the keys of ``exports``
        (checked here, so the two cannot drift apart silently).

    Returns
    -------
    tuple
        ``(__getattr__, __dir__)`` to assign at module level in the package.

    Raises
    ------
    ImportError
        If ``names`` and ``exports`` differ (a programming error in the package).
    """
    if set(names) != set(exports):
        raise ImportError(
            f"{package}: __all__ and the lazy export table differ: "
            f"{sorted(set(names) ^ set(exports))}"
        )

    def getattr_(name: str) -> Any:
        try:
            submodule = exports[name]
        except KeyError:
            raise AttributeError(
                f"module {package!r} has no attribute {name!r}"
            ) from None
        module = importlib.import_module(f"{package}.{submodule}")
        return module if submodule == name else getattr(module, name)

    def dir_() -> list[str]:
        return sorted(exports)

    return getattr_, dir_
