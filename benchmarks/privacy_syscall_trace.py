"""Which files the app server writes to, opens for writing, creates, renames or deletes while it handles uploads: the server
runs under ``strace -f`` (every thread), a browser does the privacy test's steps (a DICOM radiograph with its image
information, a corrupt NIfTI on the atrium page) once to warm up and then ``--repeats`` times with other files, and
every file-changing system call from the end of the warm-up on is listed. An investigation of the privacy test's
occasional 4 KB (README, Known gaps), not a test: it needs strace and chromium.

    MEDIMG_DATA_ROOT=../shared/datasets PYTHONPATH=. python benchmarks/privacy_syscall_trace.py \
        --json benchmarks/logs/privacy-syscall-trace.json
"""
from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
CALLS = "openat,open,creat,unlink,unlinkat,rename,renameat,renameat2,mkdir,ftruncate,truncate,memfd_create"
WRITE_CALLS = "write,pwrite64,writev,pwritev,pwritev2"  # traced with -y: each line names the file behind the fd
WRITE_FLAGS = re.compile(r"O_WRONLY|O_RDWR|O_CREAT|O_TRUNC")


def main() -> None:
    from conftest import dicom_bytes

    from core import io as mio
    from core.config import data_root

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data-root", default=None)
    args = ap.parse_args()
    root = data_root(args.data_root)
    work = Path(tempfile.mkdtemp(prefix="privacy-trace-"))
    for d in ("home", "tmp", "src"):
        (work / d).mkdir()
    arr = np.asarray(mio.read_image_2d((root / "chest_xray/train/NORMAL/IM-0117-0001.jpeg").read_bytes()).pixels)
    files = {"warm.dcm": dicom_bytes((arr * 3000).astype(np.uint16)), "upload.dcm": dicom_bytes((arr * 4000).astype(np.uint16)),
             "warm-broken.nii.gz": b"\x1f\x8b" + secrets.token_bytes(300), "broken.nii.gz": b"\x1f\x8b" + secrets.token_bytes(300)}
    for name, data in files.items():
        (work / "src" / name).write_bytes(data)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, HOME=str(work / "home"), TMPDIR=str(work / "tmp"), PYTHONUNBUFFERED="1",
               MEDIMG_DATA_ROOT=str(root))
    trace = work / "strace.out"
    with open(work / "server.log", "w") as log:
        proc = subprocess.Popen(["strace", "-f", "-ttt", "-y", "-e", f"trace={CALLS},{WRITE_CALLS}", "-o", str(trace),
                                 str(Path(sys.executable).parent / "streamlit"), "run", "streamlit_app/app.py",
                                 "--server.port", str(port), "--server.headless", "true"],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(180):
            try:
                urllib.request.urlopen(f"{url}/_stcore/health", timeout=1)
                break
            except OSError:
                time.sleep(1)
        from playwright.sync_api import sync_playwright

        with sync_playwright() as p:
            b = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--headless", "--no-sandbox", "--disable-gpu"])
            page = b.new_page()
            page.set_default_timeout(180_000)

            def steps(xray: str, broken: str) -> None:
                page.goto(f"{url}/Pneumonia")
                page.locator("input[type=file]").first.set_input_files(str(work / "src" / xray))
                page.get_by_text("P(pneumonia) =").first.wait_for()
                page.get_by_text("Image information").first.click()
                page.wait_for_timeout(1000)
                page.goto(f"{url}/Atrium_segmentation")
                page.locator("input[type=file]").first.set_input_files(str(work / "src" / broken))
                page.get_by_text("cannot be used").first.wait_for()
                page.wait_for_timeout(1000)

            steps("warm.dcm", "warm-broken.nii.gz")
            page.wait_for_timeout(2000)
            start = time.time()
            for _ in range(args.repeats):
                steps("upload.dcm", "broken.nii.gz")
            end = time.time()
            b.close()
    finally:
        # the whole group: stopping strace alone would leave the traced server running
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    lines = trace.read_text().splitlines()

    def changing(ln: str) -> bool:
        text = ln.split(None, 2)[2]
        call = text.split("(", 1)[0]
        if call in WRITE_CALLS.split(","):  # a write to a file (not a socket, a pipe or an event fd)
            fd = re.match(r"\w+\(\d+<([^>]*)>", text)
            return bool(fd) and fd.group(1).startswith("/") and fd.group(1) != "/dev/null"
        if "ENOENT" in ln or "/dev/null" in ln or call not in CALLS.split(","):
            return False
        return bool(WRITE_FLAGS.search(text.split(")", 1)[0])) if call in ("open", "openat") else True

    def stamp(ln: str) -> float:
        return float(ln.split()[1])

    timed = [ln for ln in lines if len(ln.split()) > 1 and re.fullmatch(r"\d+\.\d+", ln.split()[1])]
    before = [ln.split(None, 2)[2][:300] for ln in timed if stamp(ln) < start and changing(ln)]
    during = [ln.split(None, 2)[2][:300] for ln in timed if start <= stamp(ln) <= end and changing(ln)]
    rec = {"what": "file-changing system calls of the app server (strace -f) while a browser repeats the privacy "
                   "test's uploads, after one warm-up with other files", "calls_traced": f"{CALLS},{WRITE_CALLS}",
           "repeats": args.repeats, "seconds_traced": round(end - start, 1),
           "system_calls_in_the_window": sum(start <= stamp(ln) <= end for ln in timed),
           "file_changing_calls_in_the_window": during, "file_changing_calls_before_it": before,
           "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    Path(args.json).write_text(json.dumps(rec, indent=1) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({k: v for k, v in rec.items() if k != "file_changing_calls_before_it"}, indent=1))


if __name__ == "__main__":
    main()
