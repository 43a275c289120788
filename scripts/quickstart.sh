#!/usr/bin/env bash
# Install flwr-ext into .venv and run the main job: the hospital-diagnostics app
# (3 hospitals, FedAvg, 5 rounds) in Flower's Simulation Engine. The log ends with
# the folder holding the metrics (JSON, CSV), the final model and the PNG plots.
# Extra arguments go to `flwr-ext simulate`, e.g. `-c strategy='"median"'`.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${FLWR_EXT_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating a virtualenv in $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install --quiet --upgrade pip
# torch first: the CPU build 2.13.0. A bare `torch` requirement on a machine
# without torch would pull a multi-GB CUDA build.
"$PY" -m pip install --quiet torch==2.13.0
"$PY" -m pip install --quiet -e .

echo "==> running apps/hospital-diagnostics in Flower's Simulation Engine"
exec "$VENV/bin/flwr-ext" simulate apps/hospital-diagnostics --num-supernodes 3 "$@"
