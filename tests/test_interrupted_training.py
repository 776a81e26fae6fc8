"""Training stopped midway never leaves a half-written or mismatched weights/card pair."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from core import checkpoint as ck
from core.checkpoint import load_state_dict, recover, save_checkpoint
from core.config import PROJECT_ROOT
from core.errors import MissingWeightsError
from core.models import build_model


def _pair_state(d, task: str) -> str:
    pt, js = d / f"{task}.pt", d / f"{task}.json"
    if not pt.exists() and not js.exists():
        return "absent"
    try:
        load_state_dict(task, d)  # runs recovery, then checks the checksum
        return "consistent"
    except MissingWeightsError as exc:
        return f"broken: {exc}"


def test_crash_between_renames_is_recovered(tmp_path, monkeypatch):
    net = build_model("SmallCNN", base=4, n_blocks=2)
    save_checkpoint(net.state_dict(), {"v": 1}, "pneumonia", tmp_path)
    real = os.replace
    calls = {"n": 0}

    def flaky(src, dst):
        calls["n"] += 1
        if calls["n"] == 2:  # the weights are renamed, the card is not
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(ck.os, "replace", flaky)
    net2 = build_model("SmallCNN", base=4, n_blocks=2)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(net2.state_dict(), {"v": 2}, "pneumonia", tmp_path)
    monkeypatch.setattr(ck.os, "replace", real)
    recover("pneumonia", tmp_path)
    state, card = load_state_dict("pneumonia", tmp_path)
    assert card["v"] == 2
    assert not list(tmp_path.glob(".*partial"))


def test_crash_while_writing_keeps_old_pair(tmp_path, monkeypatch):
    net = build_model("SmallCNN", base=4, n_blocks=2)
    save_checkpoint(net.state_dict(), {"v": 1}, "pneumonia", tmp_path)

    def boom(path, data):
        path.write_bytes(data[: len(data) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(ck, "_write_full", boom)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(net.state_dict(), {"v": 2}, "pneumonia", tmp_path)
    monkeypatch.undo()
    _, card = load_state_dict("pneumonia", tmp_path)
    assert card["v"] == 1


def test_killed_training_runs(xray_root, tmp_path):
    """Kill `train_all.py --smoke` at several moments, then run it again to the end."""
    out = tmp_path / "w"
    cmd = [sys.executable, str(PROJECT_ROOT / "train_all.py"), "--smoke", "--tasks", "pneumonia", "--device", "cpu",
           "--data-root", str(xray_root), "--weights-dir", str(out)]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    states = []
    for delay in (4.0, 9.0, 14.0, 18.0):
        p = subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
        states.append(_pair_state(out, "pneumonia"))
    assert all(s in ("absent", "consistent") for s in states), states
    subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert _pair_state(out, "pneumonia") == "consistent"
    assert json.loads((out / "pneumonia.json").read_text())["smoke"] is True
    assert not list(out.glob(".*partial"))
