"""8-bit integer (int8) inference for a U-Net: static post-training quantisation (PyTorch FX, x86 backend).

Weights are quantised per output channel, activations per tensor, with ranges observed while the float model
segments volumes it was trained on (``calibrate``). The observed ranges are small tensors that can be saved
beside the weights (``observer_state``) and put back on the same weights later (``from_observer_state``), so
nothing needs data at load time.
"""
from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from core.concurrency import fx_tracing
from core.models import UNet2D, check_unet_input


class _Body(nn.Module):
    """The U-Net without its input-shape check (which FX cannot trace): x (N, C, H, W) -> logits (N, K, H, W)."""

    def __init__(self, net: UNet2D) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z, skips = self.net.encode(x)
        return self.net.decode(z, skips)


class Int8UNet(nn.Module):
    """A quantised U-Net body behind the float model's input check: float (N, C, H, W) -> float logits."""

    def __init__(self, body: nn.Module, depth: int) -> None:
        super().__init__()
        self.body = body
        self.depth = depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_unet_input(x, self.depth)
        return self.body(x.float().contiguous())


def qconfig_mapping():
    """The x86 backend's default (per-channel weights, per-tensor activations), with the transposed
    convolutions left in float: quantised, they gave outputs unrelated to the float model's with torch 2.14.1's
    x86 and fbgemm engines (every pixel wrong on a real volume), and they are 4 of the 23 convolution layers."""
    from torch.ao.quantization import get_default_qconfig_mapping

    return get_default_qconfig_mapping("x86").set_object_type(nn.ConvTranspose2d, None)


def prepare(model: UNet2D) -> nn.Module:
    """An observing copy of a float U-Net in eval mode (``model`` itself is left as it is); run float inputs
    (N, C, H, W) through it to record activation ranges, then ``convert``."""
    from torch.ao.quantization.quantize_fx import prepare_fx

    if not isinstance(model, UNet2D):
        raise TypeError(f"int8 inference is built for UNet2D, got {type(model).__name__}")
    if model.training:
        raise ValueError("quantise a model in eval mode")
    net = copy.deepcopy(model).to(memory_format=torch.contiguous_format).eval()
    for parent in list(net.modules()):  # batch norm folded away (optimize_for_inference) leaves Identity
        for name, child in list(parent.named_children()):  # modules that would keep conv and ReLU apart
            if isinstance(child, nn.Sequential) and any(isinstance(m, nn.Identity) for m in child):
                setattr(parent, name, nn.Sequential(*[m for m in child if not isinstance(m, nn.Identity)]))
    body = _Body(net).eval()
    # FX graph-mode quantisation is marked for migration to torchao; it is the pinned torch's (2.14.1) eager,
    # kernel-backed int8 path, used here on purpose, so its notices are not passed on
    # fx_tracing: the tracer patches every module's __call__ in the process while it runs (see core.concurrency)
    with warnings.catch_warnings(), fx_tracing():
        warnings.simplefilter("ignore")
        example = torch.zeros(1, model.down[0][0].in_channels, 2**model.depth, 2**model.depth)
        return prepare_fx(body, qconfig_mapping(), example_inputs=(example,))


def convert(prepared: nn.Module, depth: int) -> Int8UNet:
    """The int8 model from an observing copy that has seen its calibration inputs (``prepared`` is used up:
    take ``observer_state`` first if it is wanted)."""
    from torch.ao.quantization.quantize_fx import convert_fx

    with warnings.catch_warnings(), fx_tracing():
        warnings.simplefilter("ignore")
        q = convert_fx(prepared)
    return Int8UNet(q, depth).eval()


def calibrate(model: UNet2D, run: Callable[[nn.Module], None]) -> tuple[Int8UNet, dict]:
    """Quantise ``model`` with activation ranges observed while ``run(observer_model)`` feeds it (float32,
    no autocast). Returns the int8 model and the observed ranges (``observer_state``)."""
    prepared = prepare(model)
    with torch.inference_mode():
        run(prepared)
    state = observer_state(prepared)
    return convert(prepared, model.depth), state


def observer_state(prepared: nn.Module) -> dict[str, torch.Tensor]:
    """The observers' buffers of a calibrated observing copy (activation ranges; no weights)."""
    return {k: v.detach().clone() for k, v in prepared.state_dict().items() if "activation_post_process" in k}


def from_observer_state(model: UNet2D, state: dict[str, torch.Tensor]) -> Int8UNet:
    """The int8 model of float ``model`` with saved activation ranges (``observer_state``) put back."""
    prepared = prepare(model)
    own = prepared.state_dict()
    missing = sorted(k for k in own if "activation_post_process" in k and k not in state)
    extra = sorted(k for k in state if k not in own)
    if missing or extra:
        raise ValueError(f"saved activation ranges do not fit this network (missing {missing[:3]}, "
                         f"unexpected {extra[:3]})")
    prepared.load_state_dict({**own, **state})
    return convert(prepared, model.depth)


# --------------------------------------------------------------------------- saved ranges beside the weights
def ranges_paths(task: str, wdir=None) -> tuple[Path, Path]:
    """(``<task>.int8.pt``, ``<task>.int8.json``): the observed activation ranges and their card."""
    from core.config import weights_dir

    d = weights_dir(wdir)
    return d / f"{task}.int8.pt", d / f"{task}.int8.json"


def save_ranges(state: dict[str, torch.Tensor], info: dict, task: str, weights_sha256: str, wdir=None) -> dict:
    """Write the activation ranges of ``task``'s weights (sha256 ``weights_sha256``) and their card (``info``
    plus both checksums, torch version, date, commit); returns the card."""
    from datetime import datetime, timezone

    from core.checkpoint import _atomic_write, git_commit, json_bytes, sha256_bytes, state_bytes

    pt, js = ranges_paths(task, wdir)
    data = state_bytes(state)
    card = {**info, "weights_sha256": weights_sha256, "ranges_sha256": sha256_bytes(data),
            "torch_version": torch.__version__, "git_commit": git_commit(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    _atomic_write(pt, data)
    _atomic_write(js, json_bytes(card))
    return card


def read_ranges_card(task: str, weights_sha256: str, wdir=None) -> dict | None:
    """The card of ``task``'s saved activation ranges when they were observed on these weights (sha256) and
    their file is intact; None otherwise (then the task has no int8 model)."""
    import json

    from core.checkpoint import sha256_bytes

    pt, js = ranges_paths(task, wdir)
    if not (pt.is_file() and js.is_file()):
        return None
    try:
        card = json.loads(js.read_text())
    except ValueError:
        return None
    if card.get("weights_sha256") != weights_sha256 or card.get("ranges_sha256") != sha256_bytes(pt.read_bytes()):
        return None
    return card


def load_ranges(task: str, weights_sha256: str, wdir=None) -> dict[str, torch.Tensor]:
    """The saved activation ranges of ``task``'s weights; ValueError when none fit them (``read_ranges_card``)."""
    import io

    if read_ranges_card(task, weights_sha256, wdir) is None:
        raise ValueError(f"no int8 activation ranges for these {task} weights in {ranges_paths(task, wdir)[0].parent}")
    return torch.load(io.BytesIO(ranges_paths(task, wdir)[0].read_bytes()), map_location="cpu", weights_only=True)


def engine_available() -> bool:
    """Whether this torch build has the x86 quantised kernels (FBGEMM/oneDNN) the int8 model runs on."""
    return "x86" in torch.backends.quantized.supported_engines
