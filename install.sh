#!/bin/sh
# install.sh: installs irsa-agent from a .deb or release tarball.
# Not written yet: no package is built so far (see the packaging issue). Until then, build from
# source with `cargo build --release` and copy target/release/irsa-agent to /usr/bin.
set -eu
echo "install.sh: no irsa-agent package exists yet; build from source: cargo build --release" >&2
exit 1
