#!/usr/bin/env bash
# The main job: set up (apt packages, virtualenv), then run `peerpull quickstart` on a private,
# embedded set-up (own registry and containerd under a temp dir; never the host's).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${PEERPULL_VENV:-.venv}
# a private set-up: nothing outlives it (no fd holder; a stop unmounts FUSE)
export PEERPULL_SNAPSHOTTER_FD_HOLDER=${PEERPULL_SNAPSHOTTER_FD_HOLDER:-false}
export PEERPULL_SNAPSHOTTER_KEEP_MOUNT_ON_STOP=${PEERPULL_SNAPSHOTTER_KEEP_MOUNT_ON_STOP:-false}
exec "$VENV/bin/peerpull" quickstart "$@"
