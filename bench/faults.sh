#!/usr/bin/env bash
# Faults under load, full size: tests/faults_under_load.rs in release, longer, with a
# larger flood and more clients. While steady gRPC load runs against two meshlimits (one
# on Redis with --redis-failure-mode local, one on the memory store), Redis is killed and
# restarted twice, a flood of distinct users arrives, and the config directory is
# rewritten every 150 ms with valid and invalid versions.
#
#   bench/faults.sh                                  # 60 s of load, 1 000 000 flooded users
#   FAULTS_SECONDS=20 FAULTS_FLOOD_USERS=200000 bench/faults.sh
#   FAULTS_CLIENTS=8 bench/faults.sh                 # steady client tasks per server (4)
#
# Loopback only: every server listens on a free 127.0.0.1 port. Needs redis-server or
# valkey-server (scripts/test.sh installs one). The run is bounded by `timeout` (the
# release build before it is not). Prints one summary line -- requests answered, answers
# over the 1 s deadline, errors, lost decisions, panics, latency percentiles, counters
# held against --cache-capacity, reloads -- and writes it, with the date, commit and
# machine, to bench/results/faults.txt. Exits 1 if a target was missed (anything over
# the deadline, any error, lost decision or panic, the cache over its capacity).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

export FAULTS_SECONDS=${FAULTS_SECONDS:-60}
export FAULTS_FLOOD_USERS=${FAULTS_FLOOD_USERS:-1000000}
export FAULTS_CLIENTS=${FAULTS_CLIENTS:-4}
# Load, then the floods finishing, the recovery checks and startup: a generous bound.
run_limit=$((FAULTS_SECONDS * 2 + 180))

echo "==> cargo test --release --test faults_under_load --no-run"
cargo test --release --locked --test faults_under_load --no-run

mkdir -p bench/results
log=bench/results/faults.log
echo "==> ${FAULTS_SECONDS} s of load, ${FAULTS_FLOOD_USERS} flooded users, ${FAULTS_CLIENTS} clients per server (at most ${run_limit} s)"
status=0
timeout "$run_limit" cargo test --release --locked --test faults_under_load -- --nocapture \
  >"$log" 2>&1 || status=$?

summary=$(grep -h "faults summary" "$log" || true)
{
  echo "# $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(nproc) CPUs, $(uname -m)"
  echo "# FAULTS_SECONDS=$FAULTS_SECONDS FAULTS_FLOOD_USERS=$FAULTS_FLOOD_USERS FAULTS_CLIENTS=$FAULTS_CLIENTS bench/faults.sh"
  echo "${summary:-no summary: the run did not finish; see $log}"
} >bench/results/faults.txt
cat bench/results/faults.txt
if [ "$status" -ne 0 ]; then
  echo "a target was missed or the run failed (exit $status); the test's output is in $log" >&2
  exit 1
fi
