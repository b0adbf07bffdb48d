#!/usr/bin/env bash
# The test command: set up everything (apt packages, virtualenv), then run the whole test suite.
# Tests that need root, FUSE, containerd or a registry start private instances under temp dirs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${PEERPULL_VENV:-.venv}
# the house rules first: lint + import order (ruff), types of the libraries (mypy --strict)
"$VENV/bin/ruff" check --quiet .
"$VENV/bin/mypy" --no-error-summary
exec "$VENV/bin/python" -m pytest -p no:cacheprovider "$@"
