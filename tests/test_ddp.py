"""train_all.py under torchrun: DistributedDataParallel on CPU (gloo), 2 processes agree on the weights."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from core.checkpoint import load_state_dict
from core.config import PROJECT_ROOT


@pytest.mark.parametrize("extra", [[], ["--ema", "0.9"]], ids=["plain", "weight-average"])
def test_torchrun_two_processes_agree(xray_root, tmp_path, extra):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "w"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={port}",
           str(PROJECT_ROOT / "train_all.py"), "--smoke", "--tasks", "pneumonia", "--device", "cpu",
           "--data-root", str(xray_root), "--weights-dir", str(out), *extra]
    r = subprocess.run(cmd, cwd=PROJECT_ROOT, env={**os.environ, "TQDM_DISABLE": "1"}, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    card = json.loads((out / "pneumonia.json").read_text())
    ddp = card["ddp"]
    assert ddp["world_size"] == 2 and ddp["backend"] == "gloo"
    assert len(set(ddp["rank_weights_sha256"])) == 1, ddp
    assert ddp["rank_weights_sha256"][0] == card["weights_sha256"]
    from core.tasks import get_task

    assert card["training"]["ema"] == (0.9 if extra else get_task("pneumonia").train_defaults.get("ema"))
    load_state_dict("pneumonia", out)
