"""Inference precision: how it is chosen (registry, hardware, $MEDIMG_PRECISION) and that bfloat16
changes the U-Nets' outputs only a little (real-data checks in test_evaluate_real.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from core import precision as P
from core.errors import MedImgError
from core.atrium import segment_atrium
from core.cardiac import predict_cardiac
from core.inference import load_model
from core.io import Volume
from core.precision import PRECISION_ENV, PrecisionError, autocast, flush_subnormals, inference_precision, native_bf16

CPU = torch.device("cpu")
AUTO_CPU = "bfloat16" if native_bf16(CPU) else "float32"


def test_explicit_precisions_are_kept(monkeypatch):
    monkeypatch.delenv(PRECISION_ENV, raising=False)
    assert inference_precision("float32") == "float32"
    assert inference_precision("bfloat16") == "bfloat16"
    assert inference_precision("bfloat16", bf16_allowed=False) == "bfloat16"  # asked for explicitly
    assert inference_precision(" Float32 ") == "float32"


def test_auto_follows_hardware_and_registry(monkeypatch):
    monkeypatch.delenv(PRECISION_ENV, raising=False)
    assert inference_precision() == AUTO_CPU
    assert inference_precision("auto") == AUTO_CPU
    assert inference_precision(bf16_allowed=False) == "float32"
    assert inference_precision("auto", device=torch.device("meta")) == "float32"  # no native bf16 there


def test_environment_overrides_auto_and_bad_values_say_what_to_use(monkeypatch):
    monkeypatch.setenv(PRECISION_ENV, "float32")
    assert inference_precision() == "float32"
    assert inference_precision("bfloat16") == "bfloat16"  # an argument wins over the environment
    monkeypatch.setenv(PRECISION_ENV, "half")
    with pytest.raises(PrecisionError, match=r"\$MEDIMG_PRECISION is 'half'; use one of: auto, float32, bfloat16"):
        inference_precision()
    with pytest.raises(MedImgError, match="the precision argument is 'fp8'"):
        inference_precision("fp8")


def test_autocast_context():
    with autocast("float32"):
        assert not torch.is_autocast_enabled("cpu")
    with autocast("bfloat16"):
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
    with pytest.raises(PrecisionError):
        autocast("auto")


def test_loaded_models_carry_their_precision(monkeypatch):
    monkeypatch.delenv(PRECISION_ENV, raising=False)
    assert load_model("pneumonia").precision == "float32"  # the registry keeps the X-ray CNN in float32
    # the atrium U-Net runs int8 where its weights carry activation ranges and the CPU has no AMX
    # (tests/test_quantize.py); bfloat16 or float32 otherwise
    assert load_model("atrium").precision in (AUTO_CPU, "int8")
    assert load_model("atrium", precision="bfloat16").precision == "bfloat16"
    assert load_model("cardiac", precision="float32").precision == "float32"
    assert load_model("atrium", optimize=False).precision == "float32"  # the plain baseline
    monkeypatch.setenv(PRECISION_ENV, "float32")
    assert load_model("atrium").precision == "float32"


def test_bfloat16_outputs_stay_close_to_float32():
    """Synthetic inputs (the real-data agreement is in test_evaluate_real.py): a blob the U-Net
    segments, and two cardiac frames; bfloat16 is asked for explicitly so this runs on any CPU."""
    zz, yy, xx = np.meshgrid(np.arange(24), np.arange(96), np.arange(96), indexing="ij")
    blob = ((xx - 48) ** 2 + (yy - 40) ** 2 + 4 * (zz - 12) ** 2 < 15**2).astype(np.float32)
    rng = np.random.default_rng(0)
    data = (blob * 3 + rng.normal(0, 0.3, blob.shape)).transpose(2, 1, 0).astype(np.float32)  # (X, Y, Z)
    vol = Volume(data, np.diag([1.25, 1.25, 1.37, 1.0]), (1.25, 1.25, 1.37))
    f32, b16 = (segment_atrium(load_model("atrium", precision=p), vol) for p in ("float32", "bfloat16"))
    assert f32.mask.shape == b16.mask.shape == data.shape
    assert int((f32.mask != b16.mask).sum()) <= max(50, 0.02 * int(f32.mask.sum()))
    ed = Volume(rng.random((120, 120, 10)).astype(np.float32), np.eye(4), (1.0, 1.0, 1.0))
    es = Volume(rng.random((120, 120, 10)).astype(np.float32), np.eye(4), (1.0, 1.0, 1.0))
    p32, p16 = (predict_cardiac(load_model("cardiac", precision=p), ed, es, explain=False, guard=False)
                for p in ("float32", "bfloat16"))
    assert abs(p32.probability - p16.probability) < 0.05
    assert p16.segmentation.shape == p32.segmentation.shape


def _in_thread(fn):
    """fn() run in a new thread; its result."""
    import threading

    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", fn()))
    t.start()
    t.join()
    return out["r"]


def test_flush_subnormals_reaches_the_calling_thread_and_the_threads_it_starts():
    # a subnormal float32 (~1.0e-39, below ~1.18e-38) from its bits: no float arithmetic, so it is made the same
    # whether or not this test's thread already flushes (earlier tests may have flushed the main thread)
    tiny = torch.tensor([0x000AE398], dtype=torch.int32).view(torch.float32)

    def product() -> float:
        return float((tiny * 1.0)[0])  # a subnormal input: read as 0 when flushed

    def plain() -> float:
        torch.set_flush_denormal(False)
        return product()

    assert _in_thread(plain) == pytest.approx(1e-39, rel=1e-3)

    def flushed_then_child() -> tuple[bool, float, float]:
        ok = flush_subnormals()
        return ok, product(), _in_thread(product)  # the child thread copies its creator's mode

    ok, here, child = _in_thread(flushed_then_child)
    if not ok:
        pytest.skip("this CPU has no flush-to-zero mode (torch.set_flush_denormal returned False)")
    assert here == 0.0 and child == 0.0


def test_cpu_description_names_the_model_and_its_bfloat16_units():
    xeon = "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8481C\nflags\t\t: fpu avx512_bf16 amx_bf16 amx_tile\n"
    epyc = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512f avx512_bf16\n\nprocessor\t: 1\n"
    old = "processor\t: 0\nmodel name\t: Old CPU\nflags\t\t: fpu avx2\n"
    assert P.cpu_description(xeon) == "Intel(R) Xeon(R) Platinum 8481C (AVX512-BF16, AMX)"
    assert P.cpu_description(epyc) == "AMD EPYC (AVX512-BF16, no AMX)"
    assert P.cpu_description(old) == "Old CPU (no AMX)"
    assert P.cpu_description("") == "unknown CPU"
    assert isinstance(P.cpu_description(), str)  # this machine's, whatever it is
