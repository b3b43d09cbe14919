#!/usr/bin/env bash
# Packaging checks run by CI (.ci/run) after the Rust tests; installs what it needs on a fresh
# Debian 12 machine (Debian packages, rustup targets, cargo-deb, a venv under /var/cache).
#   1. shellcheck of install.sh (POSIX sh), the packaging, systemd, bench and test scripts;
#   2. packaging/build-debs.sh: the release binary and .deb for amd64 (glibc 2.31 symbols
#      checked), lintian, and the binary runs --version and jwks (compared byte for byte with a
#      real kube-apiserver's);
#   3. install.sh against the built release: picks this machine's package, verifies SHA-256,
#      refuses a tampered file (dry runs: nothing is installed here);
#   4. the Ansible role: ansible-lint and packaging/ansible/test.sh.
# The slow real-system test (debootstrap + systemd-nspawn) is not part of CI: run
# packaging/test-deb-in-nspawn.sh by hand (see packaging/README.md).
#
# Why amd64 only: each release build is 6-7 CPU-minutes on this 2-core machine, and the
# three-apiserver tests of several servers acting as one (issue 15: rollout, faults, k3s-shaped
# rotation) pushed a fresh-clone CI run towards its 45-minute budget. arm64 and armhf (whose
# 32-bit code paths, 64-bit atomics and ring's ARMv7 assembly amd64 does not exercise) are built
# and smoke-tested under qemu-user by `packaging/build-debs.sh` (all three by default) for every
# release; IRSA_AGENT_CI_ARCHES=amd64,armhf (or amd64,arm64,armhf) puts them back in CI.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=packaging/lib.sh
. packaging/lib.sh

timed() { # timed LABEL COMMAND...: runs it, prints how long it took
    local label=$1 start=$SECONDS
    shift
    "$@"
    printf '==> %s took %d s\n' "$label" $((SECONDS - start)) >&2
}

need_apt shellcheck
say "shellcheck"
if shellcheck -s sh install.sh && shellcheck -x packaging/*.sh packaging/debian/postinst \
    packaging/debian/postrm packaging/ansible/*.sh systemd/*.sh benches/*.sh tools/*.sh tests/run.sh .ci/run; then
    ok "shellcheck: install.sh, packaging, systemd, bench and test scripts, maintainer scripts"
else
    bad "shellcheck"
fi

arches=${IRSA_AGENT_CI_ARCHES:-amd64}
dist=target/dist
rm -rf "$dist"
timed "build-debs.sh --arch $arches" packaging/build-debs.sh --arch "$arches" --out "$dist"
ok "packages built, lintian clean, binaries smoke-tested ($arches)"

say "install.sh against the built release (dry runs)"
version=$(crate_version)-1
arch=$(dpkg --print-architecture)
# check_fn DESCRIPTION FUNCTION: PASS when the function succeeds; its output ($out) shown otherwise.
check_fn() {
    out=
    if "$2"; then ok "$1"; else bad "$1"; printf '%s\n' "$out" | sed 's/^/    /'; fi
}
tampered=$(mktemp -d)
trap 'rm -rf "$tampered"' EXIT
cp "$dist"/* "$tampered/"
printf 'x' >>"$tampered/irsa-agent_${version}_${arch}.deb"
tarball=irsa-agent-${version}-${arch}.tar.gz
picks_deb() {
    out=$(sh install.sh --dry-run "$dist/" 2>&1) &&
        grep -q "irsa-agent_${version}_${arch}.deb" <<<"$out" &&
        grep -q 'SHA-256 verified' <<<"$out" && grep -q 'apt-get install' <<<"$out"
}
picks_tarball() {
    out=$(sh install.sh --dry-run --tarball "$dist/" 2>&1) && grep -q "$tarball" <<<"$out" &&
        grep -q 'install -D -m 755 .*/usr/bin/irsa-agent /usr/bin/irsa-agent' <<<"$out"
}
refuses_tampered() {
    local rc=0
    out=$(sh install.sh --dry-run "$tampered/irsa-agent_${version}_${arch}.deb" 2>&1) || rc=$?
    [ "$rc" = 1 ] && grep -q 'SHA-256 mismatch' <<<"$out"
}
refuses_unverifiable() {
    local rc=0
    rm -f "$tampered/SHA256SUMS"
    out=$(sh install.sh --dry-run "$tampered/$tarball" 2>&1) || rc=$?
    [ "$rc" = 1 ] && grep -q 'no SHA-256 to verify' <<<"$out"
}
accepts_sha256_option() {
    local sum
    sum=$(sha256sum "$dist/$tarball" | cut -d ' ' -f 1)
    out=$(sh install.sh --dry-run --sha256 "$sum" "$tampered/$tarball" 2>&1) &&
        grep -q 'from --sha256' <<<"$out"
}
check_fn "install.sh picks irsa-agent_${version}_${arch}.deb from the release and verifies it" picks_deb
check_fn "install.sh --tarball installs the tarball's files" picks_tarball
check_fn "install.sh refuses a tampered .deb (SHA-256 mismatch)" refuses_tampered
check_fn "install.sh refuses a file it cannot verify (no SHA256SUMS, no --sha256)" refuses_unverifiable
check_fn "install.sh --sha256 verifies a file without SHA256SUMS" accepts_sha256_option

# The role runs the amd64 release binary just built (saves a debug build of its own).
native=target/$(rustc -vV | sed -n 's/^host: //p')/release/irsa-agent

# tools/install-from-source.sh installs what the .deb installs: the same paths with the same
# modes (it reads the same asset list). Besides its manifest, only the two files cargo-deb
# writes itself (copyright, changelog.Debian.gz) and the lintian override differ.
files_with_modes() { # files_with_modes ROOT: "-rw-r--r-- /path" per file
    (cd "$1" && find . -type f -printf '%M %p\n' | sed 's| \./| /|' | LC_ALL=C sort -k2)
}
deb_files_with_modes() { # deb_files_with_modes DEB
    dpkg-deb -c "$1" | awk '$1 !~ /^d/ { p = $6; sub(/^\./, "", p); print $1 " " p }' |
        grep -v -e ' /usr/share/lintian/' -e ' /usr/share/doc/irsa-agent/copyright$' \
            -e ' /usr/share/doc/irsa-agent/changelog.Debian.gz$' | LC_ALL=C sort -k2
}
source_install_matches_deb() {
    local root rc=0
    root=$(mktemp -d)
    out=$(bash tools/install-from-source.sh --destdir "$root" --binary "$native" 2>&1) || rc=$?
    if [ "$rc" = 0 ]; then
        out=$(diff <(files_with_modes "$root" | grep -v ' /usr/lib/irsa-agent/install-manifest$') \
            <(deb_files_with_modes "$dist/irsa-agent_${version}_${arch}.deb") 2>&1) || rc=$?
    fi
    rm -rf "$root"
    [ "$rc" = 0 ]
}
if [ -x "$native" ]; then
    check_fn "install-from-source.sh installs the .deb's files with the .deb's modes" source_install_matches_deb
fi
if [ "$arch" = amd64 ] && [ -x "$native" ]; then
    export IRSA_AGENT_BIN=$PWD/$native
fi
if timed "packaging/ansible/test.sh" packaging/ansible/test.sh; then
    ok "Ansible role (ansible-lint, check/apply/idempotent, stop at the first failure)"
else
    bad "Ansible role test"
fi

echo "packaging checks: $passed passed, $failed failed"
[ "$failed" = 0 ]
