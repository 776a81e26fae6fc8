"""A private Orthanc for the PACS tests (Debian packages orthanc + orthanc-dicomweb): an empty store in a
folder, HTTP on one localhost port, the DICOMweb plugin at /dicom-web, no DICOM port, no authentication.

    python tests/orthanc_server.py DIR PORT   # what .ci/run starts; prints the DICOMweb URL once it answers
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def installed() -> bool:
    return Path(ORTHANC).exists() and Path(DICOMWEB_PLUGIN).exists()


def dicomweb_url(port: int) -> str:
    return f"http://127.0.0.1:{port}/dicom-web"


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/studies", timeout=1):
            return True
    except Exception:  # noqa: BLE001 - not up (yet)
        return False


def start(folder: Path, port: int, wait_s: float = 20.0) -> subprocess.Popen:
    """Start Orthanc with its store under ``folder``; returns once its DICOMweb root answers."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"Name": "medimg-test", "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
           "HttpPort": port, "DicomServerEnabled": False, "RemoteAccessAllowed": False,
           "AuthenticationEnabled": False, "Plugins": [DICOMWEB_PLUGIN],
           "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False}}
    (folder / "orthanc.json").write_text(json.dumps(cfg))
    log = open(folder / "orthanc.log", "wb")
    proc = subprocess.Popen([ORTHANC, str(folder / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    t0 = time.time()
    while not answers(dicomweb_url(port)):
        if proc.poll() is not None or time.time() - t0 > wait_s:
            proc.kill()
            raise RuntimeError(f"Orthanc did not start: {(folder / 'orthanc.log').read_text()[-2000:]}")
        time.sleep(0.2)
    return proc


if __name__ == "__main__":
    p = start(Path(sys.argv[1]), int(sys.argv[2]))
    print(dicomweb_url(int(sys.argv[2])), flush=True)
    sys.exit(p.wait())
