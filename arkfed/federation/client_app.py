"""The site side of a federated run: Flower's ClientApp, run by the site's SuperNode.

The SuperNode's node config names the site and its YAML (``arkfed site`` sets both), so the
ClientApp reads the site's data with the site's own plugin, never anything the coordinator sends.
Each handler is a thin shell around the functions local mode uses:

- ``query.hello``: identify the site by name, check its label schema against the run's record;
- ``train.visit``: :func:`arkfed.site_tasks.visit_site`, unchanged, on the received weights;
- ``evaluate.round``: :func:`arkfed.site_tasks.evaluate_site_models`; metrics only.

The site's heads (the student's and the teacher's) never leave: they are kept in the node's
context state and in its
``local_state_dir`` (:class:`~arkfed.federation.site_state.HeadStore`). Every reply passes through
:func:`audit_outgoing`, which records what left the site in ``<local_state_dir>/outbox.jsonl`` and
turns exceptions into error replies with local paths removed.
"""

from __future__ import annotations

import os
import traceback
from pathlib import Path

from flwr.app import Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from arkfed.errors import ArkfedError
from arkfed.federation import messages as m
from arkfed.federation.site_state import HeadStore, append_outbox, schema_mismatch
from arkfed.site_tasks import SiteHeads

NODE_SITE = "site"
NODE_SITE_CONFIG = "site-config"
NODE_PLUGINS = "plugins-dir"

SITE_REFUSED = 100  # error code: the site will not take part (wrong schema, wrong name); no retry
SITE_FAILED = 101  # error code: the site failed this request (retry may help)


class SiteRefusal(ArkfedError):
    """The site refuses a request (it does not belong in this run as configured)."""


def node_site_config(context: Context):
    """The site config this SuperNode serves, checked against the name in its node config."""
    from arkfed.site import load_site_config

    node = context.node_config
    if NODE_SITE_CONFIG not in node:
        raise ArkfedError(f"SuperNode has no {NODE_SITE_CONFIG!r} in its node config; start sites with `arkfed site --config`")
    config = load_site_config(Path(str(node[NODE_SITE_CONFIG])))
    name = str(node.get(NODE_SITE, config.name))
    if name != config.name:
        raise SiteRefusal(f"node config names site {name!r} but its config file names {config.name!r}", site=config.name)
    return config


def _plugins_dirs(context: Context) -> list[str]:
    value = str(context.node_config.get(NODE_PLUGINS, ""))
    return [p for p in value.split(os.pathsep) if p]


def load_node_site(context: Context):
    from arkfed.site import load_site

    return load_site(node_site_config(context), _plugins_dirs(context))


def _check_schema(site, request) -> None:
    """Refuse when the run recorded a different schema for this site."""
    from arkfed.schema import LabelSchema

    recorded = m.read_json(request, "schemas").get(site.name)
    if recorded is not None:
        expected = LabelSchema.model_validate(recorded)
        if expected != site.schema:
            raise SiteRefusal(str(schema_mismatch(site.name, site.schema, expected, "the run's record")))


def _head_stores(site, request, context: Context) -> tuple[HeadStore, HeadStore]:
    run_uid = m.read_json(request, "run_uid")
    return tuple(HeadStore(site.config.local_state_dir, run_uid, site.name, site.schema, context.state, kind)
                 for kind in ("head", "teacher-head"))


def _start_heads(stores: tuple[HeadStore, HeadStore], site, request, content: RecordDict, embed_dim: int) -> SiteHeads:
    """The heads this request starts from: a stored version, or the initial head sent along (the
    teacher's head then starts as its copy)."""
    from arkfed.model import SiteHead

    version = int(m.read_json(request, "head_from"))
    student_store, teacher_store = stores
    if version == m.NO_HEAD:
        head = student_store.load(m.NO_HEAD)
        if head is None:
            if m.HEAD not in content:
                raise ArkfedError("request starts a new head but carries no initial head", site=site.name)
            head = SiteHead(site.name, site.schema, embed_dim)
            m.load_model_record(head, content[m.HEAD], "initial head")
            student_store.save(m.NO_HEAD, head)
        return SiteHeads.fresh(head)
    head, teacher = student_store.load(version), teacher_store.load(version)
    if head is None or teacher is None:
        raise SiteRefusal(
            f"has no head from visit {version} of run {student_store.run_uid} (neither in the SuperNode's state nor in "
            f"{student_store.folder}); its local state was lost, so it cannot continue this run", site=site.name,
        )
    return SiteHeads(head, teacher)


def _models(content: RecordDict, request):
    from arkfed.model import ArkModel, ModelSpec

    spec = m.read_json(request, "spec", ModelSpec)
    student, teacher = ArkModel(spec), ArkModel(spec)
    m.load_model_record(student, content[m.STUDENT], "student")
    m.load_model_record(teacher, content[m.TEACHER], "teacher")
    teacher.requires_grad_(False)
    return student, teacher


def hello(msg: Message, context: Context) -> Message:
    """Name, schema and split sizes of this site (after checking the run's schema record)."""
    site = load_node_site(context)
    request = msg.content[m.REQUEST]
    member = site.name in m.read_json(request, "sites")
    if member:
        _check_schema(site, request)
        for store in _head_stores(site, request, context):
            store.check_recorded_schema()
    sizes = {name: len(table) for name, table in site.splits.items()}
    content = RecordDict({
        m.SITE: m.json_record(name=site.name, schema=site.schema, member=member),
        m.METRICS: MetricRecord({f"{k}_size": int(v) for k, v in sizes.items()}),
    })
    return Message(content, reply_to=msg)


def visit(msg: Message, context: Context) -> Message:
    """One Ark site visit on the received student/teacher (:func:`arkfed.site_tasks.visit_site`,
    exactly as in local mode); the heads stay here, versioned by visit."""
    from arkfed.site_tasks import visit_site
    from arkfed.training import TrainSettings, VisitPlan

    site = load_node_site(context)
    request = msg.content[m.REQUEST]
    plan = m.read_json(request, "plan", VisitPlan)
    settings = m.read_json(request, "settings", TrainSettings)
    if plan.site != site.name:
        raise SiteRefusal(f"was sent visit {plan.visit}, which is planned for site {plan.site!r}", site=site.name)
    _check_schema(site, request)
    stores = _head_stores(site, request, context)
    student, teacher = _models(msg.content, request)
    heads = _start_heads(stores, site, request, msg.content, student.embed_dim)
    result = visit_site(student, teacher, heads, site, settings, plan, float(m.read_json(request, "pending")))
    stores[0].save(plan.visit, heads.student)
    stores[1].save(plan.visit, heads.teacher)
    content = RecordDict({
        m.STUDENT: m.model_record(student),
        m.METRICS: m.metrics_record(result.model_dump(exclude={"site"})),
    })
    if settings.ema == "iteration":  # the teacher moved during the visit
        content[m.TEACHER] = m.model_record(teacher)
    return Message(content, reply_to=msg)


def evaluate(msg: Message, context: Context) -> Message:
    """Student and teacher on this site's evaluation split with their heads, exactly as local
    mode evaluates (:func:`arkfed.site_tasks.evaluate_site_models`): metrics only."""
    from arkfed.site_tasks import evaluate_site_models
    from arkfed.training import TrainSettings

    site = load_node_site(context)
    request = msg.content[m.REQUEST]
    settings = m.read_json(request, "settings", TrainSettings)
    split = m.read_json(request, "split")
    _check_schema(site, request)
    content = RecordDict()
    table = site.splits.get(split)
    if table is not None and len(table) > 0:
        stores = _head_stores(site, request, context)
        student, teacher = _models(msg.content, request)
        heads = _start_heads(stores, site, request, msg.content, student.embed_dim)
        pending = float(m.read_json(request, "pending"))
        for label, result in evaluate_site_models(student, teacher, heads, site, settings, split, pending).items():
            content[label] = m.metrics_record(result)
    return Message(content, reply_to=msg)


def _state_dir(context: Context) -> Path | None:
    try:
        return node_site_config(context).local_state_dir
    except Exception:
        return None


def _log_failure(state_dir: Path | None, msg: Message, exc: BaseException) -> None:
    """The full error (with paths and traceback) stays in the site's own log."""
    text = "".join(traceback.format_exception(exc))
    if state_dir is None:
        print(text, flush=True)
        return
    log = Path(state_dir) / "logs" / "site-errors.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as f:
        f.write(f"--- {msg.metadata.message_type} (run {msg.metadata.run_id}, round {msg.metadata.group_id})\n{text}\n")


def audit_outgoing(msg: Message, context: Context, call_next) -> Message:
    """Flower mod around every handler: error replies without local paths, and an audit line
    in the site's ``outbox.jsonl`` for every message the site sends."""
    state_dir = _state_dir(context)
    try:
        reply = call_next(msg, context)
    except Exception as exc:  # every failure becomes a reply the coordinator can act on
        _log_failure(state_dir, msg, exc)
        code = SITE_REFUSED if isinstance(exc, SiteRefusal) else SITE_FAILED
        reason = str(exc) if isinstance(exc, ArkfedError) else f"{type(exc).__name__}: {exc}"
        reply = Message(Error(code=code, reason=m.redact_paths(reason)), reply_to=msg)
    if state_dir is not None:
        entry = {"message_type": msg.metadata.message_type, "run_id": msg.metadata.run_id, "group": msg.metadata.group_id}
        if reply.has_error():
            entry["error"] = {"code": reply.error.code, "reason": reply.error.reason}
        else:
            entry["content"] = m.describe_content(reply.content)
        append_outbox(state_dir, entry)
    return reply


app = ClientApp(mods=[audit_outgoing])
app.query("hello")(hello)
app.train("visit")(visit)
app.evaluate("round")(evaluate)
