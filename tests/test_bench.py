"""core.bench runs end to end (a smoke run on synthetic inputs: it measures, it asserts no speed)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from core.bench import _timeit, alternatives
from core.io import Volume


def test_timeit_counts_warmup_and_repeats():
    calls = []
    t = _timeit(lambda: calls.append(1), repeats=3)
    assert len(calls) == 5 and t["n"] == 3 and 0 <= t["median_s"] <= t["p95_s"]
    calls.clear()
    _timeit(lambda: calls.append(1), repeats=1)
    assert len(calls) == 2  # a smoke run warms up once


def test_bench_smoke_run_writes_every_figure(tmp_path):
    # its own process, as the benchmark is run: flushing subnormal floats (core.bench.run) reaches torch's worker
    # threads only if it comes before they start, and this test session started them long ago
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "bench.json"
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "core.bench", "--repeats", "1", "--no-train", "--data-root",
                           str(tmp_path / "no-data"), "--json", str(out)], cwd=root, env=env, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert set(res["inputs"].values()) == {"synthetic 224x224", "synthetic 216x256x10", "synthetic 256x256x130"}
    assert set(res["figures"]) == {"model_load_all_three", "xray_predict_gradcam", "cardiac_predict_gradcam",
                                   "cardiac_cine_30_frames",
                                   "atrium_volume_256x256x130", "xray_batch_64"}
    for f in res["figures"].values():
        assert f["speedup"] > 0 and f["optimised"]["median_s"] > 0 and f["baseline"]["median_s"] > 0
    assert res["precision"]["pneumonia"] == "float32" and res["precision"]["atrium"] in ("float32", "bfloat16", "int8")
    assert res["peak_memory_mb"] > 0 and res["threads"] >= 1 and "training" not in res
    assert res["flush_denormal"] is True  # subnormals flushed on a CPU that can (x86 with SSE3; see core.bench.run)
    d = res["optimisation_output_change"]["xray_probability_abs_diff"]
    assert d is None or d < 1e-3  # None: the input check withholds a diagnosis for random pixels
    assert "baseline:" in proc.stdout and "speed-up x" in proc.stdout


def test_alternatives_on_a_small_volume():
    rng = np.random.default_rng(0)
    vol = Volume(rng.random((48, 48, 3)).astype(np.float32), np.diag([1.25, 1.25, 1.37, 1.0]), (1.25, 1.25, 1.37))
    res = alternatives(vol, repeats=1, train_step=False)
    inf = res["inference"]
    assert inf["eager_float32"]["speedup_vs_eager_float32"] == pytest.approx(1.0)
    assert inf["eager_float32"]["max_abs_prob_diff_vs_eager_float32"] == 0.0
    assert inf["torchscript_trace_freeze_float32"]["max_abs_prob_diff_vs_eager_float32"] < 1e-4
    assert inf["eager_bfloat16_autocast"]["max_abs_prob_diff_vs_eager_float32"] < 0.5
    assert "onnxruntime_float32" in inf  # timed when installed, else named as skipped
    assert "median_s" in inf["eager_int8"] or "skipped" in inf["eager_int8"]  # the committed ranges, where usable
    for name, r in inf.items():
        assert "median_s" in r or "skipped" in r or "failed" in r, name
    assert "training_step" not in res


def test_browser_bench_summary_and_readme_rows(tmp_path, monkeypatch):
    from core import bench_browser as BB
    from core import report

    s = BB.summarise({"open_module_page": [0.9, 0.5, 0.7], "atrium_add_mask_to_dice": []})
    assert s == {"open_module_page": {"median_s": 0.7, "min_s": 0.5, "max_s": 0.9, "n": 3,
                                      "samples": [0.9, 0.5, 0.7]}}
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / BB.FELT_FILE).write_text(json.dumps({
        "machine": {"cpu": "x86_64", "threads": 2, "browser": "chromium (headless)"}, "measured": "2026-12-03T11:00:00Z",
        "goals_s": BB.GOALS_S, "steps": s}))
    monkeypatch.setattr("core.config.PROJECT_ROOT", tmp_path)
    rows = report.felt_markdown()
    assert f"| {BB.STEP_NAMES['open_module_page']} | 0.70 | 0.50-0.90 | 3 | 1.0 |" in rows


def test_felt_and_performance_headers_name_the_cpu_model(tmp_path, monkeypatch):
    from core import bench_browser as BB
    from core import report

    (tmp_path / "benchmarks").mkdir()
    machine = {"cpu": "x86_64", "cpu_model": "AMD EPYC (AVX512-BF16, no AMX)", "threads": 2,
               "browser": "chromium (headless)"}
    (tmp_path / BB.FELT_FILE).write_text(json.dumps({
        "machine": machine, "measured": "2026-12-05T11:00:00Z", "goals_s": BB.GOALS_S,
        "steps": BB.summarise({"open_module_page_warm_browser": [0.6, 0.8, 0.7]})}))
    monkeypatch.setattr("core.config.PROJECT_ROOT", tmp_path)
    rows = report.felt_markdown()
    assert "AMD EPYC (AVX512-BF16, no AMX)" in rows[1]
    assert f"| {BB.STEP_NAMES['open_module_page_warm_browser']} | 0.70 | 0.60-0.80 | 3 | 1.0 |" in rows


def test_browser_bench_new_tab_helpers_open_wait_and_close():
    from core import bench_browser as BB

    calls: list = []

    class Locator:
        first = property(lambda self: self)

        def wait_for(self, state: str) -> None:
            calls.append(("wait", state))

    class Page:
        def set_default_timeout(self, ms: int) -> None:
            calls.append(("timeout", ms))

        def goto(self, url: str) -> None:
            calls.append(("goto", url))

        def locator(self, css: str) -> Locator:
            calls.append(("locator", css))
            return Locator()

        def wait_for_function(self, js: str, arg=None, polling=None) -> None:
            calls.append(("wait_fn", "input[type=file]" in js, arg, polling))

        def evaluate(self, js: str, arg=None) -> None:
            calls.append(("evaluate", "MutationObserver" in js, arg))

        def close(self) -> None:
            calls.append(("close",))

    class Context:  # what BB._warm_browser_opens gets from Browser.new_context
        def new_page(self) -> Page:
            calls.append(("new_page",))
            return Page()

        def close(self) -> None:
            calls.append(("context_close",))

    class Browser:
        def new_context(self, viewport: dict) -> Context:
            calls.append(("new_context", viewport))
            return Context()

    nav: list[float] = []
    dt = BB._open_to_uploader(Context().new_page, "http://x/Cardiac", nav)
    assert len(nav) == 1 and 0 <= nav[0] <= dt  # from the address entered: a part of the whole
    # the uploader is waited for on every animation frame (Playwright's locator waits re-check only every
    # 500 ms after the first 0.3 s, which put up to 0.5 s on a timed step)
    assert calls == [("new_page",), ("timeout", BB.TIMEOUT_MS), ("goto", "http://x/Cardiac"),
                     ("wait_fn", True, None, "raf"), ("close",)]
    calls.clear()
    BB.wait_text(Page(), "Slice Dice", "3D Dice")
    # the text is checked whenever the page changes (no check of the page's text on every frame)
    assert calls == [("evaluate", True, [["Slice Dice", "3D Dice"], BB.TIMEOUT_MS])]
    calls.clear()
    times = BB._warm_browser_opens(Browser(), ["http://x/A", "http://x/B"])
    assert len(times) == 2  # the first visit (to fill the cache) is not timed
    assert [c[1] for c in calls if c[0] == "goto"] == ["http://x/A", "http://x/A", "http://x/B"]
    assert calls[0] == ("new_context", BB.VIEWPORT) and calls[-1] == ("context_close",)


def test_wait_idle_waits_while_the_process_computes_and_not_after():
    import subprocess
    import sys

    from core import bench_browser as BB

    busy = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 2.5:\n"
                             "    pass\ntime.sleep(60)"])
    try:
        waited = BB.wait_idle(busy.pid, timeout_s=30)
        assert 2.0 <= waited < 30  # through the 2.5 s of computing, then stopped once a quiet second passed
        assert BB.wait_idle(busy.pid, timeout_s=30) < 30  # asleep now: no time-out
    finally:
        busy.kill()
        busy.wait()
    assert BB.wait_idle(2 ** 22 + 12345) == 0.0  # no such process: nothing to wait for
