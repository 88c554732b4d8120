#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv and install dex_monai with its test tools.
# Usage: bash scripts/setup_env.sh        (idempotent; reinstalls only when setup.cfg changed)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DEX_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
STAMP="$VENV/.dex_monai_installed"
WANT="$(cat "$ROOT/setup.cfg" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
  exit 0
fi
echo "[setup] creating environment in $VENV"
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# the CPU build of torch first: a plain 'torch' requirement would pull the multi-GB CUDA build
"$VENV/bin/python" -m pip install --quiet "torch==${DEX_TORCH_VERSION:-2.13.0}"
"$VENV/bin/python" -m pip install --quiet -e "$ROOT[dev,export]"
echo "$WANT" > "$STAMP"
echo "[setup] done: $("$VENV/bin/python" -c 'import torch, monai; print("torch", torch.__version__, "monai", monai.__version__)')"
