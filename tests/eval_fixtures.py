"""Tiny, real inputs for the evaluation tests: run folders, synthetic sites, a test plugin.

Images are drawn, not random: each finding is a bright blob at its own place, so a frozen
(even random) backbone's features separate it and a linear probe can learn it. The draw can be
made to depend on sex (``biased``), which is what the bias test needs to detect.
"""

from __future__ import annotations

import functools
import json
import textwrap
from pathlib import Path

import numpy as np
import torch
import yaml

from arkfed.data.schema import LabelSchema
from arkfed.data.tables import ArrayImages, DatasetTable, make_meta
from arkfed.model.ark import ArkModel, SiteHead
from arkfed.model.weights import save_ark_model, save_head
from arkfed.spec import ModelSpec

ARCH = "test_resnet"
SIZE = 32

# finding -> blob centre (row, col) as fractions of the image
PLACES = [(0.3, 0.3), (0.3, 0.7), (0.7, 0.5), (0.7, 0.2), (0.5, 0.8)]


def tiny_spec(arch: str = ARCH, img_size: int = SIZE, projector_dim: int = 16) -> ModelSpec:
    return ModelSpec(model=arch, img_size=img_size, projector_dim=projector_dim)


def draw_images(labels: np.ndarray, sex: np.ndarray, rng: np.random.Generator, size: int = SIZE,
                biased: tuple[int, ...] = ()) -> np.ndarray:
    """N x size x size uint8 chest-like images with one blob per positive finding.

    For a finding in ``biased`` the blob is dark in women and bright in men, so a probe trained
    on one sex transfers badly to the other.
    """
    n, k = labels.shape
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = 70 + 30 * np.exp(-((xx - 0.5) ** 2) / 0.08)  # a soft bright mediastinum
    images = np.empty((n, size, size), dtype=np.float32)
    for i in range(n):
        img = base + rng.normal(0, 12, (size, size))
        for j in range(k):
            if labels[i, j] == 1:
                cy, cx = PLACES[j % len(PLACES)]
                contrast = -60 if j in biased and sex[i] == "F" else 120
                img += contrast * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.006)
        images[i] = img
    return np.clip(images, 0, 255).astype(np.uint8)


def synthetic_table(schema: LabelSchema, n: int, seed: int, size: int = SIZE, biased: tuple[int, ...] = (), prevalence: float = 0.4,
                    rare: tuple[int, ...] = ()) -> DatasetTable:
    """``rare`` findings keep about one in twelve of their positives (a handful per test split)."""
    rng = np.random.default_rng(seed)
    k = schema.num_classes
    if schema.task == "multiclass":
        labels = np.eye(k, dtype=np.float32)[rng.integers(0, k, n)]
        draw = labels.copy()
        draw[:, 0] = 0  # class 0 is "normal": no blob
    else:
        labels = (rng.random((n, k)) < prevalence).astype(np.float32)
        for j in rare:
            labels[:, j] *= np.random.default_rng(seed + 99).random(n) < 1 / 12
        draw = labels
    sex = np.where(rng.random(n) < 0.5, "M", "F")
    images = draw_images(draw, sex, rng, size, biased)
    meta = make_meta(n, patient_id=[f"p{seed}_{i}" for i in range(n)], sex=sex, age=rng.integers(20, 80, n), view=["PA"] * n)
    return DatasetTable(images=ArrayImages(images, f"synthetic{seed}"), labels=labels, meta=meta, classes=schema.classes)


def schemas() -> dict[str, LabelSchema]:
    return {
        "alpha": LabelSchema(task="multilabel", classes=("Effusion", "Cardiomegaly", "Nodule")),
        "beta": LabelSchema(task="multilabel", classes=("Pleural Effusion", "Cardiomegaly")),
        "gamma": LabelSchema(task="multiclass", classes=("Normal", "Pneumonia", "Tuberculosis")),
    }


def make_run_folder(folder: Path, arch: str = ARCH, img_size: int = SIZE, seed: int = 0, sites: dict[str, LabelSchema] | None = None,
                    teacher: ArkModel | None = None, heads: dict[str, SiteHead] | None = None) -> Path:
    """A run folder as `arkfed train` leaves it: teacher, student, heads, config, metrics, summary.

    ``teacher``/``heads`` replace the random ones (e.g. with a :func:`pretrain`-ed model).
    """
    sites = sites or schemas()
    spec = teacher.spec if teacher is not None else tiny_spec(arch, img_size)
    torch.manual_seed(seed)
    student = ArkModel(spec)
    teacher = teacher if teacher is not None else ArkModel(spec)
    folder.mkdir(parents=True, exist_ok=True)
    save_ark_model(folder / "teacher.safetensors", teacher)
    save_ark_model(folder / "student.safetensors", student)
    for name, schema in sites.items():
        head = (heads or {}).get(name) or SiteHead(name, schema, spec.projector_dim)
        save_head(folder / "heads" / f"{name}.safetensors", head)
    config = {"sites": list(sites), "rounds": 2, "order": "fixed", "seed": seed, "init": "random",
              "model": spec.model_dump(mode="json"),
              "settings": {"batch_size": 8, "lr": 0.001, "optimizer": "adamw", "local_epochs": 1, "ema": "visit", "momentum_teacher": 0.9}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    lines = []
    for rnd in range(2):
        for name in sites:
            lines.append({"kind": "visit", "round": rnd, "site": name, "loss": 0.7 - 0.1 * rnd, "steps": 4})
        for name, schema in sites.items():
            for model in ("teacher", "student"):
                auc = 0.55 + 0.1 * rnd + (0.02 if model == "student" else 0.0)
                lines.append({"kind": "eval", "round": rnd, "site": name, "model": model, "split": "val", "loss": 0.69 - 0.05 * rnd,
                              "mean_auc": auc, "auc": {c: auc for c in schema.reported_classes}})
    (folder / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    (folder / "summary.json").write_text(json.dumps({"rounds": 2, "sites": list(sites)}))
    return folder


PLUGIN_SOURCE = textwrap.dedent('''
    """Test plugin: a site stored as one .npz per split (images, labels, sex) with the schema in options."""
    from pathlib import Path
    import numpy as np
    from pydantic import BaseModel, ConfigDict
    from arkfed.data.tables import ArrayImages, DatasetTable, make_meta
    from arkfed.datasets._plugin import DatasetPlugin, register_dataset
    from arkfed.data.schema import LabelSchema

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        task: str
        classes: list[str]

    @register_dataset
    class EvalNpz(DatasetPlugin):
        name = "evalnpz"
        Options = Options

        def label_schema(self):
            return LabelSchema(task=self.options.task, classes=tuple(self.options.classes))

        def read(self, root, split):
            out = {}
            for name in ("train", "val", "test"):
                data = np.load(Path(root) / f"{name}.npz")
                n = len(data["labels"])
                meta = make_meta(n, patient_id=[f"{name}{i}" for i in range(n)], sex=data["sex"], age=[50] * n, view=["PA"] * n)
                out[name] = DatasetTable(ArrayImages(data["images"], name), data["labels"], meta, tuple(self.options.classes))
            return out
''')


def write_site(folder: Path, name: str, schema: LabelSchema, sizes: dict[str, int], seed: int = 0, size: int = SIZE,
               biased: tuple[int, ...] = (), rare: tuple[int, ...] = ()) -> Path:
    """A site YAML + data read through the ``evalnpz`` test plugin; returns the YAML path.

    The plugin lives in ``folder/plugins``; point ``ARKFED_PLUGINS`` at it.
    """
    root = folder / name
    root.mkdir(parents=True, exist_ok=True)
    for i, (split, n) in enumerate(sizes.items()):
        table = synthetic_table(schema, n, seed * 10 + i, size, biased, rare=rare)
        np.savez(root / f"{split}.npz", images=table.images.array, labels=table.labels, sex=table.meta["sex"].to_numpy().astype(str))
    plugins = folder / "plugins"
    plugins.mkdir(exist_ok=True)
    (plugins / "evalnpz.py").write_text(PLUGIN_SOURCE)
    site = {"name": name, "dataset": "evalnpz", "root": name, "options": {"task": schema.task, "classes": list(schema.classes)}}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(site))
    return path


def pretrain(spec: ModelSpec, table: DatasetTable, schema: LabelSchema, site: str = "pre", steps: int = 60, seed: int = 0,
             lr: float = 3e-3) -> tuple[ArkModel, SiteHead]:
    """A quickly *trained* ArkModel and head: fitted on ``table`` by plain supervised training
    (stands in for an Ark run where a test needs a model that has learnt the findings)."""
    from arkfed.ark.losses import task_loss
    from arkfed.data.loaders import Normalise
    from arkfed.data.schema import label_targets

    torch.manual_seed(seed)
    model = ArkModel(spec)
    head = SiteHead(site, schema, spec.projector_dim)
    images = Normalise(model.spec.mean, model.spec.std)(torch.from_numpy(table.images.array).unsqueeze(1).repeat(1, 3, 1, 1))
    targets, mask = (torch.from_numpy(a) for a in label_targets(table.labels, schema))
    optimizer = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=lr)
    rng = np.random.default_rng(seed)
    model.train()
    for _ in range(steps):
        rows = torch.from_numpy(rng.choice(len(images), size=min(32, len(images)), replace=False))
        loss = task_loss(head(model(images[rows])), targets[rows], mask[rows], schema.task)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), head.eval()


@functools.lru_cache(maxsize=None)
def pretrained_alpha() -> tuple[ArkModel, SiteHead]:
    """One model+head trained on site alpha's findings, shared by all tests of a session
    (read-only: tests that change weights copy them first)."""
    schema = schemas()["alpha"]
    return pretrain(tiny_spec(), synthetic_table(schema, 160, 11), schema, site="alpha", steps=50)
