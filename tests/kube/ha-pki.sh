#!/bin/bash
# The certificates of the HA test cluster (tests/ha_support): one CA for the whole control plane
# (kubeadm shares it between control-plane nodes), a serving certificate valid for every
# apiserver address (10.250.0.1-3 and the in-cluster names), and an admin client certificate.
# Usage: ha-pki.sh OUTDIR ADDRESS...
# Writes OUTDIR/{ca,apiserver,admin}.{crt,key}.
set -euo pipefail
OUT=${1:?usage: ha-pki.sh OUTDIR ADDRESS...}
shift
mkdir -p "$OUT"
cd "$OUT"
sans="DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,IP:127.0.0.1,IP:10.96.0.1"
for a in "$@"; do sans="$sans,IP:$a"; done
openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 3650 \
  -subj "/CN=kubernetes" 2>/dev/null
printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth\n' "$sans" > serving.ext
openssl req -newkey rsa:2048 -nodes -keyout apiserver.key -out apiserver.csr \
  -subj "/CN=kube-apiserver" 2>/dev/null
openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
  -out apiserver.crt -days 3650 -extfile serving.ext 2>/dev/null
printf 'extendedKeyUsage=clientAuth\n' > client.ext
openssl req -newkey rsa:2048 -nodes -keyout admin.key -out admin.csr \
  -subj "/O=system:masters/CN=kubernetes-admin" 2>/dev/null
openssl x509 -req -in admin.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
  -out admin.crt -days 3650 -extfile client.ext 2>/dev/null
rm -f ./*.csr ./*.ext ./*.srl
