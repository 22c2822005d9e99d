#!/usr/bin/env bash
# The whole test suite: format and lint checks, Rust unit + integration tests, and the Python
# tests that drive a real `mlxd serve` with the official client packages (venv in .venv/).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -d ../shared/fixtures ]; then
  echo "scripts/test.sh: ../shared (the reference models, fixtures and tokenizers the tests read) is missing next to this checkout; see the README" >&2
  exit 1
fi
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  echo "scripts/test.sh: the chat page's test drives Debian's chromium, which is missing: apt-get install chromium" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
echo "Installing the Python test clients into .venv/ (tests/python/requirements.txt)..."
.venv/bin/pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt

cargo fmt --check
cargo clippy --all-targets --locked -- -D warnings
# The integration tests build target/debug/mlxd (CARGO_BIN_EXE_mlxd), which the Python tests
# drive; a separate `cargo build --bins` would recompile it with other features.
cargo test --all-targets --locked
MLXD_BIN=target/debug/mlxd .venv/bin/python -m pytest -q tests/python
