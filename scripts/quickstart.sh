#!/usr/bin/env bash
# The main job: set up (apt packages, virtualenv), then run `peerpull quickstart` on a private,
# embedded set-up (own registry and containerd under a temp dir; never the host's).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${PEERPULL_VENV:-.venv}
exec "$VENV/bin/peerpull" quickstart "$@"
