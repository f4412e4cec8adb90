"""The library side of the reuse commands: one entry function per ``arkfed`` command.

Each loads the model(s) and the site, runs the analysis of its module, writes
``OUT/results.json`` and only then draws the figure through :func:`arkfed.evaluation.plots.try_figure`
(a figure that fails warns in one line and the numbers stay; a figure drawn is named in the
results, written again). It returns a :class:`Done`, which :mod:`arkfed.evaluation.tables` renders.

Every command that reads a site takes ``protocol`` (``arkfed`` | ``ark``; None: as the site YAML
says; :func:`arkfed.site.load.load_site`) and its results record ``"protocol"`` (and, when the
protocol does not change how that site's plugin reads, ``"protocol_note"``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from arkfed.evaluation.plots import try_figure
from arkfed.evaluation.sources import load_source, write_results

if TYPE_CHECKING:
    from arkfed.evaluation.bias import BiasSettings
    from arkfed.evaluation.compare import CompareSettings
    from arkfed.evaluation.finetune import FineTuneSettings
    from arkfed.evaluation.linear_probe import ProbeCurveSettings
    from arkfed.evaluation.segment import SegmentSettings
    from arkfed.evaluation.zero_shot import ZeroShotSettings
    from arkfed.model.ark import ArkModel
    from arkfed.site.load import Site

Plugins = Sequence[Path]


@dataclass
class Done:
    """What a command wrote: its results (as in ``results.json``), that file, the figure (None when
    there is none or it failed) and the site it ran on (when it ran on one)."""

    result: dict
    path: Path
    chart: Path | None = None
    site: Site | None = None


@dataclass(frozen=True)
class ModelSource:
    """A command's MODEL: a run folder, an export folder or a weights file; ``arch`` and ``img_size``
    only for a plain backbone file (see :func:`arkfed.evaluation.sources.load_source`)."""

    path: Path
    which: str = "teacher"
    arch: str | None = None
    img_size: int = 224

    def load(self) -> ArkModel:
        return load_source(self.path, self.which, self.arch, self.img_size)


def load_site(ref: str, plugins: Plugins = (), protocol: str | None = None) -> Site:
    """A site by name (``sites/NAME.yaml``) or YAML path, with extra dataset plugin folders, read
    under ``protocol`` (None: as its YAML says)."""
    from arkfed.site.load import load_site as load

    return load(ref, plugins or (), protocol=protocol)


def protocol_record(site: Site) -> dict:
    """What a result records of the reading protocol: ``protocol`` and, when there is one, ``protocol_note``."""
    return {"protocol": site.protocol, **({"protocol_note": site.protocol_note} if site.protocol_note else {})}


def compared_models(paths: Sequence[Path], which: str) -> dict[str, ArkModel]:
    """``--compare`` models keyed by a readable, unique name (the folder or file name)."""
    out: dict = {}
    for path in paths or ():
        name = path.name
        while name in out or name in ("model", "random"):
            name += "'"
        out[name] = load_source(path, which)
    return out


def save(out: Path, result: dict, figure: tuple[str, Callable[[Path], Path]] | None = None, site: Site | None = None) -> Done:
    """Write ``out/results.json``; then draw ``figure`` (name, draw(path)) if any and name it in the results."""
    path = write_results(out, result)
    chart = None
    if figure is not None:
        name, draw = figure
        chart = try_figure(lambda: draw(out / name), name)
        if chart is not None:
            result["chart"] = chart.name
            path = write_results(out, result)
    return Done(result, path, chart, site)


# -- the commands -----------------------------------------------------------------------------
def run_export(source: Path, out: Path, which: str = "teacher", calibrate: Sequence[str] = (), plugins: Plugins = ()) -> Done:
    """``arkfed export``: :func:`arkfed.evaluation.export.export_model`, BatchNorm calibrated on the ``calibrate`` sites."""
    from arkfed.evaluation.export import export_model

    sites = [load_site(ref, plugins) for ref in calibrate or ()]
    return save(out, export_model(source, out, which, sites).to_json())


def run_evaluate(source: Path, site: str, out: Path, *, plugins: Plugins = (), split: str = "test", ten_crop: bool | None = None,
                 n_boot: int = 1000, batch_size: int = 64, device: str = "cpu", seed: int = 0, min_positives: int = 10,
                 protocol: str | None = None) -> Done:
    """``arkfed evaluate``: :func:`arkfed.evaluation.evaluate.evaluate_source`."""
    from arkfed.evaluation.evaluate import evaluate_source

    s = load_site(site, plugins, protocol)
    result = evaluate_source(source, s, split, ten_crop, n_boot, batch_size, device, seed, min_positives)
    return save(out, {**result, **protocol_record(s)}, site=s)


def run_linear_probe(model: ModelSource, site: str, settings: ProbeCurveSettings, out: Path, compare: Sequence[Path] = (),
                     plugins: Plugins = (), protocol: str | None = None) -> Done:
    """``arkfed linear-probe``: :func:`arkfed.evaluation.linear_probe.probe_curve` and its figure."""
    from arkfed.evaluation.curves import plot_curves
    from arkfed.evaluation.linear_probe import probe_curve

    s = load_site(site, plugins, protocol)
    net = model.load()
    result = {"source": str(model.path), "site": s.name, **protocol_record(s),
              **probe_curve({"model": net, **compared_models(compare, model.which)}, s.split("train"), s.split("test"), s.schema, settings)}
    title = f"Linear probes on {s.name} ({settings.features} features)"
    return save(out, result, ("linear-probe.png", lambda path: plot_curves(result["curve"], path, "test mean AUC", title)), s)


def run_finetune(model: ModelSource, site: str, settings: FineTuneSettings, out: Path, *, inits: tuple[str, ...],
                 sizes: tuple[int | None, ...], seeds: tuple[int, ...], correction: str = "holm", compare: Sequence[Path] = (),
                 plugins: Plugins = (), protocol: str | None = None) -> Done:
    """``arkfed finetune``: :func:`arkfed.evaluation.finetune.finetune_curve` and its figure."""
    from arkfed.evaluation.curves import plot_curves
    from arkfed.evaluation.finetune import finetune_curve

    s = load_site(site, plugins, protocol)
    net = model.load()
    result = {"source": str(model.path), "site": s.name, **protocol_record(s),
              **finetune_curve({"model": net, **compared_models(compare, model.which)}, s.split("train"), s.splits.get("val"),
                               s.split("test"), s.schema, inits, sizes, seeds, settings, correction)}
    title = f"Fine-tuning on {s.name} ({settings.epochs} epochs)"
    return save(out, result, ("finetune.png", lambda path: plot_curves(result["curve"], path, "test mean AUC", title)), s)


def run_bias(model: ModelSource, site: str, settings: BiasSettings, out: Path, plugins: Plugins = (), protocol: str | None = None) -> Done:
    """``arkfed bias``: :func:`arkfed.evaluation.bias.bias_analysis` and its figure."""
    from arkfed.evaluation.bias import bias_analysis, plot_bias

    s = load_site(site, plugins, protocol)
    net = model.load()
    result = {"source": str(model.path), "site": s.name, "model": model.which, **protocol_record(s),
              **bias_analysis(net, s.split("train"), s.split("test"), s.schema, settings)}
    title = f"{s.name}: gender bias of {model.path.name} (* DeLong, {settings.correction}-adjusted p < {settings.alpha})"
    return save(out, result, ("bias.png", lambda path: plot_bias(result, path, title)), s)


def run_segment(model: ModelSource, images: Path, masks: Path, settings: SegmentSettings, out: Path, compare: Sequence[Path] = ()) -> Done:
    """``arkfed segment``: :func:`arkfed.evaluation.segment.segmentation_curve` and its figure."""
    from arkfed.evaluation.curves import plot_curves
    from arkfed.evaluation.segment import segmentation_curve

    models = {"model": model.load(), **compared_models(compare, model.which)}
    result = {"source": str(model.path), **segmentation_curve(models, images, masks, settings)}
    title = f"Segmentation transfer ({settings.encoder} encoder, {settings.img_size} px, {settings.steps} steps)"
    return save(out, result, ("segment.png", lambda path: plot_curves(result["curve"], path, "Dice", title)))


def run_compare(paths: Sequence[Path], site: str, settings: CompareSettings, out: Path, *, arch: str | None = None, img_size: int = 224,
                plugins: Plugins = (), protocol: str | None = None) -> Done:
    """``arkfed compare``: :func:`arkfed.evaluation.compare.compare_models` and its figure."""
    from arkfed.evaluation.compare import compare_entries, compare_models, plot_comparison

    s = load_site(site, plugins, protocol)
    entries = compare_entries(list(paths), s, arch, img_size)
    result = {"sources": [str(m) for m in paths], **protocol_record(s), **compare_models(entries, s, settings)}
    title = f"{s.name}: {', '.join(e.name for e in entries)}"
    return save(out, result, ("compare.png", lambda path: plot_comparison(result, path, title)), s)


def run_predict(source: Path, images: Sequence[Path], out: Path, which: str = "teacher", batch_size: int = 32, device: str = "cpu") -> Done:
    """``arkfed predict``: :func:`arkfed.evaluation.predict.predict_images` with the model's heads."""
    from arkfed.evaluation.predict import predict_images
    from arkfed.evaluation.sources import model_heads

    net = load_source(source, which)
    heads, note = model_heads(source, which)
    result = {"source": str(source), "model": which, **predict_images(net, heads, list(images), batch_size, device),
              "notes": [note] if note else []}
    return save(out, result)


def run_zero_shot(source: Path, site: str, settings: ZeroShotSettings, out: Path, which: str = "teacher", plugins: Plugins = (),
                  protocol: str | None = None) -> Done:
    """``arkfed zero-shot``: :func:`arkfed.evaluation.zero_shot.zero_shot_source` on a site the model never trained on."""
    from arkfed.evaluation.zero_shot import zero_shot_source

    s = load_site(site, plugins, protocol)
    return save(out, {**zero_shot_source(source, s, settings, which), **protocol_record(s)}, site=s)


def run_report(run: Path, out: Path | None = None) -> Done:
    """``arkfed report``: :func:`arkfed.evaluation.report.write_report` into ``out`` (default RUN/report);
    the results then list the files written."""
    from arkfed.evaluation.report import write_report

    out = out or run / "report"
    return save(out, write_report(run, out))
