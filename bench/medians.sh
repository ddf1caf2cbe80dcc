#!/usr/bin/env bash
# Prints the median of every criterion benchmark of the last `cargo bench` run, with its
# 95 % confidence interval. Criterion's own output leads with the mean, which one
# descheduled sample can drag; the median is what BENCHMARKS.md quotes.
#
#   cargo bench --bench decision && bench/medians.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
criterion=${CARGO_TARGET_DIR:-target}/criterion

if ! command -v python3 >/dev/null 2>&1; then
  echo "python3 is missing; it reads criterion's estimates.json files" >&2
  exit 1
fi
if [ ! -d "$criterion" ]; then
  echo "no $criterion; run cargo bench --bench decision first" >&2
  exit 1
fi

python3 - "$criterion" <<'EOF'
import json, pathlib, sys

def show(nanos):
    if nanos >= 1000:
        return f"{nanos / 1000:.2f} us"
    return f"{nanos:.1f} ns"

root = pathlib.Path(sys.argv[1])
for estimates in sorted(root.glob("**/new/estimates.json")):
    bench = json.loads(estimates.with_name("benchmark.json").read_text())
    median = json.loads(estimates.read_text())["median"]
    low = median["confidence_interval"]["lower_bound"]
    high = median["confidence_interval"]["upper_bound"]
    name = bench["full_id"]
    print(f"{name:<52} {show(median['point_estimate']):>10}   [{show(low)} .. {show(high)}]")
EOF
