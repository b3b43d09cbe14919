#!/bin/sh
# install.sh: installs irsa-agent on this machine from a release (.deb or tarball), verifying
# its SHA-256 first. Run `sh install.sh --help` for what it does, step by step.
set -eu

usage() {
    cat <<'EOF'
Usage: install.sh [OPTIONS] SOURCE
       install.sh --uninstall [--purge] [--dry-run]

Installs irsa-agent on this machine from a release you choose:

  1. detects this machine's architecture (amd64, arm64 or armhf; a 32-bit Raspberry Pi OS on
     a 64-bit kernel counts as armhf), using dpkg when it exists;
  2. fetches SOURCE: a .deb (irsa-agent_VERSION_ARCH.deb), a release tarball
     (irsa-agent-VERSION-ARCH.tar.gz), or a release directory/URL ending in `/` holding
     SHA256SUMS and those files, from which it picks the one for this architecture (the .deb
     where dpkg exists, else the tarball); SOURCE may be a local path or an http(s) URL;
  3. verifies the file's SHA-256 against --sha256 or the SHA256SUMS file next to it, and
     stops if they differ or if there is nothing to verify against;
  4. installs it: a .deb with apt-get (which also installs its dependencies; dpkg -i where
     apt-get is missing), keeping an existing /etc/irsa-agent/config.yaml; a tarball by
     copying its files to /usr/bin, /usr/lib/systemd/system, /usr/share, and
     /etc/irsa-agent/config.yaml only if that does not exist yet;
  5. enables irsa-agent.service on first install and (re)starts it when systemd runs. The
     service does nothing until you set `issuer:` in /etc/irsa-agent/config.yaml.

Running it again with the same release changes nothing. Configuration
(/etc/irsa-agent) and state (/var/lib/irsa-agent) survive upgrades and --uninstall;
--uninstall --purge deletes them too.

Options:
  --sha256 HEX   expected SHA-256 of the .deb or tarball (instead of SHA256SUMS)
  --tarball      install the tarball even where dpkg exists (release directory only)
  --uninstall    remove irsa-agent (keeps configuration and state)
  --purge        with --uninstall: also delete /etc/irsa-agent and /var/lib/irsa-agent
  -n, --dry-run  fetch and verify, then print the commands instead of running them
  -h, --help     this help

Examples:
  sudo sh install.sh https://example.org/irsa-agent/releases/v0.1.0/
  sudo sh install.sh ./irsa-agent_0.1.0-1_arm64.deb     # SHA256SUMS beside it
  sudo sh install.sh --sha256 4f2c... irsa-agent-0.1.0-1-armhf.tar.gz
  sudo sh install.sh --uninstall --purge

Exit status: 0 done (or nothing to do), 1 failure, 64 bad usage.
EOF
}

say() { printf '==> %s\n' "$*" >&2; }
die() {
    printf 'install.sh: error: %s\n' "$*" >&2
    exit 1
}
usage_error() {
    printf 'install.sh: %s (see --help)\n' "$*" >&2
    exit 64
}

# Runs a command that changes the system, or only shows it with --dry-run.
run() {
    printf '    + %s\n' "$*" >&2
    if [ "$dry_run" = 0 ]; then
        "$@"
    fi
}

manifest=/usr/lib/irsa-agent/install-manifest
unit=irsa-agent.service

sha256_expected=
source=
prefer_tarball=0
uninstall=0
purge=0
dry_run=0
while [ $# -gt 0 ]; do
    case $1 in
        --sha256)
            [ $# -ge 2 ] || usage_error "--sha256 needs a value"
            sha256_expected=$2
            shift 2
            ;;
        --sha256=*)
            sha256_expected=${1#*=}
            shift
            ;;
        --tarball) prefer_tarball=1; shift ;;
        --uninstall) uninstall=1; shift ;;
        --purge) purge=1; shift ;;
        -n | --dry-run) dry_run=1; shift ;;
        -h | --help) usage; exit 0 ;;
        -*) usage_error "unknown option: $1" ;;
        *)
            [ -z "$source" ] || usage_error "only one SOURCE, got '$source' and '$1'"
            source=$1
            shift
            ;;
    esac
done
if [ -n "$sha256_expected" ]; then
    sha256_expected=$(printf '%s' "$sha256_expected" | tr 'A-F' 'a-f')
    case $sha256_expected in
        *[!0-9a-f]*) usage_error "--sha256 must be 64 hexadecimal digits" ;;
    esac
    [ ${#sha256_expected} -eq 64 ] || usage_error "--sha256 must be 64 hexadecimal digits"
fi
if [ "$uninstall" = 1 ]; then
    [ -z "$source" ] || usage_error "--uninstall takes no SOURCE"
else
    [ "$purge" = 0 ] || usage_error "--purge goes with --uninstall"
    [ -n "$source" ] || usage_error "missing SOURCE (a .deb, a tarball or a release directory)"
fi

need_root() {
    [ "$dry_run" = 1 ] || [ "$(id -u)" = 0 ] || die "this changes the system: run it as root (sudo sh install.sh ...)"
}

systemd_running() { [ -d /run/systemd/system ]; }

dpkg_status() { dpkg-query -W -f='${db:Status-Status} ${Version}' irsa-agent 2>/dev/null || true; }

# ---------------------------------------------------------------------------------------------
# --uninstall
# ---------------------------------------------------------------------------------------------
uninstall() {
    need_root
    status=
    if command -v dpkg-query >/dev/null 2>&1; then
        status=$(dpkg_status)
    fi
    case $status in
        installed* | config-files* | half-* | unpacked* | triggers-*)
            if [ "$purge" = 1 ]; then
                say "purging the irsa-agent package: program, configuration and state"
                run dpkg --purge irsa-agent
            elif [ "${status%% *}" = config-files ]; then
                say "irsa-agent is already removed (its configuration is kept; --purge deletes it)"
            else
                say "removing the irsa-agent package (keeps /etc/irsa-agent and /var/lib/irsa-agent)"
                run dpkg --remove irsa-agent
            fi
            return 0
            ;;
    esac
    if [ -f "$manifest" ]; then
        say "removing irsa-agent installed from a tarball (files listed in $manifest)"
        if command -v systemctl >/dev/null 2>&1; then
            if systemd_running; then
                run systemctl disable --now "$unit" || true
            else
                run systemctl disable "$unit" || true
            fi
        fi
        files=$(grep -vxF "$manifest" "$manifest" || true)
        printf '%s\n' "$files" | while IFS= read -r file; do
            case $file in
                /*) run rm -f "$file" ;;
            esac
        done
        run rm -f "$manifest"
        for dir in /usr/lib/irsa-agent /usr/share/doc/irsa-agent; do
            if [ -d "$dir" ]; then run rmdir "$dir" 2>/dev/null || true; fi
        done
        if command -v systemctl >/dev/null 2>&1 && systemd_running; then
            run systemctl daemon-reload
        fi
    else
        say "irsa-agent is not installed: nothing to remove"
    fi
    if [ "$purge" = 1 ]; then
        for dir in /etc/irsa-agent /var/lib/irsa-agent; do
            if [ -e "$dir" ]; then
                say "deleting $dir"
                run rm -rf "$dir"
            fi
        done
    else
        say "kept /etc/irsa-agent and /var/lib/irsa-agent (--uninstall --purge deletes them)"
    fi
}

if [ "$uninstall" = 1 ]; then
    uninstall
    exit 0
fi

# ---------------------------------------------------------------------------------------------
# install: architecture, fetch, verify
# ---------------------------------------------------------------------------------------------
detect_arch() {
    if command -v dpkg >/dev/null 2>&1; then
        dpkg --print-architecture
        return
    fi
    machine=$(uname -m)
    case $machine in
        x86_64 | amd64) echo amd64 ;;
        aarch64 | arm64)
            # A 64-bit kernel under a 32-bit userland (older Raspberry Pi OS) runs armhf.
            if [ "$(getconf LONG_BIT 2>/dev/null || echo 64)" = 32 ]; then echo armhf; else echo arm64; fi
            ;;
        armv7* | armv8l) echo armhf ;;
        *) echo "$machine" ;;
    esac
}
arch=$(detect_arch)
case $arch in
    amd64 | arm64 | armhf) ;;
    armel | armv6l) die "this is an ARMv6 system (Raspberry Pi 1 or Zero): the armhf build needs ARMv7 (Pi 2 or newer)" ;;
    *) die "no irsa-agent build for architecture '$arch' (there are amd64, arm64 and armhf)" ;;
esac
say "this machine's architecture: $arch"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/irsa-agent-install.XXXXXX")
trap 'rm -rf "$tmp"' EXIT INT TERM
# apt-get reads local .debs as the unprivileged _apt user.
chmod 0755 "$tmp"

is_url() {
    case $1 in http://* | https://*) return 0 ;; *) return 1 ;; esac
}

# fetch SOURCE DEST: copies a local file or downloads a URL (curl or wget).
fetch() {
    if is_url "$1"; then
        if command -v curl >/dev/null 2>&1; then
            curl -fsSL --proto '=https,http' -o "$2" "$1"
        elif command -v wget >/dev/null 2>&1; then
            wget -q -O "$2" "$1"
        else
            die "cannot download $1: neither curl nor wget is installed"
        fi
    else
        [ -f "$1" ] || return 1
        cp "$1" "$2"
    fi
}

sha256_of() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum "$1" | cut -d ' ' -f 1
    elif command -v shasum >/dev/null 2>&1; then
        shasum -a 256 "$1" | cut -d ' ' -f 1
    else
        die "neither sha256sum nor shasum is installed: cannot verify the download"
    fi
}

# The SHA256SUMS line for NAME: prints its hash, or nothing.
sum_for() {
    awk -v name="$2" '{ f = $2; sub(/^\*/, "", f); if (f == name) { print tolower($1); exit } }' "$1"
}

case $source in
    */)
        # A release directory: SHA256SUMS names the artifacts; take ours.
        base=$source
        say "reading ${base}SHA256SUMS"
        fetch "${base}SHA256SUMS" "$tmp/SHA256SUMS" || die "cannot fetch ${base}SHA256SUMS"
        names=$(awk '{ f = $2; sub(/^\*/, "", f); print f }' "$tmp/SHA256SUMS")
        deb_name=$(printf '%s\n' "$names" | grep "^irsa-agent_.*_${arch}\.deb\$" | sort -V | tail -n 1 || true)
        tar_name=$(printf '%s\n' "$names" | grep "^irsa-agent-.*-${arch}\.tar\.gz\$" | sort -V | tail -n 1 || true)
        if [ -n "$deb_name" ] && [ "$prefer_tarball" = 0 ] && command -v dpkg >/dev/null 2>&1; then
            name=$deb_name
        elif [ -n "$tar_name" ]; then
            name=$tar_name
        elif [ -n "$deb_name" ]; then
            die "the release has only a .deb for $arch and this system has no dpkg"
        else
            die "the release at $base has no package for $arch (SHA256SUMS lists: $(printf '%s' "$names" | tr '\n' ' '))"
        fi
        ;;
    *)
        [ "$prefer_tarball" = 0 ] || usage_error "--tarball chooses within a release directory; SOURCE is a file"
        base=${source%/*}/
        [ "$base" != "$source/" ] || base=./
        name=${source##*/}
        ;;
esac
case $name in
    *.deb) kind=deb ;;
    *.tar.gz | *.tgz) kind=tarball ;;
    *) die "$name is neither a .deb nor a .tar.gz" ;;
esac
file=$tmp/$name
say "fetching $base$name"
fetch "$base$name" "$file" || die "cannot fetch $base$name"

if [ -z "$sha256_expected" ]; then
    if [ ! -f "$tmp/SHA256SUMS" ]; then
        fetch "${base}SHA256SUMS" "$tmp/SHA256SUMS" 2>/dev/null ||
            die "no SHA-256 to verify $name against: pass --sha256 HEX or put SHA256SUMS beside it"
    fi
    sha256_expected=$(sum_for "$tmp/SHA256SUMS" "$name")
    [ -n "$sha256_expected" ] || die "${base}SHA256SUMS has no line for $name"
    from="${base}SHA256SUMS"
else
    from="--sha256"
fi
actual=$(sha256_of "$file")
if [ "$actual" != "$sha256_expected" ]; then
    die "SHA-256 mismatch for $name: expected $sha256_expected (from $from), got $actual. Not installing."
fi
say "SHA-256 verified ($actual, from $from)"

# ---------------------------------------------------------------------------------------------
# install a .deb
# ---------------------------------------------------------------------------------------------
install_deb() {
    command -v dpkg-deb >/dev/null 2>&1 || die "$name is a .deb but this system has no dpkg: use the tarball"
    pkg=$(dpkg-deb -f "$file" Package)
    version=$(dpkg-deb -f "$file" Version)
    deb_arch=$(dpkg-deb -f "$file" Architecture)
    [ "$pkg" = irsa-agent ] || die "$name is the package '$pkg', not irsa-agent"
    [ "$deb_arch" = "$arch" ] || die "$name is for $deb_arch, this machine is $arch"
    status=$(dpkg_status)
    if [ "$status" = "installed $version" ]; then
        say "irsa-agent $version is already installed: nothing to do"
        return 0
    fi
    need_root
    if [ -f "$manifest" ]; then
        say "replacing the tarball installation by the package (the package now owns the files)"
        run rm -f "$manifest"
    fi
    say "installing irsa-agent $version (${status:-not installed before}); an existing /etc/irsa-agent/config.yaml is kept"
    if command -v apt-get >/dev/null 2>&1; then
        DEBIAN_FRONTEND=noninteractive
        export DEBIAN_FRONTEND
        run apt-get install -y --no-install-recommends --allow-downgrades \
            -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "$file"
    else
        run dpkg -i --force-confdef --force-confold "$file" ||
            die "dpkg -i failed; if dependencies are missing, install libc6, libgcc-s1 and ca-certificates"
    fi
}

# ---------------------------------------------------------------------------------------------
# install a tarball
# ---------------------------------------------------------------------------------------------
install_tarball() {
    if command -v dpkg-query >/dev/null 2>&1; then
        case $(dpkg_status) in
            installed*) die "irsa-agent is installed as a Debian package: install the .deb, or run --uninstall first" ;;
        esac
    fi
    mkdir "$tmp/x"
    tar -xzf "$file" -C "$tmp/x" || die "cannot unpack $name"
    set -- "$tmp"/x/*
    if [ $# -ne 1 ] || [ ! -f "$1/usr/bin/irsa-agent" ]; then
        die "$name is not an irsa-agent release tarball (expected one directory holding usr/bin/irsa-agent)"
    fi
    stage=$1
    version=$("$stage/usr/bin/irsa-agent" --version 2>/dev/null) ||
        die "the irsa-agent in $name does not run here (wrong architecture, or a C library older than glibc 2.31?)"
    say "installing $version from the tarball; an existing /etc/irsa-agent/config.yaml is kept"
    need_root
    first_install=1
    [ -f "$manifest" ] && first_install=0
    changed=0
    list=$tmp/files
    (cd "$stage" && find . -type f | sed 's|^\./|/|' | sort) >"$list"
    while IFS= read -r dest; do
        src=$stage$dest
        mode=$(stat -c %a "$src")
        if [ "$dest" = /etc/irsa-agent/config.yaml ] && [ -e "$dest" ]; then
            cmp -s "$src" "$dest" || say "keeping your $dest (the example of this release is in $name)"
            continue
        fi
        if [ -f "$dest" ] && cmp -s "$src" "$dest" && [ "$(stat -c %a "$dest")" = "$mode" ]; then
            continue
        fi
        run install -D -m "$mode" "$src" "$dest"
        changed=1
    done <"$list"
    if [ ! -d /var/lib/irsa-agent ]; then
        run install -d -m 0700 /var/lib/irsa-agent
    fi
    grep -v '^/etc/' "$list" >"$tmp/manifest"
    echo "$manifest" >>"$tmp/manifest"
    if ! cmp -s "$tmp/manifest" "$manifest" 2>/dev/null; then
        run install -D -m 0644 "$tmp/manifest" "$manifest"
    fi
    if [ "$changed" = 0 ]; then
        say "$version is already installed: nothing to do"
        return 0
    fi
    if command -v systemctl >/dev/null 2>&1; then
        if systemd_running; then
            run systemctl daemon-reload
        fi
        if [ "$first_install" = 1 ]; then
            run systemctl enable "$unit"
            if systemd_running; then run systemctl start "$unit" || true; fi
        elif systemd_running; then
            run systemctl try-restart "$unit" || true
        fi
    fi
}

case $kind in
    deb) install_deb ;;
    tarball) install_tarball ;;
esac

if [ "$dry_run" = 1 ]; then
    say "dry run: nothing was changed"
    exit 0
fi
if ! grep -qs '^issuer:' /etc/irsa-agent/config.yaml && [ -z "$(ls /etc/irsa-agent/config.d 2>/dev/null)" ]; then
    say "next: set 'issuer:' and 'publish:' in /etc/irsa-agent/config.yaml, then"
    say "      irsa-agent check-config && irsa-agent apply --check --diff && systemctl restart irsa-agent"
fi
say "done"
