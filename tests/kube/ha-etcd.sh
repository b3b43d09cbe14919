#!/bin/bash
# The one etcd of the HA harness (tests/ha_support), inside the test's network namespace, on
# 127.0.0.1:2379 (peer 2380, metrics 2381) of that namespace. Stops etcd on SIGTERM, or when
# PARENT_PID (the test) is gone, so a test killed with -9 leaves no etcd behind.
# Usage: ha-etcd.sh DATADIR PARENT_PID
set -uo pipefail
DATA=${1:?usage: ha-etcd.sh DATADIR PARENT_PID}
PARENT=${2:?usage: ha-etcd.sh DATADIR PARENT_PID}
"${ETCD_BIN:-/usr/bin/etcd}" --name ha --data-dir "$DATA" \
  --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
  --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
  --initial-cluster ha=http://127.0.0.1:2380 --listen-metrics-urls http://127.0.0.1:2381 &
etcd=$!
# Running, not a zombie waiting to be reaped.
alive() {
  local st
  [ -r "/proc/$1/stat" ] && read -r _ _ st _ <"/proc/$1/stat" && [ "$st" != Z ]
}
trap 'kill -TERM "$etcd" 2>/dev/null; wait "$etcd"; exit 0' TERM INT
while kill -0 "$PARENT" 2>/dev/null && alive "$etcd"; do
  sleep 1
done
kill -TERM "$etcd" 2>/dev/null
wait "$etcd"
