#!/usr/bin/env bash
# Create (or refresh) the MONAI Label environment in .venv-label: PyPI's torch + torchvision (the CUDA build, which
# also runs on CPU), MONAI Label 0.8.5 and dex_monai (editable), for label_app/ (see docs/monai_label.md).
# Usage: bash scripts/setup_label_env.sh     (idempotent; reinstalls only when its inputs changed)
# Environment: DEX_LABEL_VENV (default <repo>/.venv-label), PYTHON (default python3.11).
# It is separate from .venv because torchvision from PyPI does not work with the CPU build of torch used there.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DEX_LABEL_VENV:-$ROOT/.venv-label}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
MONAILABEL_VERSION="0.8.5"
PYDICOM_SEG_VERSION="0.4.1"
REQS="$ROOT/label_app/requirements.txt"
COMPAT="$ROOT/label_app/compat/dex_label_pydicom_compat.py"
STAMP="$VENV/.dex_label_installed"
WANT="$(cat "$ROOT/setup.cfg" "$ROOT/pyproject.toml" "$REQS" "$COMPAT" "${BASH_SOURCE[0]}" | sha256sum | cut -d' ' -f1)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" && -x "$VENV/bin/monailabel" ]]; then
  exit 0
fi
start=$SECONDS
echo "[setup-label] creating the MONAI Label environment in $VENV (torch from PyPI is a multi-GB download)"
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install --quiet --upgrade pip
# 1. torch + torchvision (PyPI builds), MONAI Label's own requirements, and the project with its test tools
"$PY" -m pip install --quiet -r "$REQS" -e "$ROOT[dev]"
# 2. MONAI Label and pydicom-seg without their pins (numpy<2 / jsonschema<4 / sam2 source build; see requirements)
"$PY" -m pip install --quiet --no-deps "monailabel==$MONAILABEL_VERSION" "pydicom-seg==$PYDICOM_SEG_VERSION"
# 3. pydicom-seg 0.4.1 imports pydicom._storage_sopclass_uids, which pydicom 3 removed: alias it (this venv only)
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
cp "$COMPAT" "$SITE/dex_label_pydicom_compat.py"
echo "import dex_label_pydicom_compat" > "$SITE/dex_label_pydicom_compat.pth"
# 4. check: the server's modules import, torchvision runs, dex_monai is this checkout
(cd "$ROOT" && "$PY" - <<'EOF'
import pathlib, torch, torchvision, monai, monailabel, dex_monai
from torchvision.ops import nms
import monailabel.app  # noqa: F401  (imports every endpoint, pydicom_seg included)
nms(torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([1.0]), 0.5)
assert pathlib.Path(dex_monai.__file__).resolve().parents[1] == pathlib.Path.cwd().resolve(), dex_monai.__file__
print(f"[setup-label] torch {torch.__version__}, torchvision {torchvision.__version__}, monai {monai.__version__}, "
      f"monailabel {monailabel.__version__}")
EOF
)
echo "$WANT" > "$STAMP"
echo "[setup-label] done in $((SECONDS - start)) s; $(du -sh "$VENV" | cut -f1) in $VENV"
