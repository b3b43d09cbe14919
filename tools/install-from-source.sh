#!/usr/bin/env bash
# install-from-source.sh: builds irsa-agent from this source checkout and installs it on this
# machine with the files the .deb installs. Run `tools/install-from-source.sh --help`.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: tools/install-from-source.sh [OPTIONS]
       tools/install-from-source.sh --uninstall [--purge] [OPTIONS]

Builds irsa-agent from this checkout and installs it on this machine (a Raspberry Pi builds its
own). Run it as the user who has Rust: it builds as that user, then runs the install steps
through sudo (as root it does everything itself):

  1. cargo build --release --locked (needs Rust >= 1.88, https://rustup.rs, and a C compiler:
     apt-get install build-essential);
  2. the man pages and bash/zsh/fish completions, written by the built binary
     (packaging/generate-assets.sh);
  3. installs the files the .deb installs, read from the one list in Cargo.toml
     ([package.metadata.deb] assets, plus the unit systemd/irsa-agent.service), each with
     its mode: /usr/bin/irsa-agent, /usr/lib/systemd/system/irsa-agent.service, the man page,
     completions, /usr/share/doc/irsa-agent/ (README.md, docs/*.md), and
     /etc/irsa-agent/config.yaml ONLY if it does not exist yet (yours is never overwritten);
  4. creates /var/lib/irsa-agent (mode 0700) if missing, and writes the list of installed
     files to /usr/lib/irsa-agent/install-manifest (the one install.sh uses, so
     `sh install.sh --uninstall` removes this installation too);
  5. enables irsa-agent.service on first install and (re)starts it when systemd runs. The
     service does nothing until you set `issuer:` in /etc/irsa-agent/config.yaml.

Running it again installs what changed and keeps your configuration. Refuses when the Debian
package is installed (remove it first, or install the package instead).

Options:
  --destdir DIR   install under DIR instead of / (for packaging and tests): no root needed,
                  systemctl is not run, the Debian package is not looked at
  --binary PATH   install this irsa-agent binary instead of building one (it also writes
                  the man pages and completions)
  --uninstall     remove what the manifest lists (keeps /etc/irsa-agent, /var/lib/irsa-agent)
  --purge         with --uninstall: also delete /etc/irsa-agent and /var/lib/irsa-agent
  -n, --dry-run   print what would be installed or removed, change nothing
  -h, --help      this help

Examples:
  tools/install-from-source.sh
  tools/install-from-source.sh --destdir /tmp/root --binary target/debug/irsa-agent
  sudo tools/install-from-source.sh --uninstall

Exit status: 0 done (or nothing to do), 1 failure, 64 bad usage.
EOF
}

say() { printf '==> %s\n' "$*" >&2; }
die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}
usage_error() {
    printf 'error: %s (see --help)\n' "$*" >&2
    exit 64
}

destdir=
binary=
uninstall=0
purge=0
dry_run=0
while [ $# -gt 0 ]; do
    case $1 in
        --destdir)
            [ $# -ge 2 ] || usage_error "--destdir needs a directory"
            destdir=$2
            shift 2
            ;;
        --destdir=*) destdir=${1#*=}; shift ;;
        --binary)
            [ $# -ge 2 ] || usage_error "--binary needs a path"
            binary=$2
            shift 2
            ;;
        --binary=*) binary=${1#*=}; shift ;;
        --uninstall) uninstall=1; shift ;;
        --purge) purge=1; shift ;;
        -n | --dry-run) dry_run=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage_error "unknown argument: $1" ;;
    esac
done
[ "$purge" = 0 ] || [ "$uninstall" = 1 ] || usage_error "--purge goes with --uninstall"
if [ -n "$destdir" ]; then
    mkdir -p "$destdir" || die "cannot create --destdir $destdir"
    destdir=$(cd "$destdir" && pwd)
    [ "$destdir" != / ] || destdir=
fi
if [ -n "$binary" ]; then
    [ -x "$binary" ] || die "--binary $binary is not an executable file"
    binary=$(cd "$(dirname "$binary")" && pwd)/$(basename "$binary")
fi

src=$(cd "$(dirname "$0")/.." && pwd)
manifest=/usr/lib/irsa-agent/install-manifest
unit=irsa-agent.service
conffile=/etc/irsa-agent/config.yaml
state_dir=/var/lib/irsa-agent

run() {
    printf '    + %s\n' "$*" >&2
    if [ "$dry_run" = 0 ]; then
        "$@"
    fi
}

# systemctl only on the real system, with systemd present.
real_system() { [ -z "$destdir" ]; }
have_systemctl() { real_system && command -v systemctl >/dev/null 2>&1; }
systemd_running() { [ -d /run/systemd/system ]; }

need_root() {
    real_system || return 0
    [ "$dry_run" = 1 ] || [ "$(id -u)" = 0 ] ||
        die "this changes the system: run it as root (sudo $0 ...), or use --destdir"
}

# As a normal user on the real system: build here, then install through sudo.
as_root_via_sudo() {
    real_system && [ "$dry_run" = 0 ] && [ "$(id -u)" != 0 ]
}

if real_system && command -v dpkg-query >/dev/null 2>&1; then
    case $(dpkg-query -W -f='${db:Status-Status}' irsa-agent 2>/dev/null || true) in
        installed* | config-files* | half-* | unpacked* | triggers-*)
            if [ "$uninstall" = 1 ]; then
                die "irsa-agent is installed as a Debian package: remove it with apt-get remove irsa-agent (or sh install.sh --uninstall)"
            fi
            case $(dpkg-query -W -f='${db:Status-Status}' irsa-agent 2>/dev/null) in
                config-files*) ;;
                *) die "irsa-agent is installed as a Debian package: remove it first (apt-get remove irsa-agent), or build and install the package (packaging/build-debs.sh)" ;;
            esac
            ;;
    esac
fi

# ---------------------------------------------------------------------------------------------
# --uninstall
# ---------------------------------------------------------------------------------------------
if [ "$uninstall" = 1 ]; then
    need_root
    if [ -f "$destdir$manifest" ]; then
        say "removing irsa-agent (the files listed in $manifest)"
        if have_systemctl; then
            if systemd_running; then
                run systemctl disable --now "$unit" || true
            else
                run systemctl disable "$unit" || true
            fi
        fi
        while IFS= read -r file; do
            case $file in
                "$manifest") ;;
                /etc/*) ;; # configuration: kept unless --purge
                /*) run rm -f "$destdir$file" ;;
            esac
        done <"$destdir$manifest"
        run rm -f "$destdir$manifest"
        for dir in /usr/lib/irsa-agent /usr/share/doc/irsa-agent; do
            if [ -d "$destdir$dir" ]; then run rmdir "$destdir$dir" 2>/dev/null || true; fi
        done
        if have_systemctl && systemd_running; then run systemctl daemon-reload; fi
    else
        say "irsa-agent is not installed from source or a tarball here ($manifest is missing): nothing to remove"
    fi
    if [ "$purge" = 1 ]; then
        for dir in /etc/irsa-agent "$state_dir"; do
            if [ -e "$destdir$dir" ]; then
                say "deleting $dir"
                run rm -rf "$destdir$dir"
            fi
        done
    else
        say "kept /etc/irsa-agent and $state_dir (--uninstall --purge deletes them)"
    fi
    say "done"
    exit 0
fi

# ---------------------------------------------------------------------------------------------
# build
# ---------------------------------------------------------------------------------------------
as_root_via_sudo || need_root
if [ -z "$binary" ]; then
    command -v cargo >/dev/null 2>&1 ||
        die "cargo is not installed: install Rust (https://rustup.rs: curl --proto '=https' -sSf https://sh.rustup.rs | sh), then run this again"
    say "building the release binary (cargo build --release --locked)"
    start=$SECONDS
    (cd "$src" && cargo build --release --locked) || die "the build failed (see above)"
    say "built in $((SECONDS - start)) s"
    binary=$src/target/release/irsa-agent
fi
if as_root_via_sudo; then
    command -v sudo >/dev/null 2>&1 ||
        die "built $binary; installing needs root: run $0 --binary $binary as root"
    say "installing as root: sudo $0 --binary $binary"
    exec sudo "$0" --binary "$binary"
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
version=$("$binary" --version) || die "$binary does not run here"
say "man pages and completions (packaging/generate-assets.sh)"
bash "$src/packaging/generate-assets.sh" "$tmp/generated" "$binary" >/dev/null

# ---------------------------------------------------------------------------------------------
# stage: the .deb's files, from the one list in Cargo.toml
# ---------------------------------------------------------------------------------------------
stage=$tmp/stage
mkdir -p "$stage"
# Source paths in the list name the release build; map them to what this run built.
source_path() {
    case $1 in
        target/release/irsa-agent) printf '%s\n' "$binary" ;;
        target/release/generated/*) printf '%s\n' "$tmp/generated/${1#target/release/generated/}" ;;
        *) printf '%s\n' "$src/$1" ;;
    esac
}
assets=$tmp/assets
# One `["source", "destination", "mode"],` per line between `assets = [` and `]`.
awk '
    /^\[package\.metadata\.deb\]/ { deb = 1; next }
    /^\[/ { deb = 0 }
    deb && /^assets = \[/ { on = 1; next }
    on && /^\]/ { on = 0 }
    on && /^[ \t]*\[/ {
        line = $0
        gsub(/^[ \t]*\[|\],?[ \t]*(#.*)?$/, "", line)
        n = split(line, f, /"[ \t]*,[ \t]*"/)
        gsub(/"/, "", f[1]); gsub(/"/, "", f[n])
        if (n == 3) print f[1] "\t" f[2] "\t" f[3]
    }
' "$src/Cargo.toml" >"$assets"
[ -s "$assets" ] || die "no [package.metadata.deb] assets found in $src/Cargo.toml"
count=0
while IFS=$'\t' read -r from to mode; do
    case $to in
        usr/share/lintian/*) continue ;; # Debian's package checker only (the tarball drops it too)
    esac
    pattern=$(source_path "$from")
    found=0
    for file in $pattern; do
        [ -f "$file" ] || continue
        case $to in
            */) dest=$to$(basename "$file") ;;
            *) dest=$to ;;
        esac
        install -D -m "$mode" "$file" "$stage/$dest"
        found=1
        count=$((count + 1))
    done
    [ "$found" = 1 ] || die "Cargo.toml asset $from matches no file (expected at $pattern)"
done <"$assets"
# cargo-deb's `systemd-units = { unit-scripts = "systemd/" }` installs the unit here.
install -D -m 0644 "$src/systemd/$unit" "$stage/usr/lib/systemd/system/$unit"
count=$((count + 1))

# ---------------------------------------------------------------------------------------------
# install
# ---------------------------------------------------------------------------------------------
say "installing $version into ${destdir:-/} ($count files); an existing $conffile is kept"
first_install=1
[ -f "$destdir$manifest" ] && first_install=0
changed=0
list=$tmp/files
(cd "$stage" && find . -type f | sed 's|^\./|/|' | LC_ALL=C sort) >"$list"
while IFS= read -r dest; do
    from=$stage$dest
    mode=$(stat -c %a "$from")
    to=$destdir$dest
    if [ "$dest" = "$conffile" ] && [ -e "$to" ]; then
        cmp -s "$from" "$to" || say "keeping your $conffile (this version's example: $src/packaging/config.yaml)"
        continue
    fi
    if [ -f "$to" ] && cmp -s "$from" "$to" && [ "$(stat -c %a "$to")" = "$mode" ]; then
        continue
    fi
    run install -D -m "$mode" "$from" "$to"
    changed=1
done <"$list"
if [ ! -d "$destdir$state_dir" ]; then
    run install -d -m 0700 "$destdir$state_dir"
fi
grep -v '^/etc/' "$list" >"$tmp/manifest"
echo "$manifest" >>"$tmp/manifest"
if ! cmp -s "$tmp/manifest" "$destdir$manifest" 2>/dev/null; then
    run install -D -m 0644 "$tmp/manifest" "$destdir$manifest"
fi
if [ "$changed" = 0 ]; then
    say "$version is already installed: nothing to do"
elif have_systemctl; then
    if systemd_running; then run systemctl daemon-reload; fi
    if [ "$first_install" = 1 ]; then
        run systemctl enable "$unit"
        if systemd_running; then run systemctl start "$unit" || true; fi
    elif systemd_running; then
        run systemctl try-restart "$unit" || true
    fi
fi
if [ "$dry_run" = 1 ]; then
    say "dry run: nothing was changed"
    exit 0
fi
if ! grep -qs '^issuer:' "$destdir$conffile"; then
    say "next: set 'issuer:' and 'publish:' in $conffile, then"
    say "      irsa-agent check-config && irsa-agent apply --check --diff && systemctl restart irsa-agent"
    say "      (the whole journey: /usr/share/doc/irsa-agent/quickstart.md)"
fi
say "done"
