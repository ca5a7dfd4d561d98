#!/usr/bin/env bash
# Installs everything safekit-cloud, its demo and its tests need on a fresh Debian machine.
# Idempotent: a second run only checks. Run as root (apt, namespaces, FUSE).
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/lib.sh

APT_PACKAGES=(fuse3 nftables libnftables1 iproute2 iputils-ping procps psmisc
              postgresql rsync curl e2fsprogs mount)
apt_install_missing setup "${APT_PACKAGES[@]}"

# PostgreSQL's binaries for the example and its test (Debian keeps them off the PATH).
if ! command -v pg_ctl >/dev/null 2>&1; then
  pgbin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
  [ -n "$pgbin" ] && for b in initdb pg_ctl postgres pgbench psql pg_isready; do ln -sf "$pgbin/$b" /usr/local/bin/$b; done
fi

# The PostgreSQL example runs the server as the postgres system user. The package creates it; a
# minimal image, or an /etc/passwd restored without it, may lack it.
if ! id -u postgres >/dev/null 2>&1; then
  echo "setup: creating the postgres system user"
  getent group postgres >/dev/null || groupadd --system postgres
  useradd --system --gid postgres --home-dir /var/lib/postgresql --no-create-home --shell /bin/bash postgres
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  echo "setup: installing Python packages into .venv"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q --disable-pip-version-check -e '.[all,dev]' 2>&1 | grep -vE 'Location .* is ignored|BuildBackendWarning|^ +(!!|\*+|corresp|with strategy|Please|By 20|See https|name as your|folders in)|^ *$' || true
  rm -f .venv/.installed-*
  touch "$stamp"
fi
echo "setup: ready (.venv/bin/safekit-cloud)"
