#!/bin/bash
# A stand-in for systemctl on one k3s server of the HA harness (tests/ha_support/k3s.rs), for the
# unit `k3s` only (Type=notify): `restart k3s` asks the k3s stand-in (k3s-standin.sh) to stop and
# start its apiserver and returns once the new one is ready (k3s tells systemd it is ready once
# its apiserver is); `is-active k3s`, `show k3s -p ActiveState,MainPID`. Every call is logged to
# STATEDIR/systemctl.log.
# Usage: k3s-systemctl.sh STATEDIR URL PKIDIR ARGS...
# PKIDIR has ca.crt and the client certificate admin.crt/admin.key (the readiness check).
set -uo pipefail
STATE=${1:?usage: k3s-systemctl.sh STATEDIR URL PKIDIR ARGS...}
URL=${2:?usage}
PKI=${3:?usage}
shift 3
echo "$(date +%s%3N) $*" >>"$STATE/systemctl.log"
verb=${1:-}
unit=${2:-}
unit=${unit%.service}
if [ "$unit" != k3s ]; then
  echo "Failed to $verb ${2:-}: Unit ${2:-}.service not found." >&2
  exit 5
fi
running() {
  local p st
  p=$(cat "$STATE/kube-apiserver.pid" 2>/dev/null) || return 1
  [ -r "/proc/$p/stat" ] && read -r _ _ st _ <"/proc/$p/stat" && [ "$st" != Z ]
}
case "$verb" in
  restart)
    id="$(date +%s%N)-$$"
    echo "$id" >"$STATE/restart-request.tmp" && mv "$STATE/restart-request.tmp" "$STATE/restart-request"
    for _ in $(seq 1 3000); do
      [ "$(cat "$STATE/restart-done" 2>/dev/null)" = "$id" ] && break
      sleep 0.1
    done
    if [ "$(cat "$STATE/restart-done" 2>/dev/null)" != "$id" ]; then
      echo "Job for k3s.service failed because a timeout was exceeded." >&2
      exit 1
    fi
    for _ in $(seq 1 1200); do
      if [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" --key "$PKI/admin.key" "$URL/readyz")" = 200 ]; then
        echo "$(date +%s%3N) ready" >>"$STATE/systemctl.log"
        exit 0
      fi
      running || break
      sleep 0.1
    done
    echo "Job for k3s.service failed because the control process exited with error code." >&2
    exit 1
    ;;
  is-active)
    if running; then echo active; else echo inactive; exit 3; fi
    ;;
  show)
    if running; then
      echo "ActiveState=active"
      echo "MainPID=$(cat "$STATE/kube-apiserver.pid")"
    else
      echo "ActiveState=inactive"
      echo "MainPID=0"
    fi
    ;;
  *)
    echo "k3s systemctl stand-in: $verb not supported" >&2
    exit 1
    ;;
esac
