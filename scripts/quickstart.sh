#!/usr/bin/env bash
# Install flwr-ext into .venv and run the main job in Flower's Simulation Engine.
# Extra arguments go to `flwr-ext simulate`, e.g. `-c num-server-rounds=10`.
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
"$PY" -m pip install --quiet torch==2.13.0   # CPU build first (see README)
"$PY" -m pip install --quiet -e .

echo "==> running the robustness demo app in Flower's Simulation Engine"
exec "$VENV/bin/flwr-ext" simulate tests/e2e/robust_app --num-supernodes 5 \
  -c 'attack="scaling"' -c attack-strength=-20.0 -c 'attack-partition-ids="4"' "$@"
