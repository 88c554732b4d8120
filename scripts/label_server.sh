#!/usr/bin/env bash
# Start the MONAI Label server of the DEX segmentation bundles (label_app/) on 127.0.0.1.
# Usage: bash scripts/label_server.sh --studies DIR|URL [--port 8000] [--conf KEY VALUE]...
#   DIR: a local folder of NIfTI / NRRD / PNG files and DICOM series (one series per sub-folder);
#   URL: a DICOMweb server, e.g. http://127.0.0.1:8042/dicom-web (Orthanc); labels go back to it as DICOM SEG.
#   --conf: options of label_app/main.py (models, overrides, work_dir, ...); see docs/monai_label.md.
# Needs the label environment: bash scripts/setup_label_env.sh (DEX_LABEL_VENV to use another one).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DEX_LABEL_VENV:-$ROOT/.venv-label}"
STUDIES=""
PORT=8000
CONF=()
usage() { sed -n '2,7p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --studies|-s) STUDIES="${2:?--studies needs a folder or a DICOMweb URL}"; shift 2 ;;
    --port|-p) PORT="${2:?--port needs a number}"; shift 2 ;;
    --conf|-c) CONF+=(--conf "${2:?--conf needs KEY VALUE}" "${3:?--conf needs KEY VALUE}"); shift 3 ;;
    --host|-i) echo "label_server.sh: the server only listens on 127.0.0.1 (no --host)" >&2; exit 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "label_server.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
done
if [[ -z "$STUDIES" ]]; then
  echo "label_server.sh: --studies DIR|URL is required" >&2; usage >&2; exit 2
fi
if [[ "$STUDIES" =~ ^https?:// ]]; then
  STUDIES_ARG="$STUDIES"  # a DICOMweb server: MONAI Label's DICOMweb datastore (see docs/monai_label.md)
elif [[ -d "$STUDIES" ]]; then
  STUDIES_ARG="$(cd "$STUDIES" && pwd)"
else
  echo "label_server.sh: studies folder $STUDIES does not exist (or give a DICOMweb URL http://...)" >&2; exit 2
fi
if [[ ! "$PORT" =~ ^[0-9]+$ ]]; then
  echo "label_server.sh: --port must be a number" >&2; exit 2
fi
if [[ ! -x "$VENV/bin/python" ]] || ! "$VENV/bin/python" -c "import monailabel" 2>/dev/null; then
  echo "label_server.sh: no MONAI Label environment in $VENV; create it with: bash scripts/setup_label_env.sh" >&2
  exit 3
fi
cd "$ROOT"
# a private temporary folder for this server: MONAI Label writes uploads there, and the app serves files by path only
# from there, the studies folder and its work folder (never from the shared /tmp); removed when the server stops
SERVER_TMP="$(mktemp -d "${TMPDIR:-/tmp}/dex-label-server.XXXXXX")"
chmod 700 "$SERVER_TMP"
trap 'rm -rf "$SERVER_TMP"' EXIT
export TMPDIR="$SERVER_TMP"
# the environment's tools (dcmqi's itkimage2segimage writes the DICOM SEG of labels saved to a DICOMweb server)
export PATH="$VENV/bin:$PATH"
# (the venv's python directly: the `monailabel` launcher runs whatever `python` is first on PATH)
"$VENV/bin/python" -m monailabel.main start_server --app "$ROOT/label_app" --studies "$STUDIES_ARG" \
  --host 127.0.0.1 --port "$PORT" ${CONF[@]+"${CONF[@]}"} &
SERVER_PID=$!
trap 'kill -TERM "$SERVER_PID" 2>/dev/null || true' TERM INT HUP
status=0
wait "$SERVER_PID" || status=$?
# a signal interrupts the first wait; wait again for the server to finish before the folder is removed
while kill -0 "$SERVER_PID" 2>/dev/null; do wait "$SERVER_PID" || status=$?; done
exit "$status"
