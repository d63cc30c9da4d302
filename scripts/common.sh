# shellcheck shell=bash
# Pid files, shared by infra.sh and services.sh (sourced; the caller defines
# `log`). A recorded pid counts only while its command line still names the
# program: after a reboot the number may belong to a process that is not ours,
# which must never be stopped.

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
