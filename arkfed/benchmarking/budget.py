"""The accrual benchmark's budgets: everything that sets the cost of a run (``--budget``).

``default`` is sized for 2 CPU cores, ``smoke`` checks the pipeline in seconds (its numbers mean
nothing), ``gpu`` is for a CUDA machine; see :mod:`arkfed.benchmarking.accrual` for what each
measured. :func:`budget_with` applies the command line's overrides.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from arkfed.errors import ArkfedError


@dataclass(frozen=True)
class Budget:
    """Everything that sets the cost of a benchmark run (written into results.json)."""

    model: str = "test_resnet"
    img_size: int = 64
    demo_size: int = 128
    demo_counts: dict | None = None  # images per demo site (None: the generator's defaults)
    epochs: int = 2  # E: epochs of each site's own data, alone and as a member (= rounds)
    batch_size: int = 16
    lr: float = 3e-3
    projector_dim: int = 256
    crop_scale: tuple[float, float] = (0.7, 1.0)
    ema: str = "iteration"
    max_steps_per_visit: int | None = None  # smoke only: caps a visit (then it is not a full epoch)
    shots: tuple[int, ...] = (10,)
    finetune_epochs: int = 2
    finetune_lr: float = 3e-3
    finetune_max_steps: int | None = None
    seeds: tuple[int, ...] = (0, 1, 2)
    orderings: int = 3  # rotations of the source sites for the accrual curve (at most N-1)
    device: str = "cpu"
    num_workers: int = 0


BUDGETS: dict[str, Budget] = {
    "default": Budget(),
    "smoke": Budget(img_size=32, demo_size=32, epochs=1, batch_size=8, projector_dim=32, max_steps_per_visit=2,
                    shots=(2,), finetune_epochs=1, finetune_max_steps=2, seeds=(0,), orderings=2,
                    demo_counts={"demo-nih": 48, "demo-chexpert": 48, "demo-shenzhen": 40, "demo-vindr": 48}),
    "gpu": Budget(model="resnet18", img_size=128, epochs=6, batch_size=64, lr=1e-3, crop_scale=(0.5, 1.0),
                  shots=(10, 50), finetune_epochs=5, finetune_lr=1e-3, seeds=(0, 1, 2, 3, 4), device="auto", num_workers=8,
                  demo_counts={"demo-nih": 4800, "demo-chexpert": 4000, "demo-shenzhen": 2400, "demo-vindr": 3200}),
}


def torch_device(budget: Budget):
    """The torch device the budget's ``device`` setting resolves to on this machine."""
    from arkfed.devices import resolve_device

    return resolve_device(budget.device)


def budget_with(name: str, seeds: str | None = None, epochs: int | None = None, ema: str | None = None,
                device: str | None = None, num_workers: int | None = None) -> Budget:
    """A named budget with command-line overrides."""
    if name not in BUDGETS:
        raise ArkfedError(f"unknown budget {name!r}; choose one of {sorted(BUDGETS)}")
    budget = BUDGETS[name]
    changes: dict = {}
    if seeds:
        try:
            changes["seeds"] = tuple(int(s) for s in seeds.split(","))
        except ValueError:
            raise ArkfedError(f"--seeds takes comma-separated integers, got {seeds!r}") from None
    for key, value in (("epochs", epochs), ("ema", ema), ("device", device), ("num_workers", num_workers)):
        if value is not None:
            changes[key] = value
    return replace(budget, **changes)
