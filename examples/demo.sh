#!/usr/bin/env bash
# Runs irsa-agent's main job on the bundled example k3s host (examples/k3s-host): reads the
# service-account keys the way kube-apiserver does and prints the JWKS and the OIDC discovery
# document it would publish for the configured issuer.
set -euo pipefail
cd "$(dirname "$0")/.."
host=examples/k3s-host
tls=$host/var/lib/rancher/k3s/server/tls
echo "==> building irsa-agent" >&2
cargo build --quiet --release
agent=target/release/irsa-agent
echo "==> configuration of the example host" >&2
"$agent" --root "$host" check-config >&2
echo "==> JWKS (what <jwks-uri> must serve)" >&2
"$agent" --root "$host" jwks --key-file "$tls/service.key" --signing-key-file "$tls/service.current.key"
echo >&2
echo "==> discovery document (what <issuer>/.well-known/openid-configuration must serve)" >&2
"$agent" --root "$host" discovery --key-file "$tls/service.key" --signing-key-file "$tls/service.current.key"
echo >&2
