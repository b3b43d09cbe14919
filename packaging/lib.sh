# shellcheck shell=bash
# Helpers shared by the packaging scripts (sourced, not run). Installs are idempotent and quiet:
# they do nothing when the tool is already there, so reruns are fast on a warm machine and a
# fresh Debian 12 machine with only the Rust toolchain gets everything it needs.

# Cached tools that are not Debian packages (a Python venv with zig, cargo-zigbuild and Ansible)
# and the debootstrap root of the nspawn test live here, outside the work tree.
PKG_CACHE=${IRSA_AGENT_BUILD_CACHE:-/var/cache/irsa-agent-build}
PKG_VENV=$PKG_CACHE/venv

# Versions verified together (see packaging/README.md).
ZIGLANG_VERSION=0.17.1
CARGO_ZIGBUILD_VERSION=0.24.0
ANSIBLE_CORE_VERSION=2.19.14
ANSIBLE_LINT_VERSION=26.10.1
CARGO_DEB_VERSION=3.8.0

say() { printf '==> %s\n' "$*" >&2; }
die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

# Debian architecture -> Rust target triple, qemu-user runner, objdump.
arch_triple() {
    case $1 in
        amd64) echo x86_64-unknown-linux-gnu ;;
        arm64) echo aarch64-unknown-linux-gnu ;;
        armhf) echo armv7-unknown-linux-gnueabihf ;;
        *) die "unknown architecture '$1' (amd64, arm64, armhf)" ;;
    esac
}
# Prints the command prefix that runs a binary of this architecture on this (x86_64) host.
arch_runner() {
    case $1 in
        amd64) echo "" ;;
        arm64) echo "qemu-aarch64-static -L /usr/aarch64-linux-gnu" ;;
        armhf) echo "qemu-arm-static -L /usr/arm-linux-gnueabihf" ;;
    esac
}
arch_objdump() {
    case $1 in
        amd64) echo objdump ;;
        arm64) echo aarch64-linux-gnu-objdump ;;
        armhf) echo arm-linux-gnueabihf-objdump ;;
    esac
}

# apt-get install the packages that are missing (one `apt-get update` first, if any is).
need_apt() {
    local missing=() p
    for p in "$@"; do
        [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" = "install ok installed" ] || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    say "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# The Python venv with the given pip requirements (name==version ...).
need_venv() {
    need_apt python3-venv
    if [ ! -x "$PKG_VENV/bin/python3" ]; then
        say "creating the tool venv $PKG_VENV"
        mkdir -p "$PKG_CACHE"
        /usr/bin/python3 -m venv "$PKG_VENV"
    fi
    local missing=() req
    for req in "$@"; do
        # No `pip show | grep -q`: grep's early exit would fail the pipe under pipefail.
        [ "$("$PKG_VENV/bin/pip" show "${req%%==*}" 2>/dev/null | sed -n 's/^Version: //p')" = "${req#*==}" ] ||
            missing+=("$req")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    say "installing into the tool venv: ${missing[*]}"
    "$PKG_VENV/bin/pip" install -q --disable-pip-version-check "${missing[@]}"
}

need_cargo_deb() {
    if [ "$(cargo deb --version 2>/dev/null)" != "cargo-deb $CARGO_DEB_VERSION" ]; then
        say "installing cargo-deb $CARGO_DEB_VERSION (about 1.5 minutes)"
        cargo install --quiet --locked cargo-deb --version "$CARGO_DEB_VERSION"
    fi
}

# zig + cargo-zigbuild: cross links against glibc 2.31 symbols for every architecture.
need_zigbuild() {
    need_venv "ziglang==$ZIGLANG_VERSION" "cargo-zigbuild==$CARGO_ZIGBUILD_VERSION"
    case ":$PATH:" in
        *":$PKG_VENV/bin:"*) ;;
        *) export PATH="$PKG_VENV/bin:$PATH" ;;
    esac
}

# What building and smoke-testing these architectures needs.
need_cross() {
    local arch targets=() apt=(binutils)
    for arch in "$@"; do
        targets+=("$(arch_triple "$arch")")
        case $arch in
            arm64) apt+=(qemu-user-static libc6-arm64-cross binutils-aarch64-linux-gnu) ;;
            armhf) apt+=(qemu-user-static libc6-armhf-cross binutils-arm-linux-gnueabihf) ;;
        esac
    done
    need_apt "${apt[@]}"
    local installed
    installed=$(rustup target list --installed)
    for t in "${targets[@]}"; do
        grep -qx "$t" <<<"$installed" || {
            say "rustup target add $t"
            rustup target add "$t" >/dev/null
        }
    done
    need_zigbuild
}

need_ansible() {
    need_venv "ansible-core==$ANSIBLE_CORE_VERSION" "ansible-lint==$ANSIBLE_LINT_VERSION"
}

# The highest GLIBC_x.y symbol version a binary needs.
max_glibc() {
    "$(arch_objdump "$1")" -T "$2" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -Vu | tail -n 1
}

# Package version from Cargo.toml ([package] version), plus cargo-deb's default revision.
crate_version() {
    sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1
}

# PASS/FAIL lines and their counts, for the scripts that report checks.
passed=0 failed=0
ok() { printf 'PASS: %s\n' "$*"; passed=$((passed + 1)); }
bad() { printf 'FAIL: %s\n' "$*"; failed=$((failed + 1)); }
check() { # check DESCRIPTION COMMAND...: PASS if the command succeeds
    local what=$1
    shift
    if "$@"; then ok "$what"; else bad "$what"; fi
}

# A fresh Debian root (minbase + systemd) in ROOT for the nspawn tests, unpacked from a
# debootstrap tarball cached in $PKG_CACHE (made on first use: about a minute; delete it to
# refresh). debootstrap's output goes to LOG.
debian_root() { # debian_root SUITE MIRROR ROOT LOG
    local suite=$1 mirror=$2 root=$3 log=$4
    local cache=$PKG_CACHE/debootstrap-$suite.tar tmp=$PKG_CACHE/bootstrap-$suite.tmp
    need_apt debootstrap
    if [ ! -f "$cache" ]; then
        say "debootstrap $suite (minbase + systemd), cached in $cache"
        rm -rf "$tmp"
        mkdir -p "$PKG_CACHE"
        local start=$SECONDS
        debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,ca-certificates,libgcc-s1 \
            "$suite" "$tmp" "$mirror" >"$log" 2>&1 ||
            { tail -20 "$log"; die "debootstrap failed"; }
        tar -C "$tmp" -cf "$cache.part" . && mv "$cache.part" "$cache"
        rm -rf "$tmp"
        say "debootstrap took $((SECONDS - start)) s"
    fi
    say "unpacking a fresh root into $root"
    rm -rf "$root"
    mkdir -p "$root"
    tar -C "$root" -xf "$cache"
}
