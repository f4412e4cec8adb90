"""What travels between the coordinator and the sites, as Flower records.

Three message types, each a request from the coordinator and a reply from one site:

- ``query.hello`` (who are you?): request carries the run's id, site list and its schema record;
  the reply names the site and its label schema and gives its split sizes;
- ``train.visit``: request carries the student and teacher (backbone + projector arrays), the
  visit's settings and plan (JSON in a ConfigRecord) and which version of the site's head to start
  from; the reply carries the student (and the teacher with per-iteration EMA) and the visit's
  scalar metrics;
- ``evaluate.round``: request carries student and teacher; the reply carries scalar metrics only.

Model weights (parameters and buffers, in ``state_dict`` order) go packed into one flat array per
dtype, byte-exact, so a federated visit computes exactly what a local one does. Nothing else of a
site's data is ever put in a reply.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from pydantic import BaseModel

from arkfed.ark.updates import VisitReply
from arkfed.errors import ArkfedError

if TYPE_CHECKING:
    from torch import nn

HELLO = "query.hello"
VISIT = "train.visit"
EVALUATE = "evaluate.round"

STUDENT = "student"
TEACHER = "teacher"
HEAD = "head"
METRICS = "metrics"
REQUEST = "request"
SITE = "site"

AUC_PREFIX = "auc."

# A site's error replies carry one of these codes (and a fixed category, never its error text)
SITE_REFUSED = 100  # the site will not take part (wrong schema, wrong name, its policy); no retry
SITE_FAILED = 101  # the site failed this request (retry may help)
SITE_CODES = (SITE_REFUSED, SITE_FAILED)
NO_HEAD = -1  # head version meaning "start from the initial head sent along"

Model = TypeVar("Model", bound=BaseModel)


def model_record(module: "nn.Module") -> ArrayRecord:
    """A module's full ``state_dict`` (parameters and buffers) packed into one flat array per dtype.

    Flower moves every array as its own object (one HTTP request or more each), so a model sent
    tensor by tensor costs hundreds of requests per hop; packed, it is a handful of 5 MB chunks.
    The order is the module's ``state_dict`` order, which the receiver rebuilds from the same
    :class:`~arkfed.spec.ModelSpec`; values are copied bit for bit.
    """
    import numpy as np

    groups: dict[str, list] = {}
    for tensor in module.state_dict().values():
        array = tensor.detach().cpu().contiguous().numpy()
        groups.setdefault(_dtype(tensor), []).append(array.reshape(-1))
    record = ArrayRecord()
    for dtype, parts in groups.items():
        record[dtype] = Array(np.concatenate(parts))
    return record


def _dtype(tensor) -> str:
    """The numpy name of a tensor's dtype ("float32", "int64", ...)."""
    import torch

    return str(torch.empty(0, dtype=tensor.dtype).numpy().dtype)


def layout(module: "nn.Module") -> dict[str, int]:
    """Number of values per dtype in a module's state (what a packed record must hold)."""
    sizes: dict[str, int] = {}
    for tensor in module.state_dict().values():
        sizes[_dtype(tensor)] = sizes.get(_dtype(tensor), 0) + tensor.numel()
    return sizes


def load_model_record(module: "nn.Module", record: ArrayRecord, what: str = "model") -> None:
    """Unpack a :func:`model_record` into ``module``; the sizes per dtype must match exactly."""
    import torch

    own = module.state_dict()
    if not isinstance(record, ArrayRecord):
        raise ArkfedError(f"{what} is a {type(record).__name__}, not an ArrayRecord")
    flat = {dtype: record[dtype].numpy() for dtype in record.keys()}
    for dtype, array in flat.items():  # a packed group is one flat array of exactly its key's dtype
        if array.ndim != 1 or array.dtype.name != dtype:
            raise ArkfedError(f"{what} array {dtype!r} holds {array.dtype.name} of shape {list(array.shape)}, "
                              f"expected one flat {dtype} array")
    expected = layout(module)
    got = {dtype: int(a.size) for dtype, a in flat.items()}
    if got != expected:
        raise ArkfedError(f"{what} arrays do not match the model: values per dtype {got}, the model has {expected}")
    offsets = dict.fromkeys(flat, 0)
    state = {}
    for key, tensor in own.items():
        dtype = _dtype(tensor)
        start, n = offsets[dtype], tensor.numel()
        state[key] = torch.from_numpy(flat[dtype][start : start + n].copy()).reshape(tensor.shape)
        offsets[dtype] = start + n
    module.load_state_dict(state)


def unpack_state(module: "nn.Module", record: ArrayRecord, what: str = "model") -> dict:
    """A packed record as a ``state_dict`` shaped like ``module``'s (for averaging)."""
    import copy

    clone = copy.deepcopy(module)
    load_model_record(clone, record, what)
    return clone.state_dict()


def json_record(**items: BaseModel | Any) -> ConfigRecord:
    """Pydantic models and plain values as JSON strings in one ConfigRecord."""
    values = {}
    for key, value in items.items():
        values[key] = value.model_dump_json() if isinstance(value, BaseModel) else json.dumps(value)
    return ConfigRecord(values)


def read_json(record: ConfigRecord, key: str, model: type[Model] | None = None) -> Any:
    """One value of a :func:`json_record`, validated into ``model`` when given."""
    if key not in record:
        raise ArkfedError(f"message lacks {key!r} (coordinator and site run different arkfed versions?)")
    text = str(record[key])
    return model.model_validate_json(text) if model is not None else json.loads(text)


def _number(value: Any) -> float | int:
    if hasattr(value, "item") and not isinstance(value, (int, float)):  # numpy / torch scalars
        value = value.item()
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if value is None:
        return math.nan
    return float(value)


def metrics_record(values: dict[str, Any]) -> MetricRecord:
    """Scalar metrics (nested dicts of numbers, e.g. per-class AUCs) as a flat MetricRecord."""
    flat: dict[str, float | int] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            for sub, number in value.items():
                flat[f"{key}.{sub}"] = _number(number)
        elif isinstance(value, (int, float, bool)) or value is None or getattr(value, "ndim", None) == 0:
            flat[key] = _number(value)
        else:
            raise TypeError(f"metric {key!r} is not a number ({type(value).__name__}); only scalars leave a site")
    return MetricRecord(flat)


BOOLEAN_METRICS = ("bn_recalibrated",)


def eval_result(record: MetricRecord, classes: tuple[str, ...]) -> dict:
    """The dict :func:`arkfed.ark.metrics.evaluate_site` returned at the site, from its MetricRecord:
    same keys in the same order, per-class AUCs nested again (in schema order), flags as bools."""
    result: dict[str, Any] = {}
    for key, value in record.items():
        if key.startswith(AUC_PREFIX):
            if "auc" not in result:
                aucs = {name: float(record[f"{AUC_PREFIX}{name}"]) for name in classes if f"{AUC_PREFIX}{name}" in record}
                result["auc"] = aucs
        elif key in BOOLEAN_METRICS:
            result[key] = bool(value)
        else:
            result[key] = value
    return result


def request_content(request: ConfigRecord, **arrays: ArrayRecord) -> RecordDict:
    content = RecordDict({REQUEST: request})
    for name, record in arrays.items():
        content[name] = record
    return content


# -- requests, decoded at the site; replies, encoded there ----------------------------------------
class BadRequest(ArkfedError):
    """A request field the site refuses as missing or invalid; ``public`` (what the coordinator is
    told) names the field and why, never its value."""

    def __init__(self, message: str, *, public: str):
        super().__init__(message)
        self.public = public


def _field(record: ConfigRecord, key: str, kind: type) -> Any:
    """One request field as ``kind`` (a pydantic model or a JSON type); :class:`BadRequest` if it is not."""
    from pydantic import ValidationError

    try:
        value = read_json(record, key, kind if issubclass(kind, BaseModel) else None)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join([key, *map(str, err["loc"])])
        raise BadRequest(f"invalid {key} in the request: {exc}", public=f"invalid_request: {where}: {err['msg']}") from None
    except (ArkfedError, ValueError) as exc:
        raise BadRequest(str(exc), public=f"invalid_request: {key}: missing or malformed") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise BadRequest(f"{key} in the request is a {type(value).__name__}, expected {kind.__name__}",
                         public=f"invalid_request: {key}: expected {kind.__name__}")
    return value


@dataclass
class SiteRequest:
    """A ``train.visit`` (with ``plan``) or ``evaluate.round`` (with ``split``) request, every
    field validated; the model arrays are unpacked by :meth:`models` once the site's policy allowed it."""

    settings: Any  # arkfed.config.TrainSettings
    spec: Any  # arkfed.spec.ModelSpec
    run_uid: str
    schemas: dict
    head_from: int
    pending: float
    content: RecordDict
    plan: Any = None  # arkfed.config.VisitPlan
    split: str | None = None

    def models(self) -> tuple["nn.Module", "nn.Module"]:
        """The student and teacher sent along (the teacher frozen)."""
        from arkfed.model.ark import ArkModel

        student, teacher = ArkModel(self.spec), ArkModel(self.spec)
        load_model_record(student, self.content[STUDENT], "student")
        load_model_record(teacher, self.content[TEACHER], "teacher")
        teacher.requires_grad_(False)
        return student, teacher

    def initial_head(self, head: "nn.Module", site: str) -> None:
        """Load the initial head sent along (``head_from`` is :data:`NO_HEAD`) into ``head``."""
        if HEAD not in self.content:
            raise ArkfedError("request starts a new head but carries no initial head", site=site)
        load_model_record(head, self.content[HEAD], "initial head")


def read_site_request(content: RecordDict, kind: str) -> SiteRequest:
    """A ``train.visit`` or ``evaluate.round`` request, decoded (raises :class:`BadRequest`)."""
    from arkfed.config import TrainSettings, VisitPlan
    from arkfed.spec import ModelSpec

    record = content[REQUEST]
    plan = _field(record, "plan", VisitPlan) if kind == VISIT else None
    settings, spec = _field(record, "settings", TrainSettings), _field(record, "spec", ModelSpec)
    split = _field(record, "split", str) if kind == EVALUATE else None
    return SiteRequest(settings, spec, _field(record, "run_uid", str), _field(record, "schemas", dict), _field(record, "head_from", int),
                       _field(record, "pending", float), content, plan=plan, split=split)


def visit_content(result: BaseModel, student: "nn.Module", teacher: "nn.Module | None" = None) -> RecordDict:
    """A ``train.visit`` reply: the student (and the teacher, when it moved during the visit) and
    the visit's scalar metrics."""
    content = RecordDict({STUDENT: model_record(student), METRICS: metrics_record(result.model_dump(exclude={"site"}, exclude_none=True))})
    if teacher is not None:
        content[TEACHER] = model_record(teacher)
    return content


RELEASED_HEADS = ("released_head", "released_teacher_head")  # evaluation reply: the site's heads, when its policy releases them


def evaluation_content(results: dict[str, dict], heads: tuple["nn.Module", "nn.Module"] | None = None) -> RecordDict:
    """An ``evaluate.round`` reply: per model label, the metrics the site's policy released (rounded,
    per-class AUCs only where allowed, :mod:`arkfed.site.disclosure`); with ``heads`` (the final
    evaluation, policy ``release_head: true``) the site's student and teacher heads."""
    content = RecordDict({label: metrics_record(r) for label, r in results.items()})
    for key, head in zip(RELEASED_HEADS, heads or ()):
        content[key] = model_record(head)
    return content


def read_released_heads(content: RecordDict, site: str, schema, embed_dim: int):
    """The (student, teacher) heads an evaluation reply carries (None: none), checked: schema, width, finite."""
    import torch

    from arkfed.model.ark import SiteHead

    if not any(key in content for key in RELEASED_HEADS):
        return None
    student, teacher = heads = (SiteHead(site, schema, embed_dim), SiteHead(site, schema, embed_dim).requires_grad_(False))
    for key, head in zip(RELEASED_HEADS, heads):
        head.load_state_dict(_unpack(head, _record(content, key, ArrayRecord, "evaluation reply"), key.replace("_", " ")))
    if not all(torch.isfinite(v).all() for head in heads for v in head.state_dict().values()):
        raise BadReply("evaluation reply: the released heads hold non-finite values")
    return student, teacher


# -- replies, parsed before use ------------------------------------------------------------------
# A site's reply is input from another institution: every field is decoded here, and what does
# not fit the wire format raises BadReply with one line saying why, so the coordinator skips that
# reply instead of crashing on a missing key, a metric that overwrites a record field, or arrays
# that are not the model's. Whether a decoded model may be used is decided in one place, the Ark
# loop's gate (:func:`arkfed.ark.updates.check_reply`), for local and remote visits alike.

RESERVED_METRICS = frozenset({"kind", "round", "visit", "site", "model", "split", "time"})
"""Fields the coordinator's metrics records set themselves; a reply may not carry them as metrics."""


class BadReply(ArkfedError):
    """A reply the coordinator will not use (the visit or evaluation is skipped, not retried)."""


def _record(content: RecordDict, key: str, kind: type, what: str):
    if key not in content:
        raise BadReply(f"{what} lacks {key!r}")
    record = content[key]
    if not isinstance(record, kind):
        raise BadReply(f"{what}: {key!r} is a {type(record).__name__}, expected a {kind.__name__}")
    return record


def _metric_values(record: MetricRecord, what: str, reserved: frozenset[str] = RESERVED_METRICS) -> dict[str, float | int]:
    values = {}
    for key, value in record.items():
        if key in reserved:
            raise BadReply(f"{what}: metric {key!r} is reserved for the coordinator's records")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise BadReply(f"{what}: metric {key!r} is a {type(value).__name__}, not a number")
        values[key] = value
    return values


def _unpack(module, record: ArrayRecord, what: str) -> dict:
    try:
        return unpack_state(module, record, what)
    except ArkfedError as exc:
        raise BadReply(str(exc)) from None
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise BadReply(f"{what} arrays cannot be unpacked ({type(exc).__name__})") from None


def read_visit_reply(content: RecordDict, plan, student: "nn.Module", teacher: "nn.Module", with_teacher: bool,
                     secure: bool = False) -> VisitReply:
    """The reply to ``plan``'s visit, decoded: metrics are exactly a VisitResult for this visit
    (finite), the student (and with per-iteration EMA the teacher) unpacks into a state shaped like
    ``student`` (``teacher``); raises :class:`BadReply`. The states are not checked here: the loop's
    gate (:func:`arkfed.ark.updates.check_reply`) checks every visit's. With ``secure`` (secure
    aggregation) the reply carries metrics only, and its student is empty."""
    from pydantic import ValidationError

    from arkfed.ark.visit import VisitResult

    values = _metric_values(_record(content, METRICS, MetricRecord, "visit reply"), "visit reply",
                            RESERVED_METRICS - {"round", "visit"})  # a visit's own; checked against the plan below
    try:
        result = VisitResult.model_validate({"site": plan.site, **values}, strict=False)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise BadReply(f"visit reply: metric {'.'.join(map(str, err['loc']))!r}: {err['msg']}") from None
    unexpected = set(values) - set(VisitResult.model_fields)
    if unexpected:
        raise BadReply(f"visit reply: unexpected metric {sorted(unexpected)[0]!r}")
    if (result.round, result.visit) != (plan.round, plan.visit):
        raise BadReply(f"visit reply is for round {result.round} visit {result.visit}, not visit {plan.visit}")
    bad = [k for k, v in values.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise BadReply(f"visit reply: metric {bad[0]!r} is not finite")
    if secure:
        if set(content.keys()) != {METRICS}:
            raise BadReply("visit reply under secure aggregation carries more than its metrics")
        return VisitReply(result, {})
    returned = _unpack(student, _record(content, STUDENT, ArrayRecord, "visit reply"), f"returned {STUDENT}")
    if with_teacher:
        return VisitReply(result, returned, _unpack(teacher, _record(content, TEACHER, ArrayRecord, "visit reply"), f"returned {TEACHER}"))
    return VisitReply(result, returned)


def read_eval_reply(content: RecordDict, classes: tuple[str, ...], split_size: int | None) -> dict[str, dict]:
    """Per model label (student/teacher), the evaluation result, checked: metric records of
    numbers only, no reserved names, ``num_examples`` within the split's declared size."""
    results = {}
    for label in content.keys():
        if label in RELEASED_HEADS:  # read by read_released_heads
            continue
        if label not in (STUDENT, TEACHER):
            raise BadReply(f"evaluation reply: unexpected record {label!r}")
        values = _metric_values(_record(content, label, MetricRecord, "evaluation reply"), f"evaluation of the {label}")
        count = values.get("num_examples")
        if not isinstance(count, int) or count < 0 or (split_size is not None and count > split_size):
            raise BadReply(f"evaluation of the {label}: num_examples {count!r} is not within the split size {split_size}")
        results[label] = eval_result(content[label], classes)
    return results


def read_hello_reply(content: RecordDict) -> tuple[str, bool, Any, dict[str, int]]:
    """(site name, member of this run, label schema, split sizes) of a ``query.hello`` reply."""
    from pydantic import ValidationError

    from arkfed.data.schema import LabelSchema

    info = _record(content, SITE, ConfigRecord, "hello reply")
    try:
        name, member = read_json(info, "name"), read_json(info, "member")
        schema = LabelSchema.model_validate(read_json(info, "schema"))
    except (ArkfedError, ValidationError, ValueError, TypeError) as exc:
        raise BadReply(f"hello reply: {' '.join(str(exc).split())[:200]}") from None
    if not isinstance(name, str) or not isinstance(member, bool):
        raise BadReply("hello reply: 'name' must be a string and 'member' a boolean")
    sizes = {}
    for key, value in _metric_values(_record(content, METRICS, MetricRecord, "hello reply"), "hello reply").items():
        if not key.endswith("_size") or not isinstance(value, int) or value < 0:
            raise BadReply(f"hello reply: {key!r} is not a split size")
        sizes[key[: -len("_size")]] = value
    return name, member, schema, sizes
