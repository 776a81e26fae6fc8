"""Grad-CAM through the pytorch-grad-cam package; hooks are released after each call."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from core.concurrency import model_lock


def gradcam(model: nn.Module, layer: nn.Module, x: torch.Tensor, positive: bool = True) -> np.ndarray:
    """Grad-CAM heatmap for a binary classifier.

    x: (1, C, H, W) input. Explains the positive class when ``positive``, else the negative one.
    Returns (H, W) float32 in [0, 1]; for a model whose target layer sees each input channel as its
    own image (CardiacNet: one U-Net pass per slice) one map per channel, (C, H, W), each scaled to
    [0, 1] on its own by the package.
    """
    # imported here so that training (which needs no explanations) does not depend on grad-cam
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import BinaryClassifierOutputTarget

    if x.ndim != 4 or x.shape[0] != 1:
        raise ValueError(f"expected a (1, C, H, W) tensor, got {tuple(x.shape)}")
    target = [BinaryClassifierOutputTarget(1 if positive else 0)]
    with model_lock(model):
        was_training = model.training
        model.eval()
        # Only the target layer's parameters need gradients: the heatmap needs d(score)/d(activation)
        # and nothing upstream, so autograd then keeps far fewer activations (the cardiac model runs its
        # U-Net on 16 slices; this about halves that request's peak memory). Restored afterwards.
        flags = {p: p.requires_grad for p in model.parameters()}
        own = {id(p) for p in layer.parameters()}
        try:
            for p in model.parameters():
                p.requires_grad_(id(p) in own)
            with GradCAM(model=model, target_layers=[layer]) as cam:
                heat = cam(input_tensor=x, targets=target)
        finally:
            for p, flag in flags.items():
                p.requires_grad_(flag)
                p.grad = None
        heat = heat[0] if heat.shape[0] == 1 else heat
        model.train(was_training)
    heat = np.nan_to_num(heat.astype(np.float32))
    hi = heat.max(axis=(-2, -1), keepdims=True)
    return np.where(hi > 0, heat / np.where(hi > 0, hi, 1), heat).astype(np.float32)
