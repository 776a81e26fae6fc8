"""The real server under load and with patient data: concurrent sessions without cross-talk,
and nothing of an upload written to disk or to logs."""
from __future__ import annotations

import asyncio
import os
import re
import secrets
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import dicom_bytes
from test_e2e_browser import CHROMIUM, _free_port, _need_browser

from core import io as mio
from core.bench_browser import stop_server
from core.case_report import format_probability
from core.config import PROJECT_ROOT
from core.inference import load_model
from core.pneumonia import predict_xray

N_SESSIONS = 20
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _start(tmp: Path, env_extra: dict) -> tuple[subprocess.Popen, str, Path]:
    port = _free_port()
    log = tmp / "server.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(PROJECT_ROOT / "streamlit_app" / "app.py"),
         "--server.port", str(port), "--server.address", "127.0.0.1", "--server.headless", "true"],
        cwd=PROJECT_ROOT, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env={**os.environ, **env_extra},
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=1).read() == b"ok":
                return proc, url, log
        except OSError:
            time.sleep(0.5)
    proc.kill()
    pytest.fail(f"server did not start: {log.read_text()[-2000:]}")


async def _session(browser, url: str, path: Path, i: int) -> dict:
    ctx = await browser.new_context()  # a separate Streamlit session per context
    page = await ctx.new_page()
    page.set_default_timeout(240_000)
    try:
        await page.goto(f"{url}/Pneumonia")
        await page.locator("input[type=file]").first.set_input_files(str(path))
        alert = page.get_by_text(re.compile(r"P\(pneumonia\) = (?:[<>] )?[0-9.]+%")).first
        await alert.wait_for()
        text = await alert.inner_text()
        imgs = page.locator("[data-testid=stImageContainer] img")
        await imgs.nth(1).wait_for()
        heat_src = await imgs.nth(1).get_attribute("src")
        return {"i": i, "file": path.name, "text": text, "heat": heat_src.rsplit("/", 1)[-1], "error": None}
    except Exception as exc:  # noqa: BLE001 - counted as an error of this session
        return {"i": i, "file": path.name, "text": None, "heat": None, "error": repr(exc)}
    finally:
        await ctx.close()


def test_concurrent_sessions_no_crosstalk(xray_root, tmp_path):
    _need_browser()
    from playwright.async_api import async_playwright

    files = [xray_root / "chest_xray" / "train" / d / f for d, f in (
        ("NORMAL", "IM-0117-0001.jpeg"), ("PNEUMONIA", "person996_bacteria_2924.jpeg"),
        ("PNEUMONIA", "person996_virus_1677.jpeg"), ("NORMAL", "IM-0119-0001.jpeg"))]
    lm = load_model("pneumonia")
    alone = {}
    for f in files:
        r = predict_xray(lm, mio.read_image_2d(f.read_bytes(), f.name))
        alone[f.name] = format_probability(r.probability)
    proc, url, log = _start(tmp_path, {})

    async def main() -> list[dict]:
        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            try:
                return await asyncio.gather(*[_session(browser, url, files[i % len(files)], i)
                                              for i in range(N_SESSIONS)])
            finally:
                await browser.close()

    try:
        t0 = time.time()
        results = asyncio.run(main())
        elapsed = time.time() - t0
    finally:
        stop_server(proc)
    errors = [r for r in results if r["error"]]
    assert not errors, errors
    for r in results:
        assert f"P(pneumonia) = {alone[r['file']]}" in r["text"], (r, alone)
    for name in alone:  # identical inputs gave byte-identical Grad-CAM images in every session
        assert len({r["heat"] for r in results if r["file"] == name}) == 1
    print(f"{N_SESSIONS} concurrent sessions, 0 errors, {elapsed:.1f} s")
    assert "Traceback" not in log.read_text()


def test_uploads_leave_nothing_on_disk_or_in_logs(xray_root, tmp_path):
    _need_browser()
    from playwright.sync_api import sync_playwright

    home, tmpdir = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    tmpdir.mkdir()
    marker = f"PATIENT-{secrets.token_hex(8)}"
    name = f"{marker}.dcm"
    # the patient's name inside the file differs from the file name: the page names the result after
    # the user's own file (on purpose, #17) but must never show the DICOM identifying fields
    patient = "PN" + secrets.token_hex(3).upper()
    arr = np.asarray(mio.read_image_2d((xray_root / "chest_xray/train/NORMAL/IM-0117-0001.jpeg").read_bytes()).pixels)
    data = dicom_bytes((arr * 4000).astype(np.uint16), slope=1.0, intercept=0.0)
    data = data.replace(b"Doe^Jane", patient.encode())  # same length: the file stays valid
    upload = tmp_path / "src" / name
    upload.parent.mkdir()
    upload.write_bytes(data)
    corrupt = tmp_path / "src" / f"{marker}-broken.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b" + secrets.token_bytes(300))

    warm_dcm = tmp_path / "src" / "warmup.dcm"
    # same image at another scaling: other bytes, but a full verdict with Grad-CAM, so that the
    # warm-up walks the same drawing code (matplotlib writes its font cache on first use)
    warm_dcm.write_bytes(dicom_bytes((arr * 3000).astype(np.uint16)))
    warm_bad = tmp_path / "src" / "warmup-broken.nii.gz"
    warm_bad.write_bytes(b"\x1f\x8b" + secrets.token_bytes(300))
    since = time.time()
    # unbuffered, so that output produced during the warm-up is written then, not flushed (and counted)
    # inside the measured window
    proc, url, log = _start(tmp_path, {"HOME": str(home), "TMPDIR": str(tmpdir), "PYTHONUNBUFFERED": "1"})
    try:
        with sync_playwright() as p:
            b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = b.new_page()
            page.set_default_timeout(120_000)
            # warm-up through the same code paths with other files, so that first-use caches (fonts,
            # compiled modules) are not counted as written by the measured uploads
            page.goto(f"{url}/Pneumonia")
            page.locator("input[type=file]").first.set_input_files(str(warm_dcm))
            page.get_by_text("P(pneumonia) =").first.wait_for()
            page.get_by_text("Image information").first.click()
            page.wait_for_timeout(1000)
            page.goto(f"{url}/Atrium_segmentation")
            page.locator("input[type=file]").first.set_input_files(str(warm_bad))
            page.get_by_text("cannot be used").first.wait_for()
            page.wait_for_timeout(1000)
            io_before = _io_write_bytes(proc.pid)
            log_before = log.stat().st_size
            window_start = time.time()
            page.goto(f"{url}/Pneumonia")
            page.locator("input[type=file]").first.set_input_files(str(upload))
            page.get_by_text("P(pneumonia) =").first.wait_for()
            page.get_by_text("Image information").first.click()
            page.wait_for_timeout(1000)
            body = page.inner_text("body")
            for secret in (patient, "SECRET-123", "19700101", "ACC-999", "General Hospital"):
                assert secret not in body, f"identifying DICOM value {secret!r} shown"
            page.goto(f"{url}/Atrium_segmentation")
            page.locator("input[type=file]").first.set_input_files(str(corrupt))
            page.get_by_text("cannot be used").first.wait_for()
            assert "Traceback" not in page.inner_text("body")
            b.close()
        io_after = _io_write_bytes(proc.pid)
    finally:
        stop_server(proc)
    needles = [marker.encode(), patient.encode(), data[-4096:]]
    hits = []
    for base in (PROJECT_ROOT, home, tmpdir, Path("/tmp"), Path("/var/tmp")):
        for f in _files_modified_since(base, since, skip=upload.parent):
            try:
                content = f.read_bytes()
            except OSError:
                continue
            if any(n in content for n in needles) or marker in f.name:
                hits.append(str(f))
    assert not hits, f"upload found on disk: {hits}"
    text = log.read_text(errors="replace")
    assert marker not in text and patient not in text and "Traceback" not in text
    if io_before is not None and io_after is not None:
        written = io_after - io_before
        print(f"bytes written to storage by the server during the uploads: {written}")
        log_added = log.read_bytes()[log_before:].decode(errors="replace")
        touched = [str(f) for base in (PROJECT_ROOT, home, tmpdir)
                   for f in _files_modified_since(base, window_start, skip=upload.parent)]
        # Zero in isolation, every time. In about one full-suite run in three the kernel charges the server
        # one 4 KB page during this window while no file anywhere scanned changes and the log does not
        # grow (cause not found; see the README's known gaps). One page cannot hold the ~100 KB upload,
        # whose content the scans above also look for, so up to one page is tolerated; more fails.
        assert len(data) > 16 * 4096
        assert written <= 4096, f"server log grew by: {log_added[-1500:]!r}; files modified: {touched[:20]}"


def _io_write_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _files_modified_since(base: Path, since: float, skip: Path):
    if not base.exists():
        return
    for root, dirs, names in os.walk(base):
        if Path(root) == skip or "/proc" in root or ".venv" in root or "/.git" in root or "pytest-of" in root \
                and not str(root).startswith(str(skip.parent)):
            dirs[:] = []
            continue
        for n in names:
            f = Path(root) / n
            try:
                if f.is_file() and not f.is_symlink() and f.stat().st_mtime >= since and f.stat().st_size < 50e6:
                    yield f
            except OSError:
                continue


def test_streamlit_config_limits_and_privacy():
    cfg = tomllib.loads((PROJECT_ROOT / ".streamlit" / "config.toml").read_text())
    assert cfg["server"]["maxUploadSize"] >= 300  # a 3D NIfTI fits
    assert cfg["server"]["enableXsrfProtection"] is True
    assert cfg["browser"]["gatherUsageStats"] is False
