"""Checking a site end to end before anyone trains on it, and listing the installed plugins.

:func:`validate_site` reads a site through its plugin exactly as training will, then reports
what a data steward needs to see: images per split, class prevalence (positives, negatives,
uncertain, missing), sex and age counts, patients that leak across splits, empty splits and
every image that cannot be read. Problems are collected into one :class:`ValidationReport`
(a pydantic model the CLI renders) instead of stopping at the first, so one run shows them all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from pydantic import BaseModel, Field

from arkfed.data.cache import CacheStatus
from arkfed.data.schema import UNCERTAIN, LabelSchema
from arkfed.data.tables import SPLITS, DatasetTable
from arkfed.datasets._plugin import DatasetPlugin, discover_plugins
from arkfed.errors import ArkfedError
from arkfed.site.cache import cache_status
from arkfed.site.config import SiteConfig, load_site_config
from arkfed.site.load import load_site

ProgressCallback = Callable[[int, int], None]
REQUIRED_SPLITS = ("train", "val")  # training needs both; an empty test split is only a warning
EXAMPLES = 5  # how many patient ids / paths a finding quotes


class ClassCounts(BaseModel):
    name: str
    positive: int
    negative: int
    uncertain: int
    missing: int

    @property
    def prevalence(self) -> float:
        """Positives among the labelled (positive or negative) entries; NaN when none is labelled."""
        labelled = self.positive + self.negative
        return self.positive / labelled if labelled else float("nan")


class AgeSummary(BaseModel):
    known: int
    missing: int
    min: float | None = None
    median: float | None = None
    max: float | None = None


class SplitSummary(BaseModel):
    name: str
    images: int
    patients: int
    classes: list[ClassCounts]
    sex: dict[str, int]
    age: AgeSummary


class UnreadableImage(BaseModel):
    split: str
    index: int
    path: str
    error: str


class SharedPatients(BaseModel):
    splits: tuple[str, str]
    count: int
    examples: list[str]


class ValidationReport(BaseModel):
    """Everything :func:`validate_site` found; ``ok`` is False when there is any error."""

    site: str
    dataset: str = ""
    root: str = ""
    label_schema: str = ""
    splits: list[SplitSummary] = Field(default_factory=list)
    images_total: int = 0
    images_checked: int = 0
    unreadable: list[UnreadableImage] = Field(default_factory=list)
    shared_patients: list[SharedPatients] = Field(default_factory=list)
    empty_splits: list[str] = Field(default_factory=list)
    cache: CacheStatus | None = None
    errors: list[str] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def class_counts(labels: np.ndarray, classes: Iterable[str]) -> list[ClassCounts]:
    """Per class: how many entries are 1, 0, uncertain (-1) and missing (NaN)."""
    labels = np.asarray(labels, dtype=np.float64)
    missing = np.isnan(labels)
    return [
        ClassCounts(
            name=name,
            positive=int((labels[:, k] == 1).sum()),
            negative=int((labels[:, k] == 0).sum()),
            uncertain=int((labels[:, k] == UNCERTAIN).sum()),
            missing=int(missing[:, k].sum()),
        )
        for k, name in enumerate(classes)
    ]


def summarise_split(name: str, table: DatasetTable) -> SplitSummary:
    meta = table.meta
    sex = meta["sex"].fillna("unknown").value_counts()
    ages = meta["age"].dropna().to_numpy(dtype=float)
    age = AgeSummary(known=len(ages), missing=int(len(meta) - len(ages)))
    if len(ages):
        age = age.model_copy(update={"min": float(ages.min()), "median": float(np.median(ages)), "max": float(ages.max())})
    return SplitSummary(
        name=name,
        images=len(table),
        patients=int(meta["patient_id"].dropna().nunique()),
        classes=class_counts(table.labels, table.classes),
        sex={key: int(sex.get(key, 0)) for key in ("M", "F", "unknown")},
        age=age,
    )


def label_problems(name: str, table: DatasetTable, schema: LabelSchema) -> list[str]:
    """Values a plugin let through that the schema cannot use (plugins are meant to stop these)."""
    labels = np.asarray(table.labels, dtype=np.float64)
    problems = []
    bad = ~np.isnan(labels) & ~np.isin(labels, (0.0, 1.0, UNCERTAIN))
    if bad.any():
        r, c = np.argwhere(bad)[0]
        problems.append(
            f"split {name!r}: {int(bad.sum())} label value(s) outside 1/0/-1/blank, first {labels[r, c]:g} "
            f"for class {table.classes[c]!r} at {table.images.describe(int(r))}"
        )
    if schema.task == "multiclass" and len(labels):
        several = (labels == 1).sum(axis=1) > 1
        if several.any():
            r = int(np.flatnonzero(several)[0])
            problems.append(f"split {name!r}: {int(several.sum())} multiclass row(s) with more than one class, "
                            f"first {table.images.describe(r)}")
    return problems


def shared_patients(splits: dict[str, DatasetTable]) -> list[SharedPatients]:
    """Patients present in two splits (a leak: the model is evaluated on people it trained on)."""
    ids = {name: set(t.meta["patient_id"].dropna().astype(str)) for name, t in splits.items()}
    found = []
    names = [n for n in SPLITS if n in ids]
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            both = sorted(ids[a] & ids[b])
            if both:
                found.append(SharedPatients(splits=(a, b), count=len(both), examples=both[:EXAMPLES]))
    return found


def images_to_check(splits: dict[str, DatasetTable], sample: int | None, seed: int = 0) -> list[tuple[str, int]]:
    """(split, row) of every image, or of ``sample`` of them drawn without replacement."""
    everything = [(name, i) for name in SPLITS if name in splits for i in range(len(splits[name]))]
    if sample is None or sample >= len(everything):
        return everything
    picks = np.random.default_rng(seed).choice(len(everything), size=sample, replace=False)
    return [everything[i] for i in sorted(picks)]


def read_images(
    splits: dict[str, DatasetTable], sample: int | None = None, progress: ProgressCallback | None = None
) -> tuple[int, list[UnreadableImage]]:
    """Read images through the same reader training uses; collect each failure with its file."""
    todo = images_to_check(splits, sample)
    failures = []
    for done, (name, index) in enumerate(todo, start=1):
        images = splits[name].images
        try:
            images.read(index)
        except ArkfedError as exc:
            failures.append(UnreadableImage(split=name, index=index, path=images.describe(index), error=str(exc)))
        if progress is not None:
            progress(done, len(todo))
    return len(todo), failures


def _absent_classes(summary: SplitSummary, reported: tuple[str, ...]) -> list[str]:
    """Reported classes with no positive in a split: their AUC, and so the site's mean, skips them."""
    return [c.name for c in summary.classes if c.name in reported and c.positive + c.uncertain == 0]


def validate_site(
    config: SiteConfig | str | Path,
    plugins_dirs: Iterable[str | Path] = (),
    check_images: bool = True,
    sample: int | None = None,
    progress: ProgressCallback | None = None,
) -> ValidationReport:
    """Read a site end to end and report everything wrong with it (never raises for bad data)."""
    name = config.name if isinstance(config, SiteConfig) else str(config)
    report = ValidationReport(site=name)
    try:
        if not isinstance(config, SiteConfig):
            config = load_site_config(config)
        report.site, report.dataset, report.root = config.name, config.dataset, str(config.root)
        site = load_site(config, plugins_dirs, cache=False)  # report the cache below, never prepare it here
    except ArkfedError as exc:
        report.errors.append(str(exc))
        return report

    report.label_schema = site.schema.describe()
    splits = {n: site.splits[n] for n in SPLITS if n in site.splits}
    for split_name in SPLITS:
        table = splits.get(split_name)
        if table is None or len(table) == 0:
            report.empty_splits.append(split_name)
            message = f"split {split_name!r} is empty"
            (report.errors if split_name in REQUIRED_SPLITS else report.warnings).append(message)
            continue
        summary = summarise_split(split_name, table)
        report.splits.append(summary)
        report.errors += label_problems(split_name, table, site.schema)
        absent = _absent_classes(summary, site.schema.reported_classes)
        if absent:
            report.warnings.append(f"split {split_name!r}: no positives for {', '.join(absent)} (AUC undefined there)")
    report.images_total = sum(len(t) for t in splits.values())

    report.shared_patients = shared_patients(splits)
    for leak in report.shared_patients:
        a, b = leak.splits
        report.errors.append(f"{leak.count} patient(s) in both {a!r} and {b!r}, e.g. {', '.join(leak.examples)}")

    report.cache = cache_status(config, splits)
    if report.cache.broken:
        report.warnings.append(f"image cache: {len(report.cache.broken)} broken shard(s) ({report.cache.broken[0]}); "
                               f"`arkfed prepare {config.name}` rebuilds them")
    if report.cache.changed:
        report.warnings.append(f"image cache: {report.cache.changed} image(s) changed since prepared; "
                               f"they are decoded from their files until `arkfed prepare {config.name}`")
    if check_images:
        report.images_checked, report.unreadable = read_images(splits, sample, progress)
        report.errors += [f"unreadable image ({u.split}): {u.error}" for u in report.unreadable]
    return report


# --- the plugin catalogue --------------------------------------------------------------------


class PluginSummary(BaseModel):
    """One row of ``arkfed list-datasets``."""

    name: str
    description: str
    source: str
    label_schema: dict | None = None  # LabelSchema.model_dump() for the default options
    schema_note: str = ""  # why there is no schema (e.g. it is set by the site's options)


def _source(cls: type[DatasetPlugin]) -> str:
    import inspect

    try:
        return str(inspect.getsourcefile(cls) or cls.__module__)
    except TypeError:
        return cls.__module__


def summarise_plugin(cls: type[DatasetPlugin]) -> PluginSummary:
    """A plugin's schema under its default options (the schema some plugins derive from options)."""
    summary = PluginSummary(name=cls.name, description=cls.description, source=_source(cls))
    try:
        schema = cls().label_schema()
    except ArkfedError as exc:
        return summary.model_copy(update={"schema_note": f"set by the site's options ({exc})"})
    except Exception as exc:  # a plugin bug: show it instead of hiding the plugin
        return summary.model_copy(update={"schema_note": f"schema failed: {type(exc).__name__}: {exc}"})
    return summary.model_copy(update={"label_schema": schema.model_dump(mode="json")})


def list_plugins(extra_dirs: Iterable[str | Path] = ()) -> tuple[list[PluginSummary], dict[str, str]]:
    """Every discoverable plugin summarised, and the plugins that failed to import (name -> error)."""
    catalog = discover_plugins(extra_dirs)
    return [summarise_plugin(cls) for cls in catalog.plugins.values()], dict(catalog.failures)
