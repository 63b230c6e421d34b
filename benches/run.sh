#!/usr/bin/env bash
# Runs the Roster vs etcd benchmark and rewrites the results in BENCHMARKS.md.
# Installs what the baseline needs first, from Debian's packages: etcd-server
# (the etcd under test) and protobuf-compiler (the etcd client crate's build
# needs protoc; Roster's own build does not).
#
#   benches/run.sh            # full run, about 15 minutes on 2 cores
#   benches/run.sh --quick    # shorter phases, 10k instances; for a smoke test
#   benches/run.sh --scale --out /tmp/scale.md
#                             # the scale and sessions phases at 1,000,000 instances
#                             # (20-30 minutes); --out keeps the full run's table
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v etcd >/dev/null || need+=(etcd-server)
command -v protoc >/dev/null || need+=(protobuf-compiler)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}"
fi
cargo bench --features bench --bench cluster -- "$@"
