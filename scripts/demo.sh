#!/usr/bin/env bash
# One command for a fresh machine: install everything, then run the two-node demo.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/safekit-cloud demo "$@"
