"""Saving and loading model weights: ArkModels, site heads, atomic writes, weight sources.

Formats (all safetensors; metadata carries what is needed to rebuild the module):

- an ArkModel file (``teacher.safetensors`` / ``student.safetensors`` in a run folder): keys
  ``backbone.*`` and ``projector.*``, metadata ``arkfed_spec`` (a :class:`ModelSpec` as JSON);
- a head file (``heads/<site>.safetensors``): keys ``weight``/``bias``, metadata ``site`` and
  ``schema`` (a :class:`LabelSchema` as JSON);
- an export folder (see ``arkfed export``): ``model.safetensors`` with plain timm backbone keys,
  ``config.json`` (timm pretrained config plus an ``arkfed`` section holding the spec),
  ``projector.safetensors`` and ``heads/``.

:func:`load_ark_model` accepts any of: such a file, a run folder, an export folder, a released Ark
checkpoint (``.pth.tar``, see :mod:`arkfed.model.released`), ``imagenet`` / ``imagenet:PATH``
(local timm ImageNet weights, see :func:`arkfed.model.ark.find_pretrained_weights`), or a plain timm
state dict (``.safetensors``/``.pth``) for the backbone alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from arkfed.data.schema import LabelSchema
from arkfed.errors import ArkfedError
from arkfed.io import atomic_write
from arkfed.model.ark import ArkModel, SiteHead
from arkfed.spec import ModelSpec

SPEC_KEY = "arkfed_spec"


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file(_contiguous(tensors), str(tmp), metadata=metadata))


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except FileNotFoundError:
        raise ArkfedError(f"weights file not found: {path}") from None
    except Exception as exc:
        raise ArkfedError(f"cannot read weights {path}: {type(exc).__name__}: {exc}") from None


def save_ark_model(path: Path, model: ArkModel) -> None:
    save_safetensors(path, model.state_dict(), {SPEC_KEY: model.spec.model_dump_json()})


def save_head(path: Path, head: SiteHead) -> None:
    meta = {"site": head.site, "schema": head.schema.model_dump_json(), "classes": json.dumps(list(head.classes))}
    save_safetensors(path, head.state_dict(), meta)


def load_head(path: Path) -> SiteHead:
    tensors, meta = read_safetensors(path)
    if "schema" not in meta or "site" not in meta:
        raise ArkfedError(f"{path}: not an arkfed head file (no site/schema metadata)")
    schema = LabelSchema.model_validate_json(meta["schema"])
    head = SiteHead(meta["site"], schema, tensors["weight"].shape[1])
    head.load_state_dict(tensors)
    return head


def load_heads(folder: Path) -> dict[str, SiteHead]:
    """Every ``<site>.safetensors`` in a heads folder, keyed by site name."""
    return {h.site: h for h in map(load_head, sorted(Path(folder).glob("*.safetensors")))}


def _load_state(model: ArkModel, state: dict[str, torch.Tensor], source: Path) -> ArkModel:
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ArkfedError(
            f"{source}: weights do not match {model.spec.model!r}: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    return model


def _from_export(folder: Path) -> ArkModel:
    from arkfed.model.lineage import is_release, read_release

    if is_release(folder):  # a release is refused when anything in it changed since it was written
        read_release(folder)
    config = json.loads((folder / "config.json").read_text())
    spec = ModelSpec.model_validate(config["arkfed"]["spec"])
    model = ArkModel(spec)
    backbone, _ = read_safetensors(folder / "model.safetensors")
    projector, _ = read_safetensors(folder / "projector.safetensors")
    state = {f"backbone.{k}": v for k, v in backbone.items()} | {f"projector.{k}": v for k, v in projector.items()}
    return _load_state(model, state, folder)


def _from_plain_backbone(path: Path, spec: ModelSpec) -> ArkModel:
    """A timm backbone checkpoint (no projector): load it, dropping only its classifier keys."""
    model = ArkModel(spec)
    if path.suffix == ".safetensors":
        state, _ = read_safetensors(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ArkfedError(f"cannot read weights {path}: {type(exc).__name__}: {exc}") from None
        for key in ("state_dict", "model", "teacher"):
            if isinstance(state, dict) and key in state and isinstance(state[key], dict):
                state = state[key]
    classifier = model.backbone.pretrained_cfg.get("classifier") or "head"
    classifiers = classifier if isinstance(classifier, (list, tuple)) else [classifier]
    state = {k: v for k, v in state.items() if not any(k.startswith(c + ".") for c in classifiers)}
    result = model.backbone.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ArkfedError(
            f"{path}: not a {spec.model!r} backbone: missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    return model


IMAGENET = "imagenet"


def load_file_heads(source: str | Path) -> dict[str, SiteHead]:
    """The named heads a single weights file carries: a released Ark checkpoint's ``omni_heads``
    (see :func:`arkfed.model.released.heads_from_state`); none for other files."""
    path = Path(source)
    if not path.is_file() or path.suffix == ".safetensors":
        return {}
    from arkfed.model.released import heads_from_state, is_ark_state, read_checkpoint

    try:
        state = read_checkpoint(path)
    except ArkfedError:  # not a checkpoint dict at all: it carries no heads
        return {}
    return heads_from_state(state) if is_ark_state(state) else {}


def load_init_heads(init: str | Path) -> dict[str, SiteHead]:
    """The heads a ``--init`` source brings for continual accrual: a run's or an export's
    ``heads/`` folder, a release's student heads (``student-heads/``), or a released Ark
    checkpoint's named ``omni_heads``; none otherwise."""
    from arkfed.model.lineage import STUDENT_HEADS_DIR, is_release, read_release

    text = str(init)
    if text in ("random", IMAGENET) or text.startswith(IMAGENET + ":"):
        return {}
    path = Path(init)
    if is_release(path):
        read_release(path)
        return load_heads(path / STUDENT_HEADS_DIR) if (path / STUDENT_HEADS_DIR).is_dir() else {}
    if path.is_dir():
        return load_heads(path / "heads") if (path / "heads").is_dir() else {}
    return load_file_heads(path)


def load_init_teacher_heads(init: str | Path) -> dict[str, SiteHead]:
    """The teacher's heads a ``--init`` source brings: a release's (its ``heads/``) or a run
    folder's ``teacher-heads/``; none otherwise (the teacher's head then starts as a copy of the
    student's, as at the start of any run)."""
    from arkfed.model.lineage import is_release, read_release

    path = Path(str(init))
    if is_release(path):
        read_release(path)
        return load_heads(path / "heads") if (path / "heads").is_dir() else {}
    if path.is_dir() and (path / "config.yaml").is_file() and (path / "teacher-heads").is_dir():
        return load_heads(path / "teacher-heads")
    return {}


def load_ark_model(source: str | Path, which: str = "teacher", spec: ModelSpec | None = None) -> ArkModel:
    """Load an ArkModel from a run folder, an export folder or a weights file.

    ``which`` picks ``teacher`` or ``student`` in a run folder or an Ark checkpoint. ``spec`` is
    needed for a plain timm backbone file and for ``imagenet[:PATH]``, which carry no architecture
    (the projector then starts random).
    """
    text = str(source)
    if text == IMAGENET or text.startswith(IMAGENET + ":"):
        if spec is None:
            raise ArkfedError(f"{text}: ImageNet weights carry no architecture; pass the model name (--model)")
        location = text.partition(":")[2] or True
        return ArkModel(spec, pretrained=location)
    path = Path(source)
    if path.is_dir():
        if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
            return _from_export(path)
        candidate = path / f"{which}.safetensors"
        if not candidate.is_file():
            raise ArkfedError(f"{path}: neither a run folder (no {which}.safetensors) nor an export folder (no config.json)")
        path = candidate
    if not path.is_file():
        raise ArkfedError(f"weights not found: {path}")
    if path.suffix == ".safetensors":
        tensors, meta = read_safetensors(path)
        if SPEC_KEY in meta:
            return _load_state(ArkModel(ModelSpec.model_validate_json(meta[SPEC_KEY])), tensors, path)
    else:
        from arkfed.model.released import is_ark_state, model_from_state, read_checkpoint

        try:
            state = read_checkpoint(path, which)
        except ArkfedError:
            state = {}  # not an Ark checkpoint; the plain-backbone reader says what is wrong with it
        if is_ark_state(state):
            return model_from_state(state, path, spec)
    if spec is None:
        raise ArkfedError(f"{path}: plain backbone weights carry no architecture; pass the model name (--model)")
    return _from_plain_backbone(path, spec)
