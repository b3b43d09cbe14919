#!/bin/bash
# A stand-in for kubelet with one static pod, for the HA harness (tests/ha_support): runs the real
# kube-apiserver with the command of ROOT/etc/kubernetes/manifests/kube-apiserver.yaml, and when
# that file changes (or disappears) really stops the running process (SIGTERM, SIGKILL after 30 s,
# as kubelet's grace period) and starts it again with the new command. An apiserver that exits by
# itself is started again after 1 s (kubelet's restart policy, without its back-off).
#
# Usage: kubelet-standin.sh ROOT STATEDIR HOSTNAME PARENT_PID
# Meant to run in its own UTS namespace (`unshare --uts`) inside the test's network namespace: it
# sets that namespace's hostname to HOSTNAME, which the apiserver names itself by (its identity
# Lease). Host paths in the flags (values starting with /) are read under ROOT, the fake host.
# STATEDIR/events gets one line per event: `<unix ms> start|stopping|stopped|exited|changed|invalid
# [detail]`; STATEDIR/kube-apiserver.log the apiserver's output. It stops the apiserver and exits
# on SIGTERM, or when PARENT_PID (the test) is gone (then SIGKILL after 3 s).
set -uo pipefail
ROOT=${1:?usage: kubelet-standin.sh ROOT STATEDIR HOSTNAME PARENT_PID}
STATE=${2:?usage}
NAME=${3:?usage}
PARENT=${4:?usage}
KAPI=${IRSA_TEST_KUBE_APISERVER:?IRSA_TEST_KUBE_APISERVER must name the kube-apiserver binary}
MANIFEST=$ROOT/etc/kubernetes/manifests/kube-apiserver.yaml
# shellcheck source=standin-lib.sh source-path=SCRIPTDIR
. "$(dirname "$0")/standin-lib.sh"
set_hostname "$NAME"

# The items of the first `command:` block list of the manifest, one per line, unquoted.
command_of() {
  awk '
    /^[[:space:]]*(-[[:space:]]+)?command:[[:space:]]*$/ { on = 1; indent = -1; next }
    on {
      if (match($0, /^[[:space:]]*-[[:space:]]+/)) {
        if (indent < 0) indent = RLENGTH
        if (RLENGTH != indent) exit
        v = substr($0, RLENGTH + 1)
        sub(/[[:space:]]+$/, "", v)
        if (v ~ /^".*"$/ || v ~ /^\047.*\047$/) v = substr(v, 2, length(v) - 2)
        print v
        next
      }
      exit
    }' "$1"
}

start() {
  local items=() args=() a
  [ -f "$MANIFEST" ] && mapfile -t items < <(command_of "$MANIFEST")
  if [ "${#items[@]}" -lt 2 ] || [ "${items[0]}" != kube-apiserver ]; then
    event invalid "no kube-apiserver command in $MANIFEST"
    return
  fi
  for a in "${items[@]:1}"; do
    case "$a" in
      --*=/*) args+=("${a%%=*}=$ROOT${a#*=}") ;;
      *) args+=("$a") ;;
    esac
  done
  launch "${args[@]}"
}

last=
while :; do
  exit_if_orphaned "$PARENT"
  sum=$(cksum <"$MANIFEST" 2>/dev/null || echo missing)
  if [ "$sum" != "$last" ]; then
    [ -n "$last" ] && event changed
    stop
    last=$sum
    start
  else
    restart_if_exited
  fi
  sleep 0.2
done
