#!/usr/bin/env bash
# Set up .venv if needed and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
exec "${DEX_VENV:-$ROOT/.venv}/bin/python" -m pytest -q -p no:cacheprovider "$@" tests
