"""Numeric precision: where bfloat16 runs natively, and which precision inference uses.

The models are trained with bfloat16 autocast where the hardware runs it (see ``core.train.fit``).
The U-Nets (cardiac, atrium) also infer with bfloat16 autocast on such hardware (the atrium U-Net's
forward passes about 2.7x faster on a 2-core CPU with AMX), and in float32 elsewhere, where bfloat16
would be emulated and slower. The X-ray CNN gains nothing from it and stays float32 (registry:
``TaskSpec.bf16_inference``). Grad-CAM and the out-of-distribution check always run in float32: their
maps and thresholds were made that way. ``MEDIMG_PRECISION=float32`` turns bfloat16 off everywhere.

A task whose weights carry int8 activation ranges (``core.quantize``; registry ``TaskSpec.int8_inference``:
the atrium U-Net) runs 8-bit integer passes instead on CPUs without AMX, where they were measured faster
than bfloat16 with the same masks (a 2-core EPYC with AVX512-BF16: ``benchmarks/logs/atrium-int8-oof.json``).
With AMX, where bfloat16 runs on the matrix units, "auto" keeps bfloat16: int8 was not measured there.
Training's autocast is :func:`autocast_for`; inference's is :func:`autocast`.
"""
from __future__ import annotations

import contextlib
import os

import torch

from core.errors import MedImgError

PRECISION_ENV = "MEDIMG_PRECISION"
PRECISIONS = ("auto", "float32", "bfloat16", "int8")


def _cpu_fields(cpuinfo: str | None = None) -> dict[str, str]:
    """The first value of each field of /proc/cpuinfo (or of the text ``cpuinfo``); {} where unreadable."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            return {}
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    return fields


def cpu_description(cpuinfo: str | None = None) -> str:
    """The CPU's model name and its bfloat16 hardware, e.g. "AMD EPYC (AVX512-BF16, no AMX)", from
    /proc/cpuinfo (or the text ``cpuinfo``); "unknown CPU" where it cannot be read. Timings depend on both:
    the atrium U-Net's bfloat16 passes ran about 1.5x faster on a 2-core Xeon with AMX than on a 2-core
    EPYC with AVX512-BF16 alone."""
    fields = _cpu_fields(cpuinfo)
    if "model name" not in fields and "flags" not in fields:
        return "unknown CPU"
    name = fields.get("model name") or "unknown CPU"
    flags = set(fields.get("flags", "").split())
    units = ["AMX" if "amx_bf16" in flags else "no AMX"]
    if "avx512_bf16" in flags:
        units.insert(0, "AVX512-BF16")
    return f"{name} ({', '.join(units)})"


def has_amx(cpuinfo: str | None = None) -> bool:
    """Whether the CPU has AMX matrix units (``amx_bf16`` among /proc/cpuinfo's flags, or ``cpuinfo``'s)."""
    return "amx_bf16" in _cpu_fields(cpuinfo).get("flags", "").split()


class PrecisionError(MedImgError, ValueError):
    """An unknown precision was asked for (argument or environment)."""


def native_bf16(device: torch.device) -> bool:
    """True where bfloat16 matrix maths runs in hardware: CUDA GPUs that support it, or CPUs with
    AVX512-BF16 / AMX (oneDNN). Elsewhere bf16 is emulated and slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def inference_precision(requested: str | None = None, device: torch.device | None = None,
                        bf16_allowed: bool = True, int8_ready: bool = False, amx: bool | None = None) -> str:
    """Resolve the inference precision: ``requested``, else $MEDIMG_PRECISION, else "auto".

    "auto" means "int8" where the task has an int8 model (``int8_ready``: registry, saved activation
    ranges for these weights, quantised kernels in this torch) and the CPU has no AMX (``amx``; default:
    this CPU's flags); else "bfloat16" where the task allows it (``bf16_allowed``, from the registry) and
    ``device`` (default CPU) runs it natively; else "float32". An explicit "float32" or "bfloat16" is used
    as asked; an explicit "int8" where the task has an int8 model, else as "auto" without it. Returns
    "float32", "bfloat16" or "int8".
    """
    source = "the precision argument" if requested else f"${PRECISION_ENV}"
    choice = (requested or os.environ.get(PRECISION_ENV) or "auto").strip().lower()
    if choice not in PRECISIONS:
        raise PrecisionError(f"{source} is {choice!r}; use one of: {', '.join(PRECISIONS)}.")
    dev = device or torch.device("cpu")
    if choice == "int8" or (choice == "auto" and not (has_amx() if amx is None else amx)):
        if int8_ready and dev.type == "cpu":
            return "int8"
        choice = "auto"
    if choice == "auto":
        return "bfloat16" if bf16_allowed and native_bf16(dev) else "float32"
    return choice


def autocast(precision: str, device: torch.device | None = None) -> contextlib.AbstractContextManager:
    """bfloat16 autocast for ``precision == "bfloat16"``, else a no-op context (float32; and int8, whose
    model takes float32 inputs and quantises them itself)."""
    if precision == "bfloat16":
        return torch.autocast((device or torch.device("cpu")).type, dtype=torch.bfloat16)
    if precision in ("float32", "int8"):
        return contextlib.nullcontext()
    raise PrecisionError(f"precision must be 'float32', 'bfloat16' or 'int8', got {precision!r}")


def autocast_for(device: torch.device, enabled: bool = True):
    """bfloat16 autocast on ``device`` when ``enabled`` and native there (weights and optimizer stay
    float32); otherwise a no-op context. On a 2-core AVX512-BF16/AMX CPU with channels-last memory it
    trains the U-Nets 2-4x faster (`python -m core.bench`, "training")."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled and native_bf16(device))


def flush_subnormals() -> bool:
    """Treat subnormal floats (below ~1.2e-38) as zero in the calling thread and in the threads it starts
    from now on (torch's worker threads copy the floating-point mode of the thread that creates them, so
    call this before a thread's first torch operation; later it does not reach workers already running).

    Some x86 CPUs compute subnormals many times slower: on one 2-core CPU of this project a float32 pass
    of the atrium U-Net over a real LGE volume took 25 s with them and 1.6 s without. Outputs change only
    where values are that small. Returns False where the CPU offers no such mode (then nothing changes)."""
    return bool(torch.set_flush_denormal(True))
