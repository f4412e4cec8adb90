"""``arkfed export``: the teacher as a plain timm model, plus its projector, heads and model card.

Ark's published weights were hard to reuse: the checkpoint mixed backbone, projector and head
keys, and timm's key renames broke loading. An export therefore keeps them apart:

- ``model.safetensors``: the backbone's own ``state_dict`` (timm keys, no classifier), loadable by
  ``timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=...), num_classes=0)``
  or ``timm.create_model("local-dir:EXPORT", pretrained=True)`` with no missing/unexpected keys;
- ``config.json``: timm's pretrained-config form, written by timm itself (architecture,
  num_features, model_args, input_size, mean, std), plus an ``arkfed`` section with the
  :class:`~arkfed.spec.ModelSpec` and the heads, so :func:`arkfed.model.weights.load_ark_model` can
  rebuild the whole ArkModel;
- ``projector.safetensors`` and ``heads/<site>.safetensors`` (site, class names, schema): the
  heads *of the exported model*: for the teacher, the run's ``teacher-heads/`` (the EMA of the
  student's heads) when the run has them, else the student's heads (config.json and the card say
  which);
- ``batchnorm/<site>.safetensors`` (with ``--calibrate SITE``): the BatchNorm running statistics
  re-estimated on that site's training images, exactly as training-time evaluation re-estimates
  them (:func:`arkfed.ark.metrics.calibrated_model`), i.e. the statistics that produced the site's
  reported metrics;
- ``README.md``: a model card listing sites, datasets, schemas, rounds and final metrics.

BatchNorm statistics with several sites: a BatchNorm model has no single set of statistics that
produced its numbers; each site's evaluation used statistics from its own training images. The
export therefore carries one file per calibrated site, and ``model.safetensors`` carries the
statistics of the *first* ``--calibrate`` site (the site a user of the plain timm file is told
about in the card). Without ``--calibrate`` (the exporter may hold no site's data: a federated
coordinator never does) ``model.safetensors`` keeps the running statistics as training left them
(those of the last visited site's images) and the card says so; ``arkfed evaluate`` re-estimates
them on the evaluated site either way, so its numbers do not depend on this choice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from arkfed.errors import ArkfedError
from arkfed.evaluation.recorded_run import RecordedRun, read_run
from arkfed.evaluation.sources import load_models, model_heads, source_kind
from arkfed.io import atomic_write
from arkfed.model.ark import ArkModel, SiteHead
from arkfed.model.weights import SPEC_KEY, save_head, save_safetensors


@dataclass
class ExportResult:
    folder: Path
    architecture: str
    num_features: int
    heads: dict[str, tuple[str, ...]]
    files: list[str]
    heads_of: str = "student"
    note: str | None = None

    def to_json(self) -> dict:
        return {
            "folder": str(self.folder), "architecture": self.architecture, "num_features": self.num_features,
            "heads": {k: list(v) for k, v in self.heads.items()}, "heads_of": self.heads_of, "files": self.files,
            "notes": [self.note] if self.note else [],
        }


BATCHNORM_DIR = "batchnorm"


def batchnorm_state(model: ArkModel) -> dict:
    """The backbone's BatchNorm buffers (running mean/var, batches tracked), timm keys."""
    import torch

    names = {f"{n}.{b}" for n, m in model.backbone.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
             for b in ("running_mean", "running_var", "num_batches_tracked")}
    return {k: v for k, v in model.backbone.state_dict().items() if k in names}


def apply_site_batchnorm(model: ArkModel, export: str | Path, site: str) -> ArkModel:
    """``model`` (loaded from ``export``) with the BatchNorm statistics stored for ``site``."""
    from arkfed.model.weights import read_safetensors

    path = Path(export) / BATCHNORM_DIR / f"{site}.safetensors"
    if not path.is_file():
        raise ArkfedError(f"{path}: no BatchNorm statistics for site {site!r} in this export (export with --calibrate {site})")
    state, _ = read_safetensors(path)
    missing = set(state) - set(model.backbone.state_dict())
    if missing:
        raise ArkfedError(f"{path}: keys {sorted(missing)[:3]} do not belong to this backbone")
    model.backbone.load_state_dict(state, strict=False)
    return model


def timm_config(model: ArkModel, heads: dict[str, SiteHead], which: str, heads_of: str = "student",
                batchnorm: dict | None = None) -> dict:
    """config.json content: timm's own export of the backbone config plus the ``arkfed`` section."""
    import tempfile

    from timm.models._hub import save_config_for_hf

    spec = model.spec
    data_config = {"input_size": (3, spec.img_size, spec.img_size), "mean": spec.mean, "std": spec.std, "crop_pct": 1.0}
    arkfed_section = {
        "spec": spec.model_dump(mode="json"),
        "weights": which,
        "projector": "projector.safetensors",
        "heads_of": heads_of,
        "batchnorm": batchnorm or {"model.safetensors": "as trained", "sites": {}},
        "heads": {
            site: {"file": f"heads/{site}.safetensors", "classes": list(h.classes), "schema": h.schema.model_dump(mode="json")}
            for site, h in sorted(heads.items())
        },
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.json"
        save_config_for_hf(model.backbone, str(path), model_config={"arkfed": arkfed_section}, data_config=data_config)
        return json.loads(path.read_text())


def _fmt(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "n/a"


GROUP_NORM_NOTE = [
    "Trained with `norm: group` (every BatchNorm of the timm model replaced by GroupNorm, for differential privacy): "
    "plain `timm.create_model` builds BatchNorm, so build `opacus.validators.ModuleValidator.fix(timm.create_model(arch, "
    "num_classes=0))` and load `model.safetensors` into it, or use `arkfed.model.weights.load_ark_model(folder)`.",
    "",
]


def model_card(config: dict, heads: dict[str, SiteHead], run: RecordedRun | None) -> str:
    """The export's README.md: what the model is, how to load it, what it was trained on, how it did."""
    arch = config["architecture"]
    spec = config["arkfed"]["spec"]
    size = spec["img_size"]
    lines = [
        f"# arkfed foundation model: {arch}",
        "",
        "A chest X-ray backbone trained with Ark (Ma et al., MICCAI 2023): knowledge accrued from "
        "several differently-labelled datasets through one shared backbone + projector and one head "
        f"per dataset. This export holds the {config['arkfed']['weights']} model"
        f"{' (the EMA of the student)' if config['arkfed']['weights'] == 'teacher' else ''}.",
        "",
        "## Load it",
        "",
        "```python",
        "import timm",
        f"model = timm.create_model({arch!r}, pretrained=True, num_classes=0,",
        "                          pretrained_cfg_overlay=dict(file='model.safetensors'))",
        "# or: timm.create_model('local-dir:/path/to/this/folder', pretrained=True)",
        "```",
        "",
        *GROUP_NORM_NOTE * (spec.get("norm") == "group"),
        f"Input: {size} x {size} px, grayscale replicated to 3 channels, normalised with mean "
        f"{tuple(round(m, 4) for m in spec['mean'])} and std {tuple(round(s, 4) for s in spec['std'])}. "
        f"Output: {config['num_features']} pooled features. For architectures with a fixed input size "
        "(ViT, Swin) pass the `img_size` listed under `model_args` in config.json.",
        f"The projector ({spec['projector']}, {config['num_features']} -> {spec['projector_dim']}) is in "
        "`projector.safetensors`; the whole model with its heads loads with "
        "`arkfed.model.weights.load_ark_model(folder)` and every `arkfed` evaluation command.",
        "",
        "## Sites and heads",
        "",
        "| site | dataset | task | classes | uncertain | missing |",
        "|---|---|---|---|---|---|",
    ]
    datasets = run.site_datasets() if run else {}
    for site, head in sorted(heads.items()):
        s = head.schema
        lines.append(f"| {site} | {datasets.get(site, 'n/a')} | {s.task} | {', '.join(s.classes)} | {s.uncertain} | {s.missing} |")
    heads_of = config["arkfed"].get("heads_of", "student")
    lines += ["", {
        "teacher": "The heads in `heads/` are the teacher's own heads (the EMA of the student's heads, kept with the teacher "
                   "during training): they match this model's embedding.",
        "student": "The heads in `heads/` are the student's heads (the run kept no teacher heads); "
                   + ("they were fitted to the student embedding, so on this teacher they are a stand-in."
                      if config["arkfed"]["weights"] == "teacher" else "they match this model."),
    }.get(heads_of, f"The heads in `heads/` are the {heads_of}'s heads.")]
    bn = config["arkfed"].get("batchnorm") or {}
    if bn.get("sites"):
        lines += ["", "## BatchNorm statistics", "",
                  "Reported metrics are computed with BatchNorm statistics re-estimated on each site's own training images "
                  f"(the first {bn.get('calibration_images', 'n/a')}). `batchnorm/<site>.safetensors` holds them for "
                  f"{', '.join(sorted(bn['sites']))}; `model.safetensors` carries those of **{bn['model.safetensors']}**. "
                  "Load another site's with `arkfed.evaluation.export.apply_site_batchnorm(model, folder, site)`."]
    elif bn:
        lines += ["", "## BatchNorm statistics", "",
                  "`model.safetensors` carries the running statistics as training left them (those of the last site "
                  "visited). Reported metrics re-estimate them on each site's training images; re-export with "
                  "`arkfed export --calibrate SITE` to ship the statistics that produced a site's numbers."]
    if run is not None:
        cfg = run.config
        settings = cfg.get("settings") or {}
        lines += [
            "",
            "## Training",
            "",
            f"- sites visited in order: {', '.join(run.sites) or 'n/a'}",
            f"- rounds: {cfg.get('rounds', 'n/a')} configured, {run.rounds_done} evaluated",
            f"- init: {cfg.get('init', 'n/a')}; seed: {cfg.get('seed', 'n/a')}",
            f"- batch size {settings.get('batch_size', 'n/a')}, lr {settings.get('lr', 'n/a')}, "
            f"optimizer {settings.get('optimizer', 'n/a')}, local epochs {settings.get('local_epochs', 'n/a')}, "
            f"teacher EMA {settings.get('ema', 'n/a')} from momentum {settings.get('momentum_teacher', 'n/a')}",
        ]
        final = run.final_metrics()
        if final:
            lines += ["", "## Final metrics (validation split, last round)", "",
                      "Scored at each site with BatchNorm statistics re-estimated on its training images, the teacher with "
                      "its teacher head (runs from before teacher heads: the student's); `arkfed evaluate --split val` on "
                      "the run folder reproduces them.", "",
                      "| site | model | round | mean AUC | loss |", "|---|---|---|---|---|"]
            for (site, model), rec in sorted(final.items()):
                lines.append(f"| {site} | {model} | {rec.get('round', 'n/a')} | {_fmt(rec.get('mean_auc'))} | {_fmt(rec.get('loss'))} |")
    lines += ["", "Trained with arkfed; the training images never left their sites.", ""]
    return "\n".join(lines)


def calibrate_sites(model: ArkModel, sites: list) -> dict[str, dict]:
    """Per site, the BatchNorm buffers that site's evaluation uses (see :func:`arkfed.ark.metrics.calibrated_model`)."""
    from arkfed.ark.metrics import calibrated_model, has_batchnorm

    if not has_batchnorm(model):
        raise ArkfedError(f"{model.spec.model}: the model has no BatchNorm layers; --calibrate has nothing to do")
    out = {}
    for site in sites:
        train = site.splits.get("train")
        if train is None or len(train) < 2:
            raise ArkfedError(f"site {site.name!r}: no training split with at least 2 images to calibrate BatchNorm on")
        calibrated, _ = calibrated_model(model, site.schema, train, "cpu")
        out[site.name] = batchnorm_state(calibrated)
    return out


def export_model(source: str | Path, out: str | Path, which: str = "teacher", calibrate: list | None = None) -> ExportResult:
    """Write an export folder from a run folder (or re-export an export / a weights file).

    ``calibrate``: sites (:class:`arkfed.site.load.Site`) whose BatchNorm statistics to store; the
    first one's go into ``model.safetensors`` (see the module docstring for why).
    """
    from arkfed.ark.metrics import CALIBRATION_IMAGES

    source, out = Path(source), Path(out)
    if out.resolve() == source.resolve():
        raise ArkfedError(f"{out}: export into the folder it reads from; choose another --out")
    models = load_models(source, which=(which,))
    if which not in models:
        raise ArkfedError(f"{source}: no {which} model to export")
    model = models[which]
    heads, note = model_heads(source, which)
    heads_of = "student" if note or which == "student" else ("teacher" if source_kind(source) == "run" else _heads_of(source))
    run = read_run(source) if source_kind(source) == "run" else None
    site_stats = calibrate_sites(model, calibrate) if calibrate else {}
    batchnorm = {"model.safetensors": "as trained", "sites": {}}
    if site_stats:
        first = next(iter(site_stats))
        model.backbone.load_state_dict(site_stats[first], strict=False)
        batchnorm = {"model.safetensors": f"site {first}", "calibration_images": CALIBRATION_IMAGES,
                     "sites": {name: f"{BATCHNORM_DIR}/{name}.safetensors" for name in site_stats}}

    config = timm_config(model, heads, which, heads_of, batchnorm)
    save_safetensors(out / "model.safetensors", model.backbone.state_dict(), {"format": "pt"})
    save_safetensors(out / "projector.safetensors", model.projector.state_dict(), {SPEC_KEY: model.spec.model_dump_json()})
    for site, head in heads.items():
        save_head(out / "heads" / f"{site}.safetensors", head)
    for site, state in site_stats.items():
        save_safetensors(out / BATCHNORM_DIR / f"{site}.safetensors", state, {"site": site})
    # config.json last: its presence is what makes the folder an export (see sources.source_kind)
    card = model_card(config, heads, run)
    atomic_write(out / "README.md", lambda tmp: tmp.write_text(card))
    atomic_write(out / "config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=2)))
    files = ["model.safetensors", "config.json", "projector.safetensors", "README.md", *(f"heads/{s}.safetensors" for s in sorted(heads)),
             *(f"{BATCHNORM_DIR}/{s}.safetensors" for s in site_stats)]
    return ExportResult(out, config["architecture"], int(config["num_features"]), {s: h.classes for s, h in heads.items()}, files,
                        heads_of, note)


def _heads_of(export: Path) -> str:
    """An export being re-exported keeps what its config.json says its heads are."""
    if source_kind(export) != "export":
        return "student"
    return json.loads((export / "config.json").read_text()).get("arkfed", {}).get("heads_of", "student")
