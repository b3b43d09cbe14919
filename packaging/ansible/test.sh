#!/usr/bin/env bash
# Tests the Ansible role: ansible-lint, then site.yml against this machine (connection local)
# on a fake k3s host (a copy of examples/k3s-host, through irsa-agent --root):
#   1. --check --diff: reports changes, changes no file of the host;
#   1b. --check on a node where nothing is installed yet: the package copy and install are
#      reported (nothing copied), apply says it needs the package, nothing fails;
#   2. for real: changes (config.yaml written, apply run);
#   3. for real again: changes nothing;
#   4. --check again: nothing pending;
#   5. a rollout over two nodes whose first node has a configuration check-config refuses:
#      the play fails on the first node, writes nothing there, and never touches the second;
#   6. the default (irsa_agent_apply: false) over two nodes: both configured, no apply run,
#      the apiserver configuration untouched (the daemons roll the issuer out).
# The package install (except 1b's check mode) and the service are switched off
# (irsa_agent_install/manage_service): the package and the unit are tested on a real systemd by
# packaging/test-deb-in-nspawn.sh.
#
# The role runs the real `irsa-agent apply` (with --no-restart) on the fake hosts.
# Set IRSA_AGENT_BIN=PATH to test another build.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=packaging/lib.sh
. packaging/lib.sh
need_ansible
export PATH="$PKG_VENV/bin:$PATH"
export ANSIBLE_CONFIG=$PWD/packaging/ansible/ansible.cfg ANSIBLE_NOCOLOR=1 ANSIBLE_FORCE_COLOR=0

say "ansible-lint (production profile)"
(cd packaging/ansible && ansible-lint -q --profile production site.yml roles)

if [ -n "${IRSA_AGENT_BIN:-}" ]; then
    real=$IRSA_AGENT_BIN # another build of irsa-agent, e.g. an integration check
else
    say "building irsa-agent (debug)"
    cargo build --quiet --locked
    real=$PWD/target/debug/irsa-agent
fi
bin=$real

work=$(mktemp -d /tmp/irsa-agent-ansible.XXXXXX)
trap 'rm -rf "$work"' EXIT
log=$work/log
fake_host() {
    mkdir -p "$1"
    cp -a examples/k3s-host/. "$1/"
    rm -f "$1/etc/irsa-agent/config.yaml"
}
root=$work/node
fake_host "$root"
tree_sums() { (cd "${1:-$root}" && find . -type f -print0 | sort -z | xargs -0 sha256sum); }

failures=0
fail() {
    printf 'FAIL: %s\n' "$*" >&2
    failures=$((failures + 1))
}
# run_play ARGS...: runs site.yml; sets $rc, output in $log.
run_play() {
    rc=0
    ansible-playbook packaging/ansible/site.yml "$@" >"$log" 2>&1 || rc=$?
    sed 's/^/    /' "$log" >&2
}
# play NAME ARGS...: runs site.yml on the one test node, sets $changed and $failed from the recap.
play() {
    local name=$1
    shift
    say "ansible-playbook site.yml $* ($name)"
    run_play -i packaging/ansible/tests/inventory.ini -e @packaging/ansible/tests/vars.yml \
        -e "irsa_agent_binary=$bin" -e "irsa_agent_root=$root" "$@"
    local recap
    recap=$(grep -E '^localhost +:' "$log" | tail -n 1 || true)
    changed=$(sed -n 's/.*changed=\([0-9]*\).*/\1/p' <<<"$recap")
    failed=$(sed -n 's/.*failed=\([0-9]*\).*/\1/p' <<<"$recap")
    if [ "$rc" != 0 ] || [ -z "$changed" ] || [ "$failed" != 0 ]; then
        fail "$name: ansible-playbook exit $rc, recap '$recap'"
        changed=${changed:-x}
    fi
}

before=$(tree_sums)
play "1: check mode" --check --diff
if [ "$changed" = x ] || [ "$changed" -eq 0 ]; then fail "1: check mode reported no change on a fresh host"; fi
grep -q 'apply --check --diff --json' "$log" || fail "1: the apply check did not run"
[ "$(tree_sums)" = "$before" ] || fail "1: check mode changed files under the fake root"

# 1b: check mode on a node where nothing is installed yet: the package would be copied and
# installed (a dummy .deb; check mode copies nothing), apply cannot preview without the binary
# and says so; nothing fails and nothing changes.
dummy=$work/irsa-agent_0.0.0-1_amd64.deb
echo "not a real package" >"$dummy"
play "1b: check mode, nothing installed yet" --check --diff -e irsa_agent_install=true \
    -e "irsa_agent_package=$dummy" -e "irsa_agent_package_sha256=$(sha256sum "$dummy" | cut -d ' ' -f 1)" \
    -e "irsa_agent_package_cache=$work/cache" -e "irsa_agent_binary=$work/no-such-binary"
if [ "$changed" = x ] || [ "$changed" -eq 0 ]; then fail "1b: check mode on a fresh node reported no change"; fi
grep -q 'is not installed yet' "$log" || fail "1b: check mode did not say apply needs the package"
[ ! -e "$work/cache" ] || fail "1b: check mode created the package cache"
[ "$(tree_sums)" = "$before" ] || fail "1b: check mode changed files under the fake root"

play "2: apply" --diff
if [ "$changed" = x ] || [ "$changed" -eq 0 ]; then fail "2: the first real run changed nothing"; fi
config=$root/etc/irsa-agent/config.yaml
if [ -f "$config" ]; then
    "$real" --root "$root" check-config >/dev/null || fail "2: the written config.yaml is not valid"
    grep -qx 'issuer: "https://oidc.example.com/homelab"' "$config" || fail "2: issuer missing in $config"
else
    fail "2: $config was not written"
fi
rc=0
"$real" --root "$root" apply --check --no-restart >/dev/null 2>&1 || rc=$?
[ "$rc" = 0 ] || fail "2: after the role ran, apply --check still finds changes (exit $rc)"
after=$(tree_sums)

play "3: apply again" --diff
[ "$changed" = 0 ] || fail "3: the second real run changed $changed task(s), expected none"
[ "$(tree_sums)" = "$after" ] || fail "3: the second real run changed files"

play "4: check mode again" --check --diff
[ "$changed" = 0 ] || fail "4: check mode after the rollout reported $changed change(s)"

# 5: serial rollout stops at the first failure. Two nodes on this machine, each its own root;
# node-a's issuer ends with '/', which check-config (the template's validate) refuses. The
# settings are host variables here (no -e, which would override node-a's issuer).
# local_node NAME [VAR: VALUE]...: one fake host of a local two-node inventory, with the test
# variables (those given override vars.yml's) and this machine as the connection.
local_node() {
    local n=$1 line skip=(-e '^---')
    shift
    for line in "$@"; do skip+=(-e "^${line%%:*}:"); done
    fake_host "$work/$n"
    echo "    $n:"
    grep -v "${skip[@]}" packaging/ansible/tests/vars.yml | sed 's/^/      /'
    for line in "$@"; do echo "      $line"; done
    echo "      irsa_agent_root: $work/$n"
    echo "      irsa_agent_binary: $bin"
    echo "      ansible_connection: local"
    echo "      ansible_become: false"
    echo "      ansible_python_interpreter: \"{{ ansible_playbook_python }}\""
}
{
    echo "control_plane:"
    echo "  hosts:"
    local_node node-a "irsa_agent_issuer: https://oidc.example.com/homelab/"
    local_node node-b "irsa_agent_issuer: https://oidc.example.com/homelab"
} >"$work/inventory.yml"
b_before=$(tree_sums "$work/node-b")
say "ansible-playbook site.yml over node-a (bad issuer), node-b (5: stop at the first failure)"
run_play -i "$work/inventory.yml"
[ "$rc" != 0 ] || fail "5: the rollout succeeded although node-a's configuration is invalid"
grep -q "must not end with '/'" "$log" || fail "5: the failure does not say why (check-config's message)"
[ ! -e "$work/node-a/etc/irsa-agent/config.yaml" ] || fail "5: the refused config.yaml was written on node-a"
if grep -q '^node-b ' "$log"; then fail "5: node-b appears in the run: the rollout went on after node-a failed"; fi
[ "$(tree_sums "$work/node-b")" = "$b_before" ] || fail "5: node-b was changed"

# 6: the default on several servers: the role configures both nodes and runs no apply (the
# daemons roll the issuer out, one restart at a time); the apiserver configuration is untouched.
{
    echo "control_plane:"
    echo "  hosts:"
    local_node node-c "irsa_agent_apply: false"
    local_node node-d "irsa_agent_apply: false"
} >"$work/inventory-cluster.yml"
c_k3s=$(sha256sum <"$work/node-c/etc/rancher/k3s/config.yaml")
say "ansible-playbook site.yml over node-c, node-d (6: the daemons apply)"
run_play -i "$work/inventory-cluster.yml"
[ "$rc" = 0 ] || fail "6: the two-node rollout failed (exit $rc)"
for n in node-c node-d; do
    [ -f "$work/$n/etc/irsa-agent/config.yaml" ] || fail "6: $n: config.yaml was not written"
    grep -q "^$n " "$log" || fail "6: $n is not in the run"
done
grep -q 'the irsa-agent daemons roll the issuer out' "$log" || fail "6: the play does not say the daemons apply"
[ "$(sha256sum <"$work/node-c/etc/rancher/k3s/config.yaml")" = "$c_k3s" ] || fail "6: node-c's k3s config.yaml was changed (apply ran)"
"$real" --root "$work/node-c" apply --check --no-restart >/dev/null 2>&1 && fail "6: node-c's apiserver configuration is already in sync: apply ran"

if [ "$failures" = 0 ]; then
    echo "ansible role: 7 passed, 0 failed"
else
    echo "ansible role: $failures check(s) failed"
    exit 1
fi
