#!/usr/bin/env bash
# Writes the man pages and the bash/zsh/fish completions the .deb ships, with the built binary
# itself (`irsa-agent generate`), into OUTDIR/man and OUTDIR/completions.
#
#   packaging/generate-assets.sh OUTDIR BINARY [RUNNER...]
#
# RUNNER runs a cross-built binary on this host, e.g. `qemu-aarch64-static -L /usr/aarch64-linux-gnu`,
# so each package's pages come from its own binary.
set -euo pipefail
[ $# -ge 2 ] || {
    echo "usage: $0 OUTDIR BINARY [RUNNER...]" >&2
    exit 64
}
out=$1
bin=$2
shift 2
rm -rf "$out"
mkdir -p "$out/man" "$out/completions"
"$@" "$bin" generate man "$out/man"
# Debian policy: man pages gzip-compressed, -n for reproducible bytes.
gzip -9nf "$out"/man/*.1
"$@" "$bin" generate completions bash >"$out/completions/irsa-agent.bash"
"$@" "$bin" generate completions zsh >"$out/completions/_irsa-agent"
"$@" "$bin" generate completions fish >"$out/completions/irsa-agent.fish"
# Every file must be there and non-empty: an empty completion file would ship silently.
[ -s "$out/man/irsa-agent.1.gz" ] || {
    echo "error: $bin generate man wrote no irsa-agent.1" >&2
    exit 1
}
for f in "$out"/completions/*; do
    [ -s "$f" ] || {
        echo "error: $f is empty" >&2
        exit 1
    }
done
