#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs what the tests need, then cargo test.
# Extra arguments go to cargo test (e.g. `bash tests/run.sh --test config`).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --locked "$@"
