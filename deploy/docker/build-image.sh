#!/usr/bin/env bash
# Builds the `roster:local` image without pulling anything: a scratch image
# holding the release binary and the shared libraries it links against.
#
#   deploy/docker/build-image.sh [tag]
#   ROSTER_BIN=path/to/roster deploy/docker/build-image.sh roster:test   # an existing build
set -euo pipefail
tag=${1:-roster:local}
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"

bin=${ROSTER_BIN:-}
if [ -z "$bin" ]; then
  cargo build --release --bin roster
  bin=target/release/roster
fi

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/rootfs/usr/local/bin" "$ctx/rootfs/data" "$ctx/rootfs/tmp"
cp "$bin" "$ctx/rootfs/usr/local/bin/roster"
# The dynamic loader and every library ldd resolves, at the same paths.
for lib in $(ldd "$bin" | grep -oE '/[^ ]+'); do
  mkdir -p "$ctx/rootfs$(dirname "$lib")"
  cp -L "$lib" "$ctx/rootfs$lib"
done
cp deploy/docker/Dockerfile "$ctx/Dockerfile"
docker build -q -t "$tag" "$ctx"
echo "built $tag"
