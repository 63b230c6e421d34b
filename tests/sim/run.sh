#!/usr/bin/env bash
# Long run of the deterministic simulation: the same test as
# `cargo test --features sim --test sim seeds`, built in release, over N seeds.
#   tests/sim/run.sh --seeds 100000 [--base B]
# Prints the first failing seed with the command that replays it; exits
# non-zero if any seed fails.
set -euo pipefail
cd "$(dirname "$0")/../.."

seeds=100000
base=""
while [ $# -gt 0 ]; do
  case "$1" in
    --seeds) seeds="$2"; shift 2 ;;
    --base) base="$2"; shift 2 ;;
    *) echo "usage: $0 [--seeds N] [--base B]" >&2; exit 2 ;;
  esac
done

export ROSTER_SIM_SEEDS="$seeds"
if [ -n "$base" ]; then
  export ROSTER_SIM_BASE="$base"
fi
exec cargo test --release --features sim --test sim seeds -- --nocapture
