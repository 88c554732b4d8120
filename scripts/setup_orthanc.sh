#!/usr/bin/env bash
# Install Orthanc and its DICOMweb plugin (Debian packages orthanc, orthanc-dicomweb) for the MONAI Label DICOMweb
# tests (tests/test_label_dicomweb.py) and docs/monai_label.md. Idempotent and quiet; needs root (CI runs it as root).
# The packages' system service is not started here: the tests start their own Orthanc on 127.0.0.1.
set -euo pipefail
PLUGIN=/usr/share/orthanc/plugins/libOrthancDicomWeb.so
if command -v Orthanc >/dev/null 2>&1 || [[ -x /usr/sbin/Orthanc ]]; then
  [[ -f "$PLUGIN" ]] && exit 0
fi
if [[ "$(id -u)" != "0" ]]; then
  echo "setup_orthanc.sh: run as root, or: sudo apt-get install orthanc orthanc-dicomweb" >&2
  exit 1
fi
echo "[setup-orthanc] installing orthanc and orthanc-dicomweb (apt-get)"
# keep the packages' post-install scripts from starting the system-wide Orthanc (port 8042, 4242)
POLICY=/usr/sbin/policy-rc.d
if [[ ! -e "$POLICY" ]]; then
  printf '#!/bin/sh\nexit 101\n' > "$POLICY"
  chmod 755 "$POLICY"
  trap 'rm -f "$POLICY"' EXIT
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends orthanc orthanc-dicomweb >/dev/null
[[ -f "$PLUGIN" ]] || { echo "setup_orthanc.sh: $PLUGIN missing after the install" >&2; exit 1; }
echo "[setup-orthanc] $(/usr/sbin/Orthanc --version | head -1)"
