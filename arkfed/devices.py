"""Where a site's tensors live: the device a ``compute.device`` names, bf16 autocast and the memory format.

Hardware is the site's own (``compute:`` in its YAML), never part of what the coordinator sends.
"""

from __future__ import annotations

import contextlib


def resolve_device(name: str):
    """``auto`` -> CUDA when present, else CPU; anything else is passed to ``torch.device``."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        from arkfed.errors import ArkfedError

        raise ArkfedError(f"device {name!r} requested but CUDA is not available (use --device cpu or auto)")
    return device


def autocast(device, precision: str = "auto") -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA with ``auto`` (fast and range-safe) or ``bf16``; fp32 otherwise (CPU
    stays fp32 and exact under ``auto``)."""
    import torch

    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def memory_format(device):
    import torch

    return torch.channels_last if device.type == "cuda" else torch.contiguous_format
