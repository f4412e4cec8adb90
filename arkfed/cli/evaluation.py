"""Reuse commands: ``export``, ``evaluate``, ``linear-probe``, ``finetune``, ``bias``, ``segment``,
``predict``, ``zero-shot``, ``report`` and ``compare``.

The commands that read a site take ``--protocol arkfed|ark``: how the site's labels and test
split are read (:func:`arkfed.site.load.load_site`); their results and tables record it.

Every command takes MODEL as a run folder, an export folder or a weights file (a plain timm
backbone file also needs ``--arch``), writes ``--out DIR/results.json`` and prints a rich table.
Each command parses its options, calls one entry function of :mod:`arkfed.evaluation.commands`
(which runs the analysis, writes the results, then draws the figure) and prints the table
:mod:`arkfed.evaluation.tables` builds; torch and timm are imported inside the commands.
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
ProtocolOpt = typer.Option(
    None, "--protocol",
    help="arkfed | ark: read the site as arkfed does or as Ark's reference code does (MIMIC uncertain as positive, "
    "CheXpert's full valid.csv, VinDr any-reader labels; Ark's split lists from the site's split_lists:); "
    "default: as the site YAML says (arkfed unless its options set protocol)",
)


def _console():
    """Rich console; logs and pipes get 160 columns so wide metric tables stay readable."""
    from rich.console import Console

    console = Console(highlight=False)
    return console if console.is_terminal else Console(highlight=False, width=160)


def _device(name: str) -> str:
    from arkfed.devices import resolve_device

    return str(resolve_device(name))


def _show(table, done) -> None:
    """Print a command's table, then where its results (and figure) are."""
    console = _console()
    console.print(table)
    console.print(f"results: {done.path}")
    if done.chart:
        console.print(f"chart: {done.chart}")


# -- export -----------------------------------------------------------------------------------
def export(
    run: Path = typer.Argument(..., help="run folder (or an export / weights file to re-export)", show_default=False),
    out: Path = typer.Option(..., help="export folder to write"),
    which: str = WhichOpt,
    calibrate: Optional[List[str]] = typer.Option(
        None, "--calibrate", help="site whose BatchNorm statistics to ship (repeat; the first one's go into model.safetensors)"),
    plugins_dir: Optional[List[Path]] = PluginsOpt,
) -> None:
    """Export the teacher as a plain timm model (model.safetensors + config.json), with projector, its heads and a model card."""
    from arkfed.evaluation.commands import run_export
    from arkfed.evaluation.tables import export_table

    done = run_export(run, out, which, calibrate or (), plugins_dir or ())
    _show(export_table(done.result), done)
    _console().print(f"load with: timm.create_model({done.result['architecture']!r}, pretrained=True, num_classes=0, "
                     f"pretrained_cfg_overlay=dict(file='{out / 'model.safetensors'}'))")
    if '"norm": "group"' in (out / "config.json").read_text():
        _console().print("(trained with norm: group: build the timm model through opacus.validators.ModuleValidator.fix first; "
                         "see README.md in the export)")


# -- evaluate ---------------------------------------------------------------------------------
MinPosOpt = typer.Option(10, "--min-positives", min=1,
                         help="classes with fewer positive test images are marked and left out of mean_auc_min_positives and of bias tests")


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
    min_positives: int = MinPosOpt,
    seed: int = typer.Option(0, min=0),
    batch_size: int = BatchOpt,
    device: str = DeviceOpt,
    plugins_dir: Optional[List[Path]] = PluginsOpt,
    protocol: Optional[str] = ProtocolOpt,
    out: Path = typer.Option(..., help="folder for results.json"),
) -> None:
    """Per-class AUC and mean AUC (accuracy for multiclass) of each model with its own head, BatchNorm
    recalibrated on the site's training images as in training; bootstrap 95% CIs."""
    from arkfed.evaluation.commands import run_evaluate
    from arkfed.evaluation.tables import evaluate_table

    done = run_evaluate(model, site, out, plugins=plugins_dir or (), split=split, ten_crop=ten_crop, n_boot=bootstrap,
                        batch_size=batch_size, device=_device(device), seed=seed, min_positives=min_positives, protocol=protocol)
    _show(evaluate_table(done.result, done.site.schema, min_positives), done)


# -- curves (segment, finetune, linear-probe) -------------------------------------------------
CompareOpt = typer.Option(None, "--compare", help="another model (run, export or weights file) to put on the same curve; repeat")
SeedsOpt = typer.Option("0,1,2", help="comma-separated seeds; each draws the training subset shared by every initialisation")
CorrectionOpt = typer.Option("holm", help="multiple-comparison correction of the paired tests: holm | bh")


def _correction(text: str) -> str:
    from arkfed.errors import ArkfedError

    if text not in ("holm", "bh"):
        raise ArkfedError(f"--correction takes holm or bh, got {text!r}")
    return text


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
    train_sizes: str = typer.Option("all", help="shots per class of the curve, e.g. 1,5,10,all (multilabel: K positive + K negative)"),
    shots: Optional[int] = typer.Option(None, min=1, help="one size only: the same as --train-sizes K"),
    seeds: str = SeedsOpt,
    compare: Optional[List[Path]] = CompareOpt,
    baseline: bool = typer.Option(True, help="also probe a random init of the architecture (one per seed)"),
    features: str = typer.Option("projector", help="projector (default) | backbone"),
    c: float = typer.Option(1.0, help="inverse L2 strength of the logistic regression"),
    min_positives: int = MinPosOpt,
    correction: str = CorrectionOpt,
    bootstrap: int = typer.Option(1000, min=0, help="bootstrap resamples for the test AUC CI when there is one seed"),
    which: str = WhichOpt,
    arch: Optional[str] = ArchOpt,
    img_size: int = ImgSizeOpt,
    batch_size: int = BatchOpt,
    device: str = DeviceOpt,
    plugins_dir: Optional[List[Path]] = PluginsOpt,
    protocol: Optional[str] = ProtocolOpt,
    out: Path = typer.Option(..., help="folder for results.json and linear-probe.png"),
) -> None:
    """Linear probes on frozen embeddings as a few-shot curve: the model, a random init and --compare models,
    same draws per seed, paired tests; test mean AUC."""
    from arkfed.errors import ArkfedError
    from arkfed.evaluation.commands import ModelSource, run_linear_probe
    from arkfed.evaluation.curves import parse_sizes
    from arkfed.evaluation.linear_probe import ProbeCurveSettings
    from arkfed.evaluation.tables import linear_probe_table

    if features not in ("projector", "backbone"):
        raise ArkfedError(f"--features is projector or backbone, got {features!r}")
    sizes = tuple(parse_sizes(str(shots) if shots else train_sizes))
    settings = ProbeCurveSettings(train_sizes=sizes, seeds=_seeds(seeds), features=features, c=c,
                                  random_baseline=baseline, min_positives=min_positives, n_boot=bootstrap,
                                  correction=_correction(correction), batch_size=batch_size, device=_device(device))
    done = run_linear_probe(ModelSource(model, which, arch, img_size), site, settings, out, compare or (), plugins_dir or (), protocol)
    _show(linear_probe_table(done.result), done)


# -- finetune ---------------------------------------------------------------------------------
def finetune(
    model: Path = ModelArg,
    site: str = SiteOpt,
    train_sizes: str = typer.Option("all", help="training-set sizes (images) of the curve, e.g. 5,10,20,all"),
    seeds: str = typer.Option("0", help="comma-separated seeds (subset draws and initialisation); two or more for the paired tests"),
    compare: Optional[List[Path]] = CompareOpt,
    epochs: int = typer.Option(5, min=1),
    init: List[str] = typer.Option(["model", "random"], help="model | random | imagenet; repeat to put several on the curve"),
    lr: float = typer.Option(1e-3),
    batch_size: int = typer.Option(32, min=1),
    crop_scale: str = typer.Option("0.5,1", help="random-resized-crop area range MIN,MAX"),
    max_steps_per_epoch: Optional[int] = typer.Option(None, min=1, help="cap on batches per epoch (quick trials)"),
    min_positives: int = MinPosOpt,
    correction: str = CorrectionOpt,
    bootstrap: int = typer.Option(1000, min=0, help="bootstrap resamples for the test AUC CIs"),
    which: str = WhichOpt,
    arch: Optional[str] = ArchOpt,
    img_size: int = ImgSizeOpt,
    device: str = DeviceOpt,
    plugins_dir: Optional[List[Path]] = PluginsOpt,
    protocol: Optional[str] = ProtocolOpt,
    out: Path = typer.Option(..., help="folder for results.json and finetune.png"),
) -> None:
    """Full fine-tuning with a new head on the backbone at several training-set sizes; the best-val epoch is
    scored on the test split; the model against random init (and --compare models), paired tests."""
    from arkfed.errors import ArkfedError
    from arkfed.evaluation.commands import ModelSource, run_finetune
    from arkfed.evaluation.curves import parse_sizes
    from arkfed.evaluation.finetune import FineTuneSettings
    from arkfed.evaluation.tables import finetune_table

    bad = [i for i in init if i not in ("model", "random", "imagenet")]
    if bad:
        raise ArkfedError(f"--init takes model, random or imagenet, got {bad[0]!r}")
    inits = tuple(dict.fromkeys(["model", *init]))  # the model is the reference of every comparison
    try:
        low, high = (float(x) for x in crop_scale.split(","))
    except ValueError:
        raise ArkfedError(f"--crop-scale takes MIN,MAX (e.g. 0.5,1), got {crop_scale!r}") from None
    settings = FineTuneSettings(epochs=epochs, lr=lr, batch_size=batch_size, crop_scale=(low, high),
                                max_steps_per_epoch=max_steps_per_epoch,
                                min_positives=min_positives, n_boot=bootstrap, device=_device(device))
    done = run_finetune(ModelSource(model, which, arch, img_size), site, settings, out, inits=inits, sizes=tuple(parse_sizes(train_sizes)),
                        seeds=_seeds(seeds), correction=_correction(correction), compare=compare or (), plugins=plugins_dir or (),
                        protocol=protocol)
    _show(finetune_table(done.result, epochs, min_positives), done)


# -- bias -------------------------------------------------------------------------------------
def bias(
    model: Path = ModelArg,
    site: str = SiteOpt,
    features: str = typer.Option("projector", help="projector | backbone"),
    balance: bool = typer.Option(True, help="subsample the larger sex group to the smaller's size"),
    alpha: float = typer.Option(0.05, help="significance level of the adjusted p-values"),
    correction: str = typer.Option("holm", help="multiple-comparison correction: holm | bh (Benjamini-Hochberg)"),
    min_positives: int = MinPosOpt,
    bootstrap: int = typer.Option(1000, min=0, help="bootstrap resamples for the AUCs' 95% CIs (0 = none)"),
    seed: int = typer.Option(0, min=0),
    which: str = WhichOpt,
    arch: Optional[str] = ArchOpt,
    img_size: int = ImgSizeOpt,
    batch_size: int = BatchOpt,
    device: str = DeviceOpt,
    plugins_dir: Optional[List[Path]] = PluginsOpt,
    protocol: Optional[str] = ProtocolOpt,
    out: Path = typer.Option(..., help="folder for results.json and bias.png"),
) -> None:
    """Gender bias (Ark protocol): probes on male-only / female-only training images, each tested on both sexes;
    DeLong tests corrected for multiple comparisons, bootstrap CIs."""
    from arkfed.evaluation.bias import BiasSettings
    from arkfed.evaluation.commands import ModelSource, run_bias
    from arkfed.evaluation.tables import bias_table

    settings = BiasSettings(features=features, balance=balance, alpha=alpha, correction=_correction(correction),
                            min_positives=min_positives, n_boot=bootstrap, seed=seed, batch_size=batch_size, device=_device(device))
    done = run_bias(ModelSource(model, which, arch, img_size), site, settings, out, plugins_dir or (), protocol)
    _show(bias_table(done.result), done)


# -- segment ----------------------------------------------------------------------------------
def segment(
    model: Path = ModelArg,
    images: Path = typer.Option(..., help="folder of images"),
    masks: Path = typer.Option(..., help="folder of masks named like the images (foreground > 127)"),
    train_sizes: str = typer.Option("5,10,20,all", help="training-set sizes (pairs) of the label-efficiency curve"),
    seeds: str = typer.Option("0,1", help="comma-separated seeds (training-pair draws); the test pairs images, so two suffice"),
    compare: Optional[List[Path]] = CompareOpt,
    encoder: str = typer.Option("finetuned", help="finetuned (encoder trains at 0.1x the decoder lr) | frozen"),
    img_size: int = typer.Option(96, min=16, help="image size for segmentation"),
    steps: int = typer.Option(40, min=1, help="optimisation steps per run (the same at every training-set size)"),
    lr: float = typer.Option(1e-3, help="decoder lr (the encoder trains at 0.1x when fine-tuned)"),
    batch_size: int = typer.Option(8, min=1),
    train_fraction: float = typer.Option(0.8, help="share of the pairs in the training pool; the rest is scored"),
    limit: Optional[int] = typer.Option(None, min=3, help="use at most this many pairs"),
    correction: str = CorrectionOpt,
    bootstrap: int = typer.Option(1000, min=0, help="bootstrap resamples for the Dice CIs over test images in results.json"),
    which: str = WhichOpt,
    arch: Optional[str] = ArchOpt,
    device: str = DeviceOpt,
    out: Path = typer.Option(..., help="folder for results.json and segment.png"),
) -> None:
    """Segmentation transfer as a label-efficiency curve: a U-Net decoder on the backbone's multi-scale features,
    Dice on held-out pairs at several training-set sizes, against random init and --compare models."""
    from arkfed.errors import ArkfedError
    from arkfed.evaluation.commands import ModelSource, run_segment
    from arkfed.evaluation.curves import parse_sizes
    from arkfed.evaluation.segment import SegmentSettings
    from arkfed.evaluation.tables import segment_table

    if encoder not in ("finetuned", "frozen"):
        raise ArkfedError(f"--encoder takes finetuned or frozen, got {encoder!r}")
    settings = SegmentSettings(img_size=img_size, steps=steps, lr=lr, batch_size=batch_size, train_fraction=train_fraction, limit=limit,
                               encoder=encoder, train_sizes=tuple(parse_sizes(train_sizes)), seeds=_seeds(seeds), n_boot=bootstrap,
                               correction=_correction(correction), device=_device(device))
    done = run_segment(ModelSource(model, which, arch, img_size), images, masks, settings, out, compare or ())
    _show(segment_table(done.result), done)


# -- compare ----------------------------------------------------------------------------------
def compare(
    models: List[Path] = typer.Argument(..., help="run folders, export folders or weights files; the first is the reference",
                                         show_default=False),
    site: str = SiteOpt,
    shots: str = typer.Option("5,all", help="shots per class of the few-shot probe curve"),
    seeds: str = SeedsOpt,
    features: str = typer.Option("projector", help="projector | backbone (plain timm files have no projector: use backbone)"),
    finetune_epochs: int = typer.Option(0, min=0, help="fine-tune every model this many epochs on the full training split (0 = skip)"),
    bias: bool = typer.Option(True, help="run the gender-bias protocol when the site records sex"),
    zero_shot: bool = typer.Option(True, help="also score each model's heads for other sites zero-shot (arkfed zero-shot)"),
    min_positives: int = MinPosOpt,
    correction: str = CorrectionOpt,
    bootstrap: int = typer.Option(1000, min=0, help="bootstrap resamples for single-run CIs"),
    arch: Optional[str] = ArchOpt,
    img_size: int = ImgSizeOpt,
    batch_size: int = BatchOpt,
    device: str = DeviceOpt,
    plugins_dir: Optional[List[Path]] = PluginsOpt,
    protocol: Optional[str] = ProtocolOpt,
    out: Path = typer.Option(..., help="folder for results.json and compare.png"),
) -> None:
    """Several models on one site with one protocol (own head, few-shot probe curve, fine-tuning, bias, zero-shot): one table,
    one figure, results.json."""
    from arkfed.evaluation.commands import run_compare
    from arkfed.evaluation.compare import CompareSettings
    from arkfed.evaluation.curves import parse_sizes
    from arkfed.evaluation.tables import compare_table

    settings = CompareSettings(shots=tuple(parse_sizes(shots)), seeds=_seeds(seeds), features=features, finetune_epochs=finetune_epochs,
                               bias=bias, zero_shot=zero_shot, min_positives=min_positives,
                               n_boot=bootstrap, correction=_correction(correction),
                               batch_size=batch_size, device=_device(device))
    done = run_compare(models, site, settings, out, arch=arch, img_size=img_size, plugins=plugins_dir or (), protocol=protocol)
    _show(compare_table(done.result), done)


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
    from arkfed.evaluation.commands import run_predict
    from arkfed.evaluation.tables import predict_table

    done = run_predict(model, images, out, which, batch_size, _device(device))
    _show(predict_table(done.result), done)


# -- zero-shot --------------------------------------------------------------------------------
def zero_shot(
    model: Path = ModelArg,
    site: str = SiteOpt,
    split: str = typer.Option("test", help="train | val | test"),
    ten_crop: Optional[bool] = typer.Option(
        None, "--ten-crop/--single-crop", help="default: ten crops on the test split of models trained with --recipe ark/ark+"),
    recalibrate_bn: bool = typer.Option(False, help="re-estimate BatchNorm on the site's training images (pixels only, no labels)"),
    bootstrap: int = typer.Option(1000, min=0, help="bootstrap resamples for the 95% CIs (0 = none)"),
    min_positives: int = MinPosOpt,
    seed: int = typer.Option(0, min=0),
    which: str = WhichOpt,
    batch_size: int = BatchOpt,
    device: str = DeviceOpt,
    plugins_dir: Optional[List[Path]] = PluginsOpt,
    protocol: Optional[str] = ProtocolOpt,
    out: Path = typer.Option(..., help="folder for results.json"),
) -> None:
    """Score a site the model never trained on, without training: each class through the findings vocabulary to the
    heads that know it (mean probability where several do), per-class AUC with bootstrap 95% CIs; unknown classes listed."""
    from arkfed.evaluation.commands import run_zero_shot
    from arkfed.evaluation.tables import zero_shot_table
    from arkfed.evaluation.zero_shot import ZeroShotSettings

    settings = ZeroShotSettings(split=split, ten_crop=ten_crop, recalibrate_bn=recalibrate_bn, n_boot=bootstrap, seed=seed,
                                min_positives=min_positives, batch_size=batch_size, device=_device(device))
    done = run_zero_shot(model, site, settings, out, which, plugins_dir or (), protocol)
    _show(zero_shot_table(done.result), done)


# -- report -----------------------------------------------------------------------------------
def report(
    run: Path = typer.Argument(..., help="run folder", show_default=False),
    out: Optional[Path] = typer.Option(None, help="report folder (default RUN/report)"),
) -> None:
    """PNG plots (mean AUC per site over rounds, teacher vs student, loss curves) and an HTML page with the summary table."""
    from arkfed.evaluation.commands import run_report
    from arkfed.evaluation.tables import report_table

    done = run_report(run, out)
    _show(report_table(done.result), done)
    _console().print(f"report: {done.path.parent / 'report.html'}")


def register(app: typer.Typer) -> None:
    app.command(name="export")(export)
    app.command(name="evaluate")(evaluate)
    app.command(name="linear-probe")(linear_probe)
    app.command(name="finetune")(finetune)
    app.command(name="bias")(bias)
    app.command(name="segment")(segment)
    app.command(name="predict")(predict)
    app.command(name="zero-shot")(zero_shot)
    app.command(name="report")(report)
    app.command(name="compare")(compare)
