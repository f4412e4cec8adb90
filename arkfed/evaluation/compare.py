"""``arkfed compare``: several models, one site, one protocol, one table.

To put an Ark model beside a single-site model or a public backbone (a local timm file), every
model goes through the same steps on the same splits with the same seeds:

1. **own head** (when the model has a head for the site: a run's teacher with its teacher
   head, or an export's head): test AUC as ``arkfed evaluate`` gives it, bootstrap 95% CI;
2. **few-shot curve**: linear probes at ``shots`` per class, the same draws per seed for every
   model, with a random init of the first model's architecture as the floor
   (:func:`arkfed.evaluation.linear_probe.probe_curve`);
3. **fine-tuning** (optional, ``finetune_epochs > 0``): every model fine-tuned on the full
   training split with the same schedule (:func:`arkfed.evaluation.finetune.finetune_curve`);
4. **bias** (when the site records both sexes): the Ark gender-bias protocol, counted as the
   findings with a significant gap after Holm correction
   (:func:`arkfed.evaluation.bias.bias_analysis`);
5. **zero-shot** (``zero_shot``, on by default; models with heads for other sites): the site's
   classes scored by those heads through the findings vocabulary, with no training
   (:func:`arkfed.evaluation.zero_shot.zero_shot`); its mean AUC is over the classes the heads
   know, which the results name.

The results record the settings (``settings``) and the reading protocol the site was read under
(``protocol``: ``arkfed`` or ``ark``, :func:`arkfed.site.load.load_site`).

The first model is the reference: each other model is compared with it by the curve's paired
tests (Holm-corrected over the whole curve). Results: one table, one figure, results.json.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from arkfed.errors import ArkfedError
from arkfed.io import atomic_write
from arkfed.model.ark import ArkModel, SiteHead


@dataclass
class CompareSettings:
    shots: tuple[int | None, ...] = (5, None)
    seeds: tuple[int, ...] = (0, 1, 2)
    features: str = "projector"
    finetune_epochs: int = 0
    finetune_max_steps: int | None = 20
    bias: bool = True
    zero_shot: bool = True
    min_positives: int = 10
    n_boot: int = 1000
    correction: str = "holm"
    batch_size: int = 64
    device: str = "cpu"


@dataclass
class Entry:
    """One model of the comparison: its display name, weights, (optional) head for the site and
    all its heads (for zero-shot)."""

    name: str
    model: ArkModel
    head: SiteHead | None = None
    note: str | None = None
    heads: dict[str, SiteHead] = field(default_factory=dict)


def compare_entries(paths: list[Path], site, arch: str | None = None, img_size: int = 224) -> list[Entry]:
    """The teacher of every source, named by its folder or file name (made unique), with its head
    for ``site`` when that head predicts the site's classes."""
    from arkfed.evaluation.sources import load_source, model_heads

    entries: list[Entry] = []
    for path in paths:
        name = path.name  # a file keeps its suffix: "model.safetensors" never collides with the curve key "model"
        while name in [e.name for e in entries] or name in ("model", "random"):
            name += "'"
        heads, note = model_heads(path, "teacher")
        head = heads.get(site.name)
        if head is not None and head.schema.classes != site.schema.classes:
            head, note = None, f"{path}: head {site.name!r} predicts other classes; own-head AUC skipped"
        entries.append(Entry(name, load_source(path, "teacher", arch, img_size), head, note, heads))
    return entries


def compare_models(entries: list[Entry], site, settings: CompareSettings) -> dict:
    """Run the protocol of the module docstring for every entry on ``site``."""
    from arkfed.evaluation.curves import REFERENCE
    from arkfed.evaluation.evaluate import score_with_head
    from arkfed.evaluation.linear_probe import ProbeCurveSettings, probe_curve

    if len(entries) < 2:
        raise ArkfedError("arkfed compare needs at least two models")
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise ArkfedError(f"two models share a name ({names}); give folders with different names")
    reserved = [n for n in names[1:] if n in (REFERENCE, "random")]
    if reserved:
        raise ArkfedError(f"model name {reserved[0]!r} is reserved in comparison curves; rename the folder or file")
    key = {e.name: (REFERENCE if i == 0 else e.name) for i, e in enumerate(entries)}  # curve keys
    train, test = site.split("train"), site.split("test")
    out: dict = {"site": site.name, "reference": names[0], "models": names, "notes": [e.note for e in entries if e.note],
                 "own_head": {}, "protocol": getattr(site, "protocol", "arkfed"), "settings": dataclasses.asdict(settings)}
    for e in entries:
        if e.head is not None:
            out["own_head"][e.name] = score_with_head(e.model, e.head, site, "test", False, settings.n_boot, settings.batch_size,
                                                      settings.device, 0, settings.min_positives)
    probe = probe_curve({key[e.name]: e.model for e in entries}, train, test, site.schema, ProbeCurveSettings(
        train_sizes=settings.shots, seeds=settings.seeds, features=settings.features, min_positives=settings.min_positives,
        n_boot=settings.n_boot, correction=settings.correction, batch_size=settings.batch_size, device=settings.device))
    out["probe"] = probe
    if settings.finetune_epochs > 0:
        from arkfed.evaluation.finetune import FineTuneSettings, finetune_curve

        ft = FineTuneSettings(epochs=settings.finetune_epochs, max_steps_per_epoch=settings.finetune_max_steps,
                              min_positives=settings.min_positives, n_boot=settings.n_boot, device=settings.device)
        out["finetune"] = finetune_curve({key[e.name]: e.model for e in entries}, train, site.splits.get("val"), test, site.schema,
                                         ("model",), (None,), settings.seeds[:1], ft, settings.correction)
    if settings.bias:
        out["bias"] = _bias(entries, train, test, site.schema, settings)
    if settings.zero_shot:
        out["zero_shot"] = _zero_shot(entries, site, settings)
    out["curve_names"] = {v: k for k, v in key.items()}
    return out


def _zero_shot(entries: list[Entry], site, settings: CompareSettings) -> dict:
    """Per model with heads: :func:`arkfed.evaluation.zero_shot.zero_shot` on the test split (single
    crop, as the own-head column), or ``{"skipped": why}`` when no class of the site maps."""
    from arkfed.evaluation.zero_shot import ZeroShotSettings, zero_shot

    zs = ZeroShotSettings(split="test", ten_crop=False, n_boot=settings.n_boot, min_positives=settings.min_positives,
                          batch_size=settings.batch_size, device=settings.device)
    result = {}
    for e in entries:
        if e.heads:
            try:
                result[e.name] = zero_shot(e.model, e.heads, site, zs)
            except ArkfedError as exc:
                result[e.name] = {"skipped": str(exc)}
    return result


def _bias(entries: list[Entry], train, test, schema, settings: CompareSettings) -> dict:
    from arkfed.evaluation.bias import BiasSettings, bias_analysis

    result = {}
    for e in entries:
        try:
            r = bias_analysis(e.model, train, test, schema, BiasSettings(
                features=settings.features, correction=settings.correction, min_positives=settings.min_positives,
                n_boot=0, batch_size=settings.batch_size, device=settings.device))
        except ArkfedError as exc:  # the site records no sex, or too few of one
            return {"skipped": str(exc)}
        gaps = [abs(f[f"gap_on_{s}"]) for f in r["findings"].values() for s in ("M", "F")
                if not f[f"too_few_on_{s}"] and np.isfinite(f[f"gap_on_{s}"])]
        result[e.name] = {"significant_gaps": sum(f[f"significant_on_{s}"] for f in r["findings"].values() for s in ("M", "F")),
                          "tests": r["tests_in_family"], "mean_abs_gap": float(np.mean(gaps)) if gaps else float("nan"), "detail": r}
    return result


def plot_comparison(result: dict, path: Path, title: str) -> Path:
    """Left: the few-shot probe curves of every model; right: each model's probe (all labels),
    fine-tuned and own-head test AUC with 95% CIs (drawn from lower to upper end)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from arkfed.evaluation.curves import draw_curves
    from arkfed.evaluation.plots import as_floats, draw_intervals, interval_bounds

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    draw_curves(left, result["probe"]["curve"], "test mean AUC", result["curve_names"])
    left.set_title("linear probes by shots per class", fontsize=10)
    rows = comparison_rows(result)
    kinds = [k for k in ("probe (all labels)", "fine-tuned", "own head", "zero-shot") if any(r.get(k) for r in rows)]
    width = 0.8 / max(1, len(kinds))
    x = np.arange(len(rows))
    for j, kind in enumerate(kinds):
        means = as_floats(r[kind][0] if r.get(kind) else None for r in rows)
        at = x + (j - (len(kinds) - 1) / 2) * width
        right.bar(at, means, width, label=kind)
        draw_intervals(right, at, *interval_bounds([r[kind][1] if r.get(kind) else None for r in rows]))
    right.set_xticks(x, [r["name"] for r in rows], rotation=15, ha="right")
    right.axhline(0.5, color="grey", lw=0.8, ls="--")
    right.set_ylim(0, 1.05)
    right.set_ylabel("test mean AUC (95% CI)")
    right.legend(fontsize=8)
    right.set_title("one protocol, one split", fontsize=10)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


def comparison_rows(result: dict) -> list[dict]:
    """Per model: (mean, CI) of the probe on all labels (or the largest shots), fine-tuned,
    own-head and zero-shot AUC, and the bias counts: what the table and the figure show."""
    from arkfed.evaluation.curves import shown_ci

    curve = result["probe"]["curve"]
    names = result["curve_names"]
    largest = curve["sizes"][-1]
    ft = result.get("finetune", {}).get("curve", {}).get("inits", {})
    rows = []
    for key, name in names.items():
        p = curve["inits"][key][largest]
        row = {"name": name, "key": key, "probe (all labels)": (p["mean"], shown_ci(p))}
        if key in ft:
            f = ft[key]["all"]
            row["fine-tuned"] = (f["mean"], shown_ci(f))
        own = result["own_head"].get(name)
        if own:
            row["own head"] = (own["mean_auc"], own.get("mean_auc_ci"))
        zero = result.get("zero_shot", {}).get(name, {}).get("scores")
        if zero:
            row["zero-shot"] = (zero["mean_auc"], zero.get("mean_auc_ci"))
        bias = result.get("bias", {}).get(name)
        if bias:
            row["bias"] = bias
        rows.append(row)
    return rows
