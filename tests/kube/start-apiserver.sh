#!/bin/bash
# Starts a real kube-apiserver (and, if it is not running yet, its etcd) on 127.0.0.1, for
# tests/real_apiserver_rotation.rs. Adapted from ../shared/tools/start-apiserver.sh: the binary
# comes from $IRSA_TEST_KUBE_APISERVER (never from ../shared), etcd keeps running across
# apiserver restarts (stop-apiserver.sh STATEDIR apiserver stops only the apiserver), and the
# ports come from FLAGDIR/env.
#
# Usage: start-apiserver.sh FLAGDIR STATEDIR
#   FLAGDIR/apiserver.args  extra kube-apiserver flags, one per line (absolute paths); appended
#                           after the base flags (repeatable flags accumulate, others: last wins)
#   FLAGDIR/env             sets SECURE_PORT, ETCD_PORT, ETCD_PEER_PORT, ETCD_METRICS_PORT
# STATEDIR receives pki/ (test CA, serving cert, admin client cert), etcd-data/, logs, pid files
# and kubeconfig. Prints "ready after Ns" once /readyz answers ok.
set -euo pipefail

FLAGDIR=${1:?usage: start-apiserver.sh FLAGDIR STATEDIR}
FLAGDIR=$(cd "$FLAGDIR" && pwd)
STATE=${2:?usage: start-apiserver.sh FLAGDIR STATEDIR}
mkdir -p "$STATE"
STATE=$(cd "$STATE" && pwd)

KAPI_BIN=${IRSA_TEST_KUBE_APISERVER:?IRSA_TEST_KUBE_APISERVER must name the kube-apiserver binary}
ETCD_BIN=${ETCD_BIN:-/usr/bin/etcd}
SECURE_PORT=6443
ETCD_PORT=2379
ETCD_PEER_PORT=2380
ETCD_METRICS_PORT=
# shellcheck disable=SC1091
[ -f "$FLAGDIR/env" ] && . "$FLAGDIR/env"

alive() { [ -f "$STATE/$1.pid" ] && kill -0 "$(cat "$STATE/$1.pid")" 2>/dev/null; }

if alive kube-apiserver; then
  echo "already running: kube-apiserver (pid $(cat "$STATE/kube-apiserver.pid"))" >&2
  exit 1
fi

PKI=$STATE/pki
mkdir -p "$PKI"
if [ ! -f "$PKI/ca.crt" ]; then
  (
    cd "$PKI"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 3650 \
      -subj "/CN=kapi-test-ca" 2>/dev/null
    cat > serving.ext <<'EXT'
subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,IP:10.0.0.1
extendedKeyUsage=serverAuth
EXT
    openssl req -newkey rsa:2048 -nodes -keyout apiserver.key -out apiserver.csr -subj "/CN=kube-apiserver" 2>/dev/null
    openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out apiserver.crt -days 3650 -extfile serving.ext 2>/dev/null
    printf 'extendedKeyUsage=clientAuth\n' > client.ext
    openssl req -newkey rsa:2048 -nodes -keyout admin.key -out admin.csr -subj "/O=system:masters/CN=kapi-admin" 2>/dev/null
    openssl x509 -req -in admin.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out admin.crt -days 3650 -extfile client.ext 2>/dev/null
    rm -f ./*.csr
  )
fi

read_args() { # file -> array in ARGS
  ARGS=()
  [ -f "$1" ] || return 0
  while IFS= read -r line || [ -n "$line" ]; do
    line="${line#"${line%%[![:space:]]*}"}"; line="${line%"${line##*[![:space:]]}"}"
    [ -z "$line" ] && continue
    [[ "$line" == \#* ]] && continue
    ARGS+=("$line")
  done < "$1"
}

# ---- etcd (once; it outlives apiserver restarts) ----
if ! alive etcd; then
  mkdir -p "$STATE/etcd-data"
  "$ETCD_BIN" --name kapi --data-dir "$STATE/etcd-data" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "kapi=http://127.0.0.1:$ETCD_PEER_PORT" \
    --listen-metrics-urls "http://127.0.0.1:${ETCD_METRICS_PORT:-$((ETCD_PORT + 2))}" > "$STATE/etcd.log" 2>&1 &
  echo $! > "$STATE/etcd.pid"
  for _ in $(seq 1 100); do
    curl -fsS "http://127.0.0.1:$ETCD_PORT/health" >/dev/null 2>&1 && break
    alive etcd || { echo "etcd died, see $STATE/etcd.log" >&2; tail -20 "$STATE/etcd.log" >&2; exit 1; }
    sleep 0.2
  done
fi

# ---- kube-apiserver ----
read_args "$FLAGDIR/apiserver.args"; API_EXTRA=("${ARGS[@]}")
"$KAPI_BIN" \
  --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$SECURE_PORT" \
  --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
  --tls-cert-file="$PKI/apiserver.crt" --tls-private-key-file="$PKI/apiserver.key" \
  --client-ca-file="$PKI/ca.crt" \
  --authorization-mode=RBAC --anonymous-auth=false \
  --service-cluster-ip-range=10.0.0.0/24 --endpoint-reconciler-type=none \
  --cert-dir="$STATE/certs" \
  ${API_EXTRA[@]+"${API_EXTRA[@]}"} >> "$STATE/kube-apiserver.log" 2>&1 &
echo $! > "$STATE/kube-apiserver.pid"

cat > "$STATE/kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters:
- name: kapi
  cluster:
    server: https://127.0.0.1:$SECURE_PORT
    certificate-authority: $PKI/ca.crt
users:
- name: admin
  user:
    client-certificate: $PKI/admin.crt
    client-key: $PKI/admin.key
contexts:
- name: kapi
  context: {cluster: kapi, user: admin, namespace: default}
current-context: kapi
KC

for _ in $(seq 1 600); do
  if curl -fsS --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" --key "$PKI/admin.key" \
       "https://127.0.0.1:$SECURE_PORT/readyz" >/dev/null 2>&1; then
    echo "ready after ${SECONDS}s: kube-apiserver pid $(cat "$STATE/kube-apiserver.pid")"
    exit 0
  fi
  if ! alive kube-apiserver; then
    echo "kube-apiserver exited; last log lines ($STATE/kube-apiserver.log):" >&2
    tail -25 "$STATE/kube-apiserver.log" >&2
    exit 1
  fi
  sleep 0.1
done
echo "kube-apiserver not ready after 60s; see $STATE/kube-apiserver.log" >&2
exit 1
