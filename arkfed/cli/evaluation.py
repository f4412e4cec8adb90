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
    from arkfed.devices import resolve_device

    return str(resolve_device(name))


def _spec(arch: Optional[str], img_size: int):
    from arkfed.spec import ModelSpec

    return ModelSpec(model=arch, img_size=img_size) if arch else None


def _load(source: Path, which: str, arch: Optional[str], img_size: int):
    from arkfed.errors import ArkfedError
    from arkfed.evaluation.sources import load_one, source_kind
    from arkfed.model.weights import SPEC_KEY

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
    from arkfed.site.load import load_site

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


def _chart(out: Path, result: dict, name: str, draw) -> Optional[Path]:
    """Write ``results.json``, then ``draw(out / name)``: a figure that fails warns in one line and keeps the numbers.
    On success ``result["chart"]`` names the figure (the caller's :func:`_finish` writes it in)."""
    from arkfed.evaluation.plots import try_figure
    from arkfed.evaluation.sources import write_results

    write_results(out, result)
    chart = try_figure(lambda: draw(out / name), name)
    if chart is not None:
        result["chart"] = chart.name
    return chart


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
    calibrate: Optional[List[str]] = typer.Option(
        None, "--calibrate", help="site whose BatchNorm statistics to ship (repeat; the first one's go into model.safetensors)"),
    plugins_dir: Optional[List[Path]] = PluginsOpt,
) -> None:
    """Export the teacher as a plain timm model (model.safetensors + config.json), with projector, its heads and a model card."""
    from arkfed.evaluation.export import export_model

    sites = [_site(ref, plugins_dir) for ref in calibrate or ()]
    result = export_model(run, out, which, sites)
    table = _table(f"export {out}", "file", "content", numbers=False)
    bn = f", BatchNorm statistics of site {sites[0].name}" if sites else ""
    table.add_row("model.safetensors", f"{result.architecture} backbone, {result.num_features} features{bn}")
    table.add_row("config.json", "timm pretrained config + arkfed spec")
    for site, classes in sorted(result.heads.items()):
        table.add_row(f"heads/{site}.safetensors", f"{result.heads_of} head: " + ", ".join(classes))
    for s in sites:
        table.add_row(f"batchnorm/{s.name}.safetensors", "BatchNorm statistics of its training images")
    table.add_row("README.md", "model card")
    if result.note:
        table.caption = result.note
    _finish(out, result.to_json(), table)
    _console().print(f"load with: timm.create_model({result.architecture!r}, pretrained=True, num_classes=0, "
                     f"pretrained_cfg_overlay=dict(file='{out / 'model.safetensors'}'))")


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
    out: Path = typer.Option(..., help="folder for results.json"),
) -> None:
    """Per-class AUC and mean AUC (accuracy for multiclass) of each model with its own head, BatchNorm
    recalibrated on the site's training images as in training; bootstrap 95% CIs."""
    from arkfed.evaluation.evaluate import TOO_FEW, evaluate_source

    s = _site(site, plugins_dir)
    result = evaluate_source(model, s, split, ten_crop, bootstrap, batch_size, _device(device), seed, min_positives)
    names = list(result["models"])
    first = result["models"][names[0]]
    table = _table(f"{s.name} / {split} ({'ten-crop' if result['ten_crop'] else 'single crop'})", "class", "positives",
                   *[f"{n} AUC" for n in names], *[f"{n} 95% CI" for n in names])
    for c in s.schema.classes:
        mark = f" ({TOO_FEW})" if c in first["too_few_positives"] else ""
        table.add_row(c + mark, str(first["positives"][c]), *[_f(result["models"][n]["auc"].get(c)) for n in names],
                      *[_ci(result["models"][n].get("auc_ci", {}).get(c)) for n in names])
    table.add_row("[b]mean AUC[/b]", "", *[_f(result["models"][n]["mean_auc"]) for n in names],
                  *[_ci(result["models"][n].get("mean_auc_ci")) for n in names])
    if s.schema.task == "multiclass":
        table.add_row("accuracy", "", *[_f(result["models"][n].get("accuracy")) for n in names],
                      *[_ci(result["models"][n].get("accuracy_ci")) for n in names])
    table.caption = evaluate_caption(result, first, min_positives)
    _finish(out, result, table)


def evaluate_caption(result: dict, first: dict, min_positives: int) -> str:
    """What the table's numbers are: the CI unit, the mean's classes, the heads and BatchNorm."""
    parts = []
    if "bootstrap" in first:
        b = first["bootstrap"]
        parts.append(f"95% CIs: percentile bootstrap over {b['unit']}s ({b['resamples']} resamples)")
    if first["too_few_positives"]:
        from arkfed.evaluation.evaluate import TOO_FEW

        parts.append(f"classes with fewer than {min_positives} positives are marked '{TOO_FEW}'; mean AUC without them: "
                     + ", ".join(f"{n} {_f(m.get('mean_auc_min_positives'))}" for n, m in result["models"].items()))
    heads = ", ".join(f"{n}: {h}/" for n, h in result.get("heads", {}).items())
    if heads:
        parts.append(f"heads {heads}")
    if any(m.get("bn_recalibrated") for m in result["models"].values()):
        parts.append("BatchNorm statistics re-estimated on the site's training images (as in training)")
    parts += result.get("notes", [])
    return "; ".join(parts)


# -- curves (segment, finetune, linear-probe) -------------------------------------------------
CompareOpt = typer.Option(None, "--compare", help="another model (run, export or weights file) to put on the same curve; repeat")
SeedsOpt = typer.Option("0,1,2", help="comma-separated seeds; each draws the training subset shared by every initialisation")
CorrectionOpt = typer.Option("holm", help="multiple-comparison correction of the paired tests: holm | bh")


def _compared(paths: Optional[List[Path]], which: str) -> dict:
    """``--compare`` models keyed by a readable, unique name (the folder or file name)."""
    out: dict = {}
    for path in paths or ():
        name = path.name
        while name in out or name in ("model", "random"):
            name += "'"
        out[name] = _load(path, which, None, 224)
    return out


def _correction(text: str) -> str:
    from arkfed.errors import ArkfedError

    if text not in ("holm", "bh"):
        raise ArkfedError(f"--correction takes holm or bh, got {text!r}")
    return text


BOOT_NOTE = "† no variation over seeds: 95% CI from a percentile bootstrap over test cases of one run"


def _point(point: dict) -> str:
    """``mean [CI]`` of a curve point; † marks a bootstrap CI (see :func:`curves.shown_ci`)."""
    from arkfed.evaluation.curves import shown_ci

    ci = shown_ci(point)
    return f"{_f(point['mean'])} {_ci(ci)}{'†' if ci is not None and ci is point.get('bootstrap_ci') else ''}"


def _any_bootstrap(curve: dict) -> bool:
    from arkfed.evaluation.curves import shown_ci

    points = [p for pts in curve["inits"].values() for p in pts.values()]
    return any(p.get("bootstrap_ci") is not None and shown_ci(p) is p.get("bootstrap_ci") for p in points)


def _delta(difference: float, c: dict) -> str:
    if c.get("p") is None or not c["p"] == c["p"]:  # NaN: not tested
        return f"{difference:+.3f} (not tested)"
    return f"{difference:+.3f}{'*' if c['significant'] else ''} ({_f(c['p_adjusted'])})"


def _curve_table(curve: dict, title: str, extra_caption: str = ""):
    """Rows: training-set sizes; columns: each initialisation's mean [95% CI], then the model's
    difference to each other initialisation with its adjusted p-value."""
    inits = list(curve["inits"])
    others = list(curve["comparisons"])
    table = _table(title, "size", *[f"{i} {curve['metric']} [95% CI]" for i in inits], *[f"model − {o} (p adj)" for o in others])
    for label in curve["sizes"]:
        n = curve["inits"]["model"][label]["train_size"]
        cells = [_point(curve["inits"][i][label]) for i in inits]
        for o in others:
            c = curve["comparisons"][o][label]
            cells.append(_delta(c["difference"], c))
        table.add_row(f"{label} ({n})" if label == "all" else label, *cells)
    caption = [curve["pretraining"]["sentence"],
               f"CIs: {curve['interval']}; p: {curve['test']}, {curve['correction_name']}-adjusted over {curve['tests_in_family']} tests; "
               f"* p adj < {curve['alpha']}"]
    if _any_bootstrap(curve):
        caption.append(BOOT_NOTE)
    if extra_caption:
        caption.append(extra_caption)
    table.caption = "; ".join(caption)
    return table


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
    out: Path = typer.Option(..., help="folder for results.json and linear-probe.png"),
) -> None:
    """Linear probes on frozen embeddings as a few-shot curve: the model, a random init and --compare models,
    same draws per seed, paired tests; test mean AUC."""
    from arkfed.errors import ArkfedError
    from arkfed.evaluation.curves import parse_sizes, plot_curves
    from arkfed.evaluation.linear_probe import ProbeCurveSettings, probe_curve

    if features not in ("projector", "backbone"):
        raise ArkfedError(f"--features is projector or backbone, got {features!r}")
    s = _site(site, plugins_dir)
    net = _load(model, which, arch, img_size)
    sizes = tuple(parse_sizes(str(shots) if shots else train_sizes))
    settings = ProbeCurveSettings(train_sizes=sizes, seeds=_seeds(seeds), features=features, c=c,
                                  random_baseline=baseline, min_positives=min_positives, n_boot=bootstrap,
                                  correction=_correction(correction), batch_size=batch_size, device=_device(device))
    result = {"source": str(model), "site": s.name,
              **probe_curve({"model": net, **_compared(compare, which)}, s.split("train"), s.split("test"), s.schema, settings)}
    curve = result["curve"]
    chart = _chart(out, result, "linear-probe.png",
                   lambda path: plot_curves(curve, path, "test mean AUC", f"Linear probes on {s.name} ({features} features)"))
    few = result["too_few_positives"]
    table = _curve_table(curve, f"linear probe on {s.name}: test mean AUC by shots per class ({features} features)",
                         f"classes with fewer than {min_positives} test positives: {', '.join(few)}" if few else "")
    _finish(out, result, table)
    if chart:
        _console().print(f"chart: {chart}")


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
    out: Path = typer.Option(..., help="folder for results.json and finetune.png"),
) -> None:
    """Full fine-tuning with a new head on the backbone at several training-set sizes; the best-val epoch is
    scored on the test split; the model against random init (and --compare models), paired tests."""
    from arkfed.errors import ArkfedError
    from arkfed.evaluation.curves import parse_sizes, plot_curves
    from arkfed.evaluation.finetune import FineTuneSettings, finetune_curve

    bad = [i for i in init if i not in ("model", "random", "imagenet")]
    if bad:
        raise ArkfedError(f"--init takes model, random or imagenet, got {bad[0]!r}")
    inits = tuple(dict.fromkeys(["model", *init]))  # the model is the reference of every comparison
    s = _site(site, plugins_dir)
    net = _load(model, which, arch, img_size)
    try:
        low, high = (float(x) for x in crop_scale.split(","))
    except ValueError:
        raise ArkfedError(f"--crop-scale takes MIN,MAX (e.g. 0.5,1), got {crop_scale!r}") from None
    settings = FineTuneSettings(epochs=epochs, lr=lr, batch_size=batch_size, crop_scale=(low, high),
                                max_steps_per_epoch=max_steps_per_epoch,
                                min_positives=min_positives, n_boot=bootstrap, device=_device(device))
    result = {"source": str(model), "site": s.name,
              **finetune_curve({"model": net, **_compared(compare, which)}, s.split("train"), s.splits.get("val"), s.split("test"),
                               s.schema, inits, tuple(parse_sizes(train_sizes)), _seeds(seeds), settings, _correction(correction))}
    curve = result["curve"]
    chart = _chart(out, result, "finetune.png",
                   lambda path: plot_curves(curve, path, "test mean AUC", f"Fine-tuning on {s.name} ({epochs} epochs)"))
    few = result["runs"][0]["test"].get("too_few_positives", [])
    table = _curve_table(curve, f"fine-tuning on {s.name} ({epochs} epochs): test mean AUC by training-set size",
                         f"classes with fewer than {min_positives} test positives: {', '.join(few)}" if few else "")
    _finish(out, result, table)
    if chart:
        _console().print(f"chart: {chart}")


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
    out: Path = typer.Option(..., help="folder for results.json and bias.png"),
) -> None:
    """Gender bias (Ark protocol): probes on male-only / female-only training images, each tested on both sexes;
    DeLong tests corrected for multiple comparisons, bootstrap CIs."""
    from arkfed.errors import ArkfedError
    from arkfed.evaluation.bias import BiasSettings, bias_analysis, plot_bias

    if correction not in ("holm", "bh"):
        raise ArkfedError(f"--correction takes holm or bh, got {correction!r}")
    s = _site(site, plugins_dir)
    net = _load(model, which, arch, img_size)
    settings = BiasSettings(features=features, balance=balance, alpha=alpha, correction=correction, min_positives=min_positives,
                            n_boot=bootstrap, seed=seed, batch_size=batch_size, device=_device(device))
    result = {"source": str(model), "site": s.name, "model": which,
              **bias_analysis(net, s.split("train"), s.split("test"), s.schema, settings)}
    chart = _chart(out, result, "bias.png", lambda path: plot_bias(
        result, path, f"{s.name}: gender bias of {model.name} (* DeLong, {correction}-adjusted p < {alpha})"))
    table = _table(f"gender bias on {s.name} (train {result['train_sizes']}, test {result['test_sizes']}); A→B: trained on A, tested on B",
                   "finding", "M→M [95% CI]", "F→M", "gap M", "p", "p adj", "F→F [95% CI]", "M→F", "gap F", "p", "p adj")
    unscored = []
    for name, e in result["findings"].items():
        if all(_f(e[k]) == "n/a" for k in ("M->M", "F->M", "F->F", "M->F")):
            unscored.append(name)
            continue
        cells = {}
        for sex, other in (("M", "F"), ("F", "M")):
            few = e[f"too_few_on_{sex}"]
            ci = e.get(f"{sex}->{sex}_ci")
            cells[sex] = [f"{_f(e[f'{sex}->{sex}'])} {_ci(ci) if ci else ''}".strip(), _f(e[f"{other}->{sex}"]),
                          _f(e[f"gap_on_{sex}"]) + ("*" if e[f"significant_on_{sex}"] else ""),
                          _f(e[f"p_on_{sex}"]), f"({TOO_FEW_SHORT}: {e[f'positives_on_{sex}']})" if few else _f(e[f"p_adjusted_on_{sex}"])]
        table.add_row(name, *cells["M"], *cells["F"])
    table.add_row("[b]mean AUC[/b]", _f(result["mean_auc"]["M->M"]), _f(result["mean_auc"]["F->M"]), "", "", "",
                  _f(result["mean_auc"]["F->F"]), _f(result["mean_auc"]["M->F"]), "", "", "")
    caption = [f"* {result['correction_name']}-adjusted DeLong p < {alpha} over {result['tests_in_family']} tests",
               f"CIs: percentile bootstrap over {result['bootstrap']['unit']}s ({bootstrap} resamples)"
               if bootstrap else "no CIs (--bootstrap 0)"]
    if result["too_few_positives"]:
        caption.append(f"findings with fewer than {min_positives} positives in a test group are marked 'too few positives' "
                       f"({', '.join(result['too_few_positives'])}): not tested, not starred, left out of the means")
    if unscored:
        caption.append(f"not scorable on this test split (one label value): {', '.join(unscored)}")
    table.caption = "; ".join(caption)
    _finish(out, result, table)
    if chart:
        _console().print(f"chart: {chart}")


TOO_FEW_SHORT = "too few positives"


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
    from arkfed.evaluation.curves import parse_sizes, plot_curves
    from arkfed.evaluation.segment import SegmentSettings, segmentation_curve

    if encoder not in ("finetuned", "frozen"):
        raise ArkfedError(f"--encoder takes finetuned or frozen, got {encoder!r}")
    net = _load(model, which, arch, img_size)
    settings = SegmentSettings(img_size=img_size, steps=steps, lr=lr, batch_size=batch_size, train_fraction=train_fraction, limit=limit,
                               encoder=encoder, train_sizes=tuple(parse_sizes(train_sizes)), seeds=_seeds(seeds), n_boot=bootstrap,
                               correction=_correction(correction), device=_device(device))
    result = {"source": str(model), **segmentation_curve({"model": net, **_compared(compare, which)}, images, masks, settings)}
    curve = result["curve"]
    chart = _chart(out, result, "segment.png", lambda path: plot_curves(
        curve, path, "Dice", f"Segmentation transfer ({encoder} encoder, {img_size} px, {steps} steps)"))
    table = _curve_table(curve, f"segmentation transfer: Dice on {result['test_pairs']} held-out pairs ({encoder} encoder, {img_size} px)",
                         f"all-foreground mask Dice {_f(result['trivial_dice'])}")
    _finish(out, result, table)
    if chart:
        _console().print(f"chart: {chart}")


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
    min_positives: int = MinPosOpt,
    correction: str = CorrectionOpt,
    bootstrap: int = typer.Option(1000, min=0, help="bootstrap resamples for single-run CIs"),
    arch: Optional[str] = ArchOpt,
    img_size: int = ImgSizeOpt,
    batch_size: int = BatchOpt,
    device: str = DeviceOpt,
    plugins_dir: Optional[List[Path]] = PluginsOpt,
    out: Path = typer.Option(..., help="folder for results.json and compare.png"),
) -> None:
    """Several models on one site with one protocol (own head, few-shot probe curve, fine-tuning, bias): one table,
    one figure, results.json."""
    from arkfed.evaluation.compare import CompareSettings, Entry, compare_models, comparison_rows, plot_comparison
    from arkfed.evaluation.curves import parse_sizes
    from arkfed.evaluation.sources import model_heads

    s = _site(site, plugins_dir)
    entries = []
    for path in models:
        name = path.name  # a file keeps its suffix: "model.safetensors" never collides with the curve key "model"
        while name in [e.name for e in entries] or name in ("model", "random"):
            name += "'"
        heads, note = model_heads(path, "teacher")
        head = heads.get(s.name)
        if head is not None and head.schema.classes != s.schema.classes:
            head, note = None, f"{path}: head {s.name!r} predicts other classes; own-head AUC skipped"
        entries.append(Entry(name, _load(path, "teacher", arch, img_size), head, note))
    settings = CompareSettings(shots=tuple(parse_sizes(shots)), seeds=_seeds(seeds), features=features, finetune_epochs=finetune_epochs,
                               bias=bias, min_positives=min_positives, n_boot=bootstrap, correction=_correction(correction),
                               batch_size=batch_size, device=_device(device))
    result = {"sources": [str(m) for m in models], **compare_models(entries, s, settings)}
    chart = _chart(out, result, "compare.png",
                   lambda path: plot_comparison(result, path, f"{s.name}: {', '.join(e.name for e in entries)}"))
    curve = result["probe"]["curve"]
    # the comparison column: the largest size the seeds could test (at "all" a probe is deterministic)
    tested = [lab for lab in curve["sizes"] if any(c[lab]["p"] == c[lab]["p"] for c in curve["comparisons"].values())]
    at = (tested or curve["sizes"])[-1]
    columns = ["model", "own head AUC [95% CI]",
               *[f"probe {lab}-shot [95% CI]" if lab != "all" else "probe all [95% CI]" for lab in curve["sizes"]],
               f"Δ vs {result['reference']} ({at}{'-shot' if at != 'all' else ''}; p adj)"]
    if "finetune" in result:
        columns.append("fine-tuned [95% CI]")
    if bias and "skipped" not in result.get("bias", {}):
        columns.append("bias: significant gaps")
    table = _table(f"comparison on {s.name} (test split, {len(curve['inits'][ 'model'][curve['sizes'][0]]['seeds'])} seeds)", *columns)
    rows = comparison_rows(result)
    for row in rows:
        key = row["key"]
        own = row.get("own head")
        cells = [f"{_f(own[0])} {_ci(own[1])}" if own else "n/a (no head)"]
        for lab in curve["sizes"]:
            cells.append(_point(curve["inits"][key][lab]))
        c = curve["comparisons"].get(key, {}).get(at)
        cells.append("reference" if key == "model" else _delta(-c["difference"], c))
        if "finetune" in result:
            f = row.get("fine-tuned")
            cells.append(f"{_f(f[0])} {_ci(f[1])}" if f else "n/a")
        if bias and "skipped" not in result.get("bias", {}):
            b = row.get("bias")
            cells.append(f"{b['significant_gaps']} of {b['tests']}" if b else "n/a")
        table.add_row(row["name"], *cells)
    if "random" in curve["inits"]:
        table.add_row("random init", "", *[_point(curve["inits"]["random"][lab]) for lab in curve["sizes"]], "",
                      *([""] * (len(columns) - 3 - len(curve["sizes"]))))
    caption = [f"probe CIs: {curve['interval']}; Δ: {curve['test']}, {curve['correction_name']}-adjusted; * p adj < {curve['alpha']}",
               "own head: BatchNorm recalibrated on the site's training images, bootstrap CI over "
               + (next(iter(result["own_head"].values()))["bootstrap"]["unit"] + "s" if result["own_head"] and bootstrap else "test cases")]
    if _any_bootstrap(curve):
        caption.append(BOOT_NOTE)
    if result["probe"]["too_few_positives"]:
        few = ", ".join(result["probe"]["too_few_positives"])
        caption.append(f"classes with fewer than {min_positives} test positives: {few}")
    if "skipped" in result.get("bias", {}):
        caption.append(f"bias skipped: {result['bias']['skipped']}")
    caption += result["notes"]
    table.caption = "; ".join(caption)
    _finish(out, result, table)
    if chart:
        _console().print(f"chart: {chart}")


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
    from arkfed.evaluation.sources import model_heads

    net = _load(model, which, None, 224)
    heads, note = model_heads(model, which)
    result = {"source": str(model), "model": which, **predict_images(net, heads, images, batch_size, _device(device)),
              "notes": [note] if note else []}
    entries = result["images"]
    table = _table("zero-shot predictions (probabilities)", "head / class", *[Path(e["image"]).name for e in entries])
    for key in entries[0]["scores"]:
        table.add_row(key, *[_f(e["scores"][key]) for e in entries])
    for finding in entries[0]["combined"]:
        table.add_row(f"[b]{finding}[/b] (combined: {', '.join(entries[0]['combined'][finding]['from'])})",
                      *[_f(e["combined"][finding]["score"]) for e in entries])
    if note:
        table.caption = note
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
    app.command(name="compare")(compare)
