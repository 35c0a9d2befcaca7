#!/usr/bin/env bash
# The whole test suite: lint, types, generated-code check, unit and integration tests.
# Installs what it needs first (see scripts/setup.sh). Run from anywhere, as root.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh

.venv/bin/python scripts/genproto.py --check
.venv/bin/ruff check .
.venv/bin/mypy
# The integration tier starts a real containerd and real registries; it fails, never
# skips, when they cannot start.
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
