#!/usr/bin/env bash
# Set up the environments if needed and run the whole test suite. Extra arguments go to pytest.
#   .venv        the project (CPU torch); always
#   .venv-label  MONAI Label's separate environment (PyPI torch + torchvision, ~8 GB) for tests/test_label_app.py;
#                skipped with DEX_SKIP_LABEL_ENV=1 (those tests then skip and say how to create it)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
if [[ "${DEX_SKIP_LABEL_ENV:-0}" != "1" ]]; then
  bash "$ROOT/scripts/setup_label_env.sh"
fi
cd "$ROOT"
exec "${DEX_VENV:-$ROOT/.venv}/bin/python" -m pytest -q -p no:cacheprovider "$@" tests
