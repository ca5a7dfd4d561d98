#!/usr/bin/env bash
# One command for a fresh machine: install everything, then run the whole default test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
