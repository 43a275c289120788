"""Run the deployment steps of docs/deployment.md exactly as written.

The page marks each block an operator runs with an HTML comment just above it::

    <!-- deployment-test: once -->            run once, wait for it to succeed
    <!-- deployment-test: per-site -->        run once per site, with its values
    <!-- deployment-test: background superlink -->
    <!-- deployment-test: background per-site supernode -->
                                              long-running: started, left running
    <!-- deployment-test: once run -->        the submit-and-wait block
    <!-- deployment-test: settings -->        the variables every block reads

and an app README marks its model-loading snippet ``predict``. Blocks run
verbatim with ``bash -euo pipefail``; the one substitution, documented on the
page, is the *values* of the settings block's variables (temporary folders,
free ports, ``localhost``, the test's CSV files), passed as the environment.
:func:`settings_names` makes sure the test sets exactly the variables the page
defines, so a new variable on the page fails the test until it is provided.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from flwr_ext.launch import FlowerProcess

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "deployment.md"
_BLOCK = re.compile(
    r"<!-- deployment-test: (?P<tags>[^>]*?) -->\s*\n"
    r"```(?P<lang>\w+)\n(?P<code>.*?)\n```",
    re.DOTALL,
)


@dataclass(frozen=True)
class Block:
    """One marked code block: its tags (``once``, ``per-site``...) and its code."""

    tags: tuple[str, ...]
    lang: str
    code: str

    def has(self, *tags: str) -> bool:
        """True if the block carries every tag in ``tags``."""
        return all(t in self.tags for t in tags)


def blocks(path: Path = DOC) -> list[Block]:
    """The marked blocks of ``path``, in page order."""
    found = [
        Block(tuple(m["tags"].split()), m["lang"], m["code"])
        for m in _BLOCK.finditer(path.read_text())
    ]
    if not found:
        raise AssertionError(f"no <!-- deployment-test: ... --> block in {path}")
    return found


def settings_names(path: Path = DOC) -> set[str]:
    """Names of the variables the page's settings block exports."""
    (settings,) = [b for b in blocks(path) if b.has("settings")]
    return set(re.findall(r"^export (\w+)=", settings.code, re.MULTILINE))


def check_environment(env: Mapping[str, str], names: set[str]) -> None:
    """Fail if ``env`` lacks a variable of the settings block."""
    missing = sorted(n for n in names if n not in env)
    if missing:
        raise AssertionError(
            f"docs/deployment.md's settings block defines {missing}, which the "
            "deployment test does not set: give them test values"
        )


def run_block(
    block: Block, env: Mapping[str, str], log: Path, *, timeout: float = 300.0
) -> str:
    """Run ``block`` with ``bash -euo pipefail``; return stdout; raise on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block.code],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=str(log.parent),
    )
    with log.open("a") as handle:
        handle.write(f"$ {block.code}\n{result.stdout}{result.stderr}\n")
    if result.returncode != 0:
        raise AssertionError(
            f"documented block failed (exit {result.returncode}):\n{block.code}\n"
            f"--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"
        )
    return result.stdout


def start_block(block: Block, env: Mapping[str, str], name: str, log: Path):
    """Start a long-running block in its own process group (stopped by the test)."""
    return FlowerProcess(
        name, ["bash", "-euo", "pipefail", "-c", block.code], dict(env), log
    )


def python_block(path: Path, tag: str) -> str:
    """The code of the ``python`` block marked ``tag`` in ``path``."""
    (block,) = [b for b in blocks(path) if b.has(tag)]
    assert block.lang == "python", f"{path}: block '{tag}' is not Python"
    return block.code


def merged(base: Mapping[str, str], *extra: Mapping[str, str]) -> dict[str, str]:
    """``base`` updated with each mapping of ``extra`` in turn."""
    env = dict(base)
    for more in extra:
        env.update(more)
    return env


def environ_with(paths: Sequence[Path]) -> dict[str, str]:
    """This process's environment with ``paths`` first on ``PYTHONPATH``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(p) for p in paths] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    return env
