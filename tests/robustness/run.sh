#!/usr/bin/env bash
# Long soak of the robustness suite: the same test as `cargo test --test
# robustness`, built in release, with faults for N minutes.
#   tests/robustness/run.sh --minutes 30
# Needs root (network namespaces for partitions). Prints the summary; exits
# non-zero on any violation, with the offending sub-history in the output
# (also kept in target/robustness-<date>.log).
set -euo pipefail
cd "$(dirname "$0")/../.."

minutes=10
while [ $# -gt 0 ]; do
  case "$1" in
    --minutes) minutes="$2"; shift 2 ;;
    *) echo "usage: $0 [--minutes N]" >&2; exit 2 ;;
  esac
done

log="target/robustness-$(date +%Y%m%d-%H%M%S).log"
mkdir -p target
echo "robustness soak: ${minutes} min of faults, log in ${log}"
set +e
ROSTER_ROBUSTNESS_FULL=1 ROSTER_ROBUSTNESS_SECS=$((minutes * 60)) \
  cargo test -j1 --release --test robustness robustness_short -- --nocapture >"${log}" 2>&1
rc=$?
set -e
sed -n '/==== robustness summary/,$p' "${log}"
if [ $rc -ne 0 ]; then
  echo "FAILED (exit ${rc}); full output in ${log}" >&2
fi
exit $rc
