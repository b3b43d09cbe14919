#!/usr/bin/env bash
# Benchmark of `irsa-agent run` under a flood of idle connections to its loopback metrics
# endpoint (a script, not a timed test). Reports, for the daemon with the unit's LimitNOFILE:
#   - VmRSS / VmHWM, open descriptors and threads before, during and after N idle connections
#     (default 1000, held by one client; the endpoint keeps at most 64 and closes the rest);
#   - latency from a key file replaced by rename to the new JWKS at a directory target, for
#     several changes made while the connections are held;
#   - the same figures after the client closed everything (and the endpoint's 5 s header
#     timeout has closed the ones it kept), over several flood rounds.
#
#   bash benches/metrics-flood.sh [--binary PATH] [--connections N] [--rounds N] [--changes N]
#
# Needs: python3, openssl, prlimit (util-linux). Builds the release binary unless --binary is
# given. Exits 1 when a change is not published within 1 s during a flood, or when VmRSS after
# the last round is 15 MiB or more.
set -euo pipefail
cd "$(dirname "$0")/.."

binary=
connections=1000
rounds=3
changes=5
while [ $# -gt 0 ]; do
    case $1 in
        --binary) binary=${2:?}; shift 2 ;;
        --connections) connections=${2:?}; shift 2 ;;
        --rounds) rounds=${2:?}; shift 2 ;;
        --changes) changes=${2:?}; shift 2 ;;
        -h | --help) sed -n '2,16s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 64 ;;
    esac
done
if [ -z "$binary" ]; then
    echo "==> cargo build --release" >&2
    cargo build --release --locked --quiet
    binary=$PWD/target/release/irsa-agent
fi
binary=$(realpath "$binary")
nofile=$(sed -n 's/^LimitNOFILE=\(.*:\)\{0,1\}\([0-9]*\)$/\2/p' systemd/irsa-agent.service)
nofile=${nofile:-1024}

work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

next_port=$((20000 + $$ % 10000))
while ! python3 -c 'import socket,sys; socket.socket().bind(("127.0.0.1", int(sys.argv[1])))' "$next_port" 2>/dev/null; do
    next_port=$((next_port + 1))
done
port=$next_port

host=$work/host
mkdir -p "$host"
cp -a examples/k3s-host/. "$host/"
cat >"$host/etc/irsa-agent/config.yaml" <<YAML
issuer: https://oidc.example.com/homelab
distribution: k3s
publish:
  - type: directory
    path: /srv/oidc
run:
  metrics-listen: 127.0.0.1:$port
YAML
mkdir -p "$work/keys"
total=$((rounds * changes))
for i in $(seq "$total"); do
    openssl ecparam -genkey -name prime256v1 -noout 2>/dev/null | openssl ec -pubout 2>/dev/null >"$work/keys/$i.pub"
done

"$binary" --root "$host" run --no-restart >"$work/daemon.log" 2>&1 &
daemon=$!
pids+=("$daemon")
prlimit --pid "$daemon" --nofile="$nofile:$nofile"

python3 - "$host" "$port" "$work/keys" "$daemon" "$connections" "$rounds" "$changes" "$nofile" "$work" <<'PY'
import os, resource, socket, sys, time

host, port, keys, pid, conns, rounds, changes, nofile, work = sys.argv[1:]
port, pid, conns, rounds, changes = int(port), int(pid), int(conns), int(rounds), int(changes)
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if soft < conns + 100:
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, conns + 100), hard))
tls = os.path.join(host, "var/lib/rancher/k3s/server/tls")
service_key = os.path.join(tls, "service.key")
jwks_file = os.path.join(host, "srv/oidc/openid/v1/jwks")

def jwks():
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
        time.sleep(0.005)
    return False

def status(field):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0

def snapshot():
    return {
        "rss": status("VmRSS"),
        "hwm": status("VmHWM"),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "threads": len(os.listdir(f"/proc/{pid}/task")),
    }

def show(label, s):
    print(f"{label:<28} VmRSS {s['rss'] / 1024:5.1f} MiB  VmHWM {s['hwm'] / 1024:5.1f} MiB  fds {s['fds']:4}  threads {s['threads']}")

def scrape():
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
            return data.startswith(b"HTTP/1.1 200")
    except OSError:
        return False

if not wait(lambda: jwks() and scrape()):
    sys.exit("the daemon did not publish at start; see " + os.path.join(work, "daemon.log"))
time.sleep(2)
print(f"daemon LimitNOFILE {nofile}; {conns} idle connections per round, {rounds} rounds, {changes} key changes per round")
show("before", snapshot())
base = open(service_key).read()
latencies, worst_hwm, fail = [], 0, False
n = 0
for r in range(1, rounds + 1):
    held, refused = [], 0
    for _ in range(conns):
        try:
            held.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        except OSError:
            refused += 1
    time.sleep(0.5)
    during = snapshot()
    show(f"round {r}: {len(held)} held", during)
    for _ in range(changes):
        n += 1
        before = jwks()
        base += open(os.path.join(keys, f"{n}.pub")).read()
        tmp = os.path.join(tls, ".service.key.bench")
        with open(tmp, "w") as f:
            f.write(base)
        t0 = time.monotonic()
        os.rename(tmp, service_key)
        if not wait(lambda: jwks() != before, timeout=30):
            sys.exit(f"change {n}: not published within 30 s during the flood")
        latencies.append((time.monotonic() - t0) * 1000)
        time.sleep(0.2)
    served_again = wait(scrape, timeout=15)
    print(f"round {r}: a scrape is served again while {len(held)} are held: {served_again}")
    show(f"round {r}: after changes", snapshot())
    for s in held:
        s.close()
    time.sleep(6)
    show(f"round {r}: closed (+6 s)", snapshot())
time.sleep(10)
after = snapshot()
show("after (+16 s)", after)
latencies.sort()
print(f"publish latency during the flood over {len(latencies)} changes: p50 {latencies[len(latencies) // 2]:.0f} ms, max {latencies[-1]:.0f} ms")
if latencies[-1] >= 1000:
    print("FAIL: a change took 1 s or more"); fail = True
if after["rss"] >= 15 * 1024:
    print("FAIL: VmRSS after the flood is 15 MiB or more"); fail = True
sys.exit(1 if fail else 0)
PY
