"""End-to-end in a real browser: Playwright drives Debian's chromium against `streamlit run` on localhost.

For each module a real file is uploaded through the page's file input and the result is checked;
the atrium slice slider is moved. Screenshots go to test-artifacts/screenshots/ (not committed).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from conftest import IN_CI
from core.bench_browser import wait_text, wait_uploader  # polled on every frame: the timings are not 0.5 s late
from core.config import PROJECT_ROOT

CHROMIUM = os.environ.get("MEDIMG_CHROMIUM", "/usr/bin/chromium")
SHOTS = PROJECT_ROOT / "test-artifacts" / "screenshots"
TIMEOUT_MS = 120_000


def _need_browser() -> None:
    missing = []
    if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
        missing.append(f"chromium not found at {CHROMIUM} (apt-get install -y chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the pip package playwright is not installed")
    if missing:
        if IN_CI:
            pytest.fail("; ".join(missing))
        pytest.skip("; ".join(missing))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _app_server(log: Path, base_path: str = "", env: dict | None = None,
                script: str = "app.py") -> Iterator[tuple[subprocess.Popen, str]]:
    """`streamlit run streamlit_app/<script>` (default: app.py, the launcher) on a free localhost port, waited
    until healthy; yields the process and the app's address (with ``base_path``, its server.baseUrlPath)."""
    port = _free_port()
    extra = ["--server.baseUrlPath", base_path] if base_path else []
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(PROJECT_ROOT / "streamlit_app" / script),
         "--server.port", str(port), "--server.address", "127.0.0.1", "--server.headless", "true",
         "--browser.gatherUsageStats", "false", *extra],
        cwd=PROJECT_ROOT, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
    )
    url = f"http://127.0.0.1:{port}" + (f"/{base_path}" if base_path else "")
    try:
        for _ in range(120):
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=1).read() == b"ok":
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail(f"streamlit did not start: {log.read_text()[-2000:]}")
        yield proc, url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    _need_browser()
    t0 = time.time()
    log = tmp_path_factory.mktemp("server") / "streamlit.log"
    with _app_server(log) as (proc, url):
        yield {"url": url, "t0": t0, "log": log}
        _record("server_peak_rss_mb", _peak_rss_mb(proc.pid))


def _peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _record(key: str, value) -> None:
    """Add a measured figure to test-artifacts/e2e_timings.json (a benchmark record, not an assertion)."""
    path = PROJECT_ROOT / "test-artifacts" / "e2e_timings.json"
    path.parent.mkdir(exist_ok=True)
    data = json.loads(path.read_text()) if path.exists() else {}
    data[key] = value
    path.write_text(json.dumps(data, indent=1))


@pytest.fixture(scope="module")
def browser(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium"),
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"],
        )
        yield b
        b.close()


def _page(browser, url: str):
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    return page


def _wait_idle(page) -> None:
    """Wait until Streamlit is not running the script any more."""
    page.wait_for_timeout(300)
    page.wait_for_function("() => !document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=TIMEOUT_MS)


def _images(page, at_least: int) -> int:
    """Wait until the page shows at least ``at_least`` images; return how many it shows."""
    imgs = page.locator("[data-testid=stImageContainer] img")
    imgs.nth(at_least - 1).wait_for()
    return imgs.count()


def _shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def test_home_cold_start(server, browser):
    page = _page(browser, server["url"])
    wait_text(page, "not a medical device")
    wait_text(page, "validation AUC")
    _record("cold_start_to_first_render_s", round(time.time() - server["t0"], 2))
    page.get_by_text("3D Dice").first.wait_for()  # the last card drawn too, before the screenshot
    _shot(page, "0_home")
    page.close()


def test_pneumonia_upload(server, browser, xray_root):
    f = xray_root / "chest_xray" / "train" / "PNEUMONIA" / "person996_bacteria_2924.jpeg"
    t = time.time()
    page = _page(browser, f"{server['url']}/Pneumonia")
    wait_uploader(page)
    _record("felt_open_module_page_s", round(time.time() - t, 2))
    t = time.time()
    page.locator("input[type=file]").first.set_input_files(str(f))
    wait_text(page, "P(pneumonia) =")
    _record("felt_first_xray_upload_to_verdict_s", round(time.time() - t, 2))
    _wait_idle(page)
    assert _images(page, 2) >= 2
    assert "Grad-CAM" in page.inner_text("body")
    _shot(page, "1_pneumonia")
    # the case report: built when the button is clicked, downloaded by the browser, read back as text
    with page.expect_download() as dl:
        page.get_by_role("button", name="Download the case report (PDF)").click()
    assert dl.value.suggested_filename == "person996_bacteria_2924_report.pdf"
    pdf = Path(dl.value.path()).read_bytes()
    assert pdf.startswith(b"%PDF")
    if shutil.which("pdftotext"):
        txt = subprocess.run(["pdftotext", "-", "-"], input=pdf, capture_output=True, check=True).stdout.decode()
        assert "person996_bacteria_2924.jpeg" in txt and "not a medical device" in txt and "Weights sha256" in txt
        assert "Grad-CAM for the" in txt  # the heatmap drawn after the verdict reaches the report too
    page.close()


def test_cardiac_upload(server, browser, acdc_root):
    pdir = acdc_root / "ACDC" / "training" / "patient006"
    page = _page(browser, f"{server['url']}/Cardiac")
    inputs = page.locator("input[type=file]")
    inputs.nth(0).set_input_files(str(pdir / "patient006_frame01.nii.gz"))
    page.wait_for_timeout(500)
    inputs.nth(1).set_input_files(str(pdir / "patient006_frame02.nii.gz"))
    page.get_by_text("P(disease) =").first.wait_for()
    _wait_idle(page)
    assert _images(page, 16) >= 16  # 8 ED + 8 ES slices with Grad-CAM
    _shot(page, "2_cardiac")
    # its case report, as a user downloads it (every real study's report failed until 2026-12-06, unseen here)
    with page.expect_download() as dl:
        page.get_by_role("button", name="Download the case report (PDF)").click()
    pdf = Path(dl.value.path()).read_bytes()
    assert pdf.startswith(b"%PDF")
    if shutil.which("pdftotext"):
        txt = subprocess.run(["pdftotext", "-", "-"], input=pdf, capture_output=True, check=True).stdout.decode()
        assert "patient006_frame01.nii.gz" in txt and "P(disease)" in txt and "No volumes in mL" in txt
    page.close()


def test_cardiac_4d_cine_upload_picks_ed_and_es(server, browser, acdc_root, tmp_path):
    import nibabel as nib
    import numpy as np

    pdir = acdc_root / "ACDC" / "training" / "patient006"
    ed = nib.load(pdir / "patient006_frame01.nii.gz")
    es_path = next(p for p in sorted(pdir.glob("patient006_frame*.nii.gz"))
                   if "_gt" not in p.name and "frame01" not in p.name)
    es = np.asarray(nib.load(es_path).dataobj)
    ed_arr = np.asarray(ed.dataobj)
    cine = tmp_path / "patient006_cine_4d.nii.gz"  # a cycle that starts in systole: ES, ED, ES
    # with a cine stack's voxel size (the shared copy's headers say 1 mm): the volumes are shown in mL
    nib.save(nib.Nifti1Image(np.stack([es, ed_arr, es], axis=3).astype(np.float32), np.diag([1.4, 1.4, 10.0, 1.0])),
             cine)
    page = _page(browser, f"{server['url']}/Cardiac")
    page.get_by_text("One 4D cine").first.click()
    page.get_by_text("Upload a 4D cine NIfTI").first.wait_for()  # the page has redrawn with the one cine box
    _wait_idle(page)
    page.locator("input[type=file]").first.set_input_files(str(cine))
    page.get_by_text("P(disease) =").first.wait_for()
    _wait_idle(page)
    body = page.inner_text("body")
    # the result line names the frames chosen from the LV cavity curve: ED = frame 2, ES = frame 1
    assert "ED = patient006_cine_4d.nii.gz, frame 2" in body and "ES = patient006_cine_4d.nii.gz, frame 1" in body
    assert "Traceback" not in body
    assert "LV end-diastolic volume" in body and " mL" in body and "No volumes in mL" not in body
    _shot(page, "2b_cardiac_cine")
    page.close()


def test_atrium_upload_and_slider(server, browser, heart_root, tmp_path):
    base = heart_root / "Task02_Heart"
    page = _page(browser, f"{server['url']}/Atrium_segmentation")
    inputs = page.locator("input[type=file]")
    t = time.time()
    inputs.nth(0).set_input_files(str(base / "imagesTr" / "la_021.nii.gz"))
    # the scan is shown while the model works (a segmentation faster than the browser's look may skip it)
    wait_text(page, "as loaded; segmenting the left atrium", "Axial slices in the radiological view")
    _record("felt_atrium_upload_to_scan_s", round(time.time() - t, 2))
    wait_text(page, "Axial slices in the radiological view")
    _record("felt_atrium_upload_to_result_s", round(time.time() - t, 2))
    _wait_idle(page)
    t = time.time()
    inputs.nth(1).set_input_files(str(base / "labelsTr" / "la_021.nii.gz"))
    wait_text(page, "Slice Dice")
    _record("felt_atrium_add_mask_to_dice_s", round(time.time() - t, 2))
    _wait_idle(page)
    # the mask just added is shown: its switch turned on by itself
    assert page.get_by_role("switch", name="Show ground-truth mask").is_checked()
    assert _images(page, 1) >= 1
    assert "3D Dice" in page.inner_text("body") and "mL" in page.inner_text("body")
    assert "segmenting the left atrium" not in page.inner_text("body")  # the preview made way for the result
    # an uploaded file, not a sample: la_021 is a training volume of the committed model, and the page says so
    assert "This input is in the model's training data (la_021)" in page.inner_text("body")

    def caption() -> str:
        return page.locator("[data-testid=stImage]").first.inner_text()

    before = caption()
    thumb = page.get_by_role("slider").first
    thumb.focus()
    for _ in range(3):
        thumb.press("ArrowRight")
    page.wait_for_function(f"() => !document.body.innerText.includes({json.dumps(before)})", timeout=TIMEOUT_MS)
    _wait_idle(page)
    after = caption()
    assert after != before and "axial slice" in after
    page.get_by_role("button", name="Next ▶").click()
    page.wait_for_function(f"() => !document.body.innerText.includes({json.dumps(after)})", timeout=TIMEOUT_MS)
    _shot(page, "3_atrium")
    # the mask comes back on the input's own grid and affine, named after the input
    import nibabel as nib

    _wait_idle(page)
    with page.expect_download() as dl:
        page.get_by_role("button", name="Download predicted mask (NIfTI, input's grid and affine)").click()
    assert dl.value.suggested_filename == "la_021_left_atrium_mask.nii.gz"
    dl.value.save_as(tmp_path / dl.value.suggested_filename)  # nibabel reads the format from the name
    got = nib.load(tmp_path / dl.value.suggested_filename)
    src = nib.load(base / "imagesTr" / "la_021.nii.gz")
    assert got.shape == src.shape and (got.affine == src.affine).all() and 0 < got.get_fdata().sum()
    page.close()


def test_atrium_dicom_series_in_dicom_segmentation_out(server, browser, lge_root, tmp_path):
    """A DICOM series uploaded as a zip is segmented, and its mask comes back as a DICOM Segmentation of that
    series (what a PACS viewer overlays), made on request in memory."""
    import io
    import zipfile

    import nibabel as nib
    import numpy as np
    import pydicom
    from _dicom_build import mr_slices

    from core import pacs as P

    img = sorted((lge_root / "LA2018" / "imagesTr").glob("*.nii.gz"))[0]
    src = nib.load(img)
    # z-scores as integers of a DICOM series: x100 keeps two decimals
    dss = mr_slices(np.asarray(src.dataobj, dtype=np.float32) * 100, src.affine, "1.2.826.0.1.3680043.8.498.31")
    zpath = tmp_path / "lge_series.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        for i, ds in enumerate(dss):
            z.writestr(f"IM{i:04d}.dcm", P.dataset_bytes(ds))
    page = _page(browser, f"{server['url']}/Atrium_segmentation")
    page.locator("input[type=file]").first.set_input_files(str(zpath))
    wait_text(page, "quality check passed", "No reliable segmentation was found")
    _wait_idle(page)
    assert "quality check passed" in page.inner_text("body"), page.inner_text("body")[:2000]
    page.get_by_role("button", name="Make a DICOM Segmentation of the mask (for a PACS viewer)").click()
    wait_text(page, "Download the DICOM Segmentation (.dcm)", "could not be made")
    _wait_idle(page)
    with page.expect_download() as dl:
        page.get_by_role("button", name="Download the DICOM Segmentation (.dcm)").click()
    assert dl.value.suggested_filename == "lge_series_left_atrium_seg.dcm"
    seg = pydicom.dcmread(io.BytesIO(Path(dl.value.path()).read_bytes()))
    assert seg.Modality == "SEG" and seg.SegmentSequence[0].SegmentLabel == "Left atrium"
    assert seg.StudyInstanceUID == dss[0].StudyInstanceUID and int(seg.NumberOfFrames) == len(dss)
    mask = P.mask_from_segmentation(seg, dss)
    assert 10_000 < mask.sum() * np.prod(src.header.get_zooms()) < 250_000  # a left atrium: 10-250 mL
    assert "Traceback" not in page.inner_text("body")
    page.close()


def _open_and_list_requests(browser, url: str) -> tuple[Any, list[str]]:
    """A page at ``url`` in a fresh context, waited to its uploader; the URLs it requested on the way."""
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    page.set_default_timeout(TIMEOUT_MS)
    urls: list[str] = []
    page.on("request", lambda r: urls.append(r.url))
    page.goto(url)
    wait_uploader(page)
    return page, urls


def test_a_page_opened_at_its_own_address_connects_at_once(server, browser):
    """The launcher writes the server's address into the page (streamlit_app/frontend.py): the front end does
    not first ask for /<page>/_stcore/health, get refused and wait 100 ms before asking the server's root."""
    page, urls = _open_and_list_requests(browser, f"{server['url']}/Atrium_segmentation")
    assert not [u for u in urls if "/Atrium_segmentation/_stcore/" in u], urls
    assert f"{server['url']}/_stcore/health" in urls
    assert "Left-atrium segmentation" in page.inner_text("body")  # the page asked for, not Home
    page.reload()  # a reload stays on the page
    wait_uploader(page)
    assert "Left-atrium segmentation" in page.inner_text("body") and page.url.endswith("/Atrium_segmentation")
    page.close()


def test_the_launcher_behind_a_base_url_path(server, browser, tmp_path):
    """With server.baseUrlPath (a server behind a proxy path), pages opened at their address still connect to
    the server's base at once, and its front-end files come through."""
    with _app_server(tmp_path / "streamlit.log", base_path="medimg", env={"MEDIMG_WARM_UP": "0"}) as (_, base):
        page, urls = _open_and_list_requests(browser, f"{base}/Pneumonia")
        assert not [u for u in urls if "/Pneumonia/_stcore/" in u], urls
        assert f"{base}/_stcore/health" in urls and any(u.startswith(f"{base}/static/js/") for u in urls)
        assert "Pneumonia from a chest X-ray" in page.inner_text("body")
        page.close()


def test_home_py_started_directly_still_serves_the_pages(server, browser, tmp_path):
    """`streamlit run streamlit_app/Home.py` (without the launcher) works as the README says, only without the
    launcher's shortcut: the front end first asks under the page's address and is refused."""
    with _app_server(tmp_path / "streamlit.log", env={"MEDIMG_WARM_UP": "0"}, script="Home.py") as (_, url):
        page, urls = _open_and_list_requests(browser, f"{url}/Cardiac")
        assert "Cardiac disease from cine short-axis MRI" in page.inner_text("body")
        assert f"{url}/Cardiac/_stcore/health" in urls
        page.close()


def test_metrics_page(server, browser):
    page = _page(browser, f"{server['url']}/Training_and_metrics")
    page.get_by_text("Training curves").first.wait_for()
    page.locator(".js-plotly-plot").first.wait_for()
    _wait_idle(page)
    _shot(page, "4_metrics")
    page.close()


def test_pacs_study_opened_and_result_sent_back(server, browser, orthanc, heart_root):
    """A 3D MR series (a real MSD volume as DICOM) in a real Orthanc: the page lists it, opens it, segments
    the atrium, and stores a Segmentation and a Secondary Capture back into the same study."""
    import nibabel as nib
    import numpy as np
    from _dicom_build import mr_slices

    from core import pacs as P

    img = nib.load(heart_root / "Task02_Heart" / "imagesTr" / "la_021.nii.gz")
    vol = np.round(np.asarray(img.dataobj, dtype=np.float32))
    study = "1.2.826.0.1.3680043.8.498.40"
    dss = mr_slices(vol, img.affine, "1.2.826.0.1.3680043.8.498.41", study_uid=study)
    for ds in dss:
        ds.StudyDate, ds.StudyDescription, ds.SeriesDescription = "20260102", "browser atrium study", "3D bSSFP"
    pacs = P.Pacs(P.PacsConfig(orthanc))
    P.store(pacs, dss)

    page = _page(browser, f"{server['url']}/PACS")
    box = page.get_by_role("textbox", name="DICOMweb address of the PACS")
    box.fill(orthanc)
    box.press("Enter")
    page.get_by_role("button", name="Open and analyse this series").wait_for()  # the study table is a canvas
    _wait_idle(page)
    page.get_by_role("combobox", name="Study").click()  # the study picker: choose ours by its description
    page.get_by_role("option", name="browser atrium study").click()
    _wait_idle(page)
    page.get_by_role("button", name="Open and analyse this series").click()
    page.get_by_role("button", name="Send the result to the PACS").wait_for()
    _wait_idle(page)
    body = page.inner_text("body")
    assert "Left-atrium volume (predicted)" in body and "Quality check passed" in body
    _shot(page, "5_pacs")
    page.get_by_role("button", name="Send the result to the PACS").click()
    page.get_by_text("new instance(s) in the study").wait_for()
    page.close()
    back = {r["modality"] for r in P.list_series(pacs, study)}
    assert back == {"MR", "OT", "SEG"}


def test_the_benchmark_wait_sees_a_change_at_once_and_gives_up_after_its_limit(browser, monkeypatch):
    """core.bench_browser.wait_text, on a plain page: text that appears 0.3 s later is seen then (not at the next
    poll), text that never appears ends in an error after the limit."""
    from core import bench_browser as BB

    page = browser.new_page()
    page.set_content("<body><p id='a'>segmenting</p></body>")
    page.evaluate("() => { window.__t = 0; setTimeout(() => { document.getElementById('a').textContent = "
                  "'Slice Dice 0.912'; window.__t = Date.now(); }, 300); }")
    BB.wait_text(page, "Slice Dice")
    seen_ms = page.evaluate("() => Date.now() - window.__t")
    assert page.evaluate("() => window.__t") > 0 and seen_ms < 250  # a 500 ms poll would be ~470 ms late
    monkeypatch.setattr(BB, "TIMEOUT_MS", 300)
    with pytest.raises(Exception, match="timed out waiting for never there"):
        BB.wait_text(page, "never there")
    page.close()
