"""The one check of a device name (`--device`, the pipeline config's `device`): cpu, cuda,
cuda:N or mps, refused on one line where torch here has no such device.

Torch is imported inside `check_device`: the pipeline config checks the syntax alone
(`check_device_syntax`), so a config can be validated where torch is slow to import, and a
deployment made on a machine without the GPU it names.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# torch.device refuses a leading zero ("cuda:01")
DEVICE_PATTERN = r"^(cpu|cuda|cuda:(0|[1-9][0-9]*)|mps)$"
# the help of every --device option
DEVICE_HELP = "cpu | cuda | cuda:N (GPU N) | mps (Apple silicon)"


class DeviceError(ValueError):
    """A device name torch does not know, or a device this machine does not have."""


def check_device_syntax(device: str, what: str = "--device") -> str:
    """`device` if it is cpu, cuda, cuda:N or mps; else a DeviceError naming `what`."""
    if not isinstance(device, str) or not re.fullmatch(DEVICE_PATTERN, device):
        raise DeviceError(f"{what} {device!r}: unknown device; expected cpu, cuda, cuda:N (a GPU index) or mps")
    return device


def check_device(device: str, what: str = "--device") -> "torch.device":
    """The torch device `device` names, checked before any compute: the syntax, then that torch
    here has it (a CUDA GPU of that index, Apple's MPS). Errors are one line naming `what`."""
    import torch

    check_device_syntax(device, what)
    if device.startswith("cuda"):
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            why = "torch was built without CUDA" if not torch.backends.cuda.is_built() else "torch sees no CUDA GPU here"
            raise DeviceError(f"{what} {device}: {why} (torch.cuda.is_available() is False); use cpu")
        index = int(device.partition(":")[2] or 0)
        if index >= n:
            known = "cuda:0" if n == 1 else f"cuda:0 to cuda:{n - 1}"
            raise DeviceError(f"{what} {device}: torch sees {n} CUDA GPU{'s' if n > 1 else ''} here ({known})")
    elif device == "mps" and not torch.backends.mps.is_available():
        built = torch.backends.mps.is_built()
        why = "this Mac has no MPS device (macOS 12.3+ on Apple silicon)" if built else "torch was built without MPS"
        raise DeviceError(f"{what} mps: {why} (torch.backends.mps.is_available() is False); use cpu")
    return torch.device(device)
