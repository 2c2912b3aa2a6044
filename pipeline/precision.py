"""Mixed precision: which dtype the model's matrix work runs in, for training and inference.

`fp32` runs everything in float32. `bf16` and `fp16` run convolutions and matrix products under
`torch.autocast`; weights, optimizer state and checkpoints stay float32. What must stay float32
does: the predictors' outputs are cast back (so classifier softmax, box decoding and the losses
are float32, and autocast keeps losses float32 anyway), and position-sensitive RoIAlign, which
has no bfloat16 CPU kernel in torchvision, pools float32 maps (`detector.heads.LevelPooler`).

- CUDA: `fp16` with a gradient scaler (losses scaled so small gradients survive float16), or
  `bf16` where the GPU has it (Ampere and later), no scaler needed.
- CPU: `bf16` only; it pays where the CPU computes bfloat16 natively (AVX512-BF16 or AMX). On
  a CPU without either, oneDNN emulates it: it works, slower than fp32 (measured 1.5x slower
  for a ResNet-18 training step on an AVX-512 Xeon without BF16, 2026-12-06; docs/results.md), and a
  warning says so. `fp16` on a CPU is refused.
"""

from __future__ import annotations

import contextlib
import functools
import platform
import warnings
from pathlib import Path
from typing import Iterator, get_args

import torch

from .settings import Precision

PRECISIONS: tuple[str, ...] = get_args(Precision)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@functools.lru_cache(maxsize=1)
def cpu_bf16_native() -> bool:
    """Whether this CPU computes bfloat16 natively (x86 AVX512-BF16 or AMX-BF16; ARM BF16)."""
    flags = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        flags = " ".join(l for l in cpuinfo.read_text(errors="replace").splitlines() if l.startswith(("flags", "Features")))
    words = set(flags.replace(":", " ").split())
    if words & {"avx512_bf16", "amx_bf16", "bf16"}:
        return True
    return platform.system() == "Darwin" and platform.machine() == "arm64"  # Apple M2 and later have BF16


def check_precision(precision: str, device: str | torch.device, what: str = "--precision") -> None:
    """Refuse a precision the device cannot run (ValueError naming `what`); warn where bf16 is
    emulated on a CPU and so slower than fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"{what}: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    kind = torch.device(device).type
    if precision == "fp16" and kind != "cuda":
        raise ValueError(f"{what} fp16: needs a CUDA device (device is {kind}); on a CPU use bf16")
    if precision == "bf16" and kind == "cuda" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise ValueError(f"{what} bf16: this GPU ({torch.cuda.get_device_name()}) has no bfloat16; use fp16")
    if precision == "bf16" and kind == "cpu" and not cpu_bf16_native():
        warnings.warn(
            f"{what} bf16: this CPU ({platform.processor() or platform.machine()}) has no native bfloat16 "
            "(no AVX512-BF16 or AMX); it is emulated and slower than fp32",
            RuntimeWarning,
            stacklevel=2,
        )


def autocast(device: str | torch.device, precision: str) -> contextlib.AbstractContextManager:
    """`torch.autocast` for `precision` on `device`; a no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=DTYPES[precision])


@contextlib.contextmanager
def full_precision(x: torch.Tensor) -> Iterator[None]:
    """Inside: autocast off for `x`'s device type (an op with no low-precision kernel)."""
    with torch.autocast(x.device.type, enabled=False):
        yield


def grad_scaler(device: str | torch.device, precision: str) -> torch.amp.GradScaler:
    """A gradient scaler for fp16 on CUDA; disabled (scale, unscale and step pass through) otherwise."""
    kind = torch.device(device).type
    return torch.amp.GradScaler(kind, enabled=precision == "fp16" and kind == "cuda")
