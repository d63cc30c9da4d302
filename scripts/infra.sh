#!/usr/bin/env bash
# Brings up (or stops) the three servers the project needs, on this machine:
#   Postgres   127.0.0.1:5432   the local cluster (installed from Debian if missing)
#   Tansu      127.0.0.1:9092   Kafka-compatible broker, data in .data/tansu/
#   SecantusDB 127.0.0.1:27017  MongoDB-wire-compatible server, data in .data/secantus/
#
# Idempotent: a second `up` reuses whatever already answers. `down` stops only
# what this script started (by the pids it recorded), nothing else.
#
# Usage: scripts/infra.sh up|down|status|apt PACKAGE...|api-checkers
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DATA="$ROOT/.data"
TANSU_VERSION=0.6.0
SECANTUS_VERSION=0.7.0b3
# The OpenAPI validator and the API fuzzer `make test` runs against both
# services' documents, pinned, in their own virtualenv.
API_CHECKERS=(openapi-spec-validator==0.9.0 schemathesis==4.32.5)
API_CHECKERS_VENV="$DATA/api-checkers"
PG_PORT=5432
KAFKA_PORT=9092
MONGO_PORT=27017
PG_DATABASE=${PG_DATABASE:-ticketing}
WAIT_SECS=${INFRA_WAIT_SECS:-60}

LOG_NAME=infra
# shellcheck source=scripts/common.sh
source "$ROOT/scripts/common.sh"

# wait_for_port NAME PORT [PIDFILE PROCESS]: until 127.0.0.1:PORT answers.
wait_for_port() {
  local name=$1 port=$2 status=0
  wait_for "${3:-}" "${4:-}" port_open "127.0.0.1:$port" || status=$?
  case $status in
    0) ;;
    2) die "$name exited during start-up; see its log in $DATA" ;;
    *) die "$name did not answer on 127.0.0.1:$port within ${WAIT_SECS}s; see its log in $DATA" ;;
  esac
}

# The newest Postgres version with a cluster configuration (empty if none).
pg_version() {
  find /etc/postgresql -mindepth 1 -maxdepth 1 -type d -printf '%f\n' 2>/dev/null | sort -V | tail -n 1 || true
}

apt_install() {
  log "installing $* from Debian's packages"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

postgres_up() {
  if ! command -v pg_ctlcluster >/dev/null || [[ -z $(pg_version) ]]; then
    apt_install postgresql postgresql-client
    local version hba
    version=$(pg_version)
    hba=/etc/postgresql/$version/main/pg_hba.conf
    # A cluster we installed ourselves gets the local trust auth the project
    # expects of a development machine; an existing cluster is left as it is.
    sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
    touch "$DATA/postgres.installed-by-project"
  fi
  if ! pg_isready -q -h 127.0.0.1 -p "$PG_PORT"; then
    local version
    version=$(pg_version)
    log "starting the local Postgres $version cluster"
    pg_ctlcluster --skip-systemctl-redirect "$version" main start
    touch "$DATA/postgres.started-by-project"
  fi
  wait_for "" "" pg_isready -q -h 127.0.0.1 -p "$PG_PORT" ||
    die "Postgres did not answer on 127.0.0.1:$PG_PORT within ${WAIT_SECS}s"
  local exists
  exists=$(psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -tAc \
    "SELECT 1 FROM pg_database WHERE datname = '$PG_DATABASE'")
  if [[ $exists != 1 ]]; then
    createdb -h 127.0.0.1 -p "$PG_PORT" -U postgres "$PG_DATABASE"
    log "created database $PG_DATABASE"
  fi
  log "postgres ready on 127.0.0.1:$PG_PORT (database $PG_DATABASE)"
}

tansu_up() {
  # Captured first: with pipefail, `grep -q` closing the pipe early would
  # turn the writer's SIGPIPE into a failed check.
  local installed
  installed=$(tansu --version 2>/dev/null || true)
  if [[ $installed != *"$TANSU_VERSION"* ]]; then
    log "installing tansu $TANSU_VERSION with cargo (a one-time build of several minutes)"
    cargo install tansu --version "$TANSU_VERSION" --features libsql --locked
  fi
  local pidfile="$DATA/tansu/tansu.pid"
  mkdir -p "$DATA/tansu"
  if running_pid "$pidfile" "tansu" >/dev/null || port_open "127.0.0.1:$KAFKA_PORT"; then
    wait_for_port tansu "$KAFKA_PORT"
    [[ -f $DATA/tansu/tansu.db ]] && tansu_index_headers
    log "kafka (tansu) already up on 127.0.0.1:$KAFKA_PORT"
    return
  fi
  # Tansu reads the sqlite path relative to its working directory.
  (
    cd "$DATA/tansu"
    nohup tansu broker \
      --storage-engine sqlite://tansu.db \
      --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
      --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
      >>tansu.log 2>&1 </dev/null &
    echo $! >tansu.pid
  )
  wait_for_port tansu "$KAFKA_PORT" "$pidfile" tansu
  tansu_index_headers
  log "kafka (tansu) started on 127.0.0.1:$KAFKA_PORT, log in $DATA/tansu/tansu.log"
}

# Tansu 0.6.0's sqlite schema has no index on `header`, and it looks up each
# fetched record's headers by (topition, offset_id): every fetched message
# scans every header ever stored. With six headers per event, a topic of
# 36,000 events could not be consumed at all (the broker spun at 100% CPU).
# The index makes that lookup a probe; it is idempotent and changes no data.
tansu_index_headers() {
  local db="$DATA/tansu/tansu.db" i
  for ((i = 0; i < 50; i++)); do
    [[ -f $db ]] && python3 - "$db" <<'PY' 2>/dev/null && return 0
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], timeout=30)
db.execute("CREATE INDEX IF NOT EXISTS header_by_record ON header (topition, offset_id)")
db.commit()
PY
    sleep 0.2
  done
  log "warning: could not index tansu's header table; consuming large topics will be slow"
}

secantus_up() {
  local installed
  installed=$(python3 -m pip show secantusdb 2>/dev/null || true)
  if [[ $installed != *"Version: $SECANTUS_VERSION"* ]]; then
    log "installing secantusdb $SECANTUS_VERSION with pip"
    python3 -m pip install --quiet --disable-pip-version-check "secantusdb==$SECANTUS_VERSION"
  fi
  local pidfile="$DATA/secantus/secantus.pid"
  mkdir -p "$DATA/secantus"
  if running_pid "$pidfile" "secantus" >/dev/null || port_open "127.0.0.1:$MONGO_PORT"; then
    wait_for_port secantusdb "$MONGO_PORT"
    log "mongodb (secantusdb) already up on 127.0.0.1:$MONGO_PORT"
    return
  fi
  (
    cd "$DATA/secantus"
    nohup python3 -m secantus --host 127.0.0.1 --port "$MONGO_PORT" \
      --storage-path "$DATA/secantus/db" --log-level WARNING \
      >>secantus.log 2>&1 </dev/null &
    echo $! >secantus.pid
  )
  wait_for_port secantusdb "$MONGO_PORT" "$pidfile" secantus
  log "mongodb (secantusdb) started on 127.0.0.1:$MONGO_PORT, log in $DATA/secantus/secantus.log"
}

# Installs API_CHECKERS once, and again only when the pins change.
api_checkers_up() {
  local stamp="$API_CHECKERS_VENV/pins" wanted="${API_CHECKERS[*]}"
  if [[ -f $stamp && $(cat "$stamp") == "$wanted" ]]; then
    return 0
  fi
  log "installing ${API_CHECKERS[*]} into $API_CHECKERS_VENV"
  # Debian's python3 makes virtualenvs only with its python3-venv package.
  python3 -c 'import ensurepip, venv' 2>/dev/null || apt_install python3-venv
  rm -rf "$API_CHECKERS_VENV"
  python3 -m venv "$API_CHECKERS_VENV"
  "$API_CHECKERS_VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${API_CHECKERS[@]}"
  printf '%s' "$wanted" >"$stamp"
}

case ${1:-} in
  up)
    mkdir -p "$DATA"
    postgres_up
    secantus_up
    tansu_up
    ;;
  down)
    stop_pid tansu "$DATA/tansu/tansu.pid" tansu 10
    stop_pid secantusdb "$DATA/secantus/secantus.pid" secantus 10
    if [[ -f $DATA/postgres.started-by-project ]]; then
      pg_ctlcluster --skip-systemctl-redirect "$(pg_version)" main stop
      rm -f "$DATA/postgres.started-by-project"
      log "stopped the Postgres cluster this script had started"
    fi
    ;;
  apt)
    # A Debian package a make target needs (shellcheck for `make lint`).
    shift
    apt_install "$@"
    ;;
  api-checkers)
    mkdir -p "$DATA"
    api_checkers_up
    ;;
  status)
    for entry in "postgres $PG_PORT" "kafka $KAFKA_PORT" "mongodb $MONGO_PORT"; do
      read -r name port <<<"$entry"
      if port_open "127.0.0.1:$port"; then log "$name up on 127.0.0.1:$port"; else log "$name down (127.0.0.1:$port)"; fi
    done
    ;;
  *)
    die "usage: $0 up|down|status|apt PACKAGE...|api-checkers"
    ;;
esac
