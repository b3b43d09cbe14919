#!/usr/bin/env bash
# Benchmark of `irsa-agent run` (a script, not a timed test). Reports:
#   - latency from a key file replaced by rename to the new JWKS visible at a directory target
#     and at an S3 target (a real SeaweedFS 4.48 on 127.0.0.1), p50/p99/max over N changes
#     (default 50), both targets configured in one daemon, default debounce (100ms);
#   - idle RSS (after the changes, and of a fresh daemon with only a directory target);
#   - CPU used and wakeups (context switches of every thread) over an idle minute;
#   - the release binary's size.
#
#   bash benches/run-latency.sh [--binary PATH] [--changes N] [--idle SECONDS]
#
# Needs: python3, curl, openssl, SeaweedFS (`bash tests/run.sh` installs it into
# ~/.cache/irsa-agent-test-venv). Builds the release binary unless --binary is given.
set -euo pipefail
cd "$(dirname "$0")/.."

binary=
changes=50
idle=60
while [ $# -gt 0 ]; do
    case $1 in
        --binary) binary=${2:?}; shift 2 ;;
        --changes) changes=${2:?}; shift 2 ;;
        --idle) idle=${2:?}; shift 2 ;;
        -h | --help) sed -n '2,14s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 64 ;;
    esac
done
venv=${IRSA_TEST_VENV:-$HOME/.cache/irsa-agent-test-venv}
weed=$venv/bin/weed
[ -x "$weed" ] || { echo "SeaweedFS not found at $weed: run bash tests/run.sh once" >&2; exit 1; }
if [ -z "$binary" ]; then
    echo "==> cargo build --release" >&2
    cargo build --release --locked --quiet
    binary=$PWD/target/release/irsa-agent
fi
binary=$(realpath "$binary")

work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# Ports below the kernel's ephemeral range (32768+), so no outgoing connection can take one
# between this check and SeaweedFS's own bind. Sets $port (not echoed: a $(...) subshell
# would lose next_port and hand out the same port every time).
next_port=$((20000 + $$ % 10000))
free_port() {
  while ! python3 -c 'import socket,sys; socket.socket().bind(("127.0.0.1", int(sys.argv[1])))' "$next_port" 2>/dev/null; do
    next_port=$((next_port + 1))
  done
  port=$next_port; next_port=$((next_port + 1))
}

# --- SeaweedFS (S3 over http, SigV4) -----------------------------------------------------------
key=AKIDIRSABENCH secret=irsa-bench-secret-0123456789
mkdir -p "$work/weed/data"
printf '{"identities":[{"name":"admin","credentials":[{"accessKey":"%s","secretKey":"%s"}],"actions":["Admin","Read","Write","List","Tagging"]}]}' \
    "$key" "$secret" >"$work/weed/s3.json"
ports=()
for _ in $(seq 13); do free_port; ports+=("$port"); done
s3=${ports[0]}
(cd "$work/weed" && exec "$weed" mini -dir="$work/weed/data" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
    -master.telemetry=false -s3.port="$s3" -master.port="${ports[1]}" -master.port.grpc="${ports[2]}" \
    -volume.port="${ports[3]}" -volume.port.grpc="${ports[4]}" -filer.port="${ports[5]}" \
    -filer.port.grpc="${ports[6]}" -s3.port.grpc="${ports[7]}" -s3.port.iceberg="${ports[8]}" \
    -s3.port.lance="${ports[9]}" -admin.port="${ports[10]}" -admin.port.grpc="${ports[11]}" \
    -metricsPort=0 -webdav=false -admin.ui=false -s3.config=s3.json) >"$work/weed.log" 2>&1 &
pids+=($!)
for _ in $(seq 300); do curl -s -o /dev/null "http://127.0.0.1:$s3/" && break; sleep 0.1; done
signed() { curl -s -o /dev/null -w '%{http_code}' --aws-sigv4 aws:amz:us-east-1:s3 --user "$key:$secret" \
    -H "x-amz-content-sha256: $(printf '%s' "$3" | sha256sum | cut -d' ' -f1)" -X "$1" --data-binary "$3" "http://127.0.0.1:$s3$2"; }
[ "$(signed PUT /bench '')" = 200 ] || { tail "$work/weed.log"; echo "cannot create the bucket" >&2; exit 1; }
policy='{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":"*","Action":["s3:GetObject"],"Resource":["arn:aws:s3:::bench/*"]}]}'
signed PUT '/bench?policy=' "$policy" >/dev/null

# --- a fake k3s host ---------------------------------------------------------------------------
host=$work/host
mkdir -p "$host"
cp -a examples/k3s-host/. "$host/"
cat >"$host/etc/irsa-agent/config.yaml" <<EOF
issuer: https://oidc.example.com/homelab
distribution: k3s
# nothing serves this issuer here: no public check (it would add a failing fetch to each converge)
public-check: false
publish:
  - type: directory
    path: /srv/oidc
  - type: s3
    bucket: bench
    endpoint: http://127.0.0.1:$s3
    path-style: true
    region: us-east-1
EOF
mkdir -p "$work/keys"
for i in $(seq "$changes"); do
    openssl ecparam -genkey -name prime256v1 -noout 2>/dev/null | openssl ec -pubout 2>/dev/null >"$work/keys/$i.pub"
done

AWS_ACCESS_KEY_ID=$key AWS_SECRET_ACCESS_KEY=$secret AWS_EC2_METADATA_DISABLED=true \
    "$binary" --root "$host" run --no-restart >"$work/daemon.log" 2>&1 &
daemon=$!
pids+=("$daemon")

size=$(stat -c %s "$binary")
python3 - "$host" "$s3" "$work/keys" "$changes" "$daemon" "$idle" "$size" "$binary" "$work" <<'PY'
import os, subprocess, sys, time, urllib.request

host, s3, keys, changes, pid, idle, size, binary, work = sys.argv[1:]
changes, pid, idle, size = int(changes), int(pid), int(idle), int(size)
tls = os.path.join(host, "var/lib/rancher/k3s/server/tls")
service_key = os.path.join(tls, "service.key")
jwks_file = os.path.join(host, "srv/oidc/openid/v1/jwks")
s3_url = f"http://127.0.0.1:{s3}/bench/openid/v1/jwks"
base = open(service_key).read()

def s3_get():
    try:
        with urllib.request.urlopen(s3_url, timeout=2) as r:
            return r.read()
    except Exception:
        return b""

def file_get():
    try:
        with open(jwks_file, "rb") as f:
            return f.read()
    except OSError:
        return b""

def wait(pred, timeout=30):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.01)
    return False

if not wait(lambda: file_get() and s3_get()):
    sys.exit("the daemon did not publish at start; see " + os.path.join(work, "daemon.log"))
time.sleep(1)

def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]

dir_ms, s3_ms = [], []
for i in range(1, changes + 1):
    before_dir, before_s3 = file_get(), s3_get()
    new = base + open(os.path.join(keys, f"{i}.pub")).read()
    tmp = os.path.join(tls, ".service.key.bench")
    with open(tmp, "w") as f:
        f.write(new)
    t0 = time.monotonic()
    os.rename(tmp, service_key)
    got_dir = got_s3 = None
    end = t0 + 30
    while (got_dir is None or got_s3 is None) and time.monotonic() < end:
        now = time.monotonic()
        if got_dir is None and file_get() != before_dir:
            got_dir = now
        if got_s3 is None and s3_get() != before_s3:
            got_s3 = time.monotonic()
        time.sleep(0.001)
    if got_dir is None or got_s3 is None:
        sys.exit(f"change {i}: not published within 30 s")
    dir_ms.append((got_dir - t0) * 1000)
    s3_ms.append((got_s3 - t0) * 1000)
    time.sleep(0.3)

def rss(p):
    for line in open(f"/proc/{p}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0

def cpu_ticks(p):
    fields = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])

def switches(p):
    out = {}
    for tid in os.listdir(f"/proc/{p}/task"):
        try:
            comm = open(f"/proc/{p}/task/{tid}/comm").read().strip()
            vol = nonvol = 0
            for line in open(f"/proc/{p}/task/{tid}/status"):
                if line.startswith("voluntary_ctxt_switches"):
                    vol = int(line.split()[1])
                elif line.startswith("nonvoluntary_ctxt_switches"):
                    nonvol = int(line.split()[1])
            out[f"{tid}:{comm}"] = vol + nonvol
        except OSError:
            pass
    return out

time.sleep(12)  # tokio's idle blocking threads exit after 10 s
hz = os.sysconf("SC_CLK_TCK")
rss_after = rss(pid)
c0, s0 = cpu_ticks(pid), switches(pid)
time.sleep(idle)
c1, s1 = cpu_ticks(pid), switches(pid)
wake = {t: s1.get(t, 0) - s0.get(t, 0) for t in set(s0) | set(s1)}

# A fresh daemon with only the directory target, idle.
root2 = os.path.join(work, "host2")
subprocess.run(["cp", "-a", host, root2], check=True)
cfg = os.path.join(root2, "etc/irsa-agent/config.yaml")
text = open(cfg).read().split("  - type: s3")[0]
open(cfg, "w").write(text)
log2 = open(os.path.join(work, "daemon2.log"), "w")
p2 = subprocess.Popen([binary, "--root", root2, "run", "--no-restart"], stdout=log2, stderr=log2)
time.sleep(3)
rss_dir_only = rss(p2.pid)
p2.terminate()
p2.wait()

print(f"changes: {changes} key-file renames (debounce 100ms, directory + S3 targets in one daemon)")
print(f"latency to the directory target: p50 {pct(dir_ms, 50):.0f} ms, p99 {pct(dir_ms, 99):.0f} ms, max {max(dir_ms):.0f} ms")
print(f"latency to the S3 target (SeaweedFS): p50 {pct(s3_ms, 50):.0f} ms, p99 {pct(s3_ms, 99):.0f} ms, max {max(s3_ms):.0f} ms")
print(f"idle RSS: {rss_after / 1024:.1f} MiB (directory + S3, after the changes); {rss_dir_only / 1024:.1f} MiB (fresh, directory only)")
print(f"idle CPU over {idle} s: {(c1 - c0) / hz:.2f} s")
print(f"wakeups over {idle} s (context switches per thread): " + ", ".join(f"{t} {n}" for t, n in sorted(wake.items())))
print(f"release binary: {size / 1024 / 1024:.1f} MiB ({size} bytes)")
PY
