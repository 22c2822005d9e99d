#!/usr/bin/env bash
# The whole test suite: format and lint checks, Rust unit + integration tests, and the Python
# tests that drive a real `mlxd serve` with the official client packages (venv in .venv/).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt

cargo fmt --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --all-targets --locked
cargo build --bins --locked
MLXD_BIN=target/debug/mlxd .venv/bin/python -m pytest -q tests/python
