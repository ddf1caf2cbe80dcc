#!/usr/bin/env bash
# Loopback load test: meshlimit (in-memory store) against the ceiling of its own stack,
# examples/ok_server.rs, a tonic server that answers OK without matching or counting.
# The servers share CPU 1 but only one is loaded at a time; h2load runs on CPU 0. Rounds
# alternate between the two and the medians are compared, so a burst of other work on the
# machine lands on both rather than skewing the ratio.
#
#   bench/load.sh                    # 3 rounds x 10 s per server (plus 1 s warm-up each)
#   BENCH_SECONDS=2 bench/load.sh    # a short run, e.g. in CI
#   BENCH_ROUNDS=5 bench/load.sh     # more rounds on a noisy machine
#
# Needs h2load (Debian: nghttp2-client), curl and taskset, and two CPUs. Uses ports
# 18080, 18081 and 18091 on 127.0.0.1 (BENCH_PORT_BASE=N moves them to N, N+1, N+11).
# Prints a summary and writes it, with h2load's output, to bench/results/latest.txt.
# Exits 1 if any request failed or any sampled answer was not a gRPC OK; the throughput
# ratio is reported against its target (>= 90 % of the ceiling) but does not fail the run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=bench/common.sh
source bench/common.sh

seconds=${BENCH_SECONDS:-10}
rounds=${BENCH_ROUNDS:-3}
port_base=${BENCH_PORT_BASE:-18080}
admin_port=$port_base
meshlimit_port=$((port_base + 1))
ok_port=$((port_base + 11))
# 8 connections x 16 streams: 128 requests in flight, enough to keep one server core busy
# (latencies are then mostly queueing, which is why throughput is the headline).
connections=8
streams=16
target_percent=90

require_tools h2load curl taskset
require_free_ports "$admin_port" "$meshlimit_port" "$ok_port"
build_release --bin meshlimit --example ok_server --example make_request
bench_workdir
report="$work/report.txt"
table="$work/table.txt"
body="$work/request.bin"
"$bin/examples/make_request" write "$body"
failed=0

note() { printf '%s\n' "$*" | tee -a "$report"; }
fail() {
  note "FAIL: $*"
  failed=1
}

# check NAME PORT [--expect-limits]: a sample answer must be gRPC OK, both from curl
# posting the exact bytes h2load posts and, decoded, from a real gRPC client.
check() {
  local name=$1 port=$2
  shift 2
  local headers="$work/$name.headers"
  if curl -sS --max-time 5 --http2-prior-knowledge -H 'content-type: application/grpc' \
    -H 'te: trailers' --data-binary "@$body" -D "$headers" -o /dev/null \
    "http://127.0.0.1:$port$rpc" && grep -qi '^grpc-status: 0' "$headers"; then
    note "$name: curl posting the h2load body: HTTP/2 200, grpc-status: 0"
  else
    fail "$name: curl posting the h2load body got no grpc-status 0: $(tr '\r\n' '  ' <"$headers" 2>/dev/null)"
  fi
  local answer
  if answer=$("$bin/examples/make_request" check --addr "127.0.0.1:$port" --body "$body" "$@" 2>&1); then
    note "$name: gRPC client: $answer"
  else
    fail "$name: gRPC client: $answer"
  fi
}

# start NAME PORT [ADMIN_PORT] -- COMMAND...: runs the server on CPU 1 and waits until its
# gRPC port answers (and, given an admin port, /healthcheck says OK). Sets $started.
start() {
  local name=$1 port=$2 admin=
  shift 2
  if [ "$1" != -- ]; then
    admin=$1
    shift
  fi
  shift
  start_pinned 1 "$work/$name.log" "$@"
  wait_grpc_ready "$name" "$started" "$work/$name.log" "$port" "$body" "$admin"
  if [ -n "$admin" ]; then
    note "$name: GET /healthcheck: 200 OK"
  fi
}

# load ROUND NAME PORT PID: h2load against one server; appends a row to the table.
load() {
  local round=$1 name=$2 port=$3 pid=$4 out="$work/$2.$1.h2load"
  local ticks_before start end ticks_after
  ticks_before=$(cpu_ticks "$pid")
  start=$(date +%s.%N)
  taskset -c 0 h2load -c "$connections" -m "$streams" -t 1 -D "$seconds" --warm-up-time=1 \
    "${grpc_headers[@]}" -d "$body" \
    "http://127.0.0.1:$port$rpc" >"$out" 2>&1 || fail "$name: h2load exited with an error"
  end=$(date +%s.%N)
  ticks_after=$(cpu_ticks "$pid")
  {
    echo
    echo "--- round $round, h2load against $name ---"
    grep -E '^(finished|requests|status codes|traffic|time for request| +min)' "$out"
  } >>"$report"

  local counts rps done_count succeeded errors ok2xx mean max busy cpu_us
  counts=$(h2load_counts "$out")
  if [ -z "$counts" ]; then
    fail "$name: could not read h2load's output (see $results/latest.txt)"
    cat "$out" >>"$report"
    return 0
  fi
  read -r rps done_count succeeded errors ok2xx <<<"$counts"
  read -r max mean < <(awk '/^time for request:/ { print $5, $6 }' "$out")
  [ "$errors" -eq 0 ] || fail "$name: $errors requests failed, errored or timed out"
  [ "$succeeded" -eq "$done_count" ] || fail "$name: only $succeeded of $done_count succeeded"
  [ "$ok2xx" -eq "$done_count" ] || fail "$name: only $ok2xx of $done_count answers were HTTP 2xx"
  # The server's CPU over the run (warm-up included), and so what one request costs it:
  # unlike req/s, this barely moves when other work on the machine steals the core.
  busy=$(awk -v t="$((ticks_after - ticks_before))" -v hz="$(getconf CLK_TCK)" \
    -v s="$start" -v e="$end" 'BEGIN { printf "%.0f", 100 * t / hz / (e - s) }')
  cpu_us=$(awk -v b="$busy" -v r="$rps" 'BEGIN { printf "%.1f", b / 100 * 1e6 / r }')
  printf '%-6s %-10s %11s %10s %10s %7s%% %11s %14s\n' "$round" "$name" "$rps" "$mean" \
    "$max" "$busy" "$cpu_us" "$done_count/$errors" >>"$table"
  echo "$rps" >>"$work/$name.rps"
  echo "$cpu_us" >>"$work/$name.cpu"
}

note "meshlimit load test: $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(commit)"
note "$(machine); servers on CPU 1, h2load on CPU 0"
note "h2load -c $connections -m $streams -t 1 -D $seconds --warm-up-time=1, $rounds rounds; POST $rpc"
note "body: $(wc -c <"$body") bytes, 4 descriptors for domain edge (bench/config/edge.yaml)"
printf '%-6s %-10s %11s %10s %10s %8s %11s %14s\n' round server 'req/s' 'mean lat' 'max lat' \
  'CPU' 'CPU us/req' 'done/errors' >"$table"

echo "==> starting ok_server (the ceiling) on :$ok_port and meshlimit on :$meshlimit_port"
start ok_server "$ok_port" -- "$bin/examples/ok_server" --grpc-addr "127.0.0.1:$ok_port"
ok_pid=$started
check ok_server "$ok_port"
start meshlimit "$meshlimit_port" "$admin_port" -- "$bin/meshlimit" serve --config bench/config \
  --grpc-addr "127.0.0.1:$meshlimit_port" --admin-addr "127.0.0.1:$admin_port"
meshlimit_pid=$started

for round in $(seq 1 "$rounds"); do
  echo "==> round $round of $rounds: ${seconds}s each"
  load "$round" ok_server "$ok_port" "$ok_pid"
  load "$round" meshlimit "$meshlimit_port" "$meshlimit_pid"
done
# After the load the counters have moved, yet every descriptor is still matched, counted
# and OK: the numbers above are of real decisions.
check meshlimit "$meshlimit_port" --expect-limits

{
  echo
  cat "$table"
  if [ -s "$work/ok_server.rps" ] && [ -s "$work/meshlimit.rps" ]; then
    awk -v o="$(median <"$work/ok_server.rps")" -v m="$(median <"$work/meshlimit.rps")" \
      -v oc="$(median <"$work/ok_server.cpu")" -v mc="$(median <"$work/meshlimit.cpu")" \
      -v target="$target_percent" 'BEGIN {
        ratio = 100 * m / o
        printf "median req/s: ok_server %.0f, meshlimit %.0f\n", o, m
        printf "meshlimit throughput = %.1f%% of the ceiling (target >= %d%%: %s)\n",
          ratio, target, (ratio >= target ? "met" : "NOT met")
        printf "median server CPU per request: ok_server %.1f us, meshlimit %.1f us (ceiling / meshlimit = %.1f%%)\n",
          oc, mc, 100 * oc / mc
      }'
  fi
  if [ "$failed" -eq 0 ]; then
    echo "correctness: every request succeeded with HTTP 200; sampled answers were grpc-status 0"
  else
    echo "correctness: FAILED (see above)"
  fi
} | tee -a "$report"
cp "$report" "$results/latest.txt"
echo "written to $results/latest.txt"
exit "$failed"
