"""``arkfed train``: Ark training over sites in one process (the local coordinator)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

# Two sets of defaults (any option given on the command line wins):
# - the demo (no --sites): sized so the synthetic federation learns visibly in ~5 minutes on 2
#   CPU cores: timm's smallest ResNet at the demo images' full 128 px;
# - real sites (--sites): the Ark paper's architecture and input size.
DEMO_DEFAULTS = {"model": "test_resnet", "img_size": 128, "rounds": 8, "crop_scale": "0.7,1", "batch_size": 16, "lr": 3e-3}
SITES_DEFAULTS = {"model": "swin_base_patch4_window7_224", "img_size": 224, "rounds": 20, "crop_scale": "0.08,1", "batch_size": 32, "lr": 5e-4}
DEMO_DIR = Path("demo-data")

HELP = (
    "Train an Ark foundation model by cycling over sites (local mode).\n\n"
    "A round visits every site once; a visit trains the shared student backbone+projector and that "
    "site's own head on its training split; the teacher is an EMA of the student. After each round every "
    "site's val split is evaluated for student and teacher. Writes a run folder (config.yaml, metrics.jsonl, "
    "checkpoint, teacher.safetensors, heads/, summary.json).\n\n"
    "Without --sites it trains on the offline demo federation (synthetic images, generated into demo-data/ "
    "if absent) with small defaults: test_resnet (timm's 0.4 M-parameter ResNet) at 128 px, 8 rounds, "
    "batch 16, lr 3e-3, crop scale 0.7-1, so that it learns visibly in about 5 minutes on 2 CPU cores.\n\n"
    "With --sites the defaults follow the Ark paper instead: swin_base_patch4_window7_224 at 224 px, "
    "crop scale 0.08-1, 20 rounds, batch 32, lr 5e-4. Options given explicitly override either set."
)


def _parse_crop(text: str) -> tuple[float, float]:
    from arkfed.errors import ArkfedError

    try:
        low, high = (float(x) for x in text.split(","))
    except ValueError:
        raise ArkfedError(f"--crop-scale takes MIN,MAX (e.g. 0.08,1), got {text!r}") from None
    return low, high


def _site_refs(sites: Optional[str], demo_dir: Path) -> list[str]:
    if sites:
        return [s.strip() for s in sites.split(",") if s.strip()]
    import json

    from arkfed.demo import MARKER_FILE, ensure_demo_federation

    typer.echo(f"no --sites: training on the synthetic demo federation in {demo_dir}/")
    try:  # a demo generated with other settings (`arkfed demo-data --size ...`) is used as it is
        info = json.loads((demo_dir / MARKER_FILE).read_text())
        kwargs = {"seed": int(info["seed"]), "size": int(info["size"]), "counts": dict(info["counts"])}
    except (OSError, ValueError, KeyError, TypeError):
        kwargs = {}
    return [str(p) for p in ensure_demo_federation(demo_dir, **kwargs)]


def _default_out() -> Path:
    from datetime import datetime

    return Path("runs") / datetime.now().strftime("ark-%Y%m%d-%H%M%S")


def train(
    sites: Optional[str] = typer.Option(None, help="comma-separated site names (sites/NAME.yaml) or YAML paths; none = demo federation"),
    rounds: Optional[int] = typer.Option(None, min=1, help="rounds; each visits every site once [demo 8, sites 20]"),
    local_epochs: int = typer.Option(1, min=1, help="epochs over a site's training split per visit"),
    model: Optional[str] = typer.Option(None, help="timm backbone [demo test_resnet, sites swin_base_patch4_window7_224]"),
    img_size: Optional[int] = typer.Option(None, min=16, help="input size in pixels [demo 128, sites 224]"),
    batch_size: Optional[int] = typer.Option(None, min=1, help="[demo 16, sites 32]"),
    lr: Optional[float] = typer.Option(None, help="peak learning rate, warm-up + cosine over visits [demo 3e-3, sites 5e-4]"),
    optimizer: str = typer.Option("adamw", help="sgd | adamw (timm create_optimizer_v2)"),
    weight_decay: float = typer.Option(0.05),
    warmup_visits: int = typer.Option(0, min=0, help="linear lr warm-up, in visits"),
    crop_scale: Optional[str] = typer.Option(None, help="random-resized-crop area range MIN,MAX [demo 0.7,1, sites 0.08,1 as in Ark]"),
    views: str = typer.Option("ark", help="ark (student jitter, teacher same crop) | ark+ (teacher: whole image) | independent"),
    ema: str = typer.Option("visit", help="teacher EMA after each site visit (Ark) or per-iteration"),
    momentum_teacher: float = typer.Option(0.9, help="teacher momentum at the first visit (cosine to 1)"),
    projector: str = typer.Option("linear", help="linear | mlp"),
    projector_dim: int = typer.Option(1376, min=1),
    init: str = typer.Option("random", help="random | imagenet (needs network) | PATH (weights, export or run folder)"),
    order: str = typer.Option("fixed", help="site order per round: fixed | shuffle"),
    seed: int = typer.Option(0, min=0),
    device: str = typer.Option("cpu", help="cpu | cuda | auto (CUDA with bf16 autocast + channels_last when present)"),
    num_workers: Optional[int] = typer.Option(None, min=0, help="DataLoader worker processes (default: 0 on CPU, up to 8 with CUDA)"),
    max_steps_per_visit: Optional[int] = typer.Option(None, min=1, help="cap on batches per visit (quick trials)"),
    out: Optional[Path] = typer.Option(None, help="run folder (default runs/ark-TIMESTAMP)"),
    resume: Optional[Path] = typer.Option(None, help="continue RUN from its last finished visit (options come from RUN/config.yaml)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="plain log lines instead of the live view (CI)"),
    demo_dir: Path = typer.Option(DEMO_DIR, help="where the demo federation lives (used without --sites)"),
    federated: bool = typer.Option(False, "--federated", help="run it as a Flower federation on this machine: one SuperLink + one SuperNode per site on 127.0.0.1 (TLS + site keys)"),
) -> None:
    from rich.console import Console

    from arkfed.coordinator import train_local
    from arkfed.errors import ArkfedError
    from arkfed.model import ModelSpec
    from arkfed.progress import make_progress, summary_table
    from arkfed.runs import RunFolder
    from arkfed.site import load_site_config
    from arkfed.training import TrainConfig, TrainSettings

    if resume is not None:
        config = RunFolder(resume).read_config()
        run_dir = resume
    else:
        refs = _site_refs(sites, demo_dir)
        defaults = SITES_DEFAULTS if sites else DEMO_DEFAULTS
        model = model or defaults["model"]
        img_size = img_size or defaults["img_size"]
        rounds = rounds or defaults["rounds"]
        crop_scale = crop_scale or defaults["crop_scale"]
        batch_size = batch_size or defaults["batch_size"]
        lr = lr or defaults["lr"]
        paths = [str(p) for p in (_resolve(ref) for ref in refs)]
        names = [load_site_config(p).name for p in paths]
        try:
            config = TrainConfig(
                sites=names, site_configs=paths, rounds=rounds, order=order, seed=seed, init=init,
                model=ModelSpec(model=model, img_size=img_size, projector=projector, projector_dim=projector_dim),
                settings=TrainSettings(
                    batch_size=batch_size, local_epochs=local_epochs, lr=lr, optimizer=optimizer,
                    weight_decay=weight_decay, warmup_visits=warmup_visits, crop_scale=_parse_crop(crop_scale),
                    views=views, ema="iteration" if ema in ("iteration", "per-iteration") else ema,
                    momentum_teacher=momentum_teacher, device=device, num_workers=_workers(num_workers, device),
                    max_steps_per_visit=max_steps_per_visit,
                ),
            )
        except ValueError as exc:
            raise ArkfedError(f"invalid training option: {_first_error(exc)}") from None
        run_dir = out or _default_out()
    if federated:  # same run folder, visits at real Flower sites (arkfed.federation)
        from arkfed.federation.loopback import train_federated

        summary = train_federated(config, run_dir, resume=resume is not None, quiet=quiet)
    else:
        summary = train_local(config, run_dir, resume=resume is not None, progress=make_progress(quiet))
    console = Console(highlight=False)
    console.print(summary_table(summary))
    console.print(f"run folder: {run_dir}  (teacher: {Path(run_dir) / 'teacher.safetensors'})")


def _workers(requested: Optional[int], device: str) -> int:
    """Workers help when a GPU waits for decoding; on CPU they would compete with the model."""
    if requested is not None:
        return requested
    import os

    from arkfed.training import resolve_device

    if resolve_device(device).type != "cuda":
        return 0
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def _resolve(ref: str) -> Path:
    from arkfed.site import resolve_site_path

    return resolve_site_path(ref).resolve()


def _first_error(exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        err = errors()[0]
        return f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
    return str(exc)


def register(app: typer.Typer) -> None:
    app.command(name="train", help=HELP)(train)
