#!/usr/bin/env bash
# Real-system test of the amd64 package: a Debian root made with debootstrap, the .deb installed
# with dpkg -i, the root booted with systemd-nspawn -b (real systemd as PID 1), then an upgrade
# to a rebuilt package (bumped version) through install.sh, remove, purge, and the tarball path
# of install.sh. Too slow for every CI run (first run: ~1 min of debootstrap, later ~40 s);
# run it before a release and after changing packaging/, systemd/ or install.sh:
#
#   bash packaging/test-deb-in-nspawn.sh [--suite bookworm|bullseye] [--mirror URL] [--keep]
#
# The debootstrap root is cached as a tarball under /var/cache/irsa-agent-build (delete it to
# refresh); every run unpacks a fresh copy into target/nspawn/root (kept with --keep).
#
# The service itself is checked too: "SERVICE WAITS FOR AN ISSUER" (active, with a STATUS that
# says so) and "SERVICE ACTIVE + PUBLISHES" (a directory target). Exit status: 0 when nothing FAILED.
# shellcheck disable=SC2016 # dpkg-query -f formats and backquotes in messages are literal
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=packaging/lib.sh
. packaging/lib.sh

suite=bookworm
mirror=http://deb.debian.org/debian
keep=0
while [ $# -gt 0 ]; do
    case $1 in
        --suite) suite=${2:?}; shift 2 ;;
        --mirror) mirror=${2:?}; shift 2 ;;
        --keep) keep=1; shift ;;
        -h | --help) sed -n '2,16s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) die "unknown argument: $1" ;;
    esac
done
[ "$(id -u)" = 0 ] || die "needs root (debootstrap, systemd-nspawn)"
need_apt debootstrap systemd-container lintian

work=$PWD/target/nspawn
root=$work/root
mkdir -p "$work"
nspawn_pid=

# Runs a command inside the booted container (all its namespaces), or, before boot, chrooted
# into the root (nspawn --pipe sometimes loses a short command's output: no good for checks).
in_ct() {
    if [ -n "$nspawn_pid" ]; then
        nsenter --target "$ct_pid" --mount --uts --ipc --net --pid --cgroup -- \
            env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 "$@"
    else
        chroot "$root" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 "$@"
    fi
}

cleanup() {
    if [ -n "$nspawn_pid" ] && kill -0 "$nspawn_pid" 2>/dev/null; then
        kill -s RTMIN+4 "$ct_pid" 2>/dev/null || true # systemd: poweroff
        for _ in $(seq 50); do kill -0 "$nspawn_pid" 2>/dev/null || break; sleep 0.2; done
        kill "$nspawn_pid" 2>/dev/null || true
    fi
    [ "$keep" = 1 ] || rm -rf "$root"
}
trap cleanup EXIT

# --- packages: the release build and a rebuilt one with a higher version ----------------------
version=$(crate_version)-1
v2=$(crate_version)-1+rebuild1
say "building the amd64 packages $version and $v2 (lintian included)"
packaging/build-debs.sh --arch amd64 --out "$work/dist1" >"$work/build1.log" 2>&1 ||
    { cat "$work/build1.log"; die "build failed"; }
packaging/build-debs.sh --arch amd64 --deb-version "$v2" --out "$work/dist2" >"$work/build2.log" 2>&1 ||
    { cat "$work/build2.log"; die "build of the rebuilt package failed"; }
grep -E '^amd64 ' "$work/build1.log" >&2 || true

# --- the Debian root ---------------------------------------------------------------------------
debian_root "$suite" "$mirror" "$root" "$work/debootstrap.log"
echo irsa-agent-test >"$root/etc/hostname"
mkdir -p "$root/root/pkgs"
cp -r "$work/dist1" "$root/root/pkgs/v1"
cp -r "$work/dist2" "$root/root/pkgs/v2"
cp install.sh "$root/root/install.sh"

# --- 1. dpkg -i into the (not yet booted) root -------------------------------------------------
say "1. dpkg -i irsa-agent_${version}_amd64.deb"
# In a (not booted) nspawn container, the output kept in a file of the root.
systemd-nspawn --quiet --register=no --keep-unit --private-network -D "$root" --pipe -- \
    sh -c "dpkg -i /root/pkgs/v1/irsa-agent_${version}_amd64.deb >/root/dpkg-i.log 2>&1" \
    2>"$work/nspawn-dpkg.log" || { cat "$root/root/dpkg-i.log" "$work/nspawn-dpkg.log"; die "dpkg -i failed"; }
tee "$work/dpkg-i.log" <"$root/root/dpkg-i.log"
check "dpkg lists irsa-agent $version as installed" \
    test "$(in_ct dpkg-query -W -f='${db:Status-Status} ${Version}' irsa-agent)" = "installed $version"
check "first install explains the next step" grep -q "no issuer configured yet" "$work/dpkg-i.log"
check "/usr/bin/irsa-agent runs: $(in_ct irsa-agent --version)" test "$(in_ct irsa-agent --version)" = "irsa-agent $(crate_version)"
check "/etc/irsa-agent/config.yaml is a conffile" grep -qx ' /etc/irsa-agent/config.yaml [0-9a-f]*' \
    <(in_ct dpkg-query -W -f='${Conffiles}\n' irsa-agent)
unconfigured=$(in_ct irsa-agent check-config 2>&1 || true)
check "the shipped config.yaml sets no issuer (check-config: issuer required)" grep -q 'issuer.*required' <<<"$unconfigured"
check "/var/lib/irsa-agent exists, mode 700" test "$(stat -c %a "$root/var/lib/irsa-agent")" = 700
check "irsa-agent.service enabled on install" test -L "$root/etc/systemd/system/multi-user.target.wants/irsa-agent.service"
check "man page and completions installed" test -s "$root/usr/share/man/man1/irsa-agent.1.gz" -a \
    -s "$root/usr/share/bash-completion/completions/irsa-agent" -a -s "$root/usr/share/zsh/vendor-completions/_irsa-agent" -a \
    -s "$root/usr/share/fish/vendor_completions.d/irsa-agent.fish"

# A fake k3s server host: the example's k3s config and service-account keys.
cp -a examples/k3s-host/etc/rancher "$root/etc/"
mkdir -p "$root/var/lib/rancher"
cp -a examples/k3s-host/var/lib/rancher/. "$root/var/lib/rancher/"

# --- 2. boot -------------------------------------------------------------------------------------
say "2. systemd-nspawn -b"
start_ns=$(date +%s%N)
systemd-nspawn --quiet --register=no --keep-unit --private-network -D "$root" -b \
    --console=read-only >"$work/boot.log" 2>&1 &
nspawn_pid=$!
ct_pid=
for _ in $(seq 100); do
    ct_pid=$(pgrep -P "$nspawn_pid" -x systemd || true)
    [ -n "$ct_pid" ] && break
    sleep 0.1
done
[ -n "$ct_pid" ] || { cat "$work/boot.log"; die "the container did not start"; }
# Until its bus is up, systemctl in the container cannot answer at all.
for _ in $(seq 100); do
    [ -n "$(in_ct systemctl is-system-running 2>/dev/null || true)" ] && break
    sleep 0.1
done
state=$(in_ct systemctl is-system-running --wait 2>/dev/null || true)
boot_ms=$((($(date +%s%N) - start_ns) / 1000000))
say "booted in ${boot_ms} ms: system $state"
check "container booted (system state '$state')" test "$state" = running -o "$state" = degraded
check "irsa-agent.service is enabled" test "$(in_ct systemctl is-enabled irsa-agent.service)" = enabled
check "irsa-agent.service is loaded" test "$(in_ct systemctl show -P LoadState irsa-agent.service)" = loaded
# --man=no: minbase has no man-db to resolve Documentation=man:irsa-agent(1) (checked above).
check "systemd-analyze verify accepts the unit" \
    in_ct systemd-analyze verify --man=no /usr/lib/systemd/system/irsa-agent.service
say "service state before an issuer is configured:"
in_ct systemctl status --no-pager --lines=5 irsa-agent.service || true

service_step() {
    local label="SERVICE ACTIVE + PUBLISHES"
    local active=
    for _ in $(seq 60); do
        active=$(in_ct systemctl is-active irsa-agent.service || true)
        [ "$active" = active ] && [ -s "$root/srv/oidc/openid/v1/jwks" ] && break
        sleep 0.5
    done
    check "$label: irsa-agent.service is active" test "$active" = active
    local tls=/var/lib/rancher/k3s/server/tls
    check "$label: the directory target holds the JWKS the keys give" cmp -s "$root/srv/oidc/openid/v1/jwks" \
        <(in_ct irsa-agent jwks --key-file $tls/service.key --signing-key-file $tls/service.current.key)
    check "$label: and the discovery document" test -s "$root/srv/oidc/.well-known/openid-configuration"
    in_ct systemctl status --no-pager --lines=10 irsa-agent.service || true
}

# Before an issuer is set the service must run and say what it waits for.
waiting_step() {
    local label="SERVICE WAITS FOR AN ISSUER"
    local active=
    for _ in $(seq 30); do
        active=$(in_ct systemctl is-active irsa-agent.service || true)
        [ "$active" = active ] && break
        sleep 0.5
    done
    check "$label: active although no issuer is configured" test "$active" = active
    local status
    status=$(in_ct systemctl show -P StatusText irsa-agent.service)
    check "$label: its STATUS says so ('$status')" grep -qi issuer <<<"$status"
}
say "2b. service before an issuer is configured"
waiting_step

# Configure: the conffile edited by the admin (issuer, directory target), plus a drop-in.
cat >>"$root/etc/irsa-agent/config.yaml" <<'EOF'
issuer: https://oidc.example.com/homelab
# nothing serves this issuer here: no public check
public-check: false
publish:
  - type: directory
    path: /srv/oidc
EOF
mkdir -p "$root/etc/irsa-agent/config.d" "$root/srv/oidc"
echo "distribution: k3s" >"$root/etc/irsa-agent/config.d/50-local.yaml"
check "the configured host passes check-config" in_ct irsa-agent check-config
in_ct systemctl restart irsa-agent.service || true
say "3. service with an issuer and a directory target"
service_step

# --- 4. upgrade to the rebuilt package through install.sh -------------------------------------
echo "state written before the upgrade" >"$root/var/lib/irsa-agent/marker"
conf_before=$(sha256sum <"$root/etc/irsa-agent/config.yaml")
say "4. upgrade: sh install.sh /root/pkgs/v2/ (SHA256SUMS verified)"
in_ct sh /root/install.sh /root/pkgs/v2/ 2>&1 | tee "$work/upgrade.log"
check "upgraded to $v2" test "$(in_ct dpkg-query -W -f='${Version}' irsa-agent)" = "$v2"
check "upgrade kept the edited config.yaml byte for byte" test "$(sha256sum <"$root/etc/irsa-agent/config.yaml")" = "$conf_before"
check "upgrade kept config.d" test -f "$root/etc/irsa-agent/config.d/50-local.yaml"
check "upgrade kept /var/lib/irsa-agent" test -f "$root/var/lib/irsa-agent/marker"
check "still enabled after the upgrade" test "$(in_ct systemctl is-enabled irsa-agent.service)" = enabled
in_ct sh /root/install.sh /root/pkgs/v2/ >"$work/again.log" 2>&1
check "install.sh again with the same release: nothing to do" grep -q "already installed: nothing to do" "$work/again.log"
say "service after the upgrade"
service_step
tampered=$work/tampered
rm -rf "$tampered" && cp -r "$work/dist2" "$tampered" && echo x >>"$tampered/irsa-agent_${v2}_amd64.deb"
cp -r "$tampered" "$root/root/pkgs/tampered"
if in_ct sh /root/install.sh "/root/pkgs/tampered/irsa-agent_${v2}_amd64.deb" >"$work/tampered.log" 2>&1; then
    bad "install.sh installed a package whose SHA-256 does not match"
else
    check "install.sh refuses a package whose SHA-256 does not match" grep -q "SHA-256 mismatch" "$work/tampered.log"
fi

# --- 5. remove, then purge ----------------------------------------------------------------------
say "5. dpkg --remove, then dpkg --purge"
in_ct dpkg --remove irsa-agent
check "remove: the program is gone" test ! -e "$root/usr/bin/irsa-agent"
load_state=$(in_ct systemctl show -P LoadState irsa-agent.service)
# debhelper's postrm masks a removed unit until purge (deb-systemd-helper mask).
check "remove: the service is gone (LoadState $load_state)" test "$load_state" = not-found -o "$load_state" = masked
check "remove: config and state kept" test -f "$root/etc/irsa-agent/config.yaml" -a -f "$root/var/lib/irsa-agent/marker"
in_ct dpkg --purge irsa-agent
check "purge: /etc/irsa-agent removed" test ! -e "$root/etc/irsa-agent"
check "purge: /var/lib/irsa-agent removed" test ! -e "$root/var/lib/irsa-agent"
check "purge: no unit symlink left" test -z "$(find "$root/etc/systemd/system" -name 'irsa-agent*')"
check "purge: dpkg forgot the package" test -z "$(in_ct dpkg-query -W -f='${db:Status-Status}' irsa-agent 2>/dev/null)"

# --- 6. install.sh with the release tarball ---------------------------------------------------
say "6. sh install.sh --tarball /root/pkgs/v2/, again, then --uninstall --purge"
in_ct sh /root/install.sh --tarball /root/pkgs/v2/ 2>&1 | tee "$work/tarball.log"
check "tarball: irsa-agent installed and runs" test "$(in_ct irsa-agent --version)" = "irsa-agent $(crate_version)"
check "tarball: unit enabled" test "$(in_ct systemctl is-enabled irsa-agent.service)" = enabled
check "tarball: example config installed" test -f "$root/etc/irsa-agent/config.yaml"
in_ct sh /root/install.sh --tarball /root/pkgs/v2/ >"$work/tarball-again.log" 2>&1
check "tarball: second run changes nothing" grep -q "already installed: nothing to do" "$work/tarball-again.log"
in_ct sh /root/install.sh --uninstall --purge 2>&1 | tee "$work/uninstall.log"
check "tarball uninstall: program, unit and manifest gone" test ! -e "$root/usr/bin/irsa-agent" -a \
    ! -e "$root/usr/lib/systemd/system/irsa-agent.service" -a ! -e "$root/usr/lib/irsa-agent"
check "tarball uninstall --purge: config and state gone" test ! -e "$root/etc/irsa-agent" -a ! -e "$root/var/lib/irsa-agent"
check "tarball uninstall: no unit symlink left" test -z "$(find "$root/etc/systemd/system" -name 'irsa-agent*')"

echo "nspawn boot: ${boot_ms} ms"
echo "nspawn package test: $passed passed, $failed failed"
[ "$failed" = 0 ]
