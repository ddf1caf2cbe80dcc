#!/usr/bin/env bash
# Soak: steady open-loop load with a constant stream of clients never seen before, for a
# long time, against one meshlimit, sampling what would drift — its resident memory, the
# counters it holds against --cache-capacity and those it evicted, its CPU time per
# decision, and latency — once per sample period. A rate limiter that runs for weeks must not creep: with the
# counters bounded by the cache, memory should settle once the cache is full and stay
# there, and a decision should cost the same in the last period as in the first.
#
#   bench/soak.sh                                   # 30 min, memory store, 2 000 req/s
#   SOAK_SECONDS=600 SOAK_STORE=redis bench/soak.sh # the Redis store (redis-server on CPU 0)
#   SOAK_RATE=4000 SOAK_CAPACITY=100000 SOAK_PERIOD=30 bench/soak.sh
#
# Each period is one `make_request pace` run (CPU 0; 4 descriptors; every other request
# from a client no earlier period sent, `--cold-from`), so its latency is its own; between
# periods the server's /proc and /metrics are read. meshlimit runs on CPU 1 with
# bench/config (limits no request reaches) and --cache-capacity SOAK_CAPACITY (200 000),
# which the new clients fill within the first periods; from then on every new counter
# displaces an old one.
#
# Prints a table, one row per period, and a verdict, and writes both to
# bench/results/soak.txt: resident memory growth from the end of the first quarter of the
# run (when the cache is full) to the end, against SOAK_MAX_GROWTH percent (10); any
# failed request, or counters above the capacity, fails the run (exit 1). With fewer than
# 4 periods (the CI size) only failures are judged.
#
# Needs taskset, curl and two CPUs (and redis-server for SOAK_STORE=redis). Uses ports
# BENCH_PORT_BASE (18580) to +3 on 127.0.0.1.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=bench/common.sh
source bench/common.sh

seconds=${SOAK_SECONDS:-1800}
period=${SOAK_PERIOD:-60}
rate=${SOAK_RATE:-2000}
capacity=${SOAK_CAPACITY:-200000}
store=${SOAK_STORE:-memory}
max_growth=${SOAK_MAX_GROWTH:-10}
port_base=${BENCH_PORT_BASE:-18580}
grpc_port=$port_base
admin_port=$((port_base + 1))
redis_port=$((port_base + 2))

case $store in
  memory | redis) ;;
  *)
    echo "SOAK_STORE=$store: write memory or redis" >&2
    exit 1
    ;;
esac
periods=$(((seconds + period - 1) / period))
require_tools taskset curl
require_free_ports "$grpc_port" "$admin_port" "$redis_port"
build_release --bin meshlimit --example make_request
bench_workdir
report=$work/soak.txt
make_request() { "$bin/examples/make_request" "$@"; }
note() { printf '%s\n' "$*" | tee -a "$report"; }

store_args=()
if [ "$store" = redis ]; then
  find_redis_server
  start_pinned 0 "$work/redis-server.log" "$redis_server" --bind 127.0.0.1 --port "$redis_port" \
    --save '' --appendonly no
  store_args=(--store redis --redis-url "redis://127.0.0.1:$redis_port" --redis-timeout 1s)
fi
make_request write "$work/ready.bin"
start_pinned 1 "$work/meshlimit.log" "$bin/meshlimit" serve --config bench/config \
  --grpc-addr "127.0.0.1:$grpc_port" --admin-addr "127.0.0.1:$admin_port" \
  --cache-capacity "$capacity" "${store_args[@]}"
server=$started
wait_grpc_ready meshlimit "$server" "$work/meshlimit.log" "$grpc_port" "$work/ready.bin" "$admin_port"

# metric NAME: the value of an unlabelled series on the admin port, 0 when absent.
metric() {
  curl -s --max-time 5 "http://127.0.0.1:$admin_port/metrics" |
    awk -v name="$1" '$1 == name { printf "%d", $2; found = 1 } END { if (!found) print 0 }'
}
rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$server/status"; }
field() { printf '%s\n' "$1" | tr ' ' '\n' | awk -F= -v k="$2" '$1 == k { print $2 }'; }

note "# soak: $store store, $rate req/s for $seconds s in periods of $period s, --cache-capacity $capacity"
note "# $(date -u +%Y-%m-%dT%H:%MZ), commit $(commit), $(machine)"
printf '%-6s %10s %10s %10s %9s %9s %9s %9s %8s %8s\n' t_s rss_mib counters evicted cpu_us \
  p50_ms p99_ms p999_ms late_pct failed |
  tee -a "$report"
# Each period's cold clients: every other request, so rate × period / 2 of them.
cold_per_period=$((rate * period / 2))
failed=0
rows=()
for i in $(seq 0 $((periods - 1))); do
  decisions_before=$(metric meshlimit_decision_duration_seconds_count)
  evictions_before=$(metric meshlimit_cache_evictions_total)
  ticks_before=$(cpu_ticks "$server")
  if summary=$(taskset -c 0 "$bin/examples/make_request" pace --addr "127.0.0.1:$grpc_port" \
    --rate "$rate" --seconds "$period" --warmup 0 --connections 4 --descriptors 4 \
    --hot 4 --cold 100000000 --cold-every 2 --cold-from $((i * cold_per_period)) 2>"$work/pace.err"); then
    lost=0
  else
    summary=""
    lost=1
    failed=1
    sed 's/^/  /' "$work/pace.err" | tee -a "$report"
  fi
  decisions=$(($(metric meshlimit_decision_duration_seconds_count) - decisions_before))
  cpu_us=$(awk -v t="$(($(cpu_ticks "$server") - ticks_before))" -v hz="$(getconf CLK_TCK)" \
    -v d="$decisions" 'BEGIN { printf "%.1f", (d > 0 ? t / hz * 1e6 / d : 0) }')
  rss=$(rss_kib)
  counters=$(metric meshlimit_cache_entries)
  # Counters the cache let go this period to stay within its capacity: the turnover that
  # keeps memory flat (none on the Redis store, whose cache only holds fallback counts).
  evicted=$(($(metric meshlimit_cache_evictions_total) - evictions_before))
  if [ "$counters" -gt "$capacity" ]; then
    failed=1
    note "FAIL: $counters counters held, above --cache-capacity $capacity"
  fi
  # Sends more than 0.1 ms behind schedule: the load generator, not meshlimit, was late,
  # and that lateness is in the latencies.
  late_pct=$(awk -v l="$(field "$summary" sent_late)" -v n="$(field "$summary" requests)" \
    'BEGIN { printf "%.1f", (n > 0 ? l * 100 / n : 0) }')
  row=$(printf '%-6s %10.1f %10s %10s %9s %9s %9s %9s %8s %8s' $(((i + 1) * period)) \
    "$(awk -v k="$rss" 'BEGIN { print k / 1024 }')" "$counters" "$evicted" "$cpu_us" \
    "$(field "$summary" p50_ms)" "$(field "$summary" p99_ms)" "$(field "$summary" p999_ms)" \
    "$late_pct" "$lost")
  rows+=("$rss")
  printf '%s\n' "$row" | tee -a "$report"
done

if ! kill -0 "$server" 2>/dev/null; then
  failed=1
  note "FAIL: meshlimit exited during the soak"
  tail -20 "$work/meshlimit.log" | tee -a "$report"
fi
if [ "${#rows[@]}" -ge 4 ]; then
  settled=${rows[$((${#rows[@]} / 4))]}
  last=${rows[-1]}
  growth=$(awk -v a="$settled" -v b="$last" 'BEGIN { printf "%.1f", (b - a) * 100 / a }')
  note "resident memory: $((settled / 1024)) MiB after the first quarter, $((last / 1024)) MiB at the end: ${growth} % (at most ${max_growth} %)"
  if awk -v g="$growth" -v m="$max_growth" 'BEGIN { exit !(g > m) }'; then
    failed=1
    note "FAIL: resident memory grew ${growth} % after the cache was full"
  fi
else
  note "fewer than 4 periods: memory growth not judged"
fi
if [ "$failed" -eq 0 ]; then
  note "soak passed: no failed request, counters within the capacity"
fi
cp "$report" "$results/soak.txt"
exit "$failed"
