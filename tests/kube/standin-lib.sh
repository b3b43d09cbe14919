# shellcheck shell=bash
# What the HA harness's stand-ins (kubelet-standin.sh, k3s-standin.sh) share: sourced by them
# once they have set STATE (their folder) and KAPI (the kube-apiserver binary).
#
# STATE/events gets one line per event: `<unix ms> <event> [detail]`; STATE/kube-apiserver.log
# the apiserver's output; STATE/kube-apiserver.pid its process id while it runs. SIGTERM or
# SIGINT stops the apiserver and exits.

EVENTS=$STATE/events
mkdir -p "$STATE"

event() { echo "$(date +%s%3N) $*" >>"$EVENTS"; }

# set_hostname NAME: this UTS namespace's hostname, which the apiserver names itself by (its
# identity Lease). Exits when it cannot (not in a UTS namespace of its own?).
set_hostname() {
  if ! echo "$1" >/proc/sys/kernel/hostname; then
    event invalid "cannot set the hostname (not in a UTS namespace of its own?)"
    exit 1
  fi
}

# alive PID: running, not a zombie waiting to be reaped.
alive() {
  local st
  [ -r "/proc/$1/stat" ] || return 1
  read -r _ _ st _ <"/proc/$1/stat" || return 1
  [ "$st" != Z ]
}

pid=
# launch ARG...: the apiserver with these arguments, in the background.
launch() {
  "$KAPI" "$@" >>"$STATE/kube-apiserver.log" 2>&1 &
  pid=$!
  echo "$pid" >"$STATE/kube-apiserver.pid"
  event start "$pid"
}

# stop [GRACE]: SIGTERM, SIGKILL after GRACE tenths of a second (default 300, kubelet's 30 s).
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

# exit_if_orphaned PARENT: when the test (PARENT) is gone (killed), stops the apiserver and
# exits; its etcd is gone too, so a graceful shutdown would only hang: SIGKILL after 3 s.
exit_if_orphaned() {
  if ! kill -0 "$1" 2>/dev/null; then
    stop 30
    event exit "parent $1 gone"
    exit 0
  fi
}

# restart_if_exited: when the apiserver exited by itself, records it and starts it again after
# 1 s with the script's own `start` (a restart policy without its back-off); false when it runs.
restart_if_exited() {
  [ -n "$pid" ] && ! alive "$pid" || return 1
  wait "$pid"
  event exited "$pid status $?"
  pid=
  sleep 1
  start
}

trap 'stop; event exit; exit 0' TERM INT
