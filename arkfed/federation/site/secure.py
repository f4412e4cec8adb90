"""The site's side of secure aggregation (``secure_aggregation: true``; see :mod:`arkfed.federation.secagg`).

- A ``train.visit`` request with the ``secure`` field trains as always; then the site checks its
  own update and clips it to the bound the request names (:func:`arkfed.ark.secure.clipped_update`:
  finite, L2 norm at most ``max_update_norm``), keeps it in the node's context state
  (:func:`keep_update`, one update per site at a time) and replies with the visit's scalar
  metrics only (:func:`metrics_reply`): no model leaves the site in the clear.
- The SecAgg+ stages (Flower ``train`` messages) go through :func:`check_protocol` and then
  Flower's own :func:`flwr.client.mod.secaggplus_mod`, which calls :func:`masked_update` in its
  third stage to get the kept update (and the site's weight), quantises and masks it, and sends
  only the masked vector. The kept update is dropped as it is handed over: it is masked once.

:func:`check_protocol` refuses what an honest SecAgg+ server never sends and what would expose one
site's update: protocol fields other than those the coordinator signed (the request's ``secagg``
digest; verified by the site's gate with the rest of the request), a setup for fewer than two
sites or with a reconstruction threshold below two, and an unmask request that names a site
both alive and dropped, or this site as dropped (its private mask seed and its key shares together
would unmask its vector).
"""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import Key, Stage

from arkfed.federation import messages as m
from arkfed.federation.secagg import CONFIGS, DIGEST_FIELD, SECURE_FIELD, config_digest, weight_of

UPDATE = "arkfed-secure-update"  # context.state: the kept update's arrays (ArrayRecord, state_dict order)
KEPT = "arkfed-secure-kept"  # context.state: whose update it is (run_uid, visit, weight)


def _refuse(text: str) -> m.BadRequest:
    return m.BadRequest(f"secure aggregation refused: {text}", public=f"secure_aggregation_refused: {text}")


def secure_settings(request: m.SiteRequest) -> dict | None:
    """The visit's ``secure`` field ({"max_norm", "weighting"}), checked; None for a plain visit."""
    record = request.content[m.REQUEST]
    if SECURE_FIELD not in record:
        return None
    value = m.read_json(record, SECURE_FIELD)
    norm = value.get("max_norm") if isinstance(value, dict) else None
    if isinstance(norm, bool) or not isinstance(norm, (int, float)) or not norm > 0 or norm == float("inf"):
        raise m.BadRequest("secure.max_norm is not a positive number",
                           public="invalid_request: secure.max_norm: expected a positive number")
    if value.get("weighting") not in ("samples", "equal"):
        raise m.BadRequest("secure.weighting is not samples or equal", public="invalid_request: secure.weighting: expected samples | equal")
    return {"max_norm": float(norm), "weighting": value["weighting"]}


def keep_update(context: Context, request: m.SiteRequest, secure: dict, sent: dict, trained: dict, num_examples: int) -> float:
    """Check and clip this visit's update (:func:`arkfed.ark.secure.clipped_update`) and keep it
    for the secure aggregation; returns its norm before clipping (for the site's own log)."""
    from arkfed.ark.secure import clipped_update

    update, norm = clipped_update(sent, trained, secure["max_norm"], request.plan.site)
    context.state[UPDATE] = ArrayRecord({key: Array(value.numpy()) for key, value in update.items()})
    context.state[KEPT] = ConfigRecord({"run_uid": request.run_uid, "visit": int(request.plan.visit),
                                        "weight": weight_of(secure["weighting"], num_examples)})
    return norm


def metrics_reply(result) -> RecordDict:
    """A secure visit's reply: its scalar metrics only (the update travels masked, later)."""
    return RecordDict({m.METRICS: m.metrics_record(result.model_dump(exclude={"site"}, exclude_none=True))})


def check_protocol(msg: Message, context: Context, call_next) -> Message:
    """Flower mod in front of ``secaggplus_mod`` (see the module docstring)."""
    request, configs = msg.content.config_records.get(m.REQUEST), msg.content.config_records.get(CONFIGS)
    if request is None or configs is None or DIGEST_FIELD not in request:
        raise _refuse("the message is not a secure aggregation request of this run")
    if m.read_json(request, DIGEST_FIELD) != config_digest(configs):
        raise _refuse("the protocol fields differ from those the coordinator signed")
    stage = configs.get(Key.STAGE)
    if stage == Stage.SETUP:
        sites, threshold = configs.get(Key.SAMPLE_NUMBER), configs.get(Key.THRESHOLD)
        if not isinstance(sites, int) or not isinstance(threshold, int) or sites < 2 or threshold < 2:
            raise _refuse("a secure sum needs at least two sites and a reconstruction threshold of at least two")
    elif stage == Stage.UNMASK:
        active, dropped = set(configs.get(Key.ACTIVE_NODE_ID_LIST) or []), set(configs.get(Key.DEAD_NODE_ID_LIST) or [])
        if active & dropped or msg.metadata.dst_node_id in dropped:
            raise _refuse("the unmask request names a site both alive and dropped, or this site as dropped")
    return call_next(msg, context)


def masked_update(msg: Message, context: Context) -> Message:
    """The kept update as Flower's FitRes, for ``secaggplus_mod`` to mask (its only caller, in the
    protocol's third stage); dropped from the context as it is handed over."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.compat.common import recorddict_compat as compat

    request = msg.content.config_records[m.REQUEST]
    plan = m.read_json(request, "plan")
    kept = context.state.config_records.get(KEPT)
    if (kept is None or UPDATE not in context.state.array_records or kept["run_uid"] != m.read_json(request, "run_uid")
            or not isinstance(plan, dict) or kept["visit"] != plan.get("visit")):
        raise _refuse(f"this site keeps no update of visit {plan.get('visit') if isinstance(plan, dict) else '?'} to aggregate")
    arrays = [array.numpy() for array in context.state.array_records[UPDATE].values()]
    weight = int(kept["weight"])
    del context.state[UPDATE]
    del context.state[KEPT]
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), weight, {})
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)
