"""Peak GPU memory of an Ark training step per batch size (CUDA only; prints "no CUDA" otherwise).

One step is what a visit does per batch: student forward + head + backward, the teacher's
gradient-free forward, AdamW step; channels_last + bf16 autocast as in :mod:`arkfed.ark.visit`.
Inputs sit on the GPU already, so the figure is the model's, not the data path's. Two steps are
run (the optimizer allocates its state in the first); the peak of both is reported, or OOM.

    python benchmarks/gpu_memory.py --models resnet50,swin_base_patch4_window7_224 --batch-sizes 64,128,256
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch


def peak_bytes(model_name: str, img_size: int, batch: int, classes: int = 14) -> int | None:
    from arkfed.ark.losses import ark_loss, consistency_loss, task_loss
    from arkfed.ark.visit import make_optimizer
    from arkfed.config import TrainSettings
    from arkfed.data.schema import LabelSchema
    from arkfed.devices import autocast
    from arkfed.model.ark import ArkModel, SiteHead
    from arkfed.spec import ModelSpec

    device = torch.device("cuda")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    try:
        student = ArkModel(ModelSpec(model=model_name, img_size=img_size)).to(device, memory_format=torch.channels_last).train()
        teacher = copy.deepcopy(student).eval().requires_grad_(False)
        schema = LabelSchema(task="multilabel", classes=tuple(f"c{k}" for k in range(classes)))
        head = SiteHead("bench", schema, student.embed_dim).to(device)
        optimizer = make_optimizer(student, head, TrainSettings(), 1e-4)
        x = torch.randn(batch, 3, img_size, img_size, device=device).contiguous(memory_format=torch.channels_last)
        y = (torch.rand(batch, classes, device=device) < 0.3).float()
        mask = torch.ones_like(y)
        for _ in range(2):
            with autocast(device):
                z = student(x)
                logits = head(z)
                with torch.no_grad():
                    zt = teacher(x)
            loss = ark_loss(task_loss(logits.float(), y, mask, "multilabel"), consistency_loss(z.float(), zt.float()), 0.25)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    except torch.cuda.OutOfMemoryError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet50,swin_base_patch4_window7_224")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-sizes", default="32,64,128,256")
    parser.add_argument("--json", type=Path, default=Path("gpu_memory.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA: peak GPU memory not measured")
        args.json.write_text(json.dumps({"benchmark": "gpu_memory", "cuda": False}) + "\n")
        return
    gpu = torch.cuda.get_device_name(0)
    total = torch.cuda.get_device_properties(0).total_memory
    rows = []
    print(f"{gpu}, {total / 2**30:.0f} GiB; Ark step (student fwd+bwd, teacher fwd, AdamW), bf16 + channels_last, {args.img_size} px")
    print(f"{'model':34s} {'batch':>6s} {'peak GiB':>9s}")
    for model in args.models.split(","):
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            peak = peak_bytes(model, args.img_size, batch)
            torch.cuda.empty_cache()
            rows.append({"model": model, "batch": batch, "peak_bytes": peak})
            print(f"{model:34s} {batch:6d} {'OOM' if peak is None else f'{peak / 2**30:9.2f}':>9s}", flush=True)
    args.json.write_text(json.dumps({"benchmark": "gpu_memory", "cuda": True, "gpu": gpu, "total_bytes": total,
                                     "img_size": args.img_size, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
