"""The coordinator side of a federated run: Flower's ServerApp, started by the SuperLink.

Only plumbing lives here. The run itself is :class:`arkfed.run.loop.ArkLoop`, the same loop a local
run uses; :class:`FlowerSites` is its "sites" implementation over a Flower Grid: sites join by
name (a ``query.hello`` message, checked against their registered name when SuperNode
authentication is on), a visit or evaluation is a request to the site's SuperNode, and a request
that gets no usable answer is reported as a :class:`~arkfed.run.loop.SiteFailure`, which the loop
records as a skip.

What one site's absence costs the others (issue 17): nothing when Flower already lists its node as
gone (no request is sent; the skip says ``absent``); one ``visit_timeout`` when its node is listed
but does not answer (never retried); and when its node vanishes mid-request (Flower stops listing
it), at most ``rejoin_wait`` for it to come back and one retry. The run starts once ``min_sites``
listed sites have joined (default all, within ``join_timeout``); others are identified whenever
their SuperNode connects and enter at the next round (:meth:`FlowerSites.joined_since`).

With ``secure_aggregation`` a parallel round's visits reply with metrics only, and
:meth:`FlowerSites.secure_mean` runs Flower's SecAgg+ workflow for the round's mean
(:mod:`arkfed.federation.coordinator.secure`).

Heads stay at the sites. The coordinator names the version a site starts from (the site's last
accepted visit, kept in the checkpoint), so a retried visit, or one after a resume, starts from the
same head as in an uninterrupted run.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from arkfed.config import TrainConfig, VisitPlan
from arkfed.errors import ArkfedError
from arkfed.federation import messages as m
from arkfed.federation.coordinator.mailbox import exchange, online_nodes
from arkfed.federation.describe import describe_content
from arkfed.federation.protocol import FederationSettings
from arkfed.io import PRIVATE, append_jsonl
from arkfed.run.attendance import ABSENT
from arkfed.run.folder import RunFolder, RunState
from arkfed.run.loop import ArkLoop, SiteFailure, SiteInfo, VisitReply
from arkfed.run.plan import round_of_visit
from arkfed.run.start import init_heads

RUN_DIR_KEY = "run-dir"
HELLO_TIMEOUT = 120.0
HELLO_RETRY_AFTER = 120.0  # a node that could not say who it is is asked again after this long, not at every turn


class FlowerSites:
    """The loop's sites, reached through Flower (see the module docstring)."""

    mode = "federated"

    def __init__(self, grid: Grid, run_dir: Path, fed: FederationSettings, callbacks, poll: float = 0.25, authorizer=None,
                 claim: dict | None = None):
        self.grid, self.run_dir, self.fed, self.callbacks, self.poll = grid, Path(run_dir), fed, callbacks, poll
        self.claim = claim  # the signed claim this run was submitted with (membership changes extend it)
        self.membership: list[dict] = []  # the signed membership changes every request carries once applied
        self.parent_run: str | None = None  # the run a release continued here was made from (its sites keep their heads)
        self.authorizer = authorizer  # the coordinator's signing service signs each request (signer.RequestAuthorizer)
        self.nodes: dict[str, int] = {}
        self.known: set[int] = set()
        self.unanswered: dict[int, float] = {}  # node -> when its hello went unanswered
        self.infos: dict[str, SiteInfo] = {}
        self.initial_heads: dict = {}
        self.config: TrainConfig | None = None
        self.sent_bytes: dict[str, int] = {}
        self.fresh: set[str] = set()  # listed sites identified (joined, or joined again) since joined_since last asked

    # -- joining --------------------------------------------------------------------------------
    def _log_inbox(self, reply: Message) -> None:
        """``RUN/logs/inbox.jsonl``: what every message from a site carried (the coordinator's audit)."""
        entry = {"time": time.time(), "from_node": reply.metadata.src_node_id, "message_type": reply.metadata.message_type,
                 "group": reply.metadata.group_id}
        if reply.has_error():
            entry["error"] = {"code": reply.error.code, "reason": reply.error.reason}
        else:
            entry["content"] = describe_content(reply.content)
        append_jsonl(self.run_dir / "logs" / "inbox.jsonl", entry, PRIVATE)

    def _identify(self, node_ids: list[int], registered: dict[int, str]) -> None:
        """Ask new nodes who they are; record the listed sites among them."""
        from arkfed.data.schema import LabelSchema
        from arkfed.run.provenance import federated_fingerprint

        request = m.json_record(run_uid=self.fed.run_uid, sites=self.config.sites, schemas=self.fed.schemas, **self._membership())
        messages = {n: Message(m.request_content(request), n, m.HELLO, ttl=HELLO_TIMEOUT, group_id="join") for n in node_ids}
        for node_id, reply in exchange(self.grid, messages, HELLO_TIMEOUT, self.poll, on_reply=self._log_inbox).items():
            if isinstance(reply, SiteFailure):
                if reply.refused:
                    raise ArkfedError(f"a site was refused: {reply.reason}")
                self.callbacks.on_warning(f"SuperNode {node_id} could not say which site it is: {reply.reason}")
                self.known.discard(node_id)  # ask again later (not at once: every wait for it holds up the others)
                self.unanswered[node_id] = time.monotonic()
                continue
            try:  # issue 8: a malformed hello is reported, never a crash
                name, member, schema, sizes = m.read_hello_reply(reply.content)
            except m.BadReply as exc:
                self.callbacks.on_warning(f"SuperNode {node_id} sent an unusable hello: {exc}")
                continue
            if registered.get(node_id) and registered[node_id] != name:
                self.callbacks.on_warning(f"SuperNode {node_id} is registered as {registered[node_id]!r} but serves site {name!r}; ignored")
                continue
            if not member:
                print(f"site {name!r} (node {node_id}) is connected but not part of this run", flush=True)
                continue
            recorded = self.fed.schemas.get(name)
            if recorded is not None and LabelSchema.model_validate(recorded) != schema:
                raise ArkfedError(f"site {name!r} refused: its dataset schema {schema.describe()} differs from the run's "
                                  f"record {LabelSchema.model_validate(recorded).describe()}")
            old = self.nodes.get(name)
            if old is not None and old != node_id and old in online_nodes(self.grid):
                self.callbacks.on_warning(f"two SuperNodes serve site {name!r} ({old} and {node_id}); keeping {old}")
                continue
            sizes = self._fixed_sizes(name, sizes)
            self.nodes[name] = node_id
            self.infos[name] = SiteInfo(schema, sizes, federated_fingerprint(sizes, schema))
            self.fresh.add(name)
            self.callbacks.on_site_status(name, "joined", f"node {node_id}", **{f"{k}_size": float(v) for k, v in sizes.items()})
            print(f"site {name!r} joined (node {node_id})", flush=True)

    def _fixed_sizes(self, name: str, declared: dict[str, int]) -> dict[str, int]:
        """A site's split sizes bound the examples it may claim: capped by ``max_split_size`` and
        fixed at its first join (a rejoin, or a resumed run, keeps the sizes recorded then)."""
        recorded = self.infos[name].sizes if name in self.infos else self.fed.sizes.get(name)
        if recorded is not None:
            if declared != recorded:
                self.callbacks.on_warning(f"site {name!r} now declares split sizes {declared}; it keeps those it joined with, {recorded}")
            return dict(recorded)
        capped = {split: min(size, self.fed.max_split_size) for split, size in declared.items()}
        if capped != declared:
            self.callbacks.on_warning(f"site {name!r} declared split sizes {declared}; capped at max_split_size {self.fed.max_split_size}")
        return capped

    def _discover(self) -> None:
        nodes = list(self.grid.get_nodes())
        now = time.monotonic()
        new = [n.node_id for n in nodes if n.node_id not in self.known
               and (n.node_id not in self.unanswered or now - self.unanswered[n.node_id] >= HELLO_RETRY_AFTER)]
        if new:
            self.known.update(new)
            self._identify(new, {n.node_id: n.name for n in nodes if n.name})

    def join(self, config: TrainConfig) -> dict[str, SiteInfo]:
        """Wait until ``config.quorum`` listed sites have joined (or fail after ``join_timeout``);
        the others are absent until they join (:meth:`joined_since`)."""
        self.config = config
        deadline = time.monotonic() + self.fed.join_timeout
        self._discover()
        while len(joined := [s for s in config.sites if s in self.nodes]) < config.quorum:
            if time.monotonic() > deadline:
                missing = [s for s in config.sites if s not in self.nodes]
                need = "" if config.quorum == len(config.sites) else f"; the run needs {config.quorum} of {len(config.sites)}"
                raise ArkfedError(f"sites {missing} did not join within {self.fed.join_timeout:.0f} s "
                                  f"(joined: {joined or 'none'}{need})")
            time.sleep(self.poll)
            self._discover()
        self.fresh.clear()
        self._record(joined)
        return {name: self.infos[name] for name in joined}

    def joined_since(self) -> dict[str, SiteInfo]:
        """Listed sites whose SuperNode connected and said who it is since the last call."""
        self._discover()
        names = [name for name in self.config.sites if name in self.fresh]
        self.fresh.clear()
        self._record(names)
        return {name: self.infos[name] for name in names}

    def _record(self, names: Sequence[str]) -> None:
        """The run's record (federation.json) of each joined site's schema and split sizes."""
        new = [name for name in names if name not in self.fed.schemas or name not in self.fed.sizes]
        if new:
            for name in new:
                self.fed.schemas.setdefault(name, self.infos[name].schema.model_dump(mode="json"))
                self.fed.sizes.setdefault(name, dict(self.infos[name].sizes))
            self.fed.write(self.run_dir)

    def start(self, state: RunState, fresh: bool) -> None:
        """The initial heads go to the sites with their first request; the coordinator keeps none
        (a resumed run, or a site that joins late, gets them rebuilt, seeded exactly as at the start)."""
        from arkfed.model.lineage import release_run_uid

        self.parent_run = release_run_uid(self.config.init)
        self.initial_heads = init_heads(self.config, {n: i.schema for n, i in self.infos.items()}, state.student.embed_dim)
        state.heads, state.teacher_heads = {}, {}

    def _node_for(self, site: str, wait: float) -> int | None:
        """The site's current node (a restarted SuperNode is found again by name), waiting up to ``wait`` s."""
        deadline = time.monotonic() + wait
        while True:
            if self.nodes.get(site) not in online_nodes(self.grid):
                self._discover()
            if self.nodes.get(site) in online_nodes(self.grid):
                return self.nodes[site]
            if time.monotonic() >= deadline:
                return None
            time.sleep(self.poll)

    # -- requests -------------------------------------------------------------------------------
    def _content(self, state: RunState, site: str, **extra) -> RecordDict:
        version = state.versions.get(site, m.NO_HEAD)
        if version == m.NO_HEAD and self.parent_run is not None:  # continued from a release: the site may hold its own heads
            extra["parent_run"] = self.parent_run
        request = m.json_record(
            run_uid=self.fed.run_uid, spec=state.student.spec, settings=self.config.settings, head_from=version,
            schemas={site: self.fed.schemas[site]}, pending=state.clock.pending(site), **extra, **self._membership(),
        )
        arrays = {m.STUDENT: m.model_record(state.student), m.TEACHER: m.model_record(state.teacher)}
        if version == m.NO_HEAD:
            arrays[m.HEAD] = m.model_record(self.initial_heads[site])
        return m.request_content(request, **arrays)

    def _visit_fields(self, plan: VisitPlan) -> dict:
        """A visit request's own fields: its plan, and with secure aggregation the bound the site clips to."""
        from arkfed.federation.secagg import SECURE_FIELD

        if not self.config.secure_aggregation:
            return {"plan": plan}
        return {"plan": plan, SECURE_FIELD: {"max_norm": self.fed.max_update_norm, "weighting": self.config.weighting}}

    def _send(self, state: RunState, kind: str, items: dict[str, object], group: str) -> dict[str, Message | SiteFailure]:
        """One request per site (visits: its plan; evaluations: the split): none to a site Flower
        does not list as connected (``absent``), and retried once only when the site vanished
        mid-request (see the module docstring)."""
        results: dict[str, Message | SiteFailure] = {}
        todo = dict(items)
        for attempt in (1, 2):
            requests = {}
            for site, item in todo.items():
                node = self._node_for(site, self.fed.rejoin_wait if attempt == 2 else 0.0)
                if node is None:
                    results[site] = SiteFailure(ABSENT if attempt == 1 else "site is offline", away=True)
                    self.callbacks.on_site_status(site, ABSENT, "not connected")
                    continue
                rnd = round_of_visit(self.config, state.visits_done - 1)  # evaluations follow their round's last visit
                final = {"final": True} if kind == m.EVALUATE and rnd == self.config.rounds - 1 else {}  # sites may release heads
                fields = self._visit_fields(item) if kind == m.VISIT else {"split": item, "round": rnd, **final}
                content = self._content(state, site, **fields)
                if self.authorizer is not None:
                    self.authorizer.authorize(kind, content)
                requests[site] = Message(content, node, kind, ttl=self.fed.visit_timeout, group_id=group)
                self.sent_bytes[site] = sum(r.count_bytes() for r in content.array_records.values())
                state_name = "training" if kind == m.VISIT else "evaluating"
                self.callbacks.on_site_status(site, state_name, f"attempt {attempt}" if attempt > 1 else "")
            if requests:
                results.update(exchange(self.grid, requests, self.fed.visit_timeout, self.poll, on_reply=self._log_inbox))
            todo = {}
            for site in requests:
                result = results.get(site)
                if isinstance(result, SiteFailure):
                    self.callbacks.on_site_status(site, "failed", result.reason)
                    if attempt == 1 and not result.refused and not result.timed_out:
                        self.callbacks.on_warning(f"round {group}: request to site {site!r} failed, retrying: {result.reason}")
                        todo[site] = items[site]
            if not todo:
                return results
        return results

    def visit(self, state: RunState, plans: Sequence[VisitPlan]) -> dict[str, VisitReply | SiteFailure]:
        answers: dict[str, VisitReply | SiteFailure] = {}
        replies = self._send(state, m.VISIT, {p.site: p for p in plans}, str(plans[0].round))
        for plan in plans:
            reply = replies[plan.site]
            if isinstance(reply, SiteFailure):
                answers[plan.site] = reply
                continue
            try:  # issue 8: decoded here, checked by the loop's gate (arkfed.ark.updates.check_reply) like a local visit
                iteration = self.config.settings.ema == "iteration"
                decoded = m.read_visit_reply(reply.content, plan, state.student, state.teacher, iteration, self.config.secure_aggregation)
            except m.BadReply as exc:
                answers[plan.site] = SiteFailure(f"rejected reply: {exc}", refused=True)
                continue
            except Exception as exc:  # a malformed reply skips the visit, never the run
                answers[plan.site] = SiteFailure(f"malformed reply: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}", refused=True)
                continue
            received = sum(r.count_bytes() for r in reply.content.array_records.values())
            decoded.extra = {"bytes_sent": self.sent_bytes.get(plan.site, 0), "bytes_received": received}
            answers[plan.site] = decoded
        return answers

    def secure_mean(self, state: RunState, accepted: Sequence[tuple[VisitPlan, VisitReply]]):
        """The weighted mean of the accepted visits' updates by Flower's SecAgg+, and the sites it
        includes, or a :class:`SiteFailure` (:mod:`arkfed.federation.coordinator.secure`)."""
        from arkfed.federation.coordinator.secure import secure_mean
        from arkfed.federation.secagg import weight_of

        plans = {plan.site: plan for plan, _ in accepted}
        weights = [weight_of(self.config.weighting, reply.result.num_examples) for _, reply in accepted]
        for site in plans:
            self.callbacks.on_site_status(site, "training", "secure aggregation")
        return secure_mean(self.grid, {site: self.nodes[site] for site in plans}, plans, self.fed.run_uid, self.fed.max_update_norm,
                           max(weights), self.fed.visit_timeout, self.poll, self.authorizer, self._log_inbox)

    # -- membership ---------------------------------------------------------------------------
    def _membership(self) -> dict:
        from arkfed.federation.membership import MEMBERSHIP_FIELD

        return {MEMBERSHIP_FIELD: self.membership} if self.membership else {}

    def admit(self, config: TrainConfig, rnd: int) -> TrainConfig | None:
        """The signed configuration when membership changes admit sites from round ``rnd``
        (:mod:`arkfed.federation.coordinator.admission`); the loop then re-plans and joins them."""
        from arkfed.federation.coordinator.admission import pending_admission

        signed, chain = pending_admission(self.run_dir, self.claim, config, rnd, self.callbacks.on_warning)
        if signed is not None:
            self.membership = chain
            self.known = {n for n in self.known if n in self.nodes.values()}  # ask connected non-members again who they are
        return signed

    def accept(self, state: RunState, plan: VisitPlan, reply: VisitReply) -> None:
        self.callbacks.on_site_status(plan.site, "done", f"visit {plan.visit + 1}")

    def evaluate(self, state: RunState, split: str, sites: Sequence[str]) -> dict[str, dict[str, dict] | SiteFailure]:
        replies = self._send(state, m.EVALUATE, {site: split for site in sites}, "eval")
        answers: dict[str, dict[str, dict] | SiteFailure] = {}
        for site, reply in replies.items():
            if isinstance(reply, SiteFailure):
                answers[site] = reply
                continue
            try:  # issue 8: a malformed evaluation reply is skipped, never a crash
                info = self.infos[site]
                answers[site] = m.read_eval_reply(reply.content, info.schema.classes, info.sizes.get(split))
                released = m.read_released_heads(reply.content, site, info.schema, state.student.embed_dim)
                if released is not None:  # the site's policy releases its heads: they go into RUN/heads, teacher-heads
                    state.heads[site], state.teacher_heads[site] = released
                    print(f"site {site!r} released its heads (policy release_head)", flush=True)
            except m.BadReply as exc:
                answers[site] = SiteFailure(f"rejected reply: {exc}", refused=True)
                continue
            self.callbacks.on_site_status(site, "done", "evaluated")
        return answers


def run_federation(grid: Grid, run_dir: Path, flower_run_id: int | None = None, authorizer=None, claim: dict | None = None) -> dict:
    """The federated run in ``run_dir`` (prepared by ``arkfed coordinator``): the one Ark loop over Flower sites."""
    from arkfed.federation.coordinator.status import StatusFile
    from arkfed.run.callbacks import CallbackList
    from arkfed.run.progress import QuietProgress

    run = RunFolder(run_dir)
    config, fed = run.read_config(), FederationSettings.read(run.path)
    status = StatusFile(run.path, config, flower_run_id)
    callbacks = [status, QuietProgress(per_visit=True), *_trackers(fed, run.path)]
    sites = FlowerSites(grid, run.path, fed, CallbackList(callbacks), authorizer=authorizer, claim=claim)
    try:
        # `arkfed coordinator` wrote config.yaml: a checkpoint means resume, none means a fresh start
        return ArkLoop(config, run, sites, callbacks, max_update_norm=fed.max_update_norm).run_loop(resume=True)
    except BaseException as exc:  # a stop (SystemExit when the coordinator's processes end) is said as such
        reason = (str(exc) or type(exc).__name__) if isinstance(exc, Exception) else \
            f"stopped before finishing ({type(exc).__name__} {exc}); `arkfed coordinator --resume {run.path}` continues it"
        status.fail(reason)
        print(f"run failed: {reason}", flush=True)
        raise


def _trackers(fed: FederationSettings, run_dir: Path) -> list:
    from arkfed.run.trackers import make_trackers

    return make_trackers(fed.log, run_dir)


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Flower entry point: the run folder comes from the generated app's run config; requests are
    signed by the coordinator's signing service (its socket from the task process's environment)."""
    import os

    from arkfed.federation.coordinator.signer import SIGNER_ENV, RequestAuthorizer
    from arkfed.federation.signing import TICKET_KEY, claim_of

    signer, ticket = os.environ.get(SIGNER_ENV), context.run_config.get(TICKET_KEY)
    authorizer = RequestAuthorizer(signer, str(ticket)) if signer and ticket else None
    run_federation(grid, Path(str(context.run_config[RUN_DIR_KEY])), flower_run_id=context.run_id, authorizer=authorizer,
                   claim=claim_of(context.run_config))
