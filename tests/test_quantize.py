"""int8 inference (core.quantize) and how the app chooses it (core.precision, core.runtime): a small U-Net
against its float self, the saved ranges tied to their weights, and the committed atrium model's int8 masks
against float32 on a real volume."""
from __future__ import annotations

import shutil

import numpy as np

import pytest
import torch
from torch import nn

from core import quantize as Q
from core.models import UNet2D, optimize_for_inference
from core.precision import PRECISION_ENV, PrecisionError, autocast, has_amx, inference_precision

pytestmark = pytest.mark.skipif(not Q.engine_available(), reason="this torch build has no x86 quantised kernels")


def _discs(n: int, side: int = 32, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """n noisy images (n, 3, side, side) each with a bright disc, and the discs (n, 1, side, side)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    c = torch.randint(8, side - 8, (n, 2), generator=g)
    r = torch.randint(4, 8, (n,), generator=g)
    y = ((yy - c[:, :1, None]) ** 2 + (xx - c[:, 1:, None]) ** 2 < r[:, None, None] ** 2).float()[:, None]
    return y.expand(n, 3, side, side) * 2 + 0.5 * torch.randn(n, 3, side, side, generator=g), y


_TRAINED: dict[int, dict] = {}


def _net(seed: int = 0) -> UNet2D:
    """A small U-Net trained for a few seconds to find the discs (a random one gives near-constant outputs,
    against which a quantisation error means nothing); the same weights on every call."""
    if seed not in _TRAINED:
        torch.manual_seed(seed)
        net = UNet2D(in_channels=3, out_channels=1, base=4, depth=2)
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        x, y = _discs(64, seed=seed + 10)
        for i in range(200):
            b = slice((i % 8) * 8, (i % 8) * 8 + 8)
            loss = nn.functional.binary_cross_entropy_with_logits(net(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
        _TRAINED[seed] = {k: v.clone() for k, v in net.state_dict().items()}
    net = UNet2D(in_channels=3, out_channels=1, base=4, depth=2)
    net.load_state_dict(_TRAINED[seed])
    return net.eval()


def _inputs(n: int = 6, side: int = 32) -> list[torch.Tensor]:
    return list(_discs(2 * n, side, seed=2)[0].split(2))


def _calibrated(net: nn.Module):
    xs = _inputs()
    return Q.calibrate(net, lambda m: [m(x) for x in xs])


def test_int8_unet_follows_its_float_model():
    net = _net()
    q, state = _calibrated(net)
    x, y = _discs(8, seed=3)  # not the calibration images
    with torch.inference_mode():
        ref, out = net(x), q(x)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert float(((ref > 0) == (y > 0.5)).float().mean()) > 0.95  # the float net does find the discs
    # 8-bit activations: the error is a small part of the logits' spread, and the mask holds
    assert float((out - ref).abs().mean()) < 0.1 * float(ref.std())
    assert float(((out > 0) == (ref > 0)).float().mean()) > 0.98
    assert state and all("activation_post_process" in k for k in state)


def test_batch_norm_folded_first_gives_the_same_int8_model():
    """The app folds batch norm before quantising (optimize_for_inference leaves Identity modules where the
    norms were); the ranges observed either way are the same layers', and the outputs agree."""
    net = _net()
    q_plain, _ = _calibrated(net)
    folded = optimize_for_inference(_net())
    q_fold, _ = _calibrated(folded)
    x = _inputs(1)[0]
    with torch.inference_mode():
        a, b = q_plain(x), q_fold(x)
    assert float((a - b).abs().max()) < 0.05 * float(a.abs().max())
    names = {type(m).__name__ for m in q_fold.modules()}
    assert "ConvReLU2d" in names and "Identity" not in names  # conv and ReLU fused, nothing left between


def test_transposed_convolutions_stay_float_and_the_rest_is_quantised():
    q, _ = _calibrated(_net())
    ups = [m for m in q.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert len(ups) == 2 and all(m.weight.dtype == torch.float32 for m in ups)
    quantised = [m for m in q.modules() if type(m).__module__.startswith("torch.ao.nn.intrinsic.quantized")
                 or type(m).__module__.startswith("torch.ao.nn.quantized")]
    assert len(quantised) >= 6  # the 3x3 convolutions (with their ReLU) and the 1x1 output


def test_saved_ranges_rebuild_the_same_int8_model():
    net = _net()
    q, state = _calibrated(net)
    q2 = Q.from_observer_state(_net(), state)
    x = _inputs(1)[0]
    with torch.inference_mode():
        assert torch.equal(q(x), q2(x))
    with pytest.raises(ValueError, match="do not fit this network"):
        Q.from_observer_state(UNet2D(in_channels=3, out_channels=1, base=4, depth=3).eval(), state)


def test_input_checks():
    q, _ = _calibrated(_net())
    with pytest.raises(ValueError, match="multiples of 4"):
        q(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError, match="eval mode"):
        Q.prepare(_net().train())
    with pytest.raises(TypeError, match="UNet2D"):
        Q.prepare(nn.Conv2d(3, 1, 3).eval())


def test_ranges_file_is_tied_to_its_weights(tmp_path):
    _, state = _calibrated(_net())
    card = Q.save_ranges(state, {"calibration_cases": ["a"]}, "atrium", "w" * 64, tmp_path)
    assert card["weights_sha256"] == "w" * 64 and len(card["ranges_sha256"]) == 64
    assert Q.read_ranges_card("atrium", "w" * 64, tmp_path)["calibration_cases"] == ["a"]
    loaded = Q.load_ranges("atrium", "w" * 64, tmp_path)
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], state[k]) for k in state)
    assert Q.read_ranges_card("atrium", "x" * 64, tmp_path) is None  # other weights: no int8 model
    with pytest.raises(ValueError, match="no int8 activation ranges"):
        Q.load_ranges("atrium", "x" * 64, tmp_path)
    pt, _ = Q.ranges_paths("atrium", tmp_path)
    pt.write_bytes(pt.read_bytes() + b"x")  # a damaged file is not used either
    assert Q.read_ranges_card("atrium", "w" * 64, tmp_path) is None


def test_precision_choice_with_int8(monkeypatch):
    monkeypatch.delenv(PRECISION_ENV, raising=False)
    assert inference_precision(int8_ready=True, amx=False) == "int8"
    assert inference_precision(int8_ready=True, amx=True) in ("bfloat16", "float32")  # AMX: bfloat16 stays
    assert inference_precision(int8_ready=False, amx=False) in ("bfloat16", "float32")
    assert inference_precision("int8", int8_ready=True, amx=True) == "int8"  # asked for explicitly
    assert inference_precision("int8", int8_ready=False) == inference_precision("auto", int8_ready=False)
    assert inference_precision("float32", int8_ready=True, amx=False) == "float32"
    assert inference_precision(int8_ready=True, amx=False, device=torch.device("meta")) == "float32"
    monkeypatch.setenv(PRECISION_ENV, "int8")
    assert inference_precision(int8_ready=True, amx=True) == "int8"
    with autocast("int8"):
        assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(PrecisionError):
        autocast("int4")


def test_amx_is_read_from_the_cpu_flags():
    assert has_amx("model name : X\nflags : fpu avx512_bf16 amx_bf16 amx_tile\n")
    assert not has_amx("model name : Y\nflags : fpu avx512_bf16 avx512_vnni\n")
    assert not has_amx("")


def test_weights_without_their_ranges_run_in_a_float_precision(tmp_path, monkeypatch):
    """Weights retrained (or copied) without ranges observed on them never run as int8."""
    from core.checkpoint import weights_dir
    from core.inference import load_model

    monkeypatch.delenv(PRECISION_ENV, raising=False)
    # the weights with the localiser and refiner their card names (without them the card's model is refused:
    # tests/test_atrium.py, tests/test_refine3d.py)
    for f in ("atrium.pt", "atrium.json", "atrium_localiser.pt", "atrium_localiser.json", "atrium_refiner.pt",
              "atrium_refiner.json"):
        if (weights_dir() / f).is_file():
            shutil.copy(weights_dir() / f, tmp_path / f)
    assert load_model("atrium", tmp_path, precision="int8").precision in ("bfloat16", "float32")
    if (weights_dir() / "atrium.int8.pt").is_file():
        shutil.copy(weights_dir() / "atrium.int8.pt", tmp_path / "atrium.int8.pt")
        shutil.copy(weights_dir() / "atrium.int8.json", tmp_path / "atrium.int8.json")
        lm = load_model("atrium", tmp_path, precision="int8")
        assert lm.precision == "int8" and isinstance(lm.model, Q.Int8UNet)


def test_committed_atrium_model_has_int8_ranges_and_picks_them_where_it_should(monkeypatch):
    from core.checkpoint import read_card, weights_dir
    from core.inference import load_model

    monkeypatch.delenv(PRECISION_ENV, raising=False)
    card = read_card("atrium")
    rc = Q.read_ranges_card("atrium", card["weights_sha256"], weights_dir())
    assert rc is not None, "weights/atrium.int8.* missing or not observed on the committed weights"
    assert set(rc["calibration_cases"]) <= set(card["data"]["train_cases"])
    assert all(r["fired"] == r["n"] for r in rc["quality_check_foreign_inputs"].values())
    assert load_model("atrium").precision == ("bfloat16" if has_amx() else "int8")
    assert load_model("atrium", precision="float32").precision == "float32"


def test_atrium_calibration_feed_sees_the_volumes_then_augmented_training_crops(monkeypatch):
    """The int8 ranges are observed on the calibration volumes segmented as the app does, then on
    INT8_AUGMENTED_BATCHES batches of 32 augmented 128x128 training crops (core.atrium.int8_calibration_feed)."""
    from core import atrium as A

    class Recorder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.shapes: list[tuple[int, ...]] = []
            self.inputs: list[torch.Tensor] = []

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.shapes.append(tuple(x.shape))
            self.inputs.append(x.clone())
            return torch.zeros(x.shape[0], 1, *x.shape[2:])

    monkeypatch.setattr(A, "INT8_AUGMENTED_BATCHES", 3)  # the app's 20 take a while; the rule is the same
    rng = np.random.default_rng(0)
    zz, yy, xx = np.meshgrid(np.arange(20), np.arange(64), np.arange(64), indexing="ij")
    lab = ((xx - 32) ** 2 + (yy - 30) ** 2 + 4 * (zz - 10) ** 2 < 12**2).astype(np.uint8).transpose(2, 1, 0)
    vols = [A.CanonicalCase(f"c{i}", ds, (lab * 2 + rng.normal(0, 0.3, lab.shape)).astype(np.float32), lab,
                            (1.25, 1.25, 2.5)) for i, ds in enumerate(("MSD", "LGE"))]
    rec = Recorder()
    A.int8_calibration_feed(vols, (2,), 1.25, 0.5, 1)(rec)
    crops = [s for s in rec.shapes if s == (32, 3, 128, 128)]
    assert len(crops) == 3
    whole = [s for s in rec.shapes if s != (32, 3, 128, 128)]
    assert whole and all(s[1:] == (3, 64, 64) for s in whole)  # the volumes' own slices on the model's grid
    assert sum(s[0] for s in whole) >= 2 * 20 // 2  # both volumes, at least every second slice
    # the same inputs again, whatever the global random state (the same weights always get the same ranges),
    # and the global state is left as it was
    torch.manual_seed(123)
    torch.rand(7)
    state = torch.random.get_rng_state()
    again = Recorder()
    A.int8_calibration_feed(vols, (2,), 1.25, 0.5, 1)(again)
    assert len(again.inputs) == len(rec.inputs) and all(torch.equal(a, b) for a, b in zip(rec.inputs, again.inputs))
    assert torch.equal(torch.random.get_rng_state(), state)
