"""Grad-CAM: shape and range, hooks released, safe from several threads on one model."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from core.explain import gradcam
from core.models import build_model


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._backward_hooks) + len(m._forward_pre_hooks)
               for m in model.modules())


def test_gradcam_shape_range_and_hooks_released():
    torch.manual_seed(0)
    net = build_model("SmallCNN").eval()
    x = torch.randn(1, 1, 96, 96)
    before = _hooks(net)
    heat = gradcam(net, net.gradcam_layer(), x)
    assert heat.shape == (96, 96) and heat.dtype == np.float32
    assert heat.min() >= 0 and heat.max() <= 1 and heat.max() > 0
    assert _hooks(net) == before
    assert not net.training


def test_gradcam_cardiac_net():
    net = build_model("CardiacNet").eval()
    heat = gradcam(net, net.gradcam_layer(), torch.randn(1, 16, 112, 112), positive=False)
    assert heat.shape == (16, 112, 112)  # one map per slice: the U-Net runs on each slice
    assert heat.min() >= 0 and heat.max() <= 1
    assert _hooks(net) == 0


def test_gradcam_threads_agree_with_serial():
    torch.manual_seed(0)
    net = build_model("SmallCNN").eval()
    xs = [torch.randn(1, 1, 64, 64) for _ in range(6)]
    serial = [gradcam(net, net.gradcam_layer(), x) for x in xs]
    with ThreadPoolExecutor(4) as ex:
        parallel = list(ex.map(lambda x: gradcam(net, net.gradcam_layer(), x), xs))
    for a, b in zip(serial, parallel):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert _hooks(net) == 0


def test_gradcam_rejects_batches():
    net = build_model("SmallCNN").eval()
    with pytest.raises(ValueError):
        gradcam(net, net.gradcam_layer(), torch.randn(2, 1, 64, 64))


def test_gradcam_with_only_target_layer_grads_equals_package_output():
    """explain.gradcam turns off gradients upstream of the target layer to save memory; the maps must
    equal those of pytorch-grad-cam on the unchanged model, and the flags must be restored."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import BinaryClassifierOutputTarget

    torch.manual_seed(0)
    net = build_model("CardiacNet", in_channels=4).eval()
    x = torch.randn(1, 4, 64, 64)
    ours = gradcam(net, net.gradcam_layer(), x)
    assert all(p.requires_grad for p in net.parameters()) and all(p.grad is None for p in net.parameters())
    with GradCAM(model=net, target_layers=[net.gradcam_layer()]) as cam:
        ref = cam(input_tensor=x, targets=[BinaryClassifierOutputTarget(1)])
    ref = ref / np.maximum(ref.max(axis=(-2, -1), keepdims=True), 1e-12)
    np.testing.assert_allclose(ours, ref, atol=1e-6)
