"""``arkfed export``: the teacher as a plain timm model, plus its projector, heads and model card.

Ark's published weights were hard to reuse: the checkpoint mixed backbone, projector and head
keys, and timm's key renames broke loading. An export therefore keeps them apart:

- ``model.safetensors``: the backbone's own ``state_dict`` (timm keys, no classifier), loadable by
  ``timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=...), num_classes=0)``
  or ``timm.create_model("local-dir:EXPORT", pretrained=True)`` with no missing/unexpected keys;
- ``config.json``: timm's pretrained-config form, written by timm itself (architecture,
  num_features, model_args, input_size, mean, std), plus an ``arkfed`` section with the
  :class:`~arkfed.model.ModelSpec` and the heads, so :func:`arkfed.weights.load_ark_model` can
  rebuild the whole ArkModel;
- ``projector.safetensors`` and ``heads/<site>.safetensors`` (site, class names, schema);
- ``README.md``: a model card listing sites, datasets, schemas, rounds and final metrics.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from arkfed.errors import ArkfedError
from arkfed.evaluation.runinfo import RunInfo, read_run
from arkfed.evaluation.sources import load_models, load_source_heads, source_kind
from arkfed.model import ArkModel, SiteHead
from arkfed.io import atomic_write
from arkfed.weights import SPEC_KEY, save_head, save_safetensors


@dataclass
class ExportResult:
    folder: Path
    architecture: str
    num_features: int
    heads: dict[str, tuple[str, ...]]
    files: list[str]

    def to_json(self) -> dict:
        return {
            "folder": str(self.folder), "architecture": self.architecture, "num_features": self.num_features,
            "heads": {k: list(v) for k, v in self.heads.items()}, "files": self.files,
        }


def timm_config(model: ArkModel, heads: dict[str, SiteHead], which: str) -> dict:
    """config.json content: timm's own export of the backbone config plus the ``arkfed`` section."""
    import tempfile

    from timm.models._hub import save_config_for_hf

    spec = model.spec
    data_config = {"input_size": (3, spec.img_size, spec.img_size), "mean": spec.mean, "std": spec.std, "crop_pct": 1.0}
    arkfed_section = {
        "spec": spec.model_dump(mode="json"),
        "weights": which,
        "projector": "projector.safetensors",
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


def model_card(config: dict, heads: dict[str, SiteHead], run: RunInfo | None) -> str:
    """The export's README.md: what the model is, how to load it, what it was trained on, how it did."""
    arch = config["architecture"]
    spec = config["arkfed"]["spec"]
    size = spec["img_size"]
    lines = [
        f"# arkfed foundation model: {arch}",
        "",
        "A chest X-ray backbone trained with Ark (Ma et al., MICCAI 2023): knowledge accrued from "
        "several differently-labelled datasets through one shared backbone + projector and one head "
        f"per dataset. This export holds the {config['arkfed']['weights']} (EMA) model.",
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
        f"Input: {size} x {size} px, grayscale replicated to 3 channels, normalised with mean "
        f"{tuple(round(m, 4) for m in spec['mean'])} and std {tuple(round(s, 4) for s in spec['std'])}. "
        f"Output: {config['num_features']} pooled features. For architectures with a fixed input size "
        "(ViT, Swin) pass the `img_size` listed under `model_args` in config.json.",
        f"The projector ({spec['projector']}, {config['num_features']} -> {spec['projector_dim']}) is in "
        "`projector.safetensors`; the whole model with its heads loads with "
        "`arkfed.weights.load_ark_model(folder)` and every `arkfed` evaluation command.",
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
            lines += ["", "## Final metrics (validation split, last round)", "", "| site | model | round | mean AUC | loss |", "|---|---|---|---|---|"]
            for (site, model), rec in sorted(final.items()):
                lines.append(f"| {site} | {model} | {rec.get('round', 'n/a')} | {_fmt(rec.get('mean_auc'))} | {_fmt(rec.get('loss'))} |")
    lines += ["", "Trained with arkfed; the training images never left their sites.", ""]
    return "\n".join(lines)


def export_model(source: str | Path, out: str | Path, which: str = "teacher") -> ExportResult:
    """Write an export folder from a run folder (or re-export an export / a weights file)."""
    source, out = Path(source), Path(out)
    if out.resolve() == source.resolve():
        raise ArkfedError(f"{out}: export into the folder it reads from; choose another --out")
    models = load_models(source, which=(which,))
    if which not in models:
        raise ArkfedError(f"{source}: no {which} model to export")
    model = models[which]
    heads = load_source_heads(source)
    run = read_run(source) if source_kind(source) == "run" else None

    config = timm_config(model, heads, which)
    save_safetensors(out / "model.safetensors", model.backbone.state_dict(), {"format": "pt"})
    save_safetensors(out / "projector.safetensors", model.projector.state_dict(), {SPEC_KEY: model.spec.model_dump_json()})
    for site, head in heads.items():
        save_head(out / "heads" / f"{site}.safetensors", head)
    # config.json last: its presence is what makes the folder an export (see sources.source_kind)
    card = model_card(config, heads, run)
    atomic_write(out / "README.md", lambda tmp: tmp.write_text(card))
    atomic_write(out / "config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=2)))
    files = ["model.safetensors", "config.json", "projector.safetensors", "README.md", *(f"heads/{s}.safetensors" for s in sorted(heads))]
    return ExportResult(out, config["architecture"], int(config["num_features"]), {s: h.classes for s, h in heads.items()}, files)
