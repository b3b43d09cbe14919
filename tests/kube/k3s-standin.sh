#!/bin/bash
# A stand-in for one k3s server of the HA harness (tests/ha_support/k3s.rs): runs the real
# kube-apiserver as k3s runs it, and restarts it only when asked through the systemctl stand-in
# (k3s-systemctl.sh), as `systemctl restart k3s` restarts the k3s process.
#
# At every start, as k3s does: the bootstrap reconcile writes the shared datastore's service.key
# to the host's <data-dir>/server/tls/service.key and its first key to service.current.key; the
# apiserver's arguments are computed from BASEARGS, k3s's defaults and the `kube-apiserver-arg`
# entries of /etc/rancher/k3s/config.yaml and its drop-ins (k3s-standin.py args). Editing those
# files changes nothing until the next restart, as with k3s. An apiserver that exits by itself is
# started again after 1 s (the unit's Restart=always, without its 5 s delay).
#
# Usage: k3s-standin.sh ROOT STATEDIR HOSTNAME PARENT_PID DATASTORE BASEARGS
# Meant to run in its own UTS namespace (`unshare --uts`) inside the test's network namespace; it
# sets the hostname to HOSTNAME (the apiserver's identity Lease). STATEDIR/events gets one line
# per event: `<unix ms> start|stopping|stopped|exited|restart|invalid [detail]` (the same as the
# kubelet stand-in's); STATEDIR/kube-apiserver.log the apiserver's output. A restart is asked by
# writing an id to STATEDIR/restart-request; STATEDIR/restart-done gets that id once the new
# apiserver process runs. It stops the apiserver and exits on SIGTERM, or when PARENT_PID (the
# test) is gone.
set -uo pipefail
ROOT=${1:?usage: k3s-standin.sh ROOT STATEDIR HOSTNAME PARENT_PID DATASTORE BASEARGS}
STATE=${2:?usage}
NAME=${3:?usage}
PARENT=${4:?usage}
DATASTORE=${5:?usage}
BASE=${6:?usage}
KAPI=${IRSA_TEST_KUBE_APISERVER:?IRSA_TEST_KUBE_APISERVER must name the kube-apiserver binary}
HERE=$(cd "$(dirname "$0")" && pwd)
EVENTS=$STATE/events
mkdir -p "$STATE"

event() { echo "$(date +%s%3N) $*" >>"$EVENTS"; }

if ! echo "$NAME" >/proc/sys/kernel/hostname; then
  event invalid "cannot set the hostname (not in a UTS namespace of its own?)"
  exit 1
fi

alive() {
  local st
  [ -r "/proc/$1/stat" ] || return 1
  read -r _ _ st _ <"/proc/$1/stat" || return 1
  [ "$st" != Z ]
}

pid=
start() {
  local args=() err
  if ! err=$(python3 "$HERE/k3s-standin.py" reconcile "$ROOT" "$DATASTORE" 2>&1); then
    event invalid "bootstrap reconcile: $err"
    return
  fi
  if ! mapfile -t args < <(python3 "$HERE/k3s-standin.py" args "$ROOT" "$BASE") || [ "${#args[@]}" -lt 2 ]; then
    event invalid "cannot compute the apiserver arguments"
    return
  fi
  printf '%s\n' "${args[@]}" >"$STATE/kube-apiserver.args"
  "$KAPI" "${args[@]}" >>"$STATE/kube-apiserver.log" 2>&1 &
  pid=$!
  echo "$pid" >"$STATE/kube-apiserver.pid"
  event start "$pid"
}

stop() {
  [ -n "$pid" ] || return 0
  if alive "$pid"; then
    event stopping "$pid"
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 1 "${1:-300}"); do
      alive "$pid" || break
      sleep 0.1
    done
    alive "$pid" && kill -KILL "$pid" 2>/dev/null
  fi
  wait "$pid" 2>/dev/null
  event stopped "$pid"
  rm -f "$STATE/kube-apiserver.pid"
  pid=
}

trap 'stop; event exit; exit 0' TERM INT
handled=$(cat "$STATE/restart-request" 2>/dev/null || true)
start
while :; do
  if ! kill -0 "$PARENT" 2>/dev/null; then
    stop 30
    event exit "parent $PARENT gone"
    exit 0
  fi
  asked=$(cat "$STATE/restart-request" 2>/dev/null || true)
  if [ -n "$asked" ] && [ "$asked" != "$handled" ]; then
    event restart "$asked"
    stop
    start
    handled=$asked
    echo "$asked" >"$STATE/restart-done.tmp" && mv "$STATE/restart-done.tmp" "$STATE/restart-done"
  elif [ -n "$pid" ] && ! alive "$pid"; then
    wait "$pid"
    event exited "$pid status $?"
    pid=
    sleep 1
    start
  elif [ -z "$pid" ]; then
    sleep 1
    start
  fi
  sleep 0.2
done
