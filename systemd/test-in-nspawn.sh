#!/usr/bin/env bash
# The packaged unit, for real: a Debian root booted with `systemd-nspawn -b` (real systemd as
# PID 1), the release binary and systemd/irsa-agent.service installed as the package installs
# them, a fake k3s server (a k3s.service whose ExecStart is a script that "starts the
# apiserver" with the issuer its config.yaml names) and a fake apiserver the daemon probes
# over mutual TLS (`openssl s_server -WWW` on the host's 127.0.0.1, serving what the fake k3s
# wrote). Checks, with the unmodified hardened unit:
#   - without an issuer: active, READY, STATUS "waiting for an issuer in /etc/irsa-agent/config.yaml";
#   - the admin writes the issuer: it publishes (directory target /srv/oidc),
#     edits k3s's config.yaml, restarts k3s.service THROUGH THE SANDBOX (`systemctl restart k3s`
#     from a root service with no capabilities), waits for the new issuer, reports in sync;
#   - `systemctl reload` (SIGHUP: RELOADING=1 ... READY=1) keeps the same process;
#   - journald gets native records (priority, identifier, no timestamps of ours);
#   - a directory target outside ReadWritePaths fails with a clear error (the sandbox holds),
#     and is published after the documented drop-in;
#   - systemd-analyze verify is clean; systemd-analyze security's exposure is printed;
#   - `systemctl stop`: clean exit (status 0), state "stopped".
# Slow (release build, boot): not part of CI. Run it after changing systemd/ or src/daemon/:
#
#   bash systemd/test-in-nspawn.sh [--binary PATH] [--keep]
#
# Needs root, debootstrap and systemd-container (installed when missing), openssl. The Debian
# root is cached as a tarball in /var/cache/irsa-agent-build (shared with
# packaging/test-deb-in-nspawn.sh; IRSA_AGENT_BUILD_CACHE overrides); each run unpacks a fresh
# copy under target/nspawn-run. Exit status: 0 when every check passed.
# shellcheck disable=SC2016 # commands in single quotes run inside the container
set -euo pipefail
cd "$(dirname "$0")/.."

binary=
keep=0
while [ $# -gt 0 ]; do
    case $1 in
        --binary) binary=${2:?}; shift 2 ;;
        --keep) keep=1; shift ;;
        -h | --help) sed -n '2,27s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 64 ;;
    esac
done
# shellcheck source=packaging/lib.sh
. packaging/lib.sh
[ "$(id -u)" = 0 ] || die "needs root (debootstrap, systemd-nspawn)"
need_apt debootstrap systemd-container openssl

suite=bookworm
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
work=$PWD/target/nspawn-run
root=$work/root
api=$work/fake-apiserver
mkdir -p "$work"
nspawn_pid='' ct_pid='' s_server_pid=''
in_ct() {
    nsenter --target "$ct_pid" --mount --uts --ipc --pid --cgroup -- \
        env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 "$@"
}
# waits up to $1 seconds for a command to succeed
wait_for() {
    local seconds=$1
    shift
    local end=$((SECONDS + seconds))
    while ! "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $end ] || return 1
        sleep 0.2
    done
}
cleanup() {
    if [ -n "$nspawn_pid" ] && kill -0 "$nspawn_pid" 2>/dev/null; then
        kill -s RTMIN+4 "$ct_pid" 2>/dev/null || true # systemd: poweroff
        for _ in $(seq 50); do kill -0 "$nspawn_pid" 2>/dev/null || break; sleep 0.2; done
        kill "$nspawn_pid" 2>/dev/null || true
    fi
    [ -z "$s_server_pid" ] || kill "$s_server_pid" 2>/dev/null || true
    [ "$keep" = 1 ] || rm -rf "$root"
}
trap cleanup EXIT

# --- the binary ------------------------------------------------------------------------------
if [ -z "$binary" ]; then
    say "cargo build --release"
    cargo build --release --locked --quiet
    binary=target/release/irsa-agent
fi
[ -x "$binary" ] || die "$binary is not an executable"

# --- the Debian root -------------------------------------------------------------------------
debian_root "$suite" "$mirror" "$root" "$work/debootstrap.log"
echo irsa-agent-run-test >"$root/etc/hostname"

# --- installed as the package installs it ----------------------------------------------------
install -m 0755 "$binary" "$root/usr/bin/irsa-agent"
install -m 0644 systemd/irsa-agent.service "$root/usr/lib/systemd/system/irsa-agent.service"
mkdir -p "$root/etc/systemd/system/multi-user.target.wants"
ln -sf /usr/lib/systemd/system/irsa-agent.service \
    "$root/etc/systemd/system/multi-user.target.wants/irsa-agent.service"
install -d -m 0700 "$root/var/lib/irsa-agent"
install -d -m 0755 "$root/etc/irsa-agent"
printf '# irsa-agent configuration (no issuer yet, as the package ships it)\n# issuer: https://oidc.example.com/cluster\n' \
    >"$root/etc/irsa-agent/config.yaml"
# The default directory target's folder (writable under the unit when it exists).
mkdir -p "$root/srv/oidc"

# --- a fake k3s server and its apiserver -----------------------------------------------------
cp -a examples/k3s-host/etc/rancher "$root/etc/"
mkdir -p "$root/var/lib/rancher"
cp -a examples/k3s-host/var/lib/rancher/. "$root/var/lib/rancher/"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
rm -rf "$api" && mkdir -p "$api/www/.well-known"
cp tests/data/probe/{ca.crt,server.crt,server.key,client.crt,client.key} "$api/"
echo ok >"$api/www/readyz"
b64() { base64 -w0 <"$api/$1"; }
cat >"$root/etc/rancher/k3s/k3s.yaml" <<EOF
apiVersion: v1
kind: Config
clusters:
- cluster:
    certificate-authority-data: $(b64 ca.crt)
    server: https://127.0.0.1:$port
  name: default
contexts:
- context: {cluster: default, user: default}
  name: default
current-context: default
users:
- name: default
  user:
    client-certificate-data: $(b64 client.crt)
    client-key-data: $(b64 client.key)
EOF
chmod 600 "$root/etc/rancher/k3s/k3s.yaml"
mkdir -p "$root/usr/local/bin" "$root/srv/fake-apiserver"
cat >"$root/usr/local/bin/k3s" <<'EOF'
#!/bin/sh
# Fake k3s: "starts the apiserver" with the first service-account-issuer of config.yaml, by
# writing the discovery document the fake apiserver (openssl s_server on the host) serves.
[ "$1" = server ] || exit 1
issuer=$(sed -n 's/.*service-account-issuer=\([^"'"'"' ]*\).*/\1/p' /etc/rancher/k3s/config.yaml | head -n 1)
[ -n "$issuer" ] || issuer=https://kubernetes.default.svc.cluster.local
printf '{"issuer":"%s","jwks_uri":"https://127.0.0.1/openid/v1/jwks"}' "$issuer" \
    >/srv/fake-apiserver/.well-known/openid-configuration.new
mv /srv/fake-apiserver/.well-known/openid-configuration.new /srv/fake-apiserver/.well-known/openid-configuration
echo "started with $issuer" >>/var/log/fake-k3s.starts
exec sleep infinity
EOF
chmod 755 "$root/usr/local/bin/k3s"
cat >"$root/etc/systemd/system/k3s.service" <<'EOF'
[Unit]
Description=fake k3s server for the irsa-agent nspawn test
[Service]
ExecStart=/usr/local/bin/k3s server
[Install]
WantedBy=multi-user.target
EOF
ln -sf /etc/systemd/system/k3s.service "$root/etc/systemd/system/multi-user.target.wants/k3s.service"
(cd "$api/www" && exec openssl s_server -quiet -accept "127.0.0.1:$port" -cert ../server.crt \
    -key ../server.key -CAfile ../ca.crt -Verify 1 -WWW) >"$work/s_server.log" 2>&1 &
s_server_pid=$!

# --- boot ------------------------------------------------------------------------------------
say "systemd-nspawn -b (host network: the fake apiserver is on 127.0.0.1:$port)"
start_ns=$(date +%s%N)
systemd-nspawn --quiet --register=no --keep-unit -D "$root" \
    --bind="$api/www:/srv/fake-apiserver" -b --console=read-only >"$work/boot.log" 2>&1 &
nspawn_pid=$!
for _ in $(seq 100); do
    ct_pid=$(pgrep -P "$nspawn_pid" -x systemd || true)
    [ -n "$ct_pid" ] && break
    sleep 0.1
done
[ -n "$ct_pid" ] || { cat "$work/boot.log"; die "the container did not start"; }
wait_for 30 in_ct systemctl is-system-running --wait || true
boot_ms=$((($(date +%s%N) - start_ns) / 1000000))
say "booted in $boot_ms ms: $(in_ct systemctl is-system-running 2>/dev/null || true)"
show() { in_ct systemctl show -P "$1" irsa-agent.service; }
status_json() { in_ct irsa-agent status --json; }
jq_get() { # jq_get PYTHON-EXPRESSION-ON-d: evaluates against `irsa-agent status --json`
    status_json | python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"
}

check "systemd-analyze verify is clean" in_ct systemd-analyze verify --man=no /usr/lib/systemd/system/irsa-agent.service
exposure=$(in_ct systemd-analyze security irsa-agent.service 2>/dev/null | sed -n 's/.*Overall exposure level for irsa-agent.service: \([0-9.]*\).*/\1/p')
say "systemd-analyze security exposure (booted): $exposure"

# --- 1. no issuer yet ------------------------------------------------------------------------
say "1. before an issuer is configured"
wait_for 20 in_ct sh -c '[ "$(systemctl show -P ActiveState irsa-agent.service)" = active ]' || true
active=$(show ActiveState)
check "irsa-agent.service is active (ActiveState=$active)" test "$active" = active
status_text=$(show StatusText)
check "STATUS says it waits for an issuer ('$status_text')" \
    test "$status_text" = "waiting for an issuer in /etc/irsa-agent/config.yaml"
check "nothing published yet" test ! -e "$root/srv/oidc/openid/v1/jwks"
check "k3s not restarted yet (one start)" test "$(wc -l <"$root/var/log/fake-k3s.starts")" = 1
pid_before=$(show MainPID)

# --- 2. the admin sets the issuer ------------------------------------------------------------
say "2. issuer and directory target configured (the daemon notices the file)"
cat >"$root/etc/irsa-agent/config.yaml" <<'EOF'
issuer: https://oidc.example.com/homelab
distribution: k3s
# nothing serves this issuer here: no public check (it would keep the daemon from "in sync")
public-check: false
publish:
  - type: directory
    path: /srv/oidc
EOF
tls=/var/lib/rancher/k3s/server/tls
expected=$(in_ct irsa-agent jwks --key-file $tls/service.key)
check "the JWKS is published (what the key files give)" wait_for 60 \
    sh -c "[ \"\$(cat '$root/srv/oidc/openid/v1/jwks' 2>/dev/null)\" = '$expected' ]"
check "and the discovery document" test -s "$root/srv/oidc/.well-known/openid-configuration"
check "k3s was restarted through the sandbox (systemctl restart k3s)" wait_for 60 \
    sh -c "[ \"\$(wc -l <'$root/var/log/fake-k3s.starts')\" = 2 ]"
check "k3s restarted with the new issuer" grep -q "started with https://oidc.example.com/homelab" "$root/var/log/fake-k3s.starts"
check "status: in sync after the verified restart" wait_for 60 in_ct sh -c 'irsa-agent status >/dev/null'
phase=$(jq_get "d['daemon']['phase']")
restarts=$(jq_get "d['daemon']['metrics']['apiserver_restarts_total']")
check "daemon phase in-sync ($phase)" test "$phase" = in-sync
check "one apiserver restart counted ($restarts)" test "$restarts" = 1
check "journal: restart verified" in_ct sh -c \
    'journalctl -u irsa-agent.service -o cat | grep -q "kube-apiserver is ready and serves issuer https://oidc.example.com/homelab"'
check "switch time recorded for finalize" test "$(jq_get "d['issuer']['switched_at'] is not None")" = True
status_text=$(show StatusText)
check "STATUS: '$status_text'" grep -q "^2 key(s) published to directory /srv/oidc; apiserver in sync$" <<<"$status_text"
check "same process as before the configuration appeared" test "$(show MainPID)" = "$pid_before"
in_ct systemctl status --no-pager --lines=12 irsa-agent.service || true

# --- 3. reload -------------------------------------------------------------------------------
say "3. systemctl reload"
in_ct systemctl reload irsa-agent.service
# (systemd 252 finishes the reload job when ExecReload exits; RELOADING=1 ... READY=1 follow.)
check "systemctl reload succeeded, active again" wait_for 10 in_ct sh -c \
    '[ "$(systemctl show -P ActiveState irsa-agent.service)" = active ]'
check "same process after the reload" test "$(show MainPID)" = "$pid_before"
check "a converge after the reload" wait_for 20 in_ct sh -c \
    'irsa-agent status --json | grep -q "\"trigger\": \"reload\""'
check "journal: the reload was logged" wait_for 10 in_ct sh -c \
    'journalctl -u irsa-agent.service -o cat | grep -q "reloading the configuration (SIGHUP)"'


# --- 4. journald -----------------------------------------------------------------------------
say "4. journald records"
journal=$(in_ct journalctl -u irsa-agent.service -o json --no-pager)
check "native records with SYSLOG_IDENTIFIER=irsa-agent" grep -q '"SYSLOG_IDENTIFIER":"irsa-agent"' <<<"$journal"
check "info records at PRIORITY 6" grep -q '"PRIORITY":"6"' <<<"$journal"
check "no timestamps of our own in messages" in_ct sh -c \
    '! journalctl -u irsa-agent.service -o cat | grep -Eq "^[0-9]{4}-[0-9]{2}-[0-9]{2}[T ]"'


# --- 5. the sandbox holds; the documented drop-in opens another directory ---------------------
say "5. a directory target outside ReadWritePaths, then the drop-in"
mkdir -p "$root/var/www/oidc" "$root/etc/irsa-agent/config.d"
cat >"$root/etc/irsa-agent/config.d/90-extra.yaml" <<'EOF'
publish:
  - type: directory
    path: /srv/oidc
  - type: directory
    path: /var/www/oidc
EOF
check "refused by the read-only file system, reported" wait_for 30 in_ct sh -c \
    'irsa-agent status --json | grep -q "Read-only file system"'
check "still active while retrying" test "$(show ActiveState)" = active
check "nothing written outside ReadWritePaths" test -z "$(ls -A "$root/var/www/oidc")"
mkdir -p "$root/etc/systemd/system/irsa-agent.service.d"
printf '[Service]\nReadWritePaths=/var/www/oidc\n' >"$root/etc/systemd/system/irsa-agent.service.d/www.conf"
in_ct systemctl daemon-reload
in_ct systemctl restart irsa-agent.service
check "with the drop-in (systemctl edit), the second directory is published" wait_for 30 \
    sh -c "[ \"\$(cat '$root/var/www/oidc/openid/v1/jwks' 2>/dev/null)\" = '$expected' ]"
check "back in sync" wait_for 30 in_ct sh -c \
    '[ "$(systemctl show -P StatusText irsa-agent.service)" = "2 key(s) published to 2 targets; apiserver in sync" ]'

# --- 6. stop ---------------------------------------------------------------------------------
say "6. systemctl stop"
in_ct systemctl stop irsa-agent.service
check "stopped cleanly (Result=$(show Result), exit status $(show ExecMainStatus))" \
    test "$(show Result)" = success -a "$(show ExecMainStatus)" = 0
check "state says stopped" test "$(jq_get "d['daemon']['phase']")" = stopped

echo "nspawn boot: ${boot_ms} ms; systemd-analyze security exposure: ${exposure}"
echo "nspawn run test: $passed passed, $failed failed"
[ "$failed" = 0 ]
