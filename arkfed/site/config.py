"""Sites: an institution's dataset, as named by a YAML file in ``sites/``.

A site config names a plugin and the local data folder; optional keys override the label
policies, the split (or give Ark's split lists, ``split_lists:``), the image size, where
site-local state (e.g. the private head in federated runs) is kept and the site's ``policy:``
for federated runs (:mod:`arkfed.site.policy`).
Unknown keys and bad values are errors naming the file and the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from arkfed.data.cache import CacheSettings
from arkfed.data.schema import MissingPolicy, UncertainPolicy
from arkfed.datasets._label_files import SplitConfig
from arkfed.errors import ArkfedError
from arkfed.site.policy import SitePolicy

SITES_DIR = Path("sites")


class LabelPolicies(BaseModel):
    model_config = ConfigDict(extra="forbid")

    uncertain: UncertainPolicy | None = None
    missing: MissingPolicy | None = None


class ComputeSettings(BaseModel):
    """The site's own hardware: never sent by the coordinator (a site decides how it trains).

    ``precision: auto`` is bf16 autocast on CUDA and fp32 on CPU; ``num_workers: null`` picks
    0 on CPU (workers would compete with the model for the cores) and up to 8 with CUDA.
    """

    model_config = ConfigDict(extra="forbid")

    device: str = Field(default="cpu", description="cpu | cuda | cuda:N | auto")
    num_workers: int | None = Field(default=None, ge=0, description="DataLoader worker processes")
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    gpus: int = Field(default=1, ge=1, description="GPUs one visit uses (DistributedDataParallel when > 1; batch_size is per GPU)")
    compile: bool = Field(default=False, description="torch.compile the student for each visit (pays off on long CUDA visits)")
    augment: Literal["cpu", "device"] = Field(default="cpu", description="where the views are made: cpu (workers) | device")

    def workers(self) -> int:
        if self.num_workers is not None:
            return self.num_workers
        import os

        from arkfed.devices import resolve_device

        if resolve_device(self.device).type != "cuda":
            return 0
        return max(1, min(8, (os.cpu_count() or 2) - 1))

    def override(self, **values) -> "ComputeSettings":
        """A copy with the given values (``None`` = keep), e.g. ``arkfed train --device cuda``."""
        return self.model_copy(update={k: v for k, v in values.items() if v is not None})


class SiteConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    dataset: str
    root: Path
    options: dict = Field(default_factory=dict)
    split: SplitConfig = Field(default_factory=SplitConfig)
    split_lists: Path | None = Field(
        default=None,
        description="folder of split lists in the format of Ark's repository (Ark_MICCAI2023/dataset/*.txt as "
        "Ark_MICCAI2023/dataloader.py reads them, e.g. RSNAPneumonia_{train,val,test}.txt): the site's images and "
        "splits are the listed ones (plugins chestxray14, rsna_pneumonia, shenzhen); relative to the YAML file",
    )
    labels: LabelPolicies = Field(default_factory=LabelPolicies)
    image_size: int | None = Field(default=None, ge=16, le=2048)
    state_dir: Path | None = None
    max_images: int | None = Field(default=None, ge=1, description="cap per split, for quick trials")
    cache: CacheSettings = Field(default_factory=CacheSettings, description="prepared-image cache (arkfed.data.cache)")
    compute: ComputeSettings = Field(default_factory=ComputeSettings)
    policy: SitePolicy = Field(default_factory=SitePolicy, description="what a coordinator may ask (federated runs)")

    @model_validator(mode="after")
    def _split_lists_pick_the_split(self) -> "SiteConfig":
        """``split_lists:`` reaches the plugin as ``split.lists`` (what :meth:`DatasetPlugin.read` is given)."""
        if self.split_lists is not None:
            if self.split.lists not in (None, self.split_lists):
                raise ValueError(f"split_lists {self.split_lists} and split.lists {self.split.lists} differ: give one")
            if not self.split.use_official:
                raise ValueError("split lists name each image's split: `split: {use_official: false}` contradicts them")
            self.split = self.split.model_copy(update={"lists": self.split_lists})
        return self

    @property
    def local_state_dir(self) -> Path:
        """Where this site keeps what never leaves it (its private head, federated state)."""
        return self.state_dir or Path.home() / ".arkfed" / "sites" / self.name


def _field_error(source: str, exc: ValidationError) -> ArkfedError:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "(top level)"
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown key" + (f" (allowed: {', '.join(SiteConfig.model_fields)})" if len(err["loc"]) == 1 else "")
    return ArkfedError(f"{source}: field {where!r}: {msg}")


def resolve_site_path(ref: str | Path, sites_dir: Path = SITES_DIR) -> Path:
    """A site given as a path, or as a name meaning ``sites/NAME.yaml``."""
    path = Path(ref)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        candidate = path
    else:
        candidate = sites_dir / f"{ref}.yaml"
    if not candidate.is_file():
        raise ArkfedError(f"site config not found: {candidate} (give a path or a name from {sites_dir}/)")
    return candidate


def load_site_config(ref: str | Path, sites_dir: Path = SITES_DIR) -> SiteConfig:
    """Load and validate a site YAML; a relative ``root``/``state_dir`` is relative to the YAML file."""
    path = resolve_site_path(ref, sites_dir)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ArkfedError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise ArkfedError(f"{path}: expected a mapping with keys name, dataset, root")
    try:
        config = SiteConfig.model_validate(data)
    except ValidationError as exc:
        raise _field_error(str(path), exc) from None
    base = path.resolve().parent
    update = {"root": base / config.root}
    if config.state_dir is not None:
        update["state_dir"] = base / config.state_dir
    if config.cache.dir is not None:
        update["cache"] = config.cache.model_copy(update={"dir": base / config.cache.dir})
    if config.split.lists is not None:
        lists = base / config.split.lists
        update["split"] = config.split.model_copy(update={"lists": lists})
        update["split_lists"] = lists if config.split_lists is not None else None
    return config.model_copy(update=update)


