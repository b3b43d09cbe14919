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
# shellcheck source=standin-lib.sh source-path=SCRIPTDIR
. "$HERE/standin-lib.sh"
set_hostname "$NAME"

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
  launch "${args[@]}"
}

handled=$(cat "$STATE/restart-request" 2>/dev/null || true)
start
while :; do
  exit_if_orphaned "$PARENT"
  asked=$(cat "$STATE/restart-request" 2>/dev/null || true)
  if [ -n "$asked" ] && [ "$asked" != "$handled" ]; then
    event restart "$asked"
    stop
    start
    handled=$asked
    echo "$asked" >"$STATE/restart-done.tmp" && mv "$STATE/restart-done.tmp" "$STATE/restart-done"
  elif restart_if_exited; then
    :
  elif [ -z "$pid" ]; then
    sleep 1
    start
  fi
  sleep 0.2
done
