#!/usr/bin/env bash
# Installs what the benchmarks in bench/ need beyond scripts/setup.sh: GlusterFS (server and FUSE
# client) for the side-by-side column of bench/replication_bench.py. rsync comes from setup.sh.
# Idempotent: a second run only checks. Run as root. Not part of the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(glusterfs-server glusterfs-client)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "bench-setup: installing apt packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The package may start a system glusterd (systemd machines). bench/gluster.py uses one that is
# already running, or starts its own and stops only that one.
echo "bench-setup: ready ($(glusterd --version 2>/dev/null | head -n 1))"
