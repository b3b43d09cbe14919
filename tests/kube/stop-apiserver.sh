#!/bin/bash
# Stops what tests/kube/start-apiserver.sh started, by the PIDs it recorded.
# Usage: stop-apiserver.sh STATEDIR [apiserver]   (with "apiserver": etcd keeps running)
STATE=${1:?usage: stop-apiserver.sh STATEDIR [apiserver]}
names="kube-apiserver etcd"
[ "${2:-}" = apiserver ] && names=kube-apiserver
for name in $names; do
  pidf="$STATE/$name.pid"
  [ -f "$pidf" ] || continue
  pid=$(cat "$pidf")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid"; fi
  fi
  rm -f "$pidf"
done
