#!/usr/bin/env bash
# docs/quickstart.md, followed for real: a fresh Debian root booted with systemd-nspawn -b is made
# into a kubeadm-shaped control-plane node, and every numbered step's commands are taken out of
# docs/quickstart.md (its fenced blocks and its **Check:** command) and run inside it, from the
# source checkout to a pod's token exchanged for credentials at a local STS.
#
#   bash packaging/test-quickstart-in-nspawn.sh [--keep] [--mirror URL] [--binary PATH]
#   bash packaging/test-quickstart-in-nspawn.sh --prepare-root [--mirror URL]
#
# --prepare-root only builds the cached Debian root (debootstrap and apt, a few minutes the
# first time) and exits: .ci/run starts it in the background while the tests run.
# --binary installs PATH (as target/release/irsa-agent of the checkout) instead of the packages.
# Needs root, systemd-nspawn, IRSA_TEST_KUBE_APISERVER (the real kube-apiserver, e.g.
# `../shared/tools/kube-apiserver --path`), kubectl, SeaweedFS's `weed` (tests/run.sh installs
# it into $IRSA_TEST_VENV) and an installable irsa-agent: packages from packaging/build-debs.sh
# in target/dist/ (quickstart step 1, "packages you built"), or a release binary
# target/release/irsa-agent (step 1, "built elsewhere"). Without them it prints SKIPPED, exit 0.
#
# What is real: systemd, the package/installer, the service, the kube-apiserver binary with the
# manifest's own command line, Debian's etcd, nginx with TLS from a test CA in front of the
# directory target, SeaweedFS's IAM and STS. What stands in for what these machines lack is
# declared in the SUBSTITUTIONS table the script prints, and every substituted command is
# printed next to the quickstart's text. The debootstrap root plus the Debian packages it needs
# are cached as a tarball under /var/cache/irsa-agent-build (delete it to refresh).
# Exit status: 0 every step and check passed (or SKIPPED), 1 a step failed (it is named).
# shellcheck disable=SC2016 # single-quoted $ and backquotes are meant for the container's shell
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=packaging/lib.sh
. packaging/lib.sh

suite=bookworm
mirror=http://deb.debian.org/debian
keep=0
release_bin=target/release/irsa-agent
prepare=0
while [ $# -gt 0 ]; do
    case $1 in
        --prepare-root) prepare=1; shift ;;
        --mirror) mirror=${2:?}; shift 2 ;;
        --keep) keep=1; shift ;;
        --binary) release_bin=${2:?}; shift 2 ;;
        -h | --help) sed -n '2,/^# Exit status/s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) die "unknown argument: $1" ;;
    esac
done
skip() {
    echo "SKIPPED: $*"
    exit 0
}
[ "$(id -u)" = 0 ] || skip "needs root (systemd-nspawn)"
# As root it installs what it needs from Debian (CI starts from a bare machine).
command -v systemd-nspawn >/dev/null || need_apt systemd-container
command -v systemd-nspawn >/dev/null || skip "no systemd-nspawn (apt-get install systemd-container)"
if [ "$prepare" = 0 ]; then
command -v kubectl >/dev/null || need_apt kubernetes-client
kapi=${IRSA_TEST_KUBE_APISERVER:-}
[ -x "${kapi:-/nonexistent}" ] || skip "IRSA_TEST_KUBE_APISERVER does not name the kube-apiserver binary"
kubectl_bin=$(command -v kubectl || true)
[ -n "$kubectl_bin" ] || skip "no kubectl on this machine"
kubectl_bin=$(readlink -f "$kubectl_bin")
weed=${IRSA_TEST_VENV:-$HOME/.cache/irsa-agent-test-venv}/bin/weed
[ -x "$weed" ] || skip "no SeaweedFS at $weed (bash tests/run.sh installs it)"
version=$(crate_version)-1
arch=$(dpkg --print-architecture)
deb=target/dist/irsa-agent_${version}_${arch}.deb
if [ "$release_bin" != target/release/irsa-agent ]; then
    [ -x "$release_bin" ] || die "--binary $release_bin: not an executable"
    install_mode=binary
elif [ -f "$deb" ]; then
    install_mode=deb
elif [ -x "$release_bin" ]; then
    install_mode=binary
else
    skip "no $deb (packaging/build-debs.sh --arch $arch) and no $release_bin (cargo build --release)"
fi
fi
start_all=$SECONDS
nspawn_pid=
ct_pid=
root_tmpfs=0

work=$PWD/target/quickstart-nspawn
mkdir -p "$work"
root=$work/mnt/root

cleanup() {
    local t0=$SECONDS
    if [ -n "$nspawn_pid" ] && kill -0 "$nspawn_pid" 2>/dev/null; then
        kill -s RTMIN+4 "$ct_pid" 2>/dev/null || true # systemd: poweroff
        for _ in $(seq 100); do kill -0 "$nspawn_pid" 2>/dev/null || break; sleep 0.2; done
        kill "$nspawn_pid" 2>/dev/null || true
        wait "$nspawn_pid" 2>/dev/null || true
    fi
    local t1=$SECONDS
    if [ "$root_tmpfs" = 1 ]; then umount "$work/mnt" && rmdir "$work/mnt"; fi
    say "cleanup: container stopped in $((t1 - t0)) s, root removed in $((SECONDS - t1)) s"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
# The root lives on a tmpfs (unless --keep): unpacking and deleting its ~700 MB of small files on
# this machine's disk took 40 + 50 s, on tmpfs about 1 s.
if [ "$keep" = 0 ]; then
    mkdir -p "$work/mnt"
    mount -t tmpfs -o size=4g,mode=755 quickstart-root "$work/mnt"
    root_tmpfs=1
fi

in_ct() { # runs a command inside the booted container, as root in /root/irsa-agent
    nsenter --target "$ct_pid" --mount --uts --ipc --net --pid --cgroup --wd="$root/root/irsa-agent" -- \
        env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
        TERM=dumb "$@"
}

# --- the Debian root: debootstrap + the packages this host needs, cached --------------------------
ct_packages="sudo curl openssl nginx-light etcd-server awscli"
cache=$PKG_CACHE/quickstart-$suite-$(printf '%s' "$ct_packages" | sha256sum | cut -c1-12).tar
if [ ! -f "$cache" ]; then
    t0=$SECONDS
    debian_root "$suite" "$mirror" "$root" "$work/debootstrap.log"
    say "apt-get install $ct_packages (cached in $cache)"
    systemd-nspawn --quiet --register=no --keep-unit -D "$root" --pipe -- sh -c \
        "export DEBIAN_FRONTEND=noninteractive; apt-get update -qq && apt-get install -y -qq --no-install-recommends $ct_packages && apt-get clean" \
        >"$work/apt.log" 2>&1 || { tail -30 "$work/apt.log"; die "apt-get install in the root failed"; }
    tar -C "$root" -cf "$cache.part" . && mv "$cache.part" "$cache"
    say "root prepared in $((SECONDS - t0)) s"
else
    say "unpacking the cached root $cache"
    rm -rf "$root" && mkdir -p "$root" && tar -C "$root" -xf "$cache"
fi
prep_s=$((SECONDS - start_all))
if [ "$prepare" = 1 ]; then
    say "the Debian root is ready: $cache"
    exit 0
fi

# --- the host inside: a kubeadm-shaped node ----------------------------------------------------
echo quickstart-cp >"$root/etc/hostname"
printf '127.0.0.1 localhost quickstart-cp\n::1 localhost\n127.0.0.1 oidc.home.example.com\n' >"$root/etc/hosts"
# The source checkout (tracked and new files, as a user's clone has them) and what step 1 installs.
src=$root/root/irsa-agent
mkdir -p "$src"
git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -C "$src" -xf -
if [ "$install_mode" = deb ]; then
    mkdir -p "$src/target/dist" && cp target/dist/* "$src/target/dist/"
else
    mkdir -p "$src/target/release" && cp "$release_bin" "$src/target/release/irsa-agent"
fi

pki=$root/etc/kubernetes/pki
mkdir -p "$pki" "$root/etc/kubernetes/manifests" "$root/etc/ssl/quickstart"
(
    cd "$pki"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 30 -subj /CN=kubernetes 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,IP:10.96.0.1\nextendedKeyUsage=serverAuth\n' >server.ext
    openssl req -newkey rsa:2048 -nodes -keyout apiserver.key -out apiserver.csr -subj /CN=kube-apiserver 2>/dev/null
    openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out apiserver.crt -days 30 -extfile server.ext 2>/dev/null
    printf 'extendedKeyUsage=clientAuth\n' >client.ext
    openssl req -newkey rsa:2048 -nodes -keyout admin.key -out admin.csr -subj "/O=system:masters/CN=kubernetes-admin" 2>/dev/null
    openssl x509 -req -in admin.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out admin.crt -days 30 -extfile client.ext 2>/dev/null
    openssl genrsa -out sa.key 2048 2>/dev/null
    openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
    rm -f ./*.csr ./*.ext
)
b64() { base64 -w0 <"$1"; }
cat >"$root/etc/kubernetes/admin.conf" <<EOF
apiVersion: v1
kind: Config
clusters:
- cluster:
    certificate-authority-data: $(b64 "$pki/ca.crt")
    server: https://127.0.0.1:6443
  name: kubernetes
contexts:
- context: {cluster: kubernetes, user: kubernetes-admin}
  name: kubernetes-admin@kubernetes
current-context: kubernetes-admin@kubernetes
users:
- name: kubernetes-admin
  user:
    client-certificate-data: $(b64 "$pki/admin.crt")
    client-key-data: $(b64 "$pki/admin.key")
EOF
chmod 600 "$root/etc/kubernetes/admin.conf" "$pki"/*.key
# What `kubeadm init` tells the admin to do.
mkdir -p "$root/root/.kube" && cp "$root/etc/kubernetes/admin.conf" "$root/root/.kube/config"
# A kubeadm v1.36 manifest, reduced to the flags a node without kubelet, proxy or etcd TLS can use.
kapi_version=$("$kapi" --version | sed -n 's/^Kubernetes //p')
cat >"$root/etc/kubernetes/manifests/kube-apiserver.yaml" <<EOF
apiVersion: v1
kind: Pod
metadata:
  annotations:
    kubeadm.kubernetes.io/kube-apiserver.advertise-address.endpoint: 127.0.0.1:6443
  labels:
    component: kube-apiserver
    tier: control-plane
  name: kube-apiserver
  namespace: kube-system
spec:
  containers:
  - command:
    - kube-apiserver
    - --advertise-address=127.0.0.1
    - --allow-privileged=true
    - --authorization-mode=Node,RBAC
    - --client-ca-file=/etc/kubernetes/pki/ca.crt
    - --enable-admission-plugins=NodeRestriction
    - --enable-bootstrap-token-auth=true
    - --endpoint-reconciler-type=none
    - --etcd-servers=http://127.0.0.1:2379
    - --secure-port=6443
    - --service-account-issuer=https://kubernetes.default.svc.cluster.local
    - --service-account-key-file=/etc/kubernetes/pki/sa.pub
    - --service-account-signing-key-file=/etc/kubernetes/pki/sa.key
    - --service-cluster-ip-range=10.96.0.0/12
    - --tls-cert-file=/etc/kubernetes/pki/apiserver.crt
    - --tls-private-key-file=/etc/kubernetes/pki/apiserver.key
    image: registry.k8s.io/kube-apiserver:${kapi_version:-v1.36.2}
    name: kube-apiserver
  hostNetwork: true
  priorityClassName: system-node-critical
status: {}
EOF
# The "kubelet": runs the manifest's command (the real kube-apiserver binary) and restarts it
# whenever the manifest changes or the process dies, as kubelet does for a static pod.
cat >"$root/usr/local/sbin/quickstart-kubelet" <<'EOF'
#!/bin/bash
# Static-pod stand-in: (re)starts kube-apiserver with the command in its manifest.
m=/etc/kubernetes/manifests/kube-apiserver.yaml
pid= last=
stop() { [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null; pid=; }
trap 'stop; exit 0' TERM INT
while :; do
    cur=$(sha256sum "$m" 2>/dev/null | cut -c1-64 || true)
    if [ "$cur" != "$last" ] || { [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; }; then
        stop
        last=$cur
        if [ -n "$cur" ]; then
            mapfile -t cmd < <(awk '/^  - command:/ {c=1; next}
                c && /^    - / {sub(/^    - /, ""); gsub(/^["'\'']|["'\'']$/, ""); print; next}
                c {exit}' "$m")
            echo "manifest $cur: starting ${cmd[*]}"
            "${cmd[@]}" >>/var/log/kube-apiserver.log 2>&1 &
            pid=$!
        fi
    fi
    sleep 1
done
EOF
chmod 755 "$root/usr/local/sbin/quickstart-kubelet"
cat >"$root/etc/systemd/system/quickstart-kubelet.service" <<'EOF'
[Unit]
Description=static-pod stand-in for kube-apiserver (quickstart test)
After=etcd.service
Wants=etcd.service
[Service]
ExecStart=/usr/local/sbin/quickstart-kubelet
[Install]
WantedBy=multi-user.target
EOF
ln -sf /etc/systemd/system/quickstart-kubelet.service "$root/etc/systemd/system/multi-user.target.wants/"

# The issuer's HTTPS: a test CA the container trusts, nginx with the publishing.md server block.
(
    cd "$root/etc/ssl/quickstart"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 30 -subj "/CN=quickstart test CA" 2>/dev/null
    printf 'subjectAltName=DNS:oidc.home.example.com\nextendedKeyUsage=serverAuth\n' >oidc.ext
    openssl req -newkey rsa:2048 -nodes -keyout oidc.key -out oidc.csr -subj /CN=oidc.home.example.com 2>/dev/null
    openssl x509 -req -in oidc.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out oidc.crt -days 30 -extfile oidc.ext 2>/dev/null
    rm -f oidc.csr oidc.ext ca.key
)
cp "$root/etc/ssl/quickstart/ca.crt" "$root/usr/local/share/ca-certificates/quickstart-ca.crt"
chroot "$root" update-ca-certificates >/dev/null 2>&1 || die "update-ca-certificates in the root failed"
server_block=$(awk '/^# nginx config in a ConfigMap/ {c=1; next} c && /^```/ {exit} c' docs/publishing.md)
[ -n "$server_block" ] || die "docs/publishing.md: the nginx server block for the Ingress example is gone"
printf '%s\n' "$server_block" | sed 's|^  listen 8080;|  listen 443 ssl;\n  server_name oidc.home.example.com;\n  ssl_certificate /etc/ssl/quickstart/oidc.crt;\n  ssl_certificate_key /etc/ssl/quickstart/oidc.key;|' \
    >"$root/etc/nginx/sites-enabled/oidc"
grep -q 'listen 443 ssl' "$root/etc/nginx/sites-enabled/oidc" || die "docs/publishing.md's server block has no 'listen 8080;' to replace"

# The STS: SeaweedFS (S3 + IAM + STS) on 127.0.0.1:8333, admin credentials for the aws CLI.
sw=$root/etc/seaweedfs
mkdir -p "$sw" "$root/var/lib/seaweedfs" "$root/root/.aws"
cat >"$sw/s3.json" <<'EOF'
{"identities": [{"name": "admin", "credentials": [{"accessKey": "quickstartadmin", "secretKey": "quickstartadminsecret"}],
  "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
EOF
cat >"$sw/iam.json" <<'EOF'
{"sts": {"tokenDuration": "1h", "maxSessionLength": "12h", "issuer": "seaweedfs-sts", "accountId": "123456789012",
         "signingKey": "cXVpY2tzdGFydC10ZXN0LXN0cy1zaWduaW5nLWtleS0zMmI="},
 "providers": [], "policy": {"defaultEffect": "Deny", "storeType": "memory"}, "roles": [], "policies": []}
EOF
printf '[default]\naws_access_key_id = quickstartadmin\naws_secret_access_key = quickstartadminsecret\n' >"$root/root/.aws/credentials"
printf '[default]\nregion = us-east-1\n' >"$root/root/.aws/config"
cat >"$root/etc/systemd/system/seaweedfs.service" <<'EOF'
[Unit]
Description=SeaweedFS S3 + IAM + STS (quickstart test)
[Service]
WorkingDirectory=/etc/seaweedfs
ExecStart=/usr/local/bin/weed mini -dir=/var/lib/seaweedfs -ip=127.0.0.1 -ip.bind=127.0.0.1 -master.telemetry=false -metricsPort=0 -webdav=false -admin.ui=false -s3.port=8333 -s3.config=s3.json -s3.iam.config=iam.json -s3.iam.readOnly=false
[Install]
WantedBy=multi-user.target
EOF
ln -sf /etc/systemd/system/seaweedfs.service "$root/etc/systemd/system/multi-user.target.wants/"

# The two IAM calls SeaweedFS 4.48 does not implement (CreateRole, PutRolePolicy: NotImplemented)
# land in its iam.json instead, in its policy dialect; then it is restarted. Declared below.
cat >"$root/usr/local/sbin/seaweedfs-iam" <<'EOF'
#!/usr/bin/python3
"""seaweedfs-iam create-role NAME TRUST.json | put-role-policy ROLE NAME POLICY.json"""
import json, re, subprocess, sys
path = "/etc/seaweedfs/iam.json"
cfg = json.load(open(path))
op, name, *rest = sys.argv[1:]
if op == "create-role":
    trust = json.load(open(rest[0]))
    for st in trust["Statement"]:
        fed = st["Principal"]["Federated"]
        host = fed.split(":oidc-provider/", 1)[1]
        # the provider, named by the ARN the trust policy gives it, for the issuer it names
        if not any(p["name"] == fed for p in cfg["providers"]):
            cfg["providers"].append({"name": fed, "type": "oidc", "enabled": True,
                "config": {"issuer": "https://" + host, "clientId": "sts.amazonaws.com", "jwksCacheTTLSeconds": 1}})
        # AWS's "<provider>:sub" is SeaweedFS's "oidc:sub"; "<provider>:aud" is the provider's clientId
        cond = st.get("Condition", {})
        for op_name, kv in cond.items():
            cond[op_name] = {("oidc:sub" if k == host + ":sub" else k): v for k, v in kv.items() if k != host + ":aud"}
    cfg["roles"].append({"roleName": name, "roleArn": "arn:aws:iam::123456789012:role/" + name,
                         "trustPolicy": trust, "attachedPolicies": []})
elif op == "put-role-policy":
    policy_name, doc = rest
    cfg["policies"].append({"name": policy_name, "document": json.load(open(doc))})
    next(r for r in cfg["roles"] if r["roleName"] == name)["attachedPolicies"].append(policy_name)
json.dump(cfg, open(path, "w"), indent=1)
# A restart forgets the providers made through the API: make them again, as they were.
aws = ["aws", "--endpoint-url", "http://127.0.0.1:8333", "iam"]
def out(*a):
    return json.loads(subprocess.run(aws + list(a), check=True, capture_output=True).stdout)
made = [out("get-open-id-connect-provider", "--open-id-connect-provider-arn", p["Arn"])
        for p in out("list-open-id-connect-providers")["OpenIDConnectProviderList"]]
subprocess.run(["systemctl", "restart", "seaweedfs"], check=True)
for _ in range(200):
    if subprocess.run(["curl", "-s", "-o", "/dev/null", "http://127.0.0.1:8333/"]).returncode == 0:
        break
    subprocess.run(["sleep", "0.1"])
for p in made:
    url = p["Url"] if p["Url"].startswith("https://") else "https://" + p["Url"]
    out("create-open-id-connect-provider", "--url", url, "--client-id-list", *p["ClientIDList"],
        "--thumbprint-list", *p["ThumbprintList"])
print("seaweedfs-iam %s %s: written to %s, SeaweedFS restarted" % (op, name, path))
EOF
chmod 755 "$root/usr/local/sbin/seaweedfs-iam"

# --- boot ------------------------------------------------------------------------------------
say "systemd-nspawn -b (private network; kube-apiserver, kubectl, weed bind-mounted read-only)"
boot_start=$SECONDS
systemd-nspawn --quiet --register=no --keep-unit --private-network -D "$root" -b --console=read-only \
    --bind-ro="$kapi:/usr/local/bin/kube-apiserver" --bind-ro="$kubectl_bin:/usr/local/bin/kubectl" \
    --bind-ro="$weed:/usr/local/bin/weed" >"$work/boot.log" 2>&1 &
nspawn_pid=$!
for _ in $(seq 100); do
    ct_pid=$(pgrep -P "$nspawn_pid" -x systemd || true)
    [ -n "$ct_pid" ] && break
    sleep 0.1
done
[ -n "$ct_pid" ] || { cat "$work/boot.log"; die "the container did not start"; }
for _ in $(seq 100); do
    [ -n "$(in_ct systemctl is-system-running 2>/dev/null || true)" ] && break
    sleep 0.1
done
state=$(in_ct systemctl is-system-running --wait 2>/dev/null || true)
say "booted: system $state"
deadline=$((SECONDS + 90))
while [ $SECONDS -lt $deadline ]; do
    in_ct kubectl get --raw /readyz >/dev/null 2>&1 && break
    sleep 0.5
done
in_ct kubectl get --raw /readyz >/dev/null 2>&1 ||
    { in_ct tail -20 /var/log/kube-apiserver.log; die "kube-apiserver (from the manifest) did not get ready"; }
deadline=$((SECONDS + 60))
while [ $SECONDS -lt $deadline ]; do
    in_ct curl -s -o /dev/null http://127.0.0.1:8333/ && break
    sleep 0.5
done
in_ct curl -s -o /dev/null http://127.0.0.1:8333/ || { in_ct journalctl -u seaweedfs --no-pager | tail -20; die "SeaweedFS did not start"; }
say "kubeadm-shaped node up in $((SECONDS - boot_start)) s: $(in_ct kubectl version 2>/dev/null | tr '\n' ' ')"

# --- the quickstart, step by step -----------------------------------------------------------------
qs=docs/quickstart.md
step_text() { # the text of "## N. ..." up to the next "## "
    awk -v n="$1" '/^## / {c = ($0 ~ "^## " n "\\. ")} c' "$qs"
}
blocks() { # blocks N LANG: the fenced LANG blocks of step N (indented ones too), blocks separated by a NUL
    step_text "$1" | awk -v lang="$2" '
        !c && $0 ~ "^ *```" lang "$" {c=1; match($0, /^ */); ind=RLENGTH; next}
        c && /^ *```$/ {c=0; printf "%c", 0; next}
        c {print substr($0, ind + 1)}'
}
check_cmd() { # the first `command` after **Check:** in step N
    step_text "$1" | tr '\n' ' ' | sed -n 's/.*\*\*Check:\*\* *`\([^`]*\)`.*/\1/p'
}
fail() {
    printf '\nFAILED: quickstart step %s: %s\n' "$1" "$2" >&2
    exit 1
}
# The declared substitutions: everything not run exactly as docs/quickstart.md writes it.
echo
echo "SUBSTITUTIONS (everything that is not run verbatim):"
cat <<'EOF'
  step 1  `tools/install-from-source.sh` (builds release inside: ~8 min on 2 cores) -> the install
          path step 1 documents for a prebuilt artifact: `sudo sh install.sh target/dist/` (the
          .deb from packaging/build-debs.sh) or `sudo tools/install-from-source.sh --binary
          target/release/irsa-agent`, whichever the checkout has
  step 3  variant "Ingress" (directory /srv/oidc, issuer https://oidc.home.example.com); the name
          resolves to 127.0.0.1 in /etc/hosts; nginx serves docs/publishing.md's server block with
          `listen 8080;` -> `listen 443 ssl;` + a certificate from a test CA the container trusts
          (the Ingress's TLS)
  step 2, 3  the yaml blocks are appended to /etc/irsa-agent/config.yaml (`cat >>`)
  step 4  only the line marked `# Ingress`
  step 5  `aws` is a shell function: `aws --endpoint-url http://127.0.0.1:8333 ...` (SeaweedFS IAM,
          admin keys in ~/.aws/credentials); SeaweedFS 4.48 answers NotImplemented to
          `iam create-role` and `iam put-role-policy`, so those two become `seaweedfs-iam
          create-role|put-role-policy` with the same arguments, which writes the role, its trust
          policy and permissions into SeaweedFS's iam.json (trust condition `<issuer>:sub` ->
          `oidc:sub`; `<issuer>:aud` -> the provider's clientId sts.amazonaws.com) and restarts it;
          `<BUCKET>` -> quickstart-data; the issuer's certificate comes from a private (test) CA,
          so `--thumbprint-list <fingerprint>` is added to create-open-id-connect-provider, as the
          printed comment says, the fingerprint computed with the printed openssl command
  step 8  "Remove `run: {apply-issuer: false}`" has no command: sed deletes the block step 2 added
  step 9  no kubelet runs pods: the pod's projected token (audience sts.amazonaws.com, 3600 s) is
          `kubectl create token app --audience sts.amazonaws.com --duration 3600s` (TokenRequest,
          as kubelet does), and `aws sts get-caller-identity` with AWS_WEB_IDENTITY_TOKEN_FILE is
          `aws sts assume-role-with-web-identity` with the same role ARN and token at SeaweedFS's STS,
          then `aws sts get-caller-identity` with the credentials it returns
  host    kubeadm-shaped: /etc/kubernetes/manifests/kube-apiserver.yaml run by a static-pod
          stand-in (the real kube-apiserver binary), etcd from Debian, admin.conf and
          ~/.kube/config as kubeadm init leaves them; no kubelet, scheduler or controller-manager
EOF
echo

# aws with the endpoint; the two unimplemented IAM calls mapped (see SUBSTITUTIONS).
aws_fn='aws() {
  case "$1 $2" in
    "iam create-role") shift 2; set -- create-role "$@";;
    "iam put-role-policy") shift 2; set -- put-role-policy "$@";;
    *) echo "+ aws --endpoint-url http://127.0.0.1:8333 $*" >&2; command aws --endpoint-url http://127.0.0.1:8333 "$@"; return;;
  esac
  local op=$1 role= name= doc=; shift
  while [ $# -gt 0 ]; do case $1 in --role-name) role=$2; shift 2;; --policy-name) name=$2; shift 2;;
    --assume-role-policy-document|--policy-document) doc=${2#file://}; shift 2;; *) shift;; esac; done
  echo "+ seaweedfs-iam $op $role ${name:+$name }$doc   # aws iam $op (NotImplemented in SeaweedFS)" >&2
  if [ "$op" = create-role ]; then seaweedfs-iam create-role "$role" "$doc"; else seaweedfs-iam put-role-policy "$role" "$name" "$doc"; fi
}'

run() { # run STEP DESCRIPTION EXPECTED-EXITS SCRIPT: runs SCRIPT in the container, prints its output
    local n=$1 what=$2 exits=$3 script=$4 rc=0
    printf '\n--- step %s: %s\n' "$n" "$what"
    printf '%s\n' "$script" | sed 's/^/  $ /'
    in_ct bash -c "set -o pipefail; $aws_fn
$script" >"$work/out" 2>&1 || rc=$?
    sed 's/^/  | /' "$work/out"
    case " $exits " in
        *" $rc "*) ;;
        *) fail "$n" "'$(head -n 1 <<<"$script")' exited $rc (expected: $exits)" ;;
    esac
}
expect() { # expect STEP PATTERN: the last run's output matches
    grep -Eq -- "$2" "$work/out" || fail "$1" "output does not match /$2/"
}
the_check() { # the_check STEP EXPECTED: asserts the documented check command and returns it
    local c
    c=$(check_cmd "$1")
    [ "$c" = "$2" ] || fail "$1" "its **Check:** is now '$c', this script knows '$2': update the script"
    printf '%s' "$c"
}

# 1. Install irsa-agent
s1=$(step_text 1)
if [ "$install_mode" = deb ]; then
    cmd1='sudo sh install.sh target/dist/'
else
    cmd1='sudo tools/install-from-source.sh --binary target/release/irsa-agent'
fi
grep -qF "\`$cmd1\`" <<<"$s1" || fail 1 "docs/quickstart.md step 1 no longer documents \`$cmd1\`"
run 1 "install (documented prebuilt path)" 0 "$cmd1"
run 1 "check" 2 "$(the_check 1 'irsa-agent status')"
expect 1 'waiting for an issuer in /etc/irsa-agent/config.yaml'

# 2. Decide who changes the apiserver: its yaml goes into the conffile.
yaml2=$(blocks 2 yaml | tr -d '\0')
[ -n "$yaml2" ] || fail 2 "no yaml block"
run 2 "put the block in /etc/irsa-agent/config.yaml" 0 "cat >>/etc/irsa-agent/config.yaml <<'QS'
$yaml2
QS"

# 3. The Ingress variant: its folder, then its configuration.
cmd3=$(blocks 3 sh | tr -d '\0')
[ -n "$cmd3" ] || fail 3 "the Ingress variant no longer creates /srv/oidc"
run 3 "the Ingress variant's folder" 0 "$cmd3"
yaml3=$(blocks 3 yaml | tr '\0' '\n' | awk '/^issuer: https:\/\/oidc.home.example.com$/ {c=1} c && /^$/ {exit} c')
[ -n "$yaml3" ] || fail 3 "no Ingress yaml block (issuer: https://oidc.home.example.com)"
run 3 "the Ingress variant into /etc/irsa-agent/config.yaml" 0 "cat >>/etc/irsa-agent/config.yaml <<'QS'
$yaml3
QS"
run 3 "check" 0 "$(the_check 3 'irsa-agent check-config')"
expect 3 'https://oidc.home.example.com'
expect 3 '/srv/oidc'
# Step 2's promise, checkable once the issuer is set.
promise=$(step_text 2 | tr '\n' ' ' | sed -n 's/.*says *``\(daemon:[^`]*`[^`]*`[^`]*\)``.*/\1/p')
[ -n "$promise" ] || fail 2 "its check no longer quotes the daemon: line of check-config"
# The documented line, with check-config's column padding.
grep -qF -- "$promise" <(sed 's/^daemon: */daemon: /' "$work/out") ||
    fail 2 "check-config does not say '$promise'"

# 4. Publish (the Ingress line).
cmd4=$(blocks 4 sh | tr -d '\0' | grep -E '# Ingress$' | sed 's/ *#.*//')
[ -n "$cmd4" ] || fail 4 "no line marked '# Ingress'"
run 4 "publish" 0 "$cmd4"
expect 4 'matches byte for byte'
[ "$(grep -c 'matches byte for byte' "$work/out")" -ge 2 ] || fail 4 "not both public URLs match byte for byte"

# 5. Trust: the ServiceAccount, print the commands, then run them (the private-CA thumbprint
# added as the printed comment says: the issuer's certificate comes from a test CA).
printer=
while IFS= read -r line; do
    c=${line%%#*}
    c=${c%"${c##*[![:space:]]}"}
    [ -n "$c" ] || continue
    case $c in
        "irsa-agent trust-policy "*) printer=$c ;;
        *) run 5 "${c%% --*}" 0 "$c" ;;
    esac
done < <(blocks 5 sh | tr -d '\0')
[ -n "$printer" ] || fail 5 "no irsa-agent trust-policy command"
run 5 "print the AWS commands" 0 "$printer"
printed=$(sed 's/<BUCKET>/quickstart-data/g' "$work/out")
thumb_cmd=$(sed -n 's/^#   \(openssl s_client .*\)$/\1/p; s/^#     \(| .*\)$/\1/p' <<<"$printed" | sed 's/ *\\$//' | tr '\n' ' ')
[ -n "$thumb_cmd" ] || fail 5 "the output no longer prints the openssl command for a private CA's thumbprint"
run 5 "the private CA's thumbprint, with the printed openssl command" 0 "$thumb_cmd"
thumb=$(tr -d '[:space:]' <"$work/out")
[[ $thumb =~ ^[0-9a-f]{40}$ ]] || fail 5 "the printed openssl command gave '$thumb', not a SHA-1 fingerprint"
# shellcheck disable=SC2001 # a line-anchored edit
printed=$(sed "s/^  --client-id-list sts.amazonaws.com\$/&  \\\\\n  --thumbprint-list $thumb/" <<<"$printed")
grep -q -- "--thumbprint-list $thumb" <<<"$printed" || fail 5 "no create-open-id-connect-provider ... --client-id-list line to add the thumbprint to"
run 5 "run the printed commands (+ --thumbprint-list)" 0 "$printed"
run 5 "check" 0 "$(the_check 5 'aws iam list-open-id-connect-providers')"
expect 5 'oidc-provider/oidc.home.example.com"'

# 6. Apply.
while IFS= read -r line; do
    c=${line%%#*}
    c=${c%"${c##*[![:space:]]}"}
    [ -n "$c" ] || continue
    case $c in *--check*) run 6 "preview" "2" "$c" ;; *) run 6 "apply" 0 "$c" ;; esac
done < <(blocks 6 sh | tr -d '\0')
in_ct grep -q -- '--service-account-issuer=https://oidc.home.example.com' /etc/kubernetes/manifests/kube-apiserver.yaml ||
    fail 6 "the manifest does not name the new issuer"
run 6 "check" 0 "$(the_check 6 'irsa-agent doctor')"
run 6 "check (2)" 0 "irsa-agent apply --check"

# 7. A real token, checked the way STS will.
run 7 "verify a real token" 0 "$(blocks 7 sh | tr -d '\0')"
expect 7 'ACCEPTED'

# 8. Hand over: remove `run: {apply-issuer: false}`, reload.
run 8 "remove step 2's block" 0 "sed -i '/^run:\$/,/apply-issuer: false/d' /etc/irsa-agent/config.yaml && ! grep -Eq '^ +apply-issuer' /etc/irsa-agent/config.yaml"
run 8 "reload" 0 "$(blocks 8 sh | tr -d '\0')"
sleep 2
run 8 "check" 0 "$(the_check 8 'irsa-agent status')"
# The service itself could write the target all along (not only `irsa-agent publish` as root).
if in_ct journalctl -u irsa-agent --no-pager | grep -q 'Read-only file system'; then
    fail 8 "the service could not write /srv/oidc: $(in_ct journalctl -u irsa-agent --no-pager | grep -m1 'Read-only file system')"
fi
expect 8 'state: +in sync'
expect 8 'public copy: +matches'

# 9. The pod: pod-config verbatim, applied; the pod's token by TokenRequest, exchanged at the STS.
cmd9=$(blocks 9 sh | tr -d '\0')
run 9 "pod-config" 0 "$cmd9"
role_arn=$(grep -o 'arn:aws:iam::123456789012:role/default_app' <<<"$cmd9" | head -n 1)
[ -n "$role_arn" ] || fail 9 "the pod-config command names no role ARN"
run 9 "apply its ServiceAccount" 0 "$cmd9 | awk '/^---/ {n++} n < 1' | kubectl apply -f -"
pod_yaml=$(blocks 9 yaml | tr -d '\0')
grep -q 'serviceAccountToken: {audience: sts.amazonaws.com, expirationSeconds: 3600, path: token}' <<<"$pod_yaml" ||
    fail 9 "the bare pod no longer projects an sts.amazonaws.com token for 3600 s"
run 9 "the pod's token exchanged at the STS" 0 "kubectl create token app --namespace default --audience sts.amazonaws.com --duration 3600s >/tmp/token && aws sts assume-role-with-web-identity --role-arn $role_arn --role-session-name aws-test --web-identity-token file:///tmp/token"
expect 9 '"AccessKeyId"'
expect 9 '"SubjectFromWebIdentityToken": "system:serviceaccount:default:app"'
# The pod's `aws sts get-caller-identity`, with the credentials it got.
creds=$(cat "$work/out")
key=$(sed -n 's/.*"AccessKeyId": "\([^"]*\)".*/\1/p' <<<"$creds")
secret=$(sed -n 's/.*"SecretAccessKey": "\([^"]*\)".*/\1/p' <<<"$creds")
session=$(sed -n 's/.*"SessionToken": "\([^"]*\)".*/\1/p' <<<"$creds")
run 9 "check: get-caller-identity with those credentials" 0 "AWS_ACCESS_KEY_ID=$key AWS_SECRET_ACCESS_KEY=$secret AWS_SESSION_TOKEN=$session aws sts get-caller-identity"
expect 9 'assumed-role/default_app/'
# And the same STS refuses another service account's token: the trust policy is really checked.
run 9 "another service account is refused" 0 "kubectl create serviceaccount other --namespace default >/dev/null && kubectl create token other --namespace default --audience sts.amazonaws.com >/tmp/other && ! aws sts assume-role-with-web-identity --role-arn $role_arn --role-session-name aws-test --web-identity-token file:///tmp/other"
expect 9 'AccessDenied|not authorized|denied'

echo
echo "irsa-agent.service warnings and errors during the run (for the record):"
in_ct journalctl -u irsa-agent --no-pager -p warning | sed 's/^/  /' | tail -20
total=$((SECONDS - start_all))
echo
echo "quickstart in nspawn: every step passed ($install_mode install; root ready in ${prep_s} s; total ${total} s)"
