#!/usr/bin/env bash
# Install flwr-ext into a fresh virtualenv (.venv) and run the whole test suite:
# ruff (lint + format check), the import-layer contracts (import-linter) and
# the type check (mypy), then pytest - unit tests and the end-to-end tests
# that start Flower's Simulation and Deployment Engines.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not e2e"`.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${FLWR_EXT_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

echo "==> creating a fresh virtualenv in $VENV"
"$PYTHON" -m venv --clear "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install --quiet --upgrade pip
# torch first: the CPU build 2.13.0. A bare `torch` requirement on a machine
# without torch would pull a multi-GB CUDA build.
"$PY" -m pip install --quiet torch==2.13.0
"$PY" -m pip install --quiet -e ".[test]"

echo "==> ruff"
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .

echo "==> import layers (lint-imports) and types (mypy)"
# The contracts in pyproject.toml cover the two apps too: put them on the path.
PYTHONPATH="$PWD/apps/bank-fraud:$PWD/apps/hospital-diagnostics${PYTHONPATH:+:$PYTHONPATH}" \
    "$VENV/bin/lint-imports" --no-cache
"$VENV/bin/mypy"

echo "==> pytest"
# Two workers, one per core of the CI machine (pytest-xdist). The end-to-end
# tests spend most of their time waiting on Flower's processes (a SuperNode
# polls every 3 s, a crashed one is noticed after its missed heartbeats, each
# message starts a ClientApp process), so two modules at a time overlap those
# waits. --dist loadscope keeps each module on one worker: a module's fixtures
# (one simulation SuperLink, one documented deployment) are made once. Every
# e2e test has its own FLWR_HOME, free ports and temporary folders, and stops
# the processes it started. `-n 0` (passed as an extra argument) runs serially.
# pytest exits 5 when it collects no test (with xdist too): set -e turns that
# into a failure.
"$PY" -m pytest -n 2 --dist loadscope "$@"
