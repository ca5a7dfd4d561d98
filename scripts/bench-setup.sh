#!/usr/bin/env bash
# Installs what the benchmarks in bench/ need beyond scripts/setup.sh: GlusterFS (server and FUSE
# client) for the side-by-side column of bench/replication_bench.py. rsync comes from setup.sh.
# Idempotent: a second run only checks. Run as root. Not part of the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/lib.sh

apt_install_missing bench-setup glusterfs-server glusterfs-client
# The package may start a system glusterd (systemd machines). bench/gluster.py uses one that is
# already running, or starts its own and stops only that one.
echo "bench-setup: ready ($(glusterd --version 2>/dev/null | head -n 1))"
