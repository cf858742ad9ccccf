"""Where training runs and in which precision: checked before any work, with the param named."""

from __future__ import annotations

import contextlib

import torch

from .errors import ConfigError


def available_devices() -> list[str]:
    found = ["cpu"]
    if torch.cuda.is_available():
        found.insert(0, "cuda")
    if torch.backends.mps.is_available():
        found.insert(0, "mps")
    return found


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks cuda, else mps, else cpu; an explicit device that is not there is an error."""
    available = available_devices()
    if name == "auto":
        return torch.device(available[0])
    if name not in available:
        raise ConfigError(
            f"runtime.device: {name} is not available on this machine; "
            f"available: auto, {', '.join(available)}"
        )
    return torch.device(name)


def cpu_supports_bf16() -> bool:
    """Native bf16 arithmetic (AVX512-BF16 or AMX); without it, bf16 on the CPU is emulated and slower
    than fp32."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``runtime.precision`` on ``device`` (None: plain fp32)."""
    if precision == "fp32":
        return None
    if precision == "fp16":
        if device.type != "cuda":
            raise ConfigError(
                f"runtime.precision: fp16 needs a CUDA device (training runs on {device.type}); "
                "allowed here: fp32, bf16"
            )
        return torch.float16
    supported = (
        torch.cuda.is_bf16_supported()
        if device.type == "cuda"
        else device.type == "cpu" and cpu_supports_bf16()
    )
    if not supported:
        raise ConfigError(
            f"runtime.precision: this {device.type} has no native bf16 support; allowed here: fp32"
        )
    return torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def training_device(device: str, precision: str) -> tuple[torch.device, torch.dtype | None]:
    """The device and autocast dtype for ``runtime.device`` and ``runtime.precision``; unavailable ones are
    a ConfigError."""
    resolved = resolve_device(device)
    return resolved, autocast_dtype(precision, resolved)
