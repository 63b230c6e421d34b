#!/usr/bin/env bash
# Long run of the deterministic simulation: the same test as
# `cargo test --features sim --test sim seeds`, built in release, over N seeds.
#   tests/sim/run.sh --seeds 100000 [--base B]   (B: a number, or random: the default)
# Prints the first failing seed with the command that replays it; exits
# non-zero if any seed fails.
set -euo pipefail
cd "$(dirname "$0")/../.."

seeds=100000
base=random
while [ $# -gt 0 ]; do
  case "$1" in
    --seeds) seeds="$2"; shift 2 ;;
    --base) base="$2"; shift 2 ;;
    *) echo "usage: $0 [--seeds N] [--base B]" >&2; exit 2 ;;
  esac
done

export ROSTER_SIM_SEEDS="$seeds" ROSTER_SIM_BASE="$base"
exec cargo test --release --features sim --test sim seeds -- --nocapture
