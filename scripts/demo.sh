#!/usr/bin/env bash
# The demo: nodekeeper in front of a private containerd and a private registry, all on
# loopback under a temporary directory. Installs what it needs first (scripts/setup.sh),
# and stops everything it started before it exits. Run from anywhere, as root.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
exec .venv/bin/python scripts/demo.py
