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
EVENTS=$STATE/events
mkdir -p "$STATE"

event() { echo "$(date +%s%3N) $*" >>"$EVENTS"; }

if ! echo "$NAME" >/proc/sys/kernel/hostname; then
  event invalid "cannot set the hostname (not in a UTS namespace of its own?)"
  exit 1
fi

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

# Running, not a zombie waiting to be reaped.
alive() {
  local st
  [ -r "/proc/$1/stat" ] || return 1
  read -r _ _ st _ <"/proc/$1/stat" || return 1
  [ "$st" != Z ]
}

pid=
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
  "$KAPI" "${args[@]}" >>"$STATE/kube-apiserver.log" 2>&1 &
  pid=$!
  echo "$pid" >"$STATE/kube-apiserver.pid"
  event start "$pid"
}

# stop [GRACE]: SIGTERM, SIGKILL after GRACE tenths of a second (default 300).
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
last=
while :; do
  if ! kill -0 "$PARENT" 2>/dev/null; then
    # The test is gone (killed): its etcd too, so a graceful shutdown would only hang.
    stop 30
    event exit "parent $PARENT gone"
    exit 0
  fi
  sum=$(cksum <"$MANIFEST" 2>/dev/null || echo missing)
  if [ "$sum" != "$last" ]; then
    [ -n "$last" ] && event changed
    stop
    last=$sum
    start
  elif [ -n "$pid" ] && ! alive "$pid"; then
    wait "$pid"
    event exited "$pid status $?"
    pid=
    sleep 1
    start
  fi
  sleep 0.2
done
