"""Typed run-config and node-config schemas, validated when an app starts.

A Flower app reads everything a user may change from ``context.run_config`` (the
``[tool.flwr.app.config]`` table of its ``pyproject.toml``, overridden with
``flwr run --run-config``) and each site's settings from ``context.node_config``
(``flower-supernode --node-config``). Both arrive as plain ``dict[str, bool | int |
float | str]``. A typo there (``strategy="trimed-mean"``, ``learning-rate=-1``) must
fail when the run starts, with the valid choices listed - not in round 7 with a
``KeyError``.

An app declares its keys once, as :class:`Option` objects, and groups them in a
:class:`ConfigSchema`::

    SCHEMA = ConfigSchema(
        [
            Option("num-server-rounds", int, 5, "federated rounds", min=1),
            Option("strategy", str, "fedavg", "server strategy",
                   choices=("fedavg", "krum")),
        ]
    )
    settings = SCHEMA.validate(context.run_config)   # raises ConfigError
    rounds = settings["num-server-rounds"]

:meth:`ConfigSchema.validate` reports *every* problem at once, one line each.
Schemas are combined with ``+`` (shared groups such as
:data:`flwr_ext.appkit.strategy_options.STRATEGY_OPTIONS` plus an app's own keys), and
:meth:`ConfigSchema.markdown_table` renders the documentation table for a README,
so the documented defaults are the validated ones.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

__all__ = ["ConfigError", "ConfigSchema", "Option", "Settings"]

#: Python types a Flower run/node config value can have.
ValueType = type[bool] | type[int] | type[float] | type[str]
_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}


class ConfigError(ValueError):
    """One or more invalid config values; ``problems`` lists them, one per line."""

    def __init__(self, where: str, problems: list[str]) -> None:
        self.where = where
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid {where} ({len(self.problems)} problem(s)):\n{lines}")

    @property
    def public_reason(self) -> str:
        """The message, which may reach the coordinator.

        Run-config values came from the coordinator; node-config problems are
        built without the site's values (:mod:`flwr_ext.appkit.site`).
        """
        return str(self)


@dataclass(frozen=True)
class Option:
    """One config key: its type, default, and the values it accepts.

    Parameters
    ----------
    name : str
        The key, e.g. ``"learning-rate"`` (Flower configs use kebab-case).
    type : {bool, int, float, str}
        Value type. An ``int`` is accepted where a ``float`` is expected (TOML
        ``lr=1``); a ``bool`` is never accepted as a number.
    default : bool, int, float, str or None
        Value used when the key is absent (``None``: the key is required).
    help : str
        One line for error messages and README tables.
    choices : tuple, optional
        The only accepted values (strings are compared after ``strip()`` and
        lower-casing, and returned normalised).
    min, max : float, optional
        Inclusive bounds for numbers (see ``min_exclusive``/``max_exclusive``).
    min_exclusive, max_exclusive : bool (default: False)
        Make the corresponding bound strict.
    check : callable, optional
        Extra check ``value -> error message or None``, e.g. "must be absolute".
    """

    name: str
    type: ValueType
    default: bool | int | float | str | None
    help: str
    choices: tuple[Any, ...] | None = None
    min: float | None = None
    max: float | None = None
    min_exclusive: bool = False
    max_exclusive: bool = False
    check: Callable[[Any], str | None] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.type not in _TYPE_NAMES:
            raise TypeError(
                f"Option {self.name!r}: type must be bool, int, float or str, "
                f"got {self.type!r}"
            )
        if self.default is not None:
            error = self._error(self.default)
            if error is not None:
                raise ValueError(f"Option {self.name!r}: bad default: {error}")

    def parse(self, value: object) -> Any:
        """Return ``value`` converted to this option's type; raise ``ValueError``."""
        error = self._error(value)
        if error is not None:
            raise ValueError(error)
        return self._convert(value)

    # -- internals ------------------------------------------------------------
    def _convert(self, value: Any) -> Any:
        if self.type is float:
            return float(value)
        if self.type is str:
            text = str(value).strip()
            return text.lower() if self.choices is not None else text
        return value

    def _error(self, value: object) -> str | None:
        """Describe why ``value`` is invalid, or return None."""
        if not self._type_ok(value):
            hint = ""
            if self.type is str:
                hint = f'; TOML strings need quotes: {self.name}="{value}"'
            return (
                f"{self.name}={value!r} must be {_TYPE_NAMES[self.type]} "
                f"({self.help}){hint}"
            )
        converted = self._convert(value)
        if self.type is float and not math.isfinite(converted):
            return f"{self.name}={value!r} must be a finite number"
        if self.choices is not None and converted not in self.choices:
            valid = ", ".join(repr(c) for c in self.choices)
            return f"{self.name}={value!r} is not valid; choose one of: {valid}"
        bound = self._bound_error(converted)
        if bound is not None:
            return f"{self.name}={value!r} {bound}"
        if self.check is not None:
            message = self.check(converted)
            if message:
                return f"{self.name}={value!r} {message}"
        return None

    def _type_ok(self, value: object) -> bool:
        if self.type is bool:
            return isinstance(value, bool)
        if isinstance(value, bool):
            return False
        if self.type is int:
            return isinstance(value, int)
        if self.type is float:
            return isinstance(value, (int, float))
        return isinstance(value, str)

    def _bound_error(self, value: Any) -> str | None:
        if self.type not in (int, float):
            return None
        if self.min is not None and (
            value < self.min or (self.min_exclusive and value == self.min)
        ):
            return f"must be {'>' if self.min_exclusive else '>='} {self.min:g}"
        if self.max is not None and (
            value > self.max or (self.max_exclusive and value == self.max)
        ):
            return f"must be {'<' if self.max_exclusive else '<='} {self.max:g}"
        return None

    def describe(self) -> str:
        """Return the accepted values in words (for README tables)."""
        if self.choices is not None:
            return ", ".join(f"`{c}`" for c in self.choices)
        if self.type in (int, float) and (self.min is not None or self.max is not None):
            low = (
                ""
                if self.min is None
                else f"{self.min:g} {'<' if self.min_exclusive else '≤'} "
            )
            high = (
                ""
                if self.max is None
                else f" {'<' if self.max_exclusive else '≤'} {self.max:g}"
            )
            return f"{self.type.__name__}, {low}x{high}"
        return self.type.__name__


class Settings(Mapping[str, Any]):
    """Validated, typed config values (read-only mapping, key -> value)."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        self._values = dict(values)

    def __getitem__(self, key: str) -> Any:
        try:
            return self._values[key]
        except KeyError:
            raise KeyError(
                f"{key!r} is not a validated config key; known keys: "
                f"{', '.join(sorted(self._values))}"
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Settings({self._values!r})"

    def to_dict(self) -> dict[str, Any]:
        """Return a plain (JSON-serialisable) copy."""
        return dict(self._values)


class ConfigSchema:
    """An ordered set of :class:`Option` objects, and validation against it.

    Parameters
    ----------
    options : iterable of Option
        The keys; names must be unique.
    where : str (default: "run config")
        What the config is called in error messages (e.g. ``"node config"``).
    """

    def __init__(self, options: Iterable[Option], *, where: str = "run config") -> None:
        self.options: dict[str, Option] = {}
        for option in options:
            if option.name in self.options:
                raise ValueError(f"duplicate config option {option.name!r}")
            self.options[option.name] = option
        self.where = where

    def __add__(self, other: ConfigSchema | Iterable[Option]) -> ConfigSchema:
        """Return a schema with the options of both (names must not repeat)."""
        extra = other.options.values() if isinstance(other, ConfigSchema) else other
        return ConfigSchema([*self.options.values(), *extra], where=self.where)

    def with_defaults(
        self, defaults: Mapping[str, bool | int | float | str | None]
    ) -> ConfigSchema:
        """Return a copy whose options named in ``defaults`` get new defaults.

        Lets an app reuse a shared option group with its own defaults, e.g.
        ``STRATEGY_SCHEMA.with_defaults({"min-nodes": 3})``.
        """
        unknown = [name for name in defaults if name not in self.options]
        if unknown:
            raise ValueError(f"with_defaults: unknown options {unknown}")
        options = [
            replace(option, default=defaults[name]) if name in defaults else option
            for name, option in self.options.items()
        ]
        return ConfigSchema(options, where=self.where)

    def __contains__(self, name: object) -> bool:
        return name in self.options

    def defaults(self) -> dict[str, Any]:
        """Return ``{key: default}`` for every option that has a default."""
        return {
            name: option.default
            for name, option in self.options.items()
            if option.default is not None
        }

    def validate(
        self,
        config: Mapping[str, object],
        *,
        allow_unknown: bool = False,
        use_defaults: bool = True,
    ) -> Settings:
        """Check ``config`` and return typed :class:`Settings`.

        Parameters
        ----------
        config : Mapping
            ``context.run_config`` or ``context.node_config``.
        allow_unknown : bool (default: False)
            Accept keys the schema does not know. Keep False for run config (a
            misspelt key is a mistake); node configs legitimately carry keys read
            by other components (``ckks-context``, ``attack``...).
        use_defaults : bool (default: True)
            Fill absent keys with their defaults; if False every option without
            a value is reported as missing.

        Raises
        ------
        ConfigError
            Listing every invalid, missing or unknown key, with valid choices.
        """
        problems: list[str] = []
        values: dict[str, Any] = {}
        for name, option in self.options.items():
            if name not in config:
                if use_defaults and option.default is not None:
                    values[name] = option.default
                else:
                    problems.append(f"{name} is missing ({option.help})")
                continue
            try:
                values[name] = option.parse(config[name])
            except ValueError as err:
                problems.append(str(err))
        if not allow_unknown:
            for name in config:
                if name not in self.options:
                    problems.append(
                        f"{name} is not a known key{_did_you_mean(name, self.options)}"
                    )
        if problems:
            raise ConfigError(self.where, problems)
        return Settings(values)

    def markdown_table(self) -> str:
        """Render the options as a Markdown table (key, default, values, meaning).

        Defaults are written as in TOML (``true``, ``"fedavg"``), as a user types
        them in ``pyproject.toml`` or ``--run-config``.
        """
        rows = ["| key | default | values | meaning |", "|---|---|---|---|"]
        for option in self.options.values():
            default = (
                "required" if option.default is None else f"`{_toml(option.default)}`"
            )
            rows.append(
                f"| `{option.name}` | {default} | {option.describe()} | {option.help} |"
            )
        return "\n".join(rows)


def _toml(value: object) -> str:
    """Format a default as it is written in TOML (``true``, ``"x"``, ``0.5``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace('"', '\\"') + '"'
    return repr(value)


def _did_you_mean(name: str, known: Mapping[str, Option]) -> str:
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.6)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
