#!/usr/bin/env bash
# Benchmark of the pod identity webhook (a script, not a timed test). Reports:
#   - its own latency: p50/p99/max round trip of AdmissionReviews (the shape kube-apiserver
#     sends) at 50 concurrent requests over 50 kept-alive TLS connections, with 1,000
#     ServiceAccounts cached (benches/webhook.rs; the server in a process of its own, on one
#     current-thread runtime as in the daemon);
#   - that server process's VmRSS with 0 and with 1,000 ServiceAccounts cached;
#   - the whole daemon (`irsa-agent run`, directory target, webhook enabled): round trip of
#     1,000 reviews sent one at a time on one kept-alive connection (python3's ssl client), and
#     its VmRSS afterwards.
#
#   bash benches/webhook.sh [--binary PATH] [--no-bench]
#
# Needs: curl, python3. Builds the release binary and the bench unless --binary is given.
set -euo pipefail
cd "$(dirname "$0")/.."

binary=
bench=1
while [ $# -gt 0 ]; do
    case $1 in
        --binary) binary=${2:?}; shift 2 ;;
        --no-bench) bench=; shift ;;
        -h | --help) sed -n '2,13s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 64 ;;
    esac
done

if [ -n "$bench" ]; then
    echo "==> cargo bench --bench webhook" >&2
    cargo bench --locked --quiet --bench webhook
fi

if [ -z "$binary" ]; then
    echo "==> cargo build --release" >&2
    cargo build --release --locked --quiet
    binary=$PWD/target/release/irsa-agent
fi
binary=$(realpath "$binary")

work=$(mktemp -d)
pid=
cleanup() {
    [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

# A k3s-shaped host with the test keys, a directory target and the webhook on a free port.
root=$work/root
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mkdir -p "$root/etc/irsa-agent" "$root/etc/rancher/k3s" "$root/var/lib/rancher/k3s/server/tls" "$root/srv"
cp tests/data/apiserver/k3s/keys/service.key tests/data/apiserver/k3s/keys/service.current.key \
    "$root/var/lib/rancher/k3s/server/tls/"
printf '# k3s\n' > "$root/etc/rancher/k3s/config.yaml"
cat > "$root/etc/irsa-agent/config.yaml" <<EOF
issuer: https://oidc.example.com/bench
distribution: k3s
public-check: false
publish:
  - type: directory
    path: /srv/oidc
webhook:
  enabled: true
  listen: 127.0.0.1:$port
EOF
"$binary" --root "$root" run --no-restart > "$work/daemon.log" 2>&1 &
pid=$!
for _ in $(seq 1 100); do
    [ -s "$root/var/lib/irsa-agent/webhook-ca.pem" ] && curl -s -o /dev/null --cacert "$root/var/lib/irsa-agent/webhook-ca.pem" "https://127.0.0.1:$port/healthz" && break
    sleep 0.1
done
python3 - "$root/var/lib/irsa-agent/webhook-ca.pem" > "$work/ca.pem" <<'EOF'
import sys, re
text = open(sys.argv[1]).read()
print("".join(re.findall(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----\n", text, re.S)))
EOF
python3 - "$work/ca.pem" "$port" tests/data/webhook/review-pod.json <<'EOF'
import http.client, ssl, sys, time
ca, port, review = sys.argv[1], int(sys.argv[2]), open(sys.argv[3], "rb").read()
context = ssl.create_default_context(cafile=ca)
conn = http.client.HTTPSConnection("127.0.0.1", port, context=context)
times = []
for i in range(1100):
    started = time.perf_counter()
    conn.request("POST", "/mutate", body=review, headers={"content-type": "application/json"})
    response = conn.getresponse()
    body = response.read()
    assert response.status == 200 and b'"allowed":true' in body, body
    if i >= 100:
        times.append((time.perf_counter() - started) * 1000)
times.sort()
print("  daemon, one review at a time: p50 %.2f ms, p99 %.2f ms, max %.2f ms (%d reviews)" % (
    times[len(times) // 2], times[int(len(times) * 0.99) - 1], times[-1], len(times)))
EOF
sleep 1
rss=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")
printf '  daemon (directory target, webhook on, after those reviews) VmRSS: %.1f MiB\n' "$(echo "$rss / 1024" | bc -l)"
