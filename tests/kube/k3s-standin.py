#!/usr/bin/python3
"""What the k3s stand-in of the HA harness (tests/ha_support/k3s.rs) does the way k3s does it.

Usage:
  k3s-standin.py args ROOT BASEARGS
      The kube-apiserver arguments k3s would run with on the host ROOT, one per line, host paths
      resolved under ROOT: BASEARGS (one `--name=value` a line: what k3s itself sets, etcd,
      certificates, addresses) plus k3s's service-account defaults, then the `kube-apiserver-arg`
      entries of /etc/rancher/k3s/config.yaml and config.yaml.d/*.yaml|*.yml merged as k3s's
      configfilearg merges them (files in name order; a later file replaces a key, `key+:`
      appends to it) and applied as k3s's util.GetArgs applies them (`name=` replaces the default
      and repeats, `name+=` appends to the default, `name-=` prepends; the result sorted by name).
  k3s-standin.py reconcile ROOT DATASTORE
      k3s's bootstrap reconcile at start: the datastore's service.key is written to
      <data-dir>/server/tls/service.key, and its first key to service.current.key (the key the
      server signs with).
  k3s-standin.py ROOT DATASTORE STATEDIR certificate rotate-ca --path=DIR [--force]
      `k3s certificate rotate-ca`: asks the running server (refused when its apiserver is not
      running), which checks that DIR/tls/service.key still holds the key the cluster signs with
      now and stores it in the datastore. Nothing on disk changes until k3s restarts.
"""
import glob
import os
import re
import sys

import yaml


def config_files(root):
    main = root + "/etc/rancher/k3s/config.yaml"
    files = [main] if os.path.isfile(main) else []
    dropins = sorted(
        f
        for f in glob.glob(main + ".d/*")
        if os.path.isfile(f) and f.lower().endswith((".yaml", ".yml"))
    )
    return files + dropins


def merged_config(root):
    values = {}
    for path in config_files(root):
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            sys.exit(f"{path}: not a map of settings")
        for key, value in data.items():
            key = str(key)
            if key.endswith("+"):
                key = key[:-1]
                old = values.get(key)
                old = [] if old is None else (old if isinstance(old, list) else [old])
                new = value if isinstance(value, list) else [value]
                values[key] = old + new
            else:
                values[key] = value
    return values


def data_dir(config):
    return str(config.get("data-dir") or "/var/lib/rancher/k3s")


def get_args(initial, extra):
    """k3s's util.GetArgs."""
    initial = dict(initial)
    multi = {}
    for unsplit in extra:
        unsplit = str(unsplit)
        if unsplit.startswith("--"):
            unsplit = unsplit[2:]
        name, sep, value = unsplit.partition("=")
        if not sep:
            value = "true"
        clean = name.rstrip("-+")
        existing = multi.get(clean, [])
        if name.endswith("+"):
            new = ([initial[clean]] if clean in initial else []) + existing + [value]
        elif name.endswith("-"):
            new = [value] + ([initial[clean]] if clean in initial else []) + existing
        else:
            new = existing + [value]
        initial.pop(clean, None)
        multi[clean] = new
    out = [f"--{k}={v}" for k, v in initial.items()]
    for k, vs in multi.items():
        out += [f"--{k}={v}" for v in vs]
    return sorted(out, key=lambda a: a.split("=", 1)[0])


def apiserver_args(root, base):
    config = merged_config(root)
    tls = data_dir(config) + "/server/tls"
    domain = str(config.get("cluster-domain") or "cluster.local")
    initial = {}
    with open(base) as f:
        for line in f:
            line = line.strip()
            if line:
                name, _, value = line[2:].partition("=")
                initial[name] = value
    initial["service-account-issuer"] = f"https://kubernetes.default.svc.{domain}"
    initial["api-audiences"] = f"https://kubernetes.default.svc.{domain},k3s"
    initial["service-account-key-file"] = tls + "/service.key"
    initial["service-account-signing-key-file"] = tls + "/service.current.key"
    extra = config.get("kube-apiserver-arg") or []
    if not isinstance(extra, list):
        extra = [extra]
    args = []
    for a in get_args(initial, extra):
        name, _, value = a.partition("=")
        args.append(f"{name}={root}{value}" if value.startswith("/") else a)
    return args


def blocks(text):
    return re.findall(r"-----BEGIN [A-Z ]+-----.*?-----END [A-Z ]+-----\n?", text, re.S)


def canonical(block):
    return re.sub(r"\s+", "", block)


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def reconcile(root, datastore):
    tls = root + data_dir(merged_config(root)) + "/server/tls"
    with open(datastore + "/service.key") as f:
        keys = f.read()
    found = blocks(keys)
    if not found:
        sys.exit(f"{datastore}/service.key: no keys in the datastore")
    write(tls + "/service.key", keys)
    write(tls + "/service.current.key", found[0] if found[0].endswith("\n") else found[0] + "\n")


def alive(state):
    try:
        with open(state + "/kube-apiserver.pid") as f:
            pid = int(f.read().strip())
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except (OSError, ValueError, IndexError):
        return False


def rotate_ca(root, datastore, state, args):
    paths = [a[len("--path="):] for a in args if a.startswith("--path=")]
    if not paths:
        sys.exit('level=fatal msg="--path is required"')
    if not alive(state):
        sys.exit(
            'level=fatal msg="see server log for details: Post \\"https://127.0.0.1:6443/v1-k3s/cert/cacerts\\": connect: connection refused"'
        )
    tls = root + data_dir(merged_config(root)) + "/server/tls"
    try:
        with open(root + paths[0] + "/tls/service.key") as f:
            staged = f.read()
    except OSError as e:
        sys.exit(f'level=fatal msg="failed to read {paths[0]}/tls/service.key: {e}"')
    with open(tls + "/service.current.key") as f:
        current = blocks(f.read())
    if not blocks(staged):
        sys.exit('level=fatal msg="failed to validate new CA certificates and keys: no keys"')
    if "--force" not in args and canonical(current[0]) not in map(canonical, blocks(staged)):
        sys.exit(
            'level=fatal msg="see server log for details: ServiceKey: old ServiceAccount signing key not in new ServiceAccount key list"'
        )
    write(datastore + "/service.key", staged)
    with open(state + "/rotate-ca.log", "a") as f:
        f.write(paths[0] + "\n")
    print("certificates saved to datastore")


def main(argv):
    if argv[:1] == ["args"] and len(argv) == 3:
        print("\n".join(apiserver_args(argv[1], argv[2])))
    elif argv[:1] == ["reconcile"] and len(argv) == 3:
        reconcile(argv[1], argv[2])
    elif len(argv) >= 5 and argv[3:5] == ["certificate", "rotate-ca"]:
        rotate_ca(argv[0], argv[1], argv[2], argv[5:])
    else:
        sys.exit("k3s stand-in: unexpected arguments: " + " ".join(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
