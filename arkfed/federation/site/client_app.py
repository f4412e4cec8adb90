"""The site side of a federated run: Flower's ClientApp, run by the site's SuperNode.

The SuperNode's node config names the site and its YAML (``arkfed site`` sets both), so the
ClientApp reads the site's data with the site's own plugin, never anything the coordinator sends.
Each handler is a thin shell around the functions local mode uses:

- ``query.hello``: identify the site by name, check its label schema against the run's record;
- ``train.visit``: :func:`arkfed.ark.tasks.visit_site`, unchanged, on the received weights;
- ``evaluate.round``: :func:`arkfed.ark.tasks.evaluate_site_models`; metrics only;
- ``train`` (secure aggregation, parallel mode): Flower's SecAgg+ mod over the update a secure
  visit kept (:mod:`arkfed.federation.site.secure`).

A visit or an evaluation reads as: decode the request (:func:`arkfed.federation.messages.read_site_request`),
check it against the site's policy, run :mod:`arkfed.ark.tasks`, encode the reply.

The site's heads (the student's and the teacher's) never leave: they are kept in the node's
context state and in its
``local_state_dir`` (:class:`~arkfed.federation.site.heads.HeadStore`).

Before a visit or an evaluation touches an image or a weight, the request is checked against the
site's policy (:func:`arkfed.site.policy.check_request`; with ``approval: manual`` the operator's
approval of the run's fingerprint is awaited); a refusal names the policy key. A trained student
is checked finite before it is returned (:func:`arkfed.ark.tasks.visit_site`).

Every reply passes through :func:`audit_outgoing`, which records what left the site in
``<local_state_dir>/outbox.jsonl``. A failure leaves the site as an error code and a fixed
category (:func:`public_error`: ``data_error``, ``out_of_memory``, ``non_finite_update``,
``policy_refused: <key>: <limit>``, ...): error text can hold paths, patient and study ids, so
the full text and traceback stay in ``<local_state_dir>/logs/site-errors.log``.
:class:`SiteClientApp` does the same for exceptions Flower raises around the handlers, and
:func:`guard_task_replies` for those raised in Flower's task runtime before the ClientApp runs.
"""

from __future__ import annotations

import os
import traceback
from pathlib import Path

from flwr.app import Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from arkfed.ark.pair import ArkPair, SiteHeads
from arkfed.errors import ArkfedError
from arkfed.federation import messages as m
from arkfed.federation.describe import describe_content
from arkfed.federation.messages import SITE_CODES, SITE_FAILED, SITE_REFUSED
from arkfed.federation.signing import claim_of
from arkfed.federation.site.heads import HeadStore, append_outbox, schema_mismatch

NODE_SITE = "site"
NODE_SITE_CONFIG = "site-config"
NODE_PLUGINS = "plugins-dir"



class SiteRefusal(ArkfedError):
    """The site refuses a request (it does not belong in this run as configured, or breaks the
    site's policy); ``public`` is all the coordinator is told: a category and non-identifying detail."""

    def __init__(self, message: str, *, site: str | None = None, public: str = "refused"):
        super().__init__(message, site=site)
        self.public = public


def node_site_config(context: Context):
    """The site config this SuperNode serves, checked against the name in its node config."""
    from arkfed.site.config import load_site_config

    node = context.node_config
    if NODE_SITE_CONFIG not in node:
        raise ArkfedError(f"SuperNode has no {NODE_SITE_CONFIG!r} in its node config; start sites with `arkfed site --config`")
    config = load_site_config(Path(str(node[NODE_SITE_CONFIG])))
    name = str(node.get(NODE_SITE, config.name))
    if name != config.name:
        raise SiteRefusal(f"node config names site {name!r} but its config file names {config.name!r}", site=config.name,
                          public="wrong_site: the SuperNode's node config and its site config name different sites")
    return config


def _plugins_dirs(context: Context) -> list[str]:
    value = str(context.node_config.get(NODE_PLUGINS, ""))
    return [p for p in value.split(os.pathsep) if p]


def load_node_site(context: Context):
    from arkfed.site.load import load_site

    return load_site(node_site_config(context), _plugins_dirs(context))


def _check_schema(site, schemas: dict) -> None:
    """Refuse when the run recorded (in ``schemas``) a different schema for this site."""
    from arkfed.data.schema import LabelSchema

    recorded = schemas.get(site.name)
    if recorded is not None:
        expected = LabelSchema.model_validate(recorded)
        if expected != site.schema:
            text = str(schema_mismatch(site.name, site.schema, expected, "the run's record"))
            raise SiteRefusal(text, public=f"schema_mismatch: {text}")


def _head_stores(site, run_uid: str, context: Context) -> tuple[HeadStore, HeadStore]:
    return tuple(HeadStore(site.config.local_state_dir, run_uid, site.name, site.schema, context.state, kind)
                 for kind in ("head", "teacher-head"))


def _start_heads(stores: tuple[HeadStore, HeadStore], site, request: m.SiteRequest, embed_dim: int) -> SiteHeads:
    """The heads this request starts from: a stored version, or the initial head sent along (the
    teacher's head then starts as its copy)."""
    from arkfed.model.ark import SiteHead

    version = request.head_from
    student_store, teacher_store = stores
    if version == m.NO_HEAD:
        head = student_store.load(m.NO_HEAD)
        if head is None:
            inherited = _parent_heads(site, request, student_store, embed_dim)
            if inherited is not None:  # a run continued from a release: this site's own heads from the parent run
                student_store.save(m.NO_HEAD, inherited.student)
                teacher_store.save(m.NO_HEAD, inherited.teacher)
                return inherited
            head = SiteHead(site.name, site.schema, embed_dim)
            request.initial_head(head, site.name)
            student_store.save(m.NO_HEAD, head)
        teacher = teacher_store.load(m.NO_HEAD)
        return SiteHeads(head, teacher) if teacher is not None else SiteHeads.fresh(head)
    head, teacher = student_store.load(version), teacher_store.load(version)
    if head is None or teacher is None:
        raise SiteRefusal(
            f"has no head from visit {version} of run {student_store.run_uid} (neither in the SuperNode's state nor in "
            f"{student_store.folder}); its local state was lost, so it cannot continue this run", site=site.name,
            public=f"head_missing: the site has no head from visit {version}; its local state was lost",
        )
    return SiteHeads(head, teacher)


def _parent_heads(site, request: m.SiteRequest, store: HeadStore, embed_dim: int) -> SiteHeads | None:
    """The heads this site kept from the run a continued run descends from (request field
    ``parent_run``: the run id recorded in the release's lineage), when it has both, for the same
    schema and width; None otherwise (the site then starts from the head sent along)."""
    record = request.content[m.REQUEST]
    if "parent_run" not in record:
        return None
    parent = m.read_json(record, "parent_run")
    stores = [HeadStore(store.folder.parent.parent, parent, site.name, site.schema, None, kind) for kind in ("head", "teacher-head")]
    student, teacher = (s.latest() for s in stores)
    if student is None or teacher is None or student.in_features != embed_dim or teacher.in_features != embed_dim:
        return None
    teacher.requires_grad_(False)
    return SiteHeads(student, teacher)


def hello(msg: Message, context: Context) -> Message:
    """Name, schema and split sizes of this site (after checking the run's schema record)."""
    site = load_node_site(context)
    request = msg.content[m.REQUEST]
    member = site.name in m.read_json(request, "sites")
    if member:
        _check_schema(site, m.read_json(request, "schemas"))
        for store in _head_stores(site, m.read_json(request, "run_uid"), context):
            store.check_recorded_schema()
    sizes = {name: len(table) for name, table in site.splits.items()}
    content = RecordDict({
        m.SITE: m.json_record(name=site.name, schema=site.schema, member=member),
        m.METRICS: MetricRecord({f"{k}_size": int(v) for k, v in sizes.items()}),
    })
    return Message(content, reply_to=msg)


def _enforce_policy(config, kind: str, request: m.SiteRequest, train_size: int | None = None, claim: dict | None = None) -> None:
    """The site's policy decides before anything is loaded: :func:`arkfed.site.policy.check_request`,
    then (``approval: manual``) the operator's approval of the run's fingerprint (the whole signed
    claim, verified by the site's gate, when the run is signed)."""
    from arkfed.site.policy import check_request, claim_details, run_fingerprint, wait_for_approval

    policy, settings, spec, run_uid = config.policy, request.settings, request.spec, request.run_uid
    refusal = check_request(policy, kind, settings, plan=request.plan, split=request.split, spec=spec, train_size=train_size)
    if refusal is None and policy.approval == "manual" and train_size is not None:
        fingerprint = run_fingerprint(run_uid, spec, settings, claim)
        details = {"site": config.name, "run_uid": run_uid, "request": kind, "split": request.split,
                   "model": spec.model_dump(mode="json"), "settings": settings.model_dump(mode="json"), **claim_details(claim)}
        refusal = wait_for_approval(config.local_state_dir, fingerprint, details, policy.approval_timeout)
    if refusal is not None:
        raise SiteRefusal(f"refused by the site's policy: {refusal}", site=config.name, public=str(refusal))


def _train_size(site) -> int:
    table = site.splits.get("train")
    return len(table) if table is not None else 0


def visit(msg: Message, context: Context) -> Message:
    """One Ark site visit on the received student/teacher (:func:`arkfed.ark.tasks.visit_site`,
    exactly as in local mode), within the site's policy; the heads stay here, versioned by visit."""
    from arkfed.ark.tasks import visit_site
    from arkfed.ark.updates import check_finite
    from arkfed.federation.site.secure import keep_update, metrics_reply, secure_settings
    from arkfed.site.budget import PrivacyRefused
    from arkfed.site.policy import apply_memory_limit

    config = node_site_config(context)
    request = m.read_site_request(msg.content, m.VISIT)
    plan, settings = request.plan, request.settings
    if plan.site != config.name:
        raise SiteRefusal(f"was sent visit {plan.visit}, which is planned for site {plan.site!r}", site=config.name,
                          public=f"wrong_site: visit {plan.visit} is planned for site {plan.site!r}")
    _enforce_policy(config, "visit", request)  # before reading any data
    site = load_node_site(context)
    _enforce_policy(config, "visit", request, train_size=_train_size(site), claim=claim_of(context.run_config))
    _check_schema(site, request.schemas)
    stores = _head_stores(site, request.run_uid, context)
    student, teacher = request.models()
    heads = _start_heads(stores, site, request, student.embed_dim)
    apply_memory_limit(config.policy, config.compute.device)
    secure = secure_settings(request)
    sent = {key: value.detach().clone() for key, value in student.state_dict().items()} if secure else None
    try:
        result = visit_site(ArkPair(student, teacher, heads), site, settings, plan, request.pending)
    except PrivacyRefused as exc:  # the site's privacy budget (arkfed.site.budget): a policy refusal like the others
        raise SiteRefusal(str(exc), site=config.name, public=str(exc.refusal)) from None
    iteration = settings.ema == "iteration"  # the teacher moved during the visit: it goes back too
    if iteration:  # visit_site checked the student and its head
        check_finite(teacher, "teacher", site.name)
    if secure:  # the update stays here, checked and clipped, until Flower's SecAgg+ masks it
        keep_update(context, request, secure, sent, student.state_dict(), result.num_examples)
    stores[0].save(plan.visit, heads.student)
    stores[1].save(plan.visit, heads.teacher)
    if secure:
        return Message(metrics_reply(result), reply_to=msg)
    return Message(m.visit_content(result, student, teacher if iteration else None), reply_to=msg)


def evaluate(msg: Message, context: Context) -> Message:
    """Student and teacher on this site's evaluation split with their heads, exactly as local
    mode evaluates (:func:`arkfed.ark.tasks.evaluate_site_models`): metrics only, as the site's
    policy releases them (:mod:`arkfed.site.disclosure`: rounded, per-class AUCs only where allowed)."""
    from arkfed.ark.tasks import evaluate_site_models
    from arkfed.site.disclosure import class_counts, released_metrics
    from arkfed.site.policy import apply_memory_limit

    config = node_site_config(context)
    request = m.read_site_request(msg.content, m.EVALUATE)
    settings, split = request.settings, request.split
    _enforce_policy(config, "evaluate", request)
    site = load_node_site(context)
    _enforce_policy(config, "evaluate", request, train_size=_train_size(site), claim=claim_of(context.run_config))
    _check_schema(site, request.schemas)
    results, released = {}, None
    table = site.splits.get(split)
    if table is not None and len(table) > 0 and config.policy.released_metrics != "none":  # none: nothing evaluated or sent
        stores = _head_stores(site, request.run_uid, context)
        student, teacher = request.models()
        heads = _start_heads(stores, site, request, student.embed_dim)
        apply_memory_limit(config.policy, config.compute.device)
        results = evaluate_site_models(ArkPair(student, teacher, heads), site, settings, split, request.pending)
        counts = class_counts(table, site.schema)
        results = {label: released_metrics(r, config.policy, counts) for label, r in results.items()}
        if config.policy.release_head and _final_evaluation(msg.content[m.REQUEST], claim_of(context.run_config)):
            released = (heads.student, heads.teacher)  # once, at the end, because the site's policy says so
    return Message(m.evaluation_content(results, released), reply_to=msg)


def _final_evaluation(request, claim: dict | None) -> bool:
    """The evaluation after the run's last round (the coordinator marks it ``final``; a signed
    run's round must also be its last)."""
    try:
        final, rnd = m.read_json(request, "final"), m.read_json(request, "round")
    except (ArkfedError, KeyError, ValueError):
        return False
    if final is not True:
        return False
    return claim is None or rnd == int((claim.get("config") or {}).get("rounds", 0)) - 1


# -- what leaves the site when something fails ------------------------------------------------


def public_error(exc: BaseException) -> tuple[int, str]:
    """(error code, fixed category) for a failure: all the coordinator learns. Error text can
    carry local paths, patient and study ids; it stays in the site's log."""
    import torch

    from arkfed.errors import NonFiniteError

    if isinstance(exc, (SiteRefusal, m.BadRequest)):
        return SITE_REFUSED, " ".join(exc.public.split())[:2000]
    if isinstance(exc, NonFiniteError):
        return SITE_FAILED, exc.category
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return SITE_FAILED, "out_of_memory"
    if isinstance(exc, (ArkfedError, OSError)):
        return SITE_FAILED, "data_error"
    return SITE_FAILED, "internal_error"


def _state_dir(context: Context) -> Path | None:
    try:
        return node_site_config(context).local_state_dir
    except Exception:
        return None


def _log_failure(state_dir: Path | None, msg: Message, text: str) -> None:
    """The full error (with paths and traceback) stays in the site's own log."""
    if state_dir is None:
        print(text, flush=True)
        return
    from arkfed.io import PRIVATE, append_text

    append_text(Path(state_dir) / "logs" / "site-errors.log",
                f"--- {msg.metadata.message_type} (run {msg.metadata.run_id}, round {msg.metadata.group_id})\n{text}\n", PRIVATE)


def _error_reply(msg: Message, state_dir: Path | None, exc: BaseException) -> Message:
    _log_failure(state_dir, msg, "".join(traceback.format_exception(exc)))
    code, reason = public_error(exc)
    return Message(Error(code=code, reason=reason), reply_to=msg)


def _audit(state_dir: Path | None, msg: Message, reply: Message) -> None:
    if state_dir is None:
        return
    entry = {"message_type": msg.metadata.message_type, "run_id": msg.metadata.run_id, "group": msg.metadata.group_id}
    if reply.has_error():
        entry["error"] = {"code": reply.error.code, "reason": reply.error.reason}
    else:
        entry["content"] = describe_content(reply.content)
    append_outbox(state_dir, entry)


def audit_outgoing(msg: Message, context: Context, call_next) -> Message:
    """Flower mod around every handler: failures become a code and a category (full text in the
    site's log), and every message the site sends gets an audit line in ``outbox.jsonl``."""
    state_dir = _state_dir(context)
    try:
        reply = call_next(msg, context)
    except Exception as exc:  # every failure becomes a reply the coordinator can act on
        reply = _error_reply(msg, state_dir, exc)
    _audit(state_dir, msg, reply)
    return reply


class SiteClientApp(ClientApp):
    """Flower's ClientApp, except that an exception Flower raises around the handlers (an unknown
    message type, say) leaves as a category too, not as Flower's text."""

    def __call__(self, message: Message, context: Context) -> Message:
        try:
            return super().__call__(message, context)
        except Exception as exc:
            state_dir = _state_dir(context)
            reply = _error_reply(message, state_dir, exc)
            _audit(state_dir, message, reply)
            return reply


def guard_task_replies() -> None:
    """In a task process: an error reply that Flower's runtime built itself (the task failed
    before or while loading the ClientApp) leaves as ``internal_error``; its text goes to the
    site's log. Installed by the site's task executor before it runs Flower's task runtime."""
    from flwr.supernode.runtime import run_clientapp as runtime

    push = runtime.push_message
    if getattr(push, "arkfed_guarded", False):
        return

    def push_message(client, message: Message, context: Context) -> None:
        if message.has_error() and message.error.code not in SITE_CODES:
            _log_failure(_state_dir(context), message, f"Flower task error {message.error.code}: {message.error.reason}")
            message.error = Error(code=SITE_FAILED, reason="internal_error")
        push(client, message, context)

    push_message.arkfed_guarded = True
    runtime.push_message = push_message


def register_handlers(app: ClientApp) -> ClientApp:
    """arkfed's handlers on ``app``: hello, visit, evaluation, and secure aggregation (Flower's
    SecAgg+ mod around :func:`arkfed.federation.site.secure.masked_update`, behind its check)."""
    from flwr.client.mod import secaggplus_mod

    from arkfed.federation.site.secure import check_protocol, masked_update

    app.query("hello")(hello)
    app.train("visit")(visit)
    app.evaluate("round")(evaluate)
    app.train(mods=[check_protocol, secaggplus_mod])(masked_update)
    return app


app = register_handlers(SiteClientApp(mods=[audit_outgoing]))
