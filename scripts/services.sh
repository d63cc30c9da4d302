#!/usr/bin/env bash
# Starts (or stops) the project's own services from the release binaries,
# against the servers `scripts/infra.sh up` brought up:
#   command-api  127.0.0.1:8081  writes, with the relay to Kafka inside
#   query-api    127.0.0.1:8082  reads
#   projector    127.0.0.1:8083  Kafka -> MongoDB read models (health only)
# Logs and pids are in .data/services/. A demo show is created once; its id is
# kept in .data/services/demo-show (and checked against the event log, so a
# wiped database gets a new one).
#
# Idempotent: `up` leaves a running service alone. `down` stops only the
# processes whose pids `up` recorded.
#
# Every setting the services read can be set in the environment (docs/configuration.md);
# the addresses below are passed on to them.
#
# Requests need bearer tokens (docs/api.md, "Identity"): `up` keeps a
# generated AUTH_JWT_SECRET in .data/auth-secret (unless the environment
# brings a secret, a key file, or AUTH_DISABLED=true) and prints curl lines
# that carry a token; `token` prints one for the running system.
#
# Usage: scripts/services.sh up|down|status
#        scripts/services.sh token --sub <uuid> [--role organizer|admin]... [--ttl-secs N]
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIR=${SERVICES_DIR:-"$ROOT/.data/services"}
BIN=${SERVICES_BIN:-"${CARGO_TARGET_DIR:-$ROOT/target}/release"}
WAIT_SECS=${SERVICES_WAIT_SECS:-60}

export DATABASE_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/ticketing}
export COMMAND_API_ADDR=${COMMAND_API_ADDR:-127.0.0.1:8081}
export QUERY_API_ADDR=${QUERY_API_ADDR:-127.0.0.1:8082}
export PROJECTOR_ADDR=${PROJECTOR_ADDR:-127.0.0.1:8083}
# command-api signs consistency tokens and query-api checks them with one
# shared secret: generated once per machine (in .data/, never committed)
# unless the environment brings its own.
if [[ -z ${CONSISTENCY_KEY:-} ]]; then
  mkdir -p "$ROOT/.data"
  if [[ ! -s $ROOT/.data/consistency-key ]]; then
    (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$ROOT/.data/consistency-key")
  fi
  CONSISTENCY_KEY=$(cat "$ROOT/.data/consistency-key")
fi
export CONSISTENCY_KEY
# The secret that signs bearer tokens, the same way.
if [[ -z ${AUTH_JWT_SECRET:-}${AUTH_JWKS_FILE:-} && ${AUTH_DISABLED:-false} != true ]]; then
  mkdir -p "$ROOT/.data"
  if [[ ! -s $ROOT/.data/auth-secret ]]; then
    (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$ROOT/.data/auth-secret")
  fi
  AUTH_JWT_SECRET=$(cat "$ROOT/.data/auth-secret")
  export AUTH_JWT_SECRET
fi
COMMAND_URL="http://$COMMAND_API_ADDR"
QUERY_URL="http://$QUERY_API_ADDR"
PROJECTOR_URL="http://$PROJECTOR_ADDR"
# The seat map page comes from query-api and books on command-api.
export CORS_ALLOWED_ORIGINS=${CORS_ALLOWED_ORIGINS:-$QUERY_URL}
export COMMAND_API_URL=${COMMAND_API_URL:-$COMMAND_URL}

LOG_NAME=services
# shellcheck source=scripts/common.sh
source "$ROOT/scripts/common.sh"

service_pid() { running_pid "$DIR/$1.pid" "/$1"; } # name -> pid while it runs

# start NAME ADDR ARGS...: runs the binary in the background unless it runs.
start() {
  local name=$1 addr=$2
  shift 2
  if service_pid "$name" >/dev/null; then
    log "$name already running (pid $(service_pid "$name"))"
    return
  fi
  port_open "$addr" && die "$addr is taken by another process; stop it or set the address (docs/configuration.md)"
  [[ -x $BIN/$name ]] || die "$BIN/$name is missing: run \`make up\`, which builds it"
  nohup "$BIN/$name" "$@" >>"$DIR/$name.log" 2>&1 </dev/null &
  echo $! >"$DIR/$name.pid"
  log "started $name (pid $!), log in $DIR/$name.log"
}

# wait_ready NAME URL [PATTERN]: until URL/readyz is 200 (and its body
# matches PATTERN), failing early if the process died.
wait_ready() {
  local name=$1 url=$2 pattern=${3:-} status=0
  wait_for "$DIR/$name.pid" "/$name" ready_at "$url" "$pattern" || status=$?
  case $status in
    0) log "$name ready at $url" ;;
    2) die "$name exited during start-up; last lines of $DIR/$name.log:
$(tail -n 5 "$DIR/$name.log")" ;;
    *) die "$name was not ready within ${WAIT_SECS}s; see $DIR/$name.log" ;;
  esac
}

# ready_at URL PATTERN: URL/readyz answers 200 with PATTERN in its body.
ready_at() {
  local body
  body=$(curl -fsS --max-time 2 "$1/readyz" 2>/dev/null) && [[ $body == *"$2"* ]]
}

# token ARGS...: a bearer token signed with the running system's secret.
token() {
  [[ -x $BIN/command-api ]] || die "$BIN/command-api is missing: run \`make up\`, which builds it"
  [[ -n ${AUTH_JWT_SECRET:-} ]] || die "tokens are made with AUTH_JWT_SECRET; with AUTH_JWKS_FILE, ask your identity provider"
  "$BIN/command-api" token "$@"
}

# The demo organizer and buyer of the printed lines.
DEMO_ORGANIZER=0e4f7a3c-8d2b-4c61-9f0a-5b3e2d1c4a77
DEMO_BUYER=6f1c0a52-3c0e-4d8e-9a53-2c1d5f0b7e11

# The demo show, created once per event log.
demo_show() {
  local idfile="$DIR/demo-show" id answer headers token
  if [[ -f $idfile ]]; then
    id=$(cat "$idfile")
    if [[ $(psql "$DATABASE_URL" -tAc \
      "SELECT count(*) FROM events WHERE aggregate_type = 'Show' AND aggregate_id = '$id'") != 0 ]]; then
      echo "$id"
      return
    fi
  fi
  local auth=()
  if [[ -n ${AUTH_JWT_SECRET:-} ]]; then
    auth=(-H "Authorization: Bearer $(token --sub "$DEMO_ORGANIZER" --role organizer --ttl-secs 300)")
  fi
  headers=$(mktemp)
  answer=$(curl -fsS --max-time 10 -D "$headers" -XPOST "$COMMAND_URL/shows" "${auth[@]}" \
    -H 'content-type: application/json' -d '{
      "name": "Demo Night", "venue": "Blue Note", "starts_at": "2027-06-01T20:00:00Z",
      "sections": [
        {"name": "VIP", "price_cents": 22500, "rows": [{"row": "A", "seats": 10}]},
        {"name": "Floor", "price_cents": 9000, "rows": [{"row": "B", "seats": 20}, {"row": "C", "seats": 20}]}
      ]}') || die "creating the demo show failed; see $DIR/command-api.log"
  id=$(sed -E 's/.*"show_id":"([^"]+)".*/\1/' <<<"$answer")
  token=$(tr -d '\r' <"$headers" | sed -nE 's/^x-consistency-token: (.*)$/\1/Ip')
  rm -f "$headers"
  # Read our own write, so the printed reads work at once.
  curl -fsS --max-time 10 -o /dev/null "$QUERY_URL/shows/$id" -H "X-Consistency-Token: $token" ||
    die "the demo show did not reach the query side; see $DIR/projector.log"
  echo "$id" >"$idfile"
  log "created the demo show $id"
  echo "$id"
}

up() {
  local tool
  for tool in curl psql; do
    command -v "$tool" >/dev/null || die "$tool is missing (scripts/infra.sh up installs psql with Postgres; curl: apt-get install curl)"
  done
  mkdir -p "$DIR"
  "$BIN/command-api" migrate >>"$DIR/command-api.log" 2>&1 ||
    die "migrations failed; see $DIR/command-api.log"
  start command-api "$COMMAND_API_ADDR"
  # The relay creates the topic before it reports itself active; the
  # projector subscribes to it by name, so it starts after.
  wait_ready command-api "$COMMAND_URL" '"role":"active"'
  start projector "$PROJECTOR_ADDR"
  start query-api "$QUERY_API_ADDR"
  wait_ready projector "$PROJECTOR_URL"
  wait_ready query-api "$QUERY_URL"
  local show with_token='' body_user=''
  show=$(demo_show)
  if [[ -n ${AUTH_JWT_SECRET:-} ]]; then
    with_token=" -H 'Authorization: Bearer $(token --sub "$DEMO_BUYER" --ttl-secs 86400)'"
  else
    body_user="\"user_id\":\"$DEMO_BUYER\","
  fi
  cat <<EOF

Ticketing is up.
  command-api  $COMMAND_URL   (POST; $COMMAND_URL/openapi.json)
  query-api    $QUERY_URL   (GET;  $QUERY_URL/openapi.json)
  projector    $PROJECTOR_URL/readyz
  metrics      $COMMAND_URL/metrics $QUERY_URL/metrics $PROJECTOR_URL/metrics
  logs         $DIR/*.log

The demo show's seat map, live (paste the token below into it to book):

  $QUERY_URL/shows/$show/seatmap

Book seat A1 of the demo show, then read the VIP section and your bookings:

curl -s -XPOST $COMMAND_URL/bookings$with_token -H 'content-type: application/json' -d '{$body_user"show_id":"$show","seats":["A1"]}'
curl -s '$QUERY_URL/shows/$show/availability?section=VIP'
curl -s $QUERY_URL/users/$DEMO_BUYER/bookings$with_token

The reads follow the booking within milliseconds; pasted together they may
be a moment early. A read that sends the booking's X-Consistency-Token
header (curl -i shows it) waits for it. A1 sells once: book another seat
(A2 ... A10, B1 ... C20) for another go. The token in these lines is the
demo buyer's for 24 hours (the seat map takes it too);
\`scripts/services.sh token --sub <uuid>\` makes others (--role organizer
may create shows, --role admin may act for anyone).
EOF
}

stop() { stop_pid "$1" "$DIR/$1.pid" "/$1" 15; } # name

case ${1:-} in
  up) up ;;
  down)
    # Readers first, the writer last: it lets its requests in flight finish.
    stop query-api
    stop projector
    stop command-api
    ;;
  status)
    for name in command-api projector query-api; do
      if pid=$(service_pid "$name"); then log "$name running (pid $pid)"; else log "$name not running"; fi
    done
    ;;
  token)
    shift
    token "$@"
    ;;
  *) die "usage: $0 up|down|status|token --sub <uuid> [--role organizer|admin] [--ttl-secs N]" ;;
esac
