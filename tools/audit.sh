#!/usr/bin/env bash
# Audits Cargo.lock for crates with published security advisories (RustSec), with cargo-audit.
# The ignore list, each entry with its reason, is .cargo/audit.toml.
#
#   bash tools/audit.sh             # fetches the advisory database from GitHub first
#   bash tools/audit.sh --no-fetch  # uses the copy already in ~/.cargo/advisory-db
#
# For developers: the advisory database comes from GitHub, so this needs network access and is
# not part of CI. Install cargo-audit with `cargo install cargo-audit --locked`.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! cargo audit --version >/dev/null 2>&1; then
    echo "cargo-audit is not installed: cargo install cargo-audit --locked" >&2
    exit 2
fi
fetch=()
case ${1:-} in
    --no-fetch) fetch=(--no-fetch) ;;
    "") ;;
    *) echo "usage: bash tools/audit.sh [--no-fetch]" >&2; exit 64 ;;
esac
# --deny warnings: unmaintained or yanked crates fail too; ignore them in .cargo/audit.toml
# with a reason, like the one advisory that does not apply.
status=0
cargo audit "${fetch[@]}" --deny warnings --file Cargo.lock || status=$?
if [ "$status" -ne 0 ] && [ ! -d "$HOME/.cargo/advisory-db/crates" ]; then
    echo "tools/audit.sh: no advisory database: cargo-audit clones it from" \
        "https://github.com/RustSec/advisory-db (unreachable from CI); clone it into" \
        "$HOME/.cargo/advisory-db elsewhere and run with --no-fetch" >&2
fi
exit "$status"
