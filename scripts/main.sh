#!/usr/bin/env bash
# Set up .venv if needed and run the main job: pre-train DEX briefly on generated multi-modality data, fine-tune the
# 2D segmentation bundle from that checkpoint, run inference, and print where the MLflow runs and outputs are.
# Extra arguments go to `python -m dex_monai.main_job` (see --help).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
exec "${DEX_VENV:-$ROOT/.venv}/bin/python" -m dex_monai.main_job "$@"
