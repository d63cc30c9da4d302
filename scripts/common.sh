# shellcheck shell=bash
# What infra.sh and services.sh both need, defined once (sourced, after the
# caller sets LOG_NAME and WAIT_SECS): logging, ports, waiting, pid files.
#
# A recorded pid counts only while its command line still names the
# program: after a reboot the number may belong to a process that is not
# ours, which must never be stopped.

log() { printf '%s: %s\n' "$LOG_NAME" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# port_open HOST:PORT: true when something accepts TCP connections there.
port_open() { (exec 3<>"/dev/tcp/${1%:*}/${1##*:}") 2>/dev/null; }

# wait_for PIDFILE NAME CHECK...: runs CHECK every 0.1 s until it succeeds
# (returns 0), the process recorded in PIDFILE is gone (2; an empty PIDFILE
# is never gone), or WAIT_SECS pass (1). The process was started just now,
# so being alive is enough here: in the moment between its fork and the
# exec of NAME, its command line is still the caller's.
wait_for() {
  local pidfile=$1 i
  shift 2
  for ((i = 0; i < WAIT_SECS * 10; i++)); do
    "$@" && return 0
    if [[ -n $pidfile ]] && ! alive_pid "$pidfile"; then
      return 2
    fi
    sleep 0.1
  done
  return 1
}

# running_pid PIDFILE NAME: prints the pid while it is alive and its command
# line contains NAME (a zombie has none, so it does not count).
running_pid() {
  local pid cmdline
  [[ -f $1 ]] || return 1
  pid=$(cat "$1")
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
  [[ $cmdline == *"$2"* ]] || return 1
  echo "$pid"
}

# alive_pid PIDFILE: true while the recorded process exists and is not a
# zombie, whatever its command line.
alive_pid() {
  local pid state
  pid=$(cat "$1" 2>/dev/null) || return 1
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  state=$(ps -o stat= -p "$pid" 2>/dev/null) || return 1
  [[ -n $state && $state != Z* ]]
}

# stop_pid LABEL PIDFILE NAME SECS: SIGTERM, then SIGKILL if it still runs
# after SECS; removes the pid file either way.
stop_pid() {
  local label=$1 pidfile=$2 name=$3 secs=$4 pid i
  if pid=$(running_pid "$pidfile" "$name"); then
    kill -TERM "$pid"
    for ((i = 0; i < secs * 10; i++)); do
      running_pid "$pidfile" "$name" >/dev/null || break
      sleep 0.1
    done
    if running_pid "$pidfile" "$name" >/dev/null; then
      kill -KILL "$pid"
      log "killed $label (pid $pid): it did not stop within ${secs}s of SIGTERM"
    else
      log "stopped $label (pid $pid)"
    fi
  fi
  rm -f "$pidfile"
}
