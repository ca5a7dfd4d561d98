# Settings and helpers shared by prestart, start_prim and stop_prim (sourced, never run on its own).
# Every setting can be overridden from the environment of the safekit-cloud daemon (for example in
# a systemd drop-in: Environment=PGDATA=/srv/pg/main).

: "${PGDATA:=/var/lib/postgresql/15/main}"   # the data directory: replicated (or inside a replicated directory)
: "${PGPORT:=5432}"
if [ -z "${PGBIN:-}" ]; then                 # the server's binaries: initdb, pg_ctl, postgres
  if [ -x /usr/lib/postgresql/15/bin/pg_ctl ]; then PGBIN=/usr/lib/postgresql/15/bin
  else PGBIN=$(dirname "$(command -v pg_ctl || echo /usr/bin/pg_ctl)"); fi
fi
: "${PG_OS_USER:=postgres}"                  # the system user the server runs as
: "${PG_SOCKET_DIR:=/var/run/postgresql}"    # Unix socket directory (not in the replicated directory)
: "${PG_LOG:=/var/log/postgresql/safekit-postgresql.log}"  # server log (not in the replicated directory)
: "${PG_CLIENT_NET:=}"                       # e.g. 10.0.0.0/24: clients allowed over TCP (pg_hba.conf line)
: "${PG_CLIENT_AUTH:=scram-sha-256}"         # authentication method of that line
: "${PG_INITDB_OPTS:=--encoding=UTF8 --locale=C.UTF-8 --auth-local=peer --auth-host=scram-sha-256}"
: "${PG_OPTIONS:=}"                          # extra server options, e.g. "-c shared_buffers=1GB"
: "${PG_START_TIMEOUT:=300}"                 # seconds for start + crash recovery (keep below scripts.timeout)
: "${PG_STOP_TIMEOUT:=30}"                   # seconds for a fast stop before an immediate one (below scripts.stop_timeout)
: "${PG_REQUIRE_REPLICATED:=1}"              # 1: refuse to start unless PGDATA is on the safekit replication mount
PGDATA=${PGDATA%/}
export PGDATA PGPORT

log() { echo "postgresql: $*"; }

# Run a command as the PostgreSQL system user, from a directory it can read.
as_pg() {
  if [ "$(id -u)" = "$(id -u "$PG_OS_USER")" ]; then (cd / && "$@")
  else (cd / && runuser -u "$PG_OS_USER" -- "$@"); fi
}

# True if PID is a postmaster serving this PGDATA from this node: a process named postgres, started
# with this data directory (pg_ctl passes -D PGDATA), in our network namespace (the nodes of a test
# lab share one machine's pids, but each has its own network namespace). Anything else is not ours:
# never signal it.
is_our_postmaster() {
  _pid=$1
  case "$_pid" in ''|*[!0-9]*) return 1 ;; esac
  _comm=$(cat "/proc/$_pid/comm" 2>/dev/null) || return 1
  case "$_comm" in postgres|postmaster) ;; *) return 1 ;; esac
  [ "$(readlink "/proc/$_pid/ns/net" 2>/dev/null)" = "$(readlink /proc/self/ns/net)" ] || return 1
  tr '\0' '\n' < "/proc/$_pid/cmdline" 2>/dev/null | grep -qxF -- "$PGDATA"
}

# The file system type of the mount that holds PATH (an existing path): the topmost mount whose
# mount point is the longest prefix of it, from our own mount table (findmnt --target picks the
# lowest of stacked mounts).
fstype_of() {
  awk -v p="$(realpath "$1")" '{
    mp = $5; gsub(/\\040/, " ", mp)
    for (i = 7; i <= NF; i++) if ($i == "-") { t = $(i + 1); break }
    if (p == mp || index(p, (mp == "/" ? "/" : mp "/")) == 1) { if (length(mp) >= best) { best = length(mp); ft = t } }
  } END { print ft }' /proc/self/mountinfo
}

# Pids of our postmasters, found in /proc (works even when postmaster.pid cannot be read).
our_postmasters() {
  for _d in /proc/[0-9]*; do
    _p=${_d#/proc/}
    is_our_postmaster "$_p" && echo "$_p"
  done
  return 0
}

# The pid recorded in PGDATA/postmaster.pid (empty if there is none or it cannot be read).
recorded_pid() {
  head -n 1 "$PGDATA/postmaster.pid" 2>/dev/null | tr -dc '0-9'
}

# Server processes left without their postmaster (it was killed): named postgres, in our network
# namespace, working in PGDATA. They would keep the old shared memory busy and block a new start.
our_orphans() {
  for _d in /proc/[0-9]*; do
    _p=${_d#/proc/}
    [ "$(cat "$_d/comm" 2>/dev/null)" = postgres ] || continue
    [ "$(readlink "$_d/ns/net" 2>/dev/null)" = "$(readlink /proc/self/ns/net)" ] || continue
    [ "$_d/cwd" -ef "$PGDATA" ] 2>/dev/null && echo "$_p"
  done
  return 0
}

# Stop every postmaster of ours at once: SIGQUIT (immediate shutdown), SIGKILL after 10 s; then
# SIGKILL what is left of their children.
kill_postmasters() {
  _pids=$(our_postmasters)
  [ -n "$_pids" ] || { kill_orphans; return 0; }
  log "immediate stop of postmaster(s) $_pids"
  kill -QUIT $_pids 2>/dev/null
  for _i in $(seq 1 100); do
    _left=""; for _p in $_pids; do is_our_postmaster "$_p" && _left="$_left $_p"; done
    [ -z "$_left" ] && break
    sleep 0.1
  done
  if [ -n "$_left" ]; then
    log "postmaster(s)$_left ignored SIGQUIT: SIGKILL"
    kill -KILL $_left 2>/dev/null
  fi
  kill_orphans
}

kill_orphans() {
  for _i in 1 2 3 4 5 6 7 8 9 10; do
    _orphans=$(our_orphans)
    [ -n "$_orphans" ] || return 0
    [ "$_i" = 1 ] && log "killing server processes left behind: $(echo $_orphans)"
    kill -KILL $_orphans 2>/dev/null
    sleep 0.1
  done
  return 0
}
