"""Who a site is and where its data comes from, read from the node config.

The same ClientApp runs in two places:

- **Flower's Simulation Engine**: every node's ``node_config`` holds
  ``partition-id`` and ``num-partitions``; the app cuts its bundled offline dataset
  into ``num-partitions`` sites and uses partition ``partition-id``.
- **Flower's Deployment Engine**: each site's SuperNode is started with
  ``--node-config "data-path='/abs/path/site.csv'"`` (and optionally
  ``site-name``, ``schema-path``); the app reads that file.

:func:`site_from_context` validates the node config (:data:`NODE_OPTIONS`) and
returns a :class:`SiteSpec`. Other keys (``ckks-context``, ``attack``...) are left
for the components that read them.

Node-config errors reach the coordinator (Flower sends ``str(exception)`` in the
error reply), so they name the keys and what is wrong, never the site's values (a
path can name a patient cohort or a department); the values go to the site's own
log, and to the error's ``detail``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from logging import ERROR
from pathlib import Path
from typing import cast

from flwr.app import Context
from flwr.supercore import log

from .config import ConfigError, ConfigSchema, Option

__all__ = ["NODE_OPTIONS", "NODE_SCHEMA", "SiteSpec", "site_from_context"]


def _absolute_or_empty(value: str) -> str | None:
    if value and not Path(value).expanduser().is_absolute():
        return "must be an absolute path (the ClientApp does not run in your folder)"
    return None


#: Node-config keys of a site (all optional; see :func:`site_from_context`).
NODE_OPTIONS: tuple[Option, ...] = (
    Option("partition-id", int, None, "simulation: this site's partition", min=0),
    Option("num-partitions", int, None, "simulation: number of sites", min=1),
    Option(
        "data-path",
        str,
        None,
        "deployment: absolute path of this site's CSV file",
        check=_absolute_or_empty,
    ),
    Option("site-name", str, None, "name in logs and results (default: derived)"),
    Option(
        "schema-path",
        str,
        None,
        "deployment: JSON schema file overriding the run config's columns",
        check=_absolute_or_empty,
    ),
)
NODE_SCHEMA = ConfigSchema(NODE_OPTIONS, where="node config")


@dataclass(frozen=True)
class SiteSpec:
    """A validated site.

    Attributes
    ----------
    name : str
        Site name for logs and results.
    data_path : Path or None
        Deployment: the site's CSV file.
    partition_id, num_partitions : int or None
        Simulation: which partition of the bundled data.
    schema_path : Path or None
        Optional per-site schema file.
    """

    name: str
    data_path: Path | None
    partition_id: int | None
    num_partitions: int | None
    schema_path: Path | None

    @property
    def simulated(self) -> bool:
        """True when the site is a partition of the bundled dataset."""
        return self.data_path is None


def site_from_context(context: Context, *, name_prefix: str = "site") -> SiteSpec:
    """Read the site from ``context.node_config``.

    ``data-path`` wins if present (a deployment); otherwise ``partition-id`` and
    ``num-partitions`` are required. The default name is ``site-name``, else
    ``<name_prefix>-<partition-id>`` in simulation, else ``node-<node id>``.

    Raises
    ------
    ConfigError
        Listing what is missing or invalid, and how to set it.
    """
    config: Mapping[str, object] = context.node_config
    settings = _validate(config)
    data_path = cast(str | None, settings.get("data-path"))
    pid = cast(int | None, settings.get("partition-id"))
    num = cast(int | None, settings.get("num-partitions"))
    if data_path is None:
        if pid is None or num is None:
            raise _node_config_error(
                [
                    "no data: set data-path='/abs/path/site.csv' on this SuperNode "
                    "(--node-config), or partition-id and num-partitions in "
                    "simulation"
                ]
            )
        if pid >= num:
            raise _node_config_error(
                [f"partition-id={pid} must be < num-partitions={num}"]
            )
    name = settings.get("site-name")
    if not name:
        name = (
            f"{name_prefix}-{pid}" if data_path is None else f"node-{context.node_id}"
        )
    schema = cast(str | None, settings.get("schema-path"))
    return SiteSpec(
        name=str(name),
        data_path=Path(data_path).expanduser() if data_path else None,
        partition_id=pid if data_path is None else None,
        num_partitions=num if data_path is None else None,
        schema_path=Path(schema).expanduser() if schema else None,
    )


def _validate(config: Mapping[str, object]) -> dict[str, object]:
    """Validate the keys of :data:`NODE_OPTIONS` that are present."""
    problems: list[str] = []
    values: dict[str, object] = {}
    for name, option in NODE_SCHEMA.options.items():
        if name not in config or config[name] == "":
            continue
        try:
            values[name] = option.parse(config[name])
        except ValueError as err:
            problems.append(str(err))
    if problems:
        raise _node_config_error(problems)
    return values


_VALUE = re.compile(r"^([A-Za-z0-9_.-]+)=(.*?) must ")


def _node_config_error(problems: list[str]) -> ConfigError:
    """Build a node-config error whose message names keys, not the site's values.

    The full problems (with values) go to the site's log and to ``detail``.
    """
    public = [_VALUE.sub(r"\1 must ", problem, count=1) for problem in problems]
    for problem in problems:
        log(ERROR, "invalid node config: %s", problem)
    error = ConfigError("node config", public)
    error.detail = "\n".join(problems)  # type: ignore[attr-defined]
    return error
