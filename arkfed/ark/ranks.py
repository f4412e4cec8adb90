"""What a visit needs to know when it runs as one of N DDP ranks; a leaf that imports no training code."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class RankContext:
    """What a visit running as one of N ranks needs: its rank, the world size, the DDP wrapper."""

    rank: int = 0
    world_size: int = 1

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def wrap(self, module: nn.Module, device: torch.device, compile: bool = False) -> nn.Module:
        """What the visit calls to run ``module``: in DDP (gradients averaged over ranks in backward)
        when there are several ranks, then ``torch.compile``d when asked (the first steps compile)."""
        if self.active:
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if device.type == "cuda" else None
            module = DistributedDataParallel(module, device_ids=ids)
        return torch.compile(module) if compile else module

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over ranks (float64 totals of the visit's losses and examples)."""
        if not self.active:
            return values
        import torch.distributed as dist

        nccl = dist.get_backend() == "nccl"  # NCCL reduces CUDA tensors only
        out = values.to(f"cuda:{torch.cuda.current_device()}") if nccl else values.clone()
        dist.all_reduce(out)
        return out.cpu()


SINGLE = RankContext()
