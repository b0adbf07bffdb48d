#!/usr/bin/env bash
# Install what peerpull needs on Debian 12 (as root) and a virtualenv at $PEERPULL_VENV (default .venv).
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${PEERPULL_VENV:-.venv}
APT_PACKAGES=(python3-venv python3-dev gcc pkg-config fuse3 libfuse3-dev containerd runc docker-registry
              skopeo umoci busybox-static debootstrap iproute2 ca-certificates pigz buildah)
missing=()
for p in "${APT_PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating virtualenv $VENV" >&2
  python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q --upgrade pip >/dev/null 2>&1 || true
"$VENV/bin/pip" install -q -e ".[test,bench]" 2>&1 | grep -v -E "^(WARNING: Location|  )" >&2 || true
"$VENV/bin/python" -c "import peerpull, pyfuse3, zstandard, aiohttp" || { echo "setup: the virtualenv is broken" >&2; exit 1; }
"$VENV/bin/python" -m peerpull_proto >/dev/null  # generate the protobuf modules into the venv once
