"""Preprocessing shapes/values and model output shapes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from core import preprocess as pp
from core.errors import InvalidInputError
from core.models import build_model
from core.tasks import TASKS, get_task


def test_xray_preprocess_stretches_to_square():
    x = pp.preprocess_xray(np.random.default_rng(0).random((300, 200)).astype(np.float32))
    assert x.shape == (1, pp.XRAY_SIZE, pp.XRAY_SIZE)
    assert -2.1 <= float(x.min()) and float(x.max()) <= 2.1  # (x-0.5)/0.25 of [0, 1]


def test_cardiac_slices_and_crop():
    assert list(pp.cardiac_slice_indices(10)) == [0, 1, 3, 4, 5, 6, 8, 9]  # round(linspace(0, 9, 8))
    assert list(pp.cardiac_slice_indices(6)) == [0, 1, 1, 2, 3, 4, 4, 5]
    ed = np.random.default_rng(0).random((216, 256, 10)).astype(np.float32)
    x = pp.preprocess_cardiac(ed, ed.copy())
    assert x.shape == (2 * pp.CARDIAC_SLICES, pp.CARDIAC_SIZE, pp.CARDIAC_SIZE)
    lab = np.zeros((216, 256, 10))
    lab[100:120, 120:140, :] = 3
    m = pp.cardiac_frame(lab, mask=True)
    assert m.dtype == torch.long and set(m.unique().tolist()) <= {0, 3}
    with pytest.raises(InvalidInputError, match="differ in size"):
        pp.preprocess_cardiac(ed, ed[:, :, :8])
    with pytest.raises(InvalidInputError, match="at least 3 slices"):
        pp.cardiac_frame(ed[:, :, :2])


@pytest.mark.parametrize("shape,spacing", [((256, 256, 7), (1.25, 1.25, 1.37)), ((200, 180, 5), (0.625, 0.7, 2.0))])
def test_atrium_slices_roundtrip(shape, spacing):
    vol = np.random.default_rng(0).random(shape).astype(np.float32)
    stack, geom = pp.atrium_slices(vol, spacing)
    assert stack.shape[0] == shape[2] and stack.shape[1] == 2 * pp.ATRIUM_CONTEXT + 1
    assert stack.shape[2] % 16 == 0 and stack.shape[3] % 16 == 0
    # the centre channel of slice k is slice k of the volume (after resampling)
    prob = torch.zeros(shape[2], *stack.shape[2:])
    back = pp.atrium_restore(prob, geom)
    assert back.shape == shape
    lab = np.zeros(shape, np.uint8)
    lab[50:80, 60:90, 2] = 1
    ls = pp.atrium_label_slices(lab, geom)
    assert ls.shape == (shape[2], *stack.shape[2:])
    restored = pp.atrium_restore(ls, geom) > 0.5
    assert (restored[..., 2] == lab[..., 2].astype(bool)).mean() > 0.99


def test_atrium_grid_follows_the_requested_spacing():
    vol = np.random.default_rng(0).random((256, 200, 4)).astype(np.float32)
    stack, geom = pp.atrium_slices(vol, (1.25, 1.25, 1.37), grid_mm=2.0)
    # 256 x 1.25 / 2.0 = 160; 200 x 1.25 / 2.0 = 125 -> padded to 128
    assert geom.resampled_xy == (160, 125) and geom.padded_xy == (160, 128)
    assert stack.shape == (4, 2 * pp.ATRIUM_CONTEXT + 1, 160, 128)
    assert pp.atrium_restore(torch.zeros(4, 160, 128), geom).shape == (256, 200, 4)
    with pytest.raises(ValueError, match="in-plane grid"):
        pp.atrium_padded(vol, (1.25, 1.25, 1.37), grid_mm=0.0)


def test_largest_component():
    m = np.zeros((10, 10, 10), np.uint8)
    m[1:3, 1:3, 1:3] = 1
    m[5:9, 5:9, 5:9] = 1
    out = pp.largest_component(m)
    assert out.sum() == 64 and out[1, 1, 1] == 0


@pytest.mark.parametrize("task", list(TASKS))
def test_model_output_shapes(task):
    spec = get_task(task)
    net = build_model(spec.architecture, **spec.model_kwargs).eval()
    c = spec.model_kwargs["in_channels"]
    s = spec.input_spec.get("size", 64)
    with torch.no_grad():
        out = net(torch.zeros(2, c, s, s))
    assert out.shape == ((2, 1) if spec.kind == "binary" else (2, 1, s, s))
    n_bytes = sum(p.numel() for p in net.parameters()) * 4
    assert n_bytes < 20e6


def test_cardiac_forward_all_shapes():
    net = build_model("CardiacNet").eval()
    with torch.no_grad():
        logit, seg = net.forward_all(torch.zeros(2, 16, 112, 112))
    assert logit.shape == (2, 1) and seg.shape == (2, 16, 4, 112, 112)
    with pytest.raises(ValueError, match=r"\(N, 16, H, W\)"):
        net(torch.zeros(1, 10, 112, 112))


def test_cardiac_shape_features_known_values():
    """Descriptors of hand-made masks: ED LV 400 px, ES LV 100 px -> LV ES/ED = 0.25, and so on."""
    net = build_model("CardiacNet", in_channels=2).eval()
    m = torch.zeros(1, 2, 40, 40, dtype=torch.long)
    m[0, 0, :20, :20] = 3  # ED LV cavity 400 px
    m[0, 0, 20:30, :20] = 2  # ED myocardium 200 px
    m[0, 0, 30:40, :10] = 1  # ED RV 100 px
    m[0, 1, :10, :10] = 3  # ES LV 100 px
    m[0, 1, 20:30, :20] = 2  # ES myocardium 200 px
    m[0, 1, 30:40, :5] = 1  # ES RV 50 px
    f = net.shape_features(net.mask_logits(m))[0].numpy()
    e = 1e-3  # the model adds this to every area fraction before dividing
    lv_ed, my_ed, rv_ed = 400 / 1600 + e, 200 / 1600 + e, 100 / 1600 + e  # of the 40 x 40 slice
    lv_es, rv_es = 100 / 1600 + e, 50 / 1600 + e
    np.testing.assert_allclose(f[0], lv_es / lv_ed, rtol=1e-4)  # about 0.25: LV ES / ED
    np.testing.assert_allclose(f[1], rv_es / rv_ed, rtol=1e-4)  # about 0.5
    np.testing.assert_allclose(f[2], my_ed / lv_ed, rtol=1e-4)
    np.testing.assert_allclose(f[3], rv_ed / lv_ed, rtol=1e-4)
    np.testing.assert_allclose(f[5], np.log(lv_ed), rtol=1e-4)


def test_model_arguments_are_validated():
    with pytest.raises(ValueError, match="positive integer"):
        build_model("SmallCNN", base=0)
    with pytest.raises(ValueError, match="dropout"):
        build_model("SmallCNN", dropout=1.5)
    with pytest.raises(ValueError, match="Unknown architecture"):
        build_model("ResNet")
    with pytest.raises(ValueError, match="multiples of 16"):
        build_model("UNet2D")(torch.zeros(1, 3, 30, 30))
    with pytest.raises(ValueError, match="Unknown task"):
        get_task("brain")


# --------------------------------------------------------------------------- viewer: window/level and zoom


def test_window_maps_level_and_width_to_black_and_white():
    from core.visualize import Window

    w = Window(center=100.0, width=200.0)  # 0 -> black, 200 -> white, linear between
    assert np.allclose(w.apply(np.array([-50.0, 0.0, 50.0, 100.0, 200.0, 300.0])), [0, 0, 0.25, 0.5, 1, 1])
    inv = Window(100.0, 200.0, invert=True)  # MONOCHROME1: white is low
    assert np.allclose(inv.apply(np.array([0.0, 50.0, 200.0])), [1, 0.75, 0])
    for c, wd in ((0.0, 0.0), (0.0, -1.0), (float("nan"), 1.0)):
        with pytest.raises(ValueError):
            Window(c, wd)


def test_percentile_window_and_zoom_view():
    from core.visualize import percentile_window, zoom_view

    w = percentile_window(np.arange(101, dtype=np.float32), 10, 90)
    assert w.center == pytest.approx(50.0) and w.width == pytest.approx(80.0)
    # a volume too large to read whole is sampled on a grid: 1st-99th percentile of 0..99 along z, in any order
    vol = np.broadcast_to(np.arange(100, dtype=np.float32), (200, 200, 100))
    for v in (vol, vol.transpose(2, 0, 1)[::-1]):
        w = percentile_window(v)
        assert w.center == pytest.approx(49.5, abs=0.5) and w.width == pytest.approx(97.0, abs=1.0)
    img = np.arange(100 * 80).reshape(100, 80)
    assert zoom_view(img, 1.0).shape == (100, 80)
    z = zoom_view(img, 2.0)  # centred: rows 25-74, columns 20-59
    assert z.shape == (50, 40) and z[0, 0] == img[25, 20]
    corner = zoom_view(img, 4.0, fx=0.0, fy=1.0)  # bottom-left corner, kept inside the image
    assert corner.shape == (25, 20) and corner[0, 0] == img[75, 0]
    with pytest.raises(ValueError):
        zoom_view(img, 0.5)


def test_fit_for_display_shrinks_only_large_images():
    from core.visualize import fit_for_display

    small = np.zeros((300, 200, 3), np.uint8)
    assert fit_for_display(small) is small
    big = np.zeros((3000, 1500, 3), np.uint8)
    big[:, 750:] = 200  # right half bright: stays the right half, area-averaged at the seam
    out = fit_for_display(big, 1000)
    assert out.shape == (1000, 500, 3) and out[:, :249].max() == 0 and out[:, 251:].min() == 200
