#!/usr/bin/env bash
# STAND-IN for `irsa-agent apply` until the real one lands (issue 3). It follows the interface
# the role relies on: `apply [--check] [--diff] [--json] [--no-restart]`, exit 0 in sync / 2
# pending (with --check) / 1 error, `--json` prints {"changed", "in_sync", "check", "files":
# [{"path", "diff"}]} where `changed` means "changed now" (false with --check). Its "host
# change" is a marker file under the root holding the issuer last applied. Every other
# subcommand runs the real binary. test.sh uses this only when the real apply is missing, and
# says so.
set -euo pipefail
real=${IRSA_AGENT_REAL_BINARY:?}
args=("$@")
root=/ config=() i=0 sub=
while [ $i -lt ${#args[@]} ]; do
    case ${args[$i]} in
        --root) root=${args[$((i + 1))]}; i=$((i + 2)) ;;
        --config) config=(--config "${args[$((i + 1))]}"); i=$((i + 2)) ;;
        -*) i=$((i + 1)) ;;
        *) sub=${args[$i]}; break ;;
    esac
done
[ "$sub" = apply ] || exec "$real" "$@"
check=0
for a in "${args[@]}"; do [ "$a" = --check ] && check=1; done
want=$("$real" --root "$root" "${config[@]}" check-config --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["issuer"])')
marker=$root/var/lib/irsa-agent/fake-apply-issuer
have=$(cat "$marker" 2>/dev/null || true)
result() { # result CHANGED IN_SYNC DIFF
    python3 -c 'import json,sys; c,s,d=sys.argv[1:4]; print(json.dumps({"changed": c=="1", "in_sync": s=="1",
        "check": sys.argv[4]=="1", "files": [{"path": "/var/lib/irsa-agent/fake-apply-issuer", "diff": d}] if d else []}))' "$@" "$check"
}
if [ "$want" = "$have" ]; then
    result 0 1 ""
    exit 0
fi
diff=$(printf -- '--- a/var/lib/irsa-agent/fake-apply-issuer\n+++ b/var/lib/irsa-agent/fake-apply-issuer\n-%s\n+%s' "$have" "$want")
if [ $check = 1 ]; then
    result 0 0 "$diff"
    exit 2
fi
mkdir -p "$(dirname "$marker")"
printf '%s' "$want" >"$marker"
result 1 0 "$diff"
