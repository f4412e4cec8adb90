"""A site's policy: the limits within which a coordinator may use the site (``policy:`` in its YAML).

In a federation the coordinator chooses the batch size, the steps per visit, the image size and
which split a site evaluates. Some choices turn a visit into a leak: one gradient step on a batch
of one image can be inverted back into that image, and an evaluation on the test split spends the
site's held-out data. The site therefore states what it accepts, and its ClientApp checks every
request with :func:`check_request` *before* it reads an image or a weight; a refusal is a
:class:`Refusal` naming the policy key, sent back as a one-line reason (never retried).

Defaults protect the site (a security review should not have to change anything):

- ``min_batch_size: 16`` and ``min_steps_per_visit: 10``: every returned update averages many
  images over many steps. Both count what the site would really do (a batch is never larger than
  the training split, a visit never longer than its epochs), so a site with fewer than 16 training
  images refuses every visit until its operator lowers the limit on purpose. The demo sites'
  YAMLs lower them (synthetic images, nothing to protect) so small trial runs work; the demo
  recipe itself (batch 16, about 60 steps per visit on the 1,200-image demo site) passes the
  defaults.
- ``evaluate_splits: [val]``: the test split stays untouched until the site decides otherwise.
- ``per_class_metrics: false``: an evaluation reply carries the loss, the mean AUC (and accuracy)
  and the number of examples, not an AUC per class: at full precision an AUC gives away its class's
  positive count (:mod:`arkfed.site.disclosure`). With ``true``, a class's AUC leaves only when the
  evaluated split has at least ``min_class_positives: 10`` positive and ``min_class_negatives: 10``
  negative counted labels for it; ``metric_decimals: 2`` rounds every float metric of a reply (per
  class or not). Keep ``min_class_positives * min_class_negatives >= 10 ** metric_decimals``.
- ``max_image_size: 1024``, ``max_batch_size: 1024``, ``max_epochs_per_visit: 10``: the
  coordinator cannot make a site spend unbounded compute per visit; ``max_memory_gb`` (unset)
  caps the accelerator memory a task may allocate. Devices and data-loading workers are the
  site's own choice (``compute:`` in its YAML), never the coordinator's, so need no limit here.
- ``approval: auto``; with ``manual`` a site serves a run only after its operator approved the
  run's fingerprint (``arkfed site --config SITE.yaml --approve FINGERPRINT``): ``arkfed site``
  prints every new run's settings and fingerprint and the task waits (``approval_timeout``). The
  site's web console (``arkfed console --site``) approves the same way, or refuses: a refusal
  (``<state_dir>/refusals.txt``) ends the wait at once, for this and every later request of the run.
- ``release_head: false``: the site's heads stay at the site; with ``true`` they are sent once, with
  the evaluation after the run's last round, for the run's release (``arkfed release``).
- ``privacy:`` (unset: no differential privacy): with it, every visit at this site, local or
  federated, trains with DP-SGD (Opacus: per-sample clipping to ``max_grad_norm``, Gaussian noise,
  Poisson sampling) within a total ``epsilon`` (at ``delta``, default ``1 / (10 * N_train)``) for
  this site's training data over every run; the budget's ledger lives in the site's ``state_dir``
  (:mod:`arkfed.site.budget`, :mod:`arkfed.ark.privacy`). A visit that would exceed it is refused
  (``privacy.epsilon: 7.90 of 8.00 spent, this visit needs 0.40``).
- ``send_metrics: none | mean | per_class``: what an evaluation reply carries (unset: ``per_class``
  with ``per_class_metrics: true``, else ``mean``); ``none`` sends no evaluation metrics at all.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from arkfed.config import TrainSettings, VisitPlan
    from arkfed.spec import ModelSpec

RequestKind = Literal["visit", "evaluate"]
APPROVALS_FILE = "approvals.txt"
REFUSALS_FILE = "refusals.txt"
PENDING_DIR = "pending-runs"


class PrivacyPolicy(BaseModel):
    """The site's differential-privacy budget (``policy: privacy:``): see :mod:`arkfed.site.budget`."""

    model_config = ConfigDict(extra="forbid")

    epsilon: float = Field(gt=0, description="total epsilon for this site's training data, over every run that trains on it")
    delta: float | None = Field(default=None, gt=0, lt=1, description="delta of the guarantee (default 1 / (10 * training images))")
    max_grad_norm: float = Field(default=1.0, gt=0, description="per-sample gradient clipping norm C")
    accountant: Literal["rdp", "prv"] = Field(
        default="rdp", description="Opacus' accountant: rdp (Renyi DP) | prv (privacy random variables)")
    max_noise_multiplier: float = Field(
        default=10.0, gt=0, description="the most noise (in units of max_grad_norm) a visit may add to fit the budget; "
        "a visit that would need more is trained at this level if its cost fits, else refused")


class SitePolicy(BaseModel):
    """What this site lets a coordinator ask of it (every field is a ``policy:`` key)."""

    model_config = ConfigDict(extra="forbid")

    min_batch_size: int = Field(default=16, ge=1, description="smallest batch a visit may train on")
    min_steps_per_visit: int = Field(default=10, ge=1, description="fewest optimizer steps a visit may take")
    max_batch_size: int = Field(default=1024, ge=1)
    max_image_size: int = Field(default=1024, ge=16, description="largest model input size (pixels per side)")
    max_epochs_per_visit: int = Field(default=10, ge=1)
    max_memory_gb: float | None = Field(default=None, gt=0, description="accelerator memory a task may allocate")
    evaluate_splits: list[Literal["train", "val", "test"]] = Field(default_factory=lambda: ["val"])
    per_class_metrics: bool = Field(default=False, description="send an AUC per class (those with the minimum counts)")
    metric_decimals: int = Field(default=2, ge=0, le=15, description="decimals of every loss, AUC and accuracy sent")
    min_class_positives: int = Field(default=10, ge=1, description="fewest positive labels a class needs for its AUC to leave")
    min_class_negatives: int = Field(default=10, ge=1, description="fewest negative labels a class needs for its AUC to leave")
    approval: Literal["auto", "manual"] = "auto"
    approval_timeout: float = Field(default=3600.0, gt=0, description="seconds a task waits for the operator's approval")
    release_head: bool = Field(default=False, description=(
        "send this site's heads (student and teacher) to the coordinator once, with its evaluation after the run's last "
        "round, so they can go into the foundation-model release (`arkfed release`); false: the heads never leave the site"))
    privacy: PrivacyPolicy | None = Field(default=None, description="differential privacy (DP-SGD) with this site's budget")
    send_metrics: Literal["none", "mean", "per_class"] | None = Field(
        default=None, description="what an evaluation reply carries (unset: per_class with per_class_metrics true, else mean)")

    @property
    def released_metrics(self) -> Literal["none", "mean", "per_class"]:
        """``send_metrics``, or what ``per_class_metrics`` (the older key) says."""
        return self.send_metrics or ("per_class" if self.per_class_metrics else "mean")


@dataclass(frozen=True)
class Refusal:
    """A request outside the site's policy: the key it breaks and the limit, nothing else."""

    key: str
    reason: str

    def __str__(self) -> str:
        return f"policy_refused: {self.key}: {self.reason}"


def planned_steps(settings: TrainSettings, train_size: int) -> tuple[int, int]:
    """(batch, steps) a visit really takes on ``train_size`` images, as
    :func:`arkfed.data.loaders.visit_draws` cuts it: whole batches, at least one, at most max_steps."""
    batch = min(settings.batch_size, train_size)
    steps = max(1, train_size // max(batch, 1)) * settings.local_epochs
    if settings.max_steps_per_visit is not None:
        steps = min(steps, settings.max_steps_per_visit)
    return batch, steps


def check_request(
    policy: SitePolicy,
    kind: RequestKind,
    settings: TrainSettings,
    plan: VisitPlan | None = None,
    split: str | None = None,
    spec: ModelSpec | None = None,
    train_size: int | None = None,
) -> Refusal | None:
    """The first policy key a request breaks, or None. Plain and side-effect free: the ClientApp
    calls it before touching data or weights; ``train_size`` (the site's own) makes the batch and
    step limits count what the visit would really do. ``plan`` (the visit's schedule values) is
    part of every visit request; no rule reads it yet."""
    if spec is not None and spec.img_size > policy.max_image_size:
        return Refusal("max_image_size", f"image size {spec.img_size} > {policy.max_image_size}")
    if kind == "evaluate":
        if split not in policy.evaluate_splits:
            return Refusal("evaluate_splits", f"split {split!r} is not in {policy.evaluate_splits}")
        return None
    if settings.batch_size > policy.max_batch_size:
        return Refusal("max_batch_size", f"batch size {settings.batch_size} > {policy.max_batch_size}")
    if settings.local_epochs > policy.max_epochs_per_visit:
        return Refusal("max_epochs_per_visit", f"{settings.local_epochs} epochs > {policy.max_epochs_per_visit}")
    batch = settings.batch_size if train_size is None else min(settings.batch_size, train_size)
    if batch < policy.min_batch_size:
        fewer = "" if batch == settings.batch_size else f" (the training split has {train_size} images)"
        return Refusal("min_batch_size", f"batch size {batch} < {policy.min_batch_size}{fewer}")
    steps = settings.max_steps_per_visit
    if train_size is not None:
        steps = planned_steps(settings, train_size)[1]
    if steps is not None and steps < policy.min_steps_per_visit:
        return Refusal("min_steps_per_visit", f"{steps} steps per visit < {policy.min_steps_per_visit}")
    return None


# -- approval -------------------------------------------------------------------------------


def run_fingerprint(run_uid: str, spec: ModelSpec, settings: TrainSettings, claim: dict | None = None) -> str:
    """What the operator approves (16 hex digits of SHA-256): the whole signed claim of the run
    (its configuration, nonce and expiry) when it is signed; otherwise (an insecure trial) the
    run's id, model and settings. A resubmitted or resumed run is a new claim: approved anew."""
    if claim is not None:
        text = json.dumps(claim, sort_keys=True, separators=(",", ":"), allow_nan=False)
    else:
        text = json.dumps({"run": run_uid, "spec": spec.model_dump(mode="json"), "settings": settings.model_dump(mode="json")},
                          sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def claim_details(claim: dict | None) -> dict:
    """What the operator sees of a signed run besides model and settings, before approving it."""
    if claim is None:
        return {}
    config = claim.get("config") or {}
    shown = {key: config.get(key) for key in ("sites", "rounds", "mode", "order", "weighting", "seed", "init", "eval_split", "recipe")}
    return {"signed": {**shown, "nonce": claim.get("nonce"), "signed_at": claim.get("signed_at"), "expires_at": claim.get("expires_at")}}


def _check_fingerprint(fingerprint: str) -> str:
    from arkfed.errors import ArkfedError

    value = fingerprint.strip().lower()
    if len(value) != 16 or any(c not in "0123456789abcdef" for c in value):
        raise ArkfedError(f"not a run fingerprint: {fingerprint!r} (16 hex digits, as `arkfed site` prints it)")
    return value


def _record(state_dir: Path, name: str, fingerprint: str) -> Path:
    value = _check_fingerprint(fingerprint)
    path = Path(state_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if value not in _recorded(state_dir, name):
        with path.open("a") as f:
            f.write(value + "\n")
    return path


def _recorded(state_dir: Path, name: str) -> set[str]:
    path = Path(state_dir) / name
    if not path.is_file():
        return set()
    return {line.split("#")[0].strip().lower() for line in path.read_text().splitlines() if line.split("#")[0].strip()}


def approve_run(state_dir: Path, fingerprint: str) -> Path:
    """Record the operator's approval (``arkfed site --approve``) in ``<state_dir>/approvals.txt``."""
    return _record(state_dir, APPROVALS_FILE, fingerprint)


def approved_runs(state_dir: Path) -> set[str]:
    return _recorded(state_dir, APPROVALS_FILE)


def refuse_run(state_dir: Path, fingerprint: str) -> Path:
    """Record the operator's refusal (the console's Refuse button) in ``<state_dir>/refusals.txt``: the
    waiting task is refused at once instead of at ``approval_timeout``. An approval recorded later wins."""
    return _record(state_dir, REFUSALS_FILE, fingerprint)


def refused_runs(state_dir: Path) -> set[str]:
    return _recorded(state_dir, REFUSALS_FILE) - approved_runs(state_dir)


def pending_runs(state_dir: Path) -> list[dict]:
    """Runs waiting for approval (what ``arkfed site`` shows), oldest first."""
    folder = Path(state_dir) / PENDING_DIR
    entries = []
    for path in sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []:
        try:
            entry = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if entry.get("fingerprint") not in approved_runs(state_dir) | refused_runs(state_dir):
            entries.append(entry)
    return entries


def wait_for_approval(state_dir: Path, fingerprint: str, details: dict, timeout: float, poll: float = 0.5) -> Refusal | None:
    """Block until the operator approves ``fingerprint`` (None), refuses it or ``timeout`` passes (a Refusal).

    The request's settings go to ``<state_dir>/pending-runs/<fingerprint>.json`` for ``arkfed site``
    to show; they are the coordinator's own settings, nothing of the site's data."""
    from arkfed.io import atomic_write

    if fingerprint in approved_runs(state_dir):
        return None
    pending = Path(state_dir) / PENDING_DIR / f"{fingerprint}.json"
    text = json.dumps({"fingerprint": fingerprint, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **details}, indent=2)
    atomic_write(pending, lambda tmp: tmp.write_text(text))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fingerprint in approved_runs(state_dir):
            pending.unlink(missing_ok=True)
            return None
        if fingerprint in refused_runs(state_dir):
            pending.unlink(missing_ok=True)
            return Refusal("approval", f"run {fingerprint} was refused by the site's operator")
        time.sleep(poll)
    return Refusal("approval", f"run {fingerprint} was not approved within {math.ceil(timeout)} s")


def apply_memory_limit(policy: SitePolicy, device_name: str) -> None:
    """Cap the accelerator memory this task may allocate (``max_memory_gb``; CUDA only: on a CPU
    the operating system's limits for the site's account apply)."""
    import torch

    from arkfed.devices import resolve_device

    if policy.max_memory_gb is None:
        return
    device = resolve_device(device_name)
    if device.type != "cuda":
        return
    index = device.index or 0
    total = torch.cuda.get_device_properties(index).total_memory / 2**30
    torch.cuda.set_per_process_memory_fraction(min(1.0, policy.max_memory_gb / total), index)
