"""
A real Orthanc DICOM server with its DICOMweb plugin, for the MONAI Label DICOMweb tests.

Orthanc and the plugin come from the Debian packages ``orthanc`` and ``orthanc-dicomweb``
(``scripts/setup_orthanc.sh`` installs them; CI runs it).  :class:`Orthanc` writes its own configuration in a
temporary folder (free HTTP port, DICOM server off, storage in that folder, DICOMweb plugin on, no login, only
local clients accepted: Orthanc 1.10 has no listen-address option, ``RemoteAccessAllowed: false`` makes it refuse
every other host), starts it, and stops it.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterable, List, Optional

ORTHANC_BIN = "Orthanc"
#: where the Debian package orthanc-dicomweb puts the plugin
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
START_TIMEOUT = 60


def orthanc_problem() -> Optional[str]:
    """Why Orthanc cannot be started here (None when it can)."""
    if shutil.which(ORTHANC_BIN) is None and not Path("/usr/sbin/Orthanc").is_file():
        return "Orthanc is not installed (Debian package orthanc)"
    if not DICOMWEB_PLUGIN.is_file():
        return f"the Orthanc DICOMweb plugin {DICOMWEB_PLUGIN} is missing (Debian package orthanc-dicomweb)"
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Orthanc:
    """One Orthanc process with its configuration, storage and log in ``root``."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dicomweb_url = f"{self.url}/dicom-web"
        self.log = self.root / "orthanc.log"
        self.proc: Optional[subprocess.Popen] = None

    def config(self) -> dict:
        storage = str(self.root / "storage")
        return {
            "Name": "dex-test-orthanc",
            "StorageDirectory": storage,
            "IndexDirectory": storage,
            "HttpPort": self.port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": False,
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False, "Host": "127.0.0.1"},
            "SaveJobs": False,
            "HttpThreadsCount": 8,
        }

    def start(self) -> "Orthanc":
        import requests

        self.root.mkdir(parents=True, exist_ok=True)
        conf = self.root / "orthanc.json"
        conf.write_text(json.dumps(self.config(), indent=2))
        binary = shutil.which(ORTHANC_BIN) or "/usr/sbin/Orthanc"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([binary, "--no-jobs", str(conf)], cwd=self.root, stdout=log,
                                         stderr=subprocess.STDOUT)  # fmt: skip
        deadline = time.time() + START_TIMEOUT
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if requests.get(f"{self.url}/system", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer within {START_TIMEOUT} s:\n{self.tail()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:]) if self.log.is_file() else ""

    def upload(self, files: Iterable[Path]) -> List[dict]:
        """Store DICOM files through Orthanc's REST API (``POST /instances``); returns Orthanc's answers."""
        import requests

        answers = []
        for f in files:
            r = requests.post(f"{self.url}/instances", data=Path(f).read_bytes(), timeout=30)
            r.raise_for_status()
            answers.append(r.json())
        return answers

    def qido_series(self, **filters) -> List[dict]:
        """QIDO-RS search for series (DICOM JSON), e.g. ``qido_series(Modality="SEG")``."""
        import requests

        r = requests.get(f"{self.dicomweb_url}/series", params={**filters, "includefield": "all"}, timeout=30)
        r.raise_for_status()
        return r.json() if r.content else []
