"""The batch types the data pipeline yields and the visit consumes (their own module, so the CPU
pipeline in :mod:`arkfed.data.loaders` and the GPU views in :mod:`arkfed.data.device_views` share
them without importing each other)."""

from __future__ import annotations

from typing import NamedTuple

import torch


class TrainBatch(NamedTuple):
    student: torch.Tensor
    teacher: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor


class EvalBatch(NamedTuple):
    images: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor
