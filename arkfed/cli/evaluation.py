"""Reuse commands: ``export``, ``evaluate``, ``linear-probe``, ``finetune``, ``bias``, ``segment``,
``predict`` and ``report``.

Every command takes MODEL as a run folder, an export folder or a weights file (a plain timm
backbone file also needs ``--arch``), writes ``--out DIR/results.json`` and prints a rich table.
The work happens in :mod:`arkfed.evaluation`; torch and timm are imported inside the commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

MODEL_HELP = "run folder, export folder or weights file"
SITE_HELP = "site name (sites/NAME.yaml) or YAML path"

ModelArg = typer.Argument(..., help=MODEL_HELP, show_default=False)
SiteOpt = typer.Option(..., "--site", help=SITE_HELP)
WhichOpt = typer.Option("teacher", help="teacher | student (run folders hold both)")
ArchOpt = typer.Option(None, help="timm architecture, only for a plain backbone weights file")
ImgSizeOpt = typer.Option(224, min=16, help="input size, only for a plain backbone weights file")
DeviceOpt = typer.Option("cpu", help="cpu | cuda | auto")
BatchOpt = typer.Option(64, min=1)
PluginsOpt = typer.Option(None, "--plugins-dir", help="extra dataset plugin folder(s)")


def _console():
    """Rich console; logs and pipes get 160 columns so wide metric tables stay readable."""
    from rich.console import Console

    console = Console(highlight=False)
    return console if console.is_terminal else Console(highlight=False, width=160)


def _device(name: str) -> str:
    from arkfed.training import resolve_device

    return str(resolve_device(name))


def _spec(arch: Optional[str], img_size: int):
    from arkfed.model import ModelSpec

    return ModelSpec(model=arch, img_size=img_size) if arch else None


def _load(source: Path, which: str, arch: Optional[str], img_size: int):
    from arkfed.errors import ArkfedError
    from arkfed.evaluation.sources import load_one, source_kind
    from arkfed.weights import SPEC_KEY

    if arch is None and source_kind(source) == "file":
        meta = {}
        if source.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(source), framework="pt") as f:
                meta = f.metadata() or {}
        if SPEC_KEY not in meta:
            raise ArkfedError(f"{source}: a plain backbone file carries no architecture; pass --arch NAME (and --img-size)")
    return load_one(source, which, _spec(arch, img_size))


def _site(ref: str, plugins: Optional[List[Path]]):
    from arkfed.site import load_site

    return load_site(ref, plugins or ())


def _f(value) -> str:
    import math

    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.3f}"


def _ci(ci) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "n/a"


def _finish(out: Path, result: dict, table) -> None:
    from arkfed.evaluation.sources import write_results

    console = _console()
    console.print(table)
    path = write_results(out, result)
    console.print(f"results: {path}")


def _table(title: str, *columns: str, numbers: bool = True):
    from rich.table import Table

    table = Table(title=title)
    for i, name in enumerate(columns):
        if i == 0:
            table.add_column(name, justify="left", no_wrap=True)
        else:
            table.add_column(name, justify="right" if numbers else "left")
    return table


# -- export -----------------------------------------------------------------------------------
def export(
    run: Path = typer.Argument(..., help="run folder (or an export / weights file to re-export)", show_default=False),
    out: Path = typer.Option(..., help="export folder to write"),
    which: str = WhichOpt,
) -> None:
    """Export the teacher as a plain timm model (model.safetensors + config.json), with projector, heads and a model card."""
    from arkfed.evaluation.export import export_model

    result = export_model(run, out, which)
    table = _table(f"export {out}", "file", "content", numbers=False)
    table.add_row("model.safetensors", f"{result.architecture} backbone, {result.num_features} features")
    table.add_row("config.json", "timm pretrained config + arkfed spec")
    for site, classes in sorted(result.heads.items()):
        table.add_row(f"heads/{site}.safetensors", ", ".join(classes))
    table.add_row("README.md", "model card")
    _finish(out, result.to_json(), table)
    _console().print(f"load with: timm.create_model({result.architecture!r}, pretrained=True, num_classes=0, "
                     f"pretrained_cfg_overlay=dict(file='{out / 'model.safetensors'}'))")


# -- evaluate ---------------------------------------------------------------------------------
def evaluate(
    model: Path = ModelArg,
    site: str = SiteOpt,
    split: str = typer.Option("test", help="train | val | test"),
    ten_crop: Optional[bool] = typer.Option(
        None, "--ten-crop/--single-crop",
        help="average the probabilities of ten crops (corners, centre, flips); "
        "default: on for the test split of models trained with --recipe ark/ark+",
    ),
    bootstrap: int = typer.Option(1000, min=0, help="bootstrap resamples for the 95% CIs (0 = none)"),
    seed: int = typer.Option(0, min=0),
    batch_size: int = BatchOpt,
    device: str = DeviceOpt,
    plugins_dir: Optional[List[Path]] = PluginsOpt,
    out: Path = typer.Option(..., help="folder for results.json"),
) -> None:
    """Per-class AUC and mean AUC (accuracy for multiclass) of the site's own head, teacher and student, with bootstrap 95% CIs."""
    from arkfed.evaluation.evaluate import evaluate_source

    s = _site(site, plugins_dir)
    result = evaluate_source(model, s, split, ten_crop, bootstrap, batch_size, _device(device), seed)
    names = list(result["models"])
    table = _table(f"{s.name} / {split} ({'ten-crop' if result['ten_crop'] else 'single crop'})", "class",
                   *[f"{n} AUC" for n in names], *[f"{n} 95% CI" for n in names])
    for c in s.schema.classes:
        table.add_row(c, *[_f(result["models"][n]["auc"].get(c)) for n in names],
                      *[_ci(result["models"][n].get("auc_ci", {}).get(c)) for n in names])
    table.add_row("[b]mean AUC[/b]", *[_f(result["models"][n]["mean_auc"]) for n in names],
                  *[_ci(result["models"][n].get("mean_auc_ci")) for n in names])
    if s.schema.task == "multiclass":
        table.add_row("accuracy", *[_f(result["models"][n].get("accuracy")) for n in names],
                      *[_ci(result["models"][n].get("accuracy_ci")) for n in names])
    _finish(out, result, table)


# -- linear probe -----------------------------------------------------------------------------
def _seeds(text: str) -> tuple[int, ...]:
    from arkfed.errors import ArkfedError

    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ArkfedError(f"--seeds takes comma-separated integers, got {text!r}") from None


def linear_probe(
    model: Path = ModelArg,
    site: str = SiteOpt,
    shots: Optional[int] = typer.Option(None, min=1, help="few-shot: K images per class (multilabel: K positive + K negative)"),
    fraction: Optional[float] = typer.Option(None, help="few-shot: this fraction of the training split"),
    seeds: str = typer.Option("0,1,2", help="comma-separated seeds (subset draws; random inits)"),
    features: str = typer.Option("projector", help="projector (default) | backbone"),
    init: str = typer.Option("model", help="model | random (same architecture, random weights: the baseline)"),
    c: float = typer.Option(1.0, help="inverse L2 strength of the logistic regression"),
    which: str = WhichOpt,
    arch: Optional[str] = ArchOpt,
    img_size: int = ImgSizeOpt,
    batch_size: int = BatchOpt,
    device: str = DeviceOpt,
    plugins_dir: Optional[List[Path]] = PluginsOpt,
    out: Path = typer.Option(..., help="folder for results.json"),
) -> None:
    """Linear probe on frozen embeddings: fit on the site's training split (few-shot if asked), test AUC."""
    from arkfed.errors import ArkfedError
    from arkfed.evaluation.linear_probe import ProbeSettings
    from arkfed.evaluation.linear_probe import linear_probe as run_probe

    if features not in ("projector", "backbone") or init not in ("model", "random"):
        raise ArkfedError(f"--features is projector|backbone and --init model|random, got {features!r}, {init!r}")
    s = _site(site, plugins_dir)
    net = _load(model, which, arch, img_size)
    settings = ProbeSettings(shots=shots, fraction=fraction, seeds=_seeds(seeds), features=features, init=init, c=c,
                             batch_size=batch_size, device=_device(device))
    result = {"source": str(model), "site": s.name, **run_probe(net, s.split("train"), s.split("test"), s.schema, settings)}
    shots_text = "all" if shots is None and fraction is None else (f"{shots}-shot" if shots else f"{fraction:.0%} of the")
    table = _table(f"linear probe on {s.name}: {init} init, {features} features, {shots_text} training images; test AUC",
                   "class", *[f"seed {r['seed']}" for r in result["runs"]], "mean")
    for k in s.schema.classes:
        table.add_row(k, *[_f(r["auc"][k]) for r in result["runs"]], _f(result["auc"][k]))
    table.add_row("[b]mean AUC[/b]", *[_f(r["mean_auc"]) for r in result["runs"]], f"{_f(result['mean_auc'])} ± {_f(result['mean_auc_std'])}")
    table.add_row("training images", *[str(r["train_size"]) for r in result["runs"]], "")
    _finish(out, result, table)


# -- finetune ---------------------------------------------------------------------------------
def finetune(
    model: Path = ModelArg,
    site: str = SiteOpt,
    epochs: int = typer.Option(5, min=1),
    init: List[str] = typer.Option(["model"], help="model | random | imagenet; repeat to compare on the same split"),
    lr: float = typer.Option(1e-3),
    batch_size: int = typer.Option(32, min=1),
    crop_scale: str = typer.Option("0.5,1", help="random-resized-crop area range MIN,MAX"),
    max_steps_per_epoch: Optional[int] = typer.Option(None, min=1, help="cap on batches per epoch (quick trials)"),
    seed: int = typer.Option(0, min=0),
    which: str = WhichOpt,
    arch: Optional[str] = ArchOpt,
    img_size: int = ImgSizeOpt,
    device: str = DeviceOpt,
    plugins_dir: Optional[List[Path]] = PluginsOpt,
    out: Path = typer.Option(..., help="folder for results.json"),
) -> None:
    """Full fine-tuning with a new head on the backbone; the best-val epoch is scored on the test split."""
    from arkfed.errors import ArkfedError
    from arkfed.evaluation.finetune import FineTuneSettings
    from arkfed.evaluation.finetune import finetune as run_finetune

    bad = [i for i in init if i not in ("model", "random", "imagenet")]
    if bad:
        raise ArkfedError(f"--init takes model, random or imagenet, got {bad[0]!r}")
    s = _site(site, plugins_dir)
    net = _load(model, which, arch, img_size)
    try:
        low, high = (float(x) for x in crop_scale.split(","))
    except ValueError:
        raise ArkfedError(f"--crop-scale takes MIN,MAX (e.g. 0.5,1), got {crop_scale!r}") from None
    settings = FineTuneSettings(epochs=epochs, lr=lr, batch_size=batch_size, crop_scale=(low, high), seed=seed,
                                max_steps_per_epoch=max_steps_per_epoch, device=_device(device))
    val = s.splits.get("val")
    runs = [run_finetune(net, s.split("train"), val, s.split("test"), s.schema, i, settings) for i in init]
    table = _table(f"fine-tuning on {s.name} ({epochs} epochs, test split)", "init", "best epoch", "mean AUC", *s.schema.classes)
    for r in runs:
        table.add_row(r["init"], str(r["best_epoch"] + 1), _f(r["test"]["mean_auc"]), *[_f(r["test"]["auc"].get(k)) for k in s.schema.classes])
    _finish(out, {"source": str(model), "site": s.name, "runs": runs}, table)


# -- bias -------------------------------------------------------------------------------------
def bias(
    model: Path = ModelArg,
    site: str = SiteOpt,
    features: str = typer.Option("projector", help="projector | backbone"),
    balance: bool = typer.Option(True, help="subsample the larger sex group to the smaller's size"),
    alpha: float = typer.Option(0.05, help="significance level of DeLong's test"),
    seed: int = typer.Option(0, min=0),
    which: str = WhichOpt,
    arch: Optional[str] = ArchOpt,
    img_size: int = ImgSizeOpt,
    batch_size: int = BatchOpt,
    device: str = DeviceOpt,
    plugins_dir: Optional[List[Path]] = PluginsOpt,
    out: Path = typer.Option(..., help="folder for results.json and bias.png"),
) -> None:
    """Gender bias (Ark protocol): probes on male-only / female-only training images, each tested on both sexes; DeLong p-values."""
    from arkfed.evaluation.bias import BiasSettings, bias_analysis, plot_bias

    s = _site(site, plugins_dir)
    net = _load(model, which, arch, img_size)
    result = {"source": str(model), "site": s.name,
              **bias_analysis(net, s.split("train"), s.split("test"), s.schema,
                              BiasSettings(features=features, balance=balance, alpha=alpha, seed=seed, batch_size=batch_size, device=_device(device)))}
    chart = plot_bias(result, out / "bias.png", f"{s.name}: gender bias of {model.name} (DeLong p < {alpha} marked *)")
    result["chart"] = chart.name
    table = _table(f"gender bias on {s.name} (train {result['train_sizes']}, test {result['test_sizes']}); A→B: trained on A, tested on B",
                   "finding", "M→M", "F→M", "gap M", "p", "F→F", "M→F", "gap F", "p")
    unscored = []
    for name, e in result["findings"].items():
        if all(_f(e[k]) == "n/a" for k in ("M->M", "F->M", "F->F", "M->F")):
            unscored.append(name)
            continue
        gap = {sex: _f(e[f"gap_on_{sex}"]) + ("*" if e[f"significant_on_{sex}"] else "") for sex in ("M", "F")}
        table.add_row(name, _f(e["M->M"]), _f(e["F->M"]), gap["M"], _f(e["p_on_M"]), _f(e["F->F"]), _f(e["M->F"]), gap["F"], _f(e["p_on_F"]))
    if unscored:
        table.caption = f"not scorable on this test split (one label value): {', '.join(unscored)}"
    _finish(out, result, table)
    _console().print(f"chart: {chart}")


# -- segment ----------------------------------------------------------------------------------
def segment(
    model: Path = ModelArg,
    images: Path = typer.Option(..., help="folder of images"),
    masks: Path = typer.Option(..., help="folder of masks named like the images (foreground > 127)"),
    img_size: int = typer.Option(128, min=16, help="image size for segmentation"),
    epochs: int = typer.Option(20, min=1),
    lr: float = typer.Option(1e-3, help="decoder lr (the encoder trains at 0.1x when fine-tuned)"),
    batch_size: int = typer.Option(8, min=1),
    variants: str = typer.Option("frozen,finetuned,random", help="comma-separated: frozen, finetuned, random"),
    train_fraction: float = typer.Option(0.8, help="share of the pairs used for training; the rest is scored"),
    limit: Optional[int] = typer.Option(None, min=3, help="use at most this many pairs"),
    seed: int = typer.Option(0, min=0),
    which: str = WhichOpt,
    arch: Optional[str] = ArchOpt,
    device: str = DeviceOpt,
    out: Path = typer.Option(..., help="folder for results.json"),
) -> None:
    """Segmentation transfer: a U-Net decoder on the backbone's multi-scale features; Dice on held-out pairs."""
    from arkfed.errors import ArkfedError
    from arkfed.evaluation.segment import SegmentSettings, segmentation_transfer

    chosen = tuple(v.strip() for v in variants.split(",") if v.strip())
    if not chosen or any(v not in ("frozen", "finetuned", "random") for v in chosen):
        raise ArkfedError(f"--variants takes frozen, finetuned and/or random, got {variants!r}")
    net = _load(model, which, arch, img_size)
    result = {"source": str(model), **segmentation_transfer(net, images, masks, SegmentSettings(
        img_size=img_size, epochs=epochs, lr=lr, batch_size=batch_size, train_fraction=train_fraction, limit=limit,
        variants=chosen, seed=seed, device=_device(device)))}
    table = _table(f"segmentation transfer ({result['train_pairs']} training / {result['test_pairs']} test pairs, {img_size} px)",
                   "encoder", "Dice", "± sd", "final train loss")
    for name, v in result["variants"].items():
        table.add_row(name, _f(v["dice"]), _f(v["dice_std"]), _f(v["final_train_loss"]))
    table.add_row("all-foreground mask", _f(result["trivial_dice"]), "", "")
    _finish(out, result, table)


# -- predict ----------------------------------------------------------------------------------
def predict(
    model: Path = ModelArg,
    images: List[Path] = typer.Argument(..., help="image files (PNG, JPEG, DICOM)", show_default=False),
    which: str = WhichOpt,
    batch_size: int = typer.Option(32, min=1),
    device: str = DeviceOpt,
    out: Path = typer.Option(..., help="folder for results.json"),
) -> None:
    """Zero-shot predictions from every head (site/class), plus one combined score per finding that several heads share."""
    from arkfed.evaluation.predict import predict_images
    from arkfed.evaluation.sources import load_source_heads

    net = _load(model, which, None, 224)
    result = {"source": str(model), **predict_images(net, load_source_heads(model), images, batch_size, _device(device))}
    entries = result["images"]
    table = _table("zero-shot predictions (probabilities)", "head / class", *[Path(e["image"]).name for e in entries])
    for key in entries[0]["scores"]:
        table.add_row(key, *[_f(e["scores"][key]) for e in entries])
    for finding in entries[0]["combined"]:
        table.add_row(f"[b]{finding}[/b] (combined: {', '.join(entries[0]['combined'][finding]['from'])})",
                      *[_f(e["combined"][finding]["score"]) for e in entries])
    _finish(out, result, table)


# -- report -----------------------------------------------------------------------------------
def report(
    run: Path = typer.Argument(..., help="run folder", show_default=False),
    out: Optional[Path] = typer.Option(None, help="report folder (default RUN/report)"),
) -> None:
    """PNG plots (mean AUC per site over rounds, teacher vs student, loss curves) and an HTML page with the summary table."""
    from arkfed.evaluation.report import write_report

    out = out or run / "report"
    result = write_report(run, out)
    table = _table(f"run {run} ({result['rounds_evaluated']} rounds, {result['visits']} visits)",
                   "site", "teacher mean AUC", "student mean AUC", "best teacher", "best round")
    for row in result["sites"]:
        table.add_row(row["site"], _f(row["teacher_mean_auc"]), _f(row["student_mean_auc"]), _f(row["best_teacher_mean_auc"]),
                      str(row["best_round"] or "n/a"))
    _finish(out, result, table)
    _console().print(f"report: {out / 'report.html'}")


def register(app: typer.Typer) -> None:
    app.command(name="export")(export)
    app.command(name="evaluate")(evaluate)
    app.command(name="linear-probe")(linear_probe)
    app.command(name="finetune")(finetune)
    app.command(name="bias")(bias)
    app.command(name="segment")(segment)
    app.command(name="predict")(predict)
    app.command(name="report")(report)
