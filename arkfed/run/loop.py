"""The Ark loop: the one place where a run is planned, trained, checked, recorded and resumed.

Local and federated runs are the same loop over a small :class:`Sites` interface with two
implementations: :class:`arkfed.run.local.InProcessSites` (the sites' data in this process) and
``arkfed.federation.coordinator.server_app.FlowerSites`` (join, send, receive, retry, skip over Flower).
Either way a site runs :mod:`arkfed.ark.tasks` on the weights it is given.

A run is a list of *groups* (:func:`arkfed.run.plan.plan_groups`): visits that start from the same
student and end in one teacher update. Cyclic mode (Ark) has one visit per group; parallel mode
(the federated variant of Ark+) has every site of a round in one group, whose returned students
are aggregated (:mod:`arkfed.run.aggregation`: the coordinate-wise median by default) before the
teacher's EMA step; with ``secure_aggregation`` (federated only) the coordinator gets only their
weighted mean (``sites.secure_mean``, Flower's SecAgg+: :mod:`arkfed.ark.secure` says what moves to
the sites' own checks). Every returned update, local or remote, is checked here and only here
(:class:`arkfed.ark.updates.UpdateGuard`: shapes, finite values, declared sizes, the adaptive norm
bound, the reported metrics) before it touches the student; a visit that fails or is refused is
skipped and recorded, and the run goes on. Evaluation results are range-checked the same way.
When two different sites report non-finite losses with no visit accepted in between, the model
they were sent is unusable: the run stops with :class:`ModelUnusable` (no summary, never
"finished"), naming the last accepted visit.

Sites come and go (issue 17): a run starts once ``config.quorum`` listed sites have joined; a listed
site that joins later is admitted at the start of the next round with the head it would have had at
the start (each site's initial head is seeded by the run seed and its own name only,
:func:`arkfed.run.start.init_heads`). A visit to a site that is not there (never joined, or known to be gone) is a
skip with reason ``absent`` that costs nothing; a site that misses ``config.max_absent`` turns in a
row is ``dropped`` (:mod:`arkfed.run.attendance`).

After each group the checkpoint is written (visit counter, student, teacher, in-process heads and
the teacher clock in one file); after each round every site evaluates student and teacher. Resume
continues from the checkpoint with ``metrics.jsonl`` trimmed back to it. What the loop reports
goes to :class:`arkfed.run.callbacks.LoopCallback` s: the metrics log, progress, status file, trackers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Mapping, Protocol, Sequence

import torch

from arkfed.ark.secure import apply_update, check_secure_reply, mean_update
from arkfed.ark.updates import Accepted, UpdateGuard, VisitReply, check_eval_metrics, max_examples
from arkfed.config import TrainConfig, VisitPlan
from arkfed.data.schema import LabelSchema
from arkfed.errors import ArkfedError
from arkfed.run.aggregation import aggregate_states
from arkfed.run.attendance import ABSENT, Attendance
from arkfed.run.callbacks import CallbackList, LoopCallback, RunInfo
from arkfed.run.folder import RunFolder, RunState
from arkfed.run.plan import plan_groups
from arkfed.run.records import MetricsLog, build_summary, eval_record, round_record, skip_record, visit_record
from arkfed.run.start import open_run
from arkfed.schedules import ark_as_run_round_lr, ema_update


class ModelUnusable(ArkfedError):
    """The student and teacher the sites were sent give non-finite losses: the run stops, unfinished."""


NON_FINITE = ("non_finite_loss", "non_finite_update")
"""What a site answers when training on the model it was sent produced NaN/Inf."""


# -- what sites answer --------------------------------------------------------------------------
@dataclass(frozen=True)
class SiteFailure:
    """Why a request got no usable answer; ``refused`` means retrying cannot help (policy, schema)."""

    reason: str
    refused: bool = False
    away: bool = False  # the site was not there (not connected, went offline, no reply): a missed turn
    timed_out: bool = False  # the request waited its whole deadline: retrying would cost the others another one


@dataclass
class SiteInfo:
    """What a site tells the loop when it joins: its label schema and split sizes."""

    schema: LabelSchema
    sizes: dict[str, int]
    fingerprint: dict = field(default_factory=dict)


class Sites(Protocol):
    """Where visits and evaluations happen. ``visit``/``evaluate`` never raise for one site's
    failure: they answer a :class:`SiteFailure` for it.

    ``join`` returns the listed sites that are there (at least ``config.quorum`` of them);
    ``joined_since`` those that joined, or joined again, since the last call (asked between rounds);
    ``start`` gives every joined site its initial head (called again after late joins). Sites that
    support ``secure_aggregation`` (Flower's) also have ``secure_mean(state, accepted)``: the
    accepted visits' mean update as arrays and the sites in it, or a :class:`SiteFailure`; sites
    that support signed membership changes have ``admit(config, round)``."""

    mode: str

    def join(self, config: TrainConfig) -> dict[str, SiteInfo]: ...

    def joined_since(self) -> dict[str, SiteInfo]: ...

    def start(self, state: RunState, fresh: bool) -> None: ...

    def visit(self, state: RunState, plans: Sequence[VisitPlan]) -> dict[str, VisitReply | SiteFailure]: ...

    def accept(self, state: RunState, plan: VisitPlan, reply: VisitReply) -> None: ...

    def evaluate(self, state: RunState, split: str, sites: Sequence[str]) -> dict[str, dict[str, dict] | SiteFailure]: ...


# -- updates --------------------------------------------------------------------------------------


def weighted_average(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """FedAvg of state dicts: floating tensors weighted by ``weights``; integer buffers (BatchNorm's
    ``num_batches_tracked``) take the largest value."""
    if not states or len(states) != len(weights):
        raise ValueError("need one weight per state, and at least one state")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"weights must sum to a positive number, got {list(weights)}")
    out = {}
    for key, first in states[0].items():
        if first.dtype.is_floating_point:
            acc = torch.zeros_like(first, dtype=torch.float64)
            for state, weight in zip(states, weights):
                acc += state[key].to(torch.float64) * (weight / total)
            out[key] = acc.to(first.dtype)
        else:
            out[key] = torch.stack([s[key] for s in states]).max(dim=0).values
    return out


# -- the loop -------------------------------------------------------------------------------------
class ArkLoop:
    """One run of Ark over ``sites``, writing ``run`` (see the module docstring); ``max_update_norm``
    bounds how far (L2) a returned student may be from the one sent (None: only the adaptive bound,
    ``config.update_norm_factor``)."""

    def __init__(self, config: TrainConfig, run: RunFolder, sites: Sites, callbacks: Sequence[LoopCallback] = (),
                 max_update_norm: float | None = None):
        self.config, self.run, self.sites = config, run, sites
        self.max_update_norm = max_update_norm
        self.guard = UpdateGuard(config.update_norm_factor, max_update_norm, config.min_update_cosine)
        self.callbacks = CallbackList([MetricsLog(run), *callbacks])
        self.schemas: dict[str, LabelSchema] = {}
        self.infos: dict[str, SiteInfo] = {}
        self.non_finite: dict[str, int] = {}  # site -> visit: non-finite losses since the last accepted visit
        self.last_accepted: VisitPlan | None = None
        self.attendance = Attendance(config.max_absent)

    def warn(self, text: str) -> None:
        self.callbacks.on_warning(text)

    def _skip(self, stage: str, rnd: int, visit: int, site: str, reason: str, **extra) -> None:
        self.callbacks.on_skip(skip_record(stage, rnd, visit, site, reason, **extra))
        self.warn(f"site {site!r}: {stage} in round {rnd + 1} skipped: {reason}")

    # -- sites that come and go (arkfed.run.attendance) ------------------------------------------
    def _away(self, site: str) -> str | None:
        return self.attendance.away(site, self.infos)

    def _count_turn(self, site: str, away: bool) -> None:
        if self.attendance.turn(site, away):
            missed = self.attendance.missed[site]
            self.callbacks.on_site_status(site, "dropped", f"missed {missed} turns in a row")
            self.warn(f"site {site!r} dropped: it missed {missed} turns in a row (max_absent {self.config.max_absent}); its "
                      "turns are skipped without waiting until it joins again")

    def _join_late(self, state: RunState, rnd: int) -> None:
        """Between rounds: listed sites that joined late enter now (with their initial heads), and
        dropped sites that joined again are waited for again."""
        new = self.sites.joined_since()
        for name in new:
            if self.attendance.back(name):
                self.callbacks.on_site_status(name, "joined", f"back in round {rnd + 1}")
                self.warn(f"site {name!r} joined again: back from round {rnd + 1}")
        late = {name: info for name, info in new.items() if name not in self.infos}
        if late:
            self.infos.update(late)
            self.schemas.update({name: info.schema for name, info in late.items()})
            self.sites.start(state, False)
            for name in late:
                self.warn(f"site {name!r} joined late: it enters in round {rnd + 1}")

    def _checked(self, state: RunState, plans: Sequence[VisitPlan], replies) -> list[tuple[VisitPlan, VisitReply]]:
        accepted = []
        for plan in plans:
            reply = replies.get(plan.site) or SiteFailure("no answer")
            if not isinstance(reply, SiteFailure):
                problem = self._update_problem(state, plan, reply)
                if problem is not None:
                    reply = SiteFailure(f"rejected reply: {problem}", refused=True)
            if isinstance(reply, SiteFailure):
                self._skip("visit", plan.round, plan.visit, plan.site, reply.reason, **({"away": True} if reply.away else {}))
                self._count_turn(plan.site, reply.away)
                if reply.reason in NON_FINITE:
                    self.non_finite[plan.site] = plan.visit
            else:
                self._count_turn(plan.site, False)
                accepted.append((plan, reply))
        if accepted:
            self.non_finite.clear()
        return accepted

    def _examples(self, site: str) -> int:
        """The most examples a visit to ``site`` can see, from the training split it declared at join."""
        return max_examples(self.infos[site].sizes.get("train", 0), self.config.settings)

    def _update_problem(self, state: RunState, plan: VisitPlan, reply: VisitReply) -> str | None:
        """The one gate for every returned update, local or remote (:class:`arkfed.ark.updates.UpdateGuard`):
        the model's keys, dtypes and shapes, finite values, ``num_examples`` within what the site's
        declared training split allows (it weights a parallel-mode mean), the update's norm (the
        adaptive bound and ``max_update_norm``) and the visit's reported metrics."""
        if self.config.secure_aggregation:  # the update stays masked: its site checked and clipped it (arkfed.ark.secure)
            return check_secure_reply(reply.result, plan, self._examples(plan.site))
        return self.guard.check(reply, plan, state.student.state_dict(), state.teacher.state_dict(), self._examples(plan.site))

    def _check_usable(self) -> None:
        """Stop when two different sites (the only site of a one-site run) could not train on the
        model they were sent: one site alone cannot stop a run by claiming so."""
        if len(self.non_finite) < min(2, len(self.config.sites)):
            return
        failed = ", ".join(f"{site!r} (visit {visit + 1})" for site, visit in self.non_finite.items())
        last = self.last_accepted
        since = f"the last accepted update, visit {last.visit + 1} from site {last.site!r}" if last else "its initial state"
        raise ModelUnusable(f"stopped, not finished: the model became unusable: training on it gave non-finite losses at "
                            f"sites {failed}, with no visit accepted in between; suspect {since}. The checkpoint holds "
                            f"the model after it; resume from an earlier copy or with a lower lr")

    def _secure_mean(self, state: RunState, accepted: list[tuple[VisitPlan, VisitReply]]):
        """Secure aggregation: the accepted visits whose updates are in the mean, and the student
        moved by that mean (``sites.secure_mean``: Flower's SecAgg+; the coordinator never sees one
        site's update). When it fails, or is not what clipped updates can give, the round's visits
        are skipped."""
        if not accepted:
            return [], None
        outcome = self.sites.secure_mean(state, accepted)
        sent = state.student.state_dict()
        if not isinstance(outcome, SiteFailure):
            arrays, sites = outcome
            try:
                update, norm = mean_update(sent, arrays, self.max_update_norm)
            except ValueError as exc:
                outcome = SiteFailure(f"rejected secure aggregate: {exc}", refused=True)
        if isinstance(outcome, SiteFailure):
            for plan, _ in accepted:
                self._skip("visit", plan.round, plan.visit, plan.site, outcome.reason)
            return [], None
        for plan, _ in accepted:
            if plan.site not in sites:
                self._skip("visit", plan.round, plan.visit, plan.site, "left the secure aggregation before its update was summed")
        kept = [(plan, reply) for plan, reply in accepted if plan.site in sites]
        for _, reply in kept:
            reply.extra["secure_mean_norm"] = norm
        return kept, apply_update(sent, update)

    def _apply(self, state: RunState, group: Sequence[VisitPlan], accepted: list[tuple[VisitPlan, VisitReply]],
               secure_student: dict | None = None) -> None:
        """The student (averaged in parallel mode; with secure aggregation ``secure_student``), then
        the teacher's EMA step for the group."""
        if not accepted:
            return
        iteration = self.config.settings.ema == "iteration"
        sent = state.student.state_dict()
        if secure_student is None:
            for plan, reply in accepted:  # the adaptive bound's history, and each visit's record
                reply.extra["update_norm"] = self.guard.accept(reply, plan, sent, self._examples(plan.site))
        self.last_accepted = accepted[-1][0]
        if secure_student is not None:
            state.student.load_state_dict(secure_student)
        elif len(group) == 1:
            plan, reply = accepted[0]
            state.student.load_state_dict(reply.student)
            if iteration:
                state.teacher.load_state_dict(reply.teacher)
        else:
            rule = self.config.aggregation
            weights = [1.0 if self.config.weighting == "equal" else float(r.result.num_examples) for _, r in accepted]
            state.student.load_state_dict(aggregate_states([r.student for _, r in accepted], weights, rule))
            if iteration:
                state.teacher.load_state_dict(aggregate_states([r.teacher for _, r in accepted], weights, rule))
        momentum = group[0].momentum
        if not iteration:
            ema_update(state.teacher, state.student, momentum)
        elif accepted[0][1].result.momentum_product is not None:  # one step per iteration: the heads missed their product
            momentum = accepted[0][1].result.momentum_product  # (parallel mode: the first accepted visit's)
        state.clock.record(group[-1].visit, momentum, [plan.site for plan, _ in accepted])
        for plan, reply in accepted:
            self.sites.accept(state, plan, reply)
            state.versions[plan.site] = plan.visit

    def _train_group(self, state: RunState, group: Sequence[VisitPlan]) -> None:
        present = []
        for plan in group:
            self.callbacks.on_visit_start(plan)
            reason = self._away(plan.site)
            if reason is None:
                present.append(plan)
            else:  # nothing is sent and nobody waits
                self._skip("visit", plan.round, plan.visit, plan.site, reason, away=True)
                self._count_turn(plan.site, True)
        start = time.perf_counter()
        replies = self.sites.visit(state, present) if present else {}
        seconds = time.perf_counter() - start
        accepted, secure_student = self._checked(state, present, replies), None
        if self.config.secure_aggregation:
            accepted, secure_student = self._secure_mean(state, accepted)
        self._apply(state, group, accepted, secure_student)
        for plan, reply in accepted:  # metrics before the checkpoint: resume trims what it lacks
            self.callbacks.on_visit_end(plan, visit_record(plan, reply.result, round_trip_s=seconds, **reply.extra))
        self._check_usable()
        state.visits_done = group[-1].visit + 1
        self.run.save_checkpoint(state)

    def _with_lr(self, group: Sequence[VisitPlan]) -> Sequence[VisitPlan]:
        """The group's plans, with ``lr_schedule="ark-as-run"`` at the lr Ark's code would set after the
        validation losses recorded so far (:func:`arkfed.schedules.ark_as_run_round_lr`)."""
        from arkfed.run.records import round_val_losses

        settings = self.config.settings
        if settings.lr_schedule != "ark-as-run":
            return group
        losses = round_val_losses(self.run.read_metrics(), self.config.eval_split)
        lr = ark_as_run_round_lr(settings, self.config.rounds, losses, group[0].round)
        return [plan.model_copy(update={"lr": lr}) for plan in group]

    def _evaluate(self, state: RunState, rnd: int, started: float) -> None:
        split = self.config.eval_split
        records = []
        present = [site for site in self.config.sites if self._away(site) is None]
        answers = self.sites.evaluate(state, split, present) if present else {}
        for site in self.config.sites:  # the run's order, whatever order the answers came in
            answer = answers.get(site, SiteFailure(self._away(site) or "no answer"))
            problem = None if isinstance(answer, SiteFailure) else next(
                (f"evaluation of the {label}: {p}" for label, result in answer.items() if (p := check_eval_metrics(result))), None)
            if problem is not None:
                answer = SiteFailure(f"rejected reply: {problem}", refused=True)
            if isinstance(answer, SiteFailure):
                self._skip("evaluation", rnd, state.visits_done, site, answer.reason)
                continue
            records += [eval_record(rnd, site, label, split, result) for label, result in answer.items()]
        self.run.save_weights(state)
        self.callbacks.on_round_end(rnd, records + [round_record(rnd, time.perf_counter() - started)])

    def run_loop(self, resume: bool = False) -> dict:
        """Join, train every group, evaluate every round, write the summary."""
        started = time.perf_counter()
        if self.config.settings.optimizer_state == "carry" and self.sites.mode != "local":
            raise ArkfedError("optimizer_state 'carry' is for local runs: its momentum buffers are derived from a site's "
                              "gradients and would leave the site; use optimizer_state 'reset'")
        self._check_secure()
        try:
            infos = self.infos = dict(self.sites.join(self.config))
            self.schemas = {name: info.schema for name, info in infos.items()}
            state, evaluated, fresh = open_run(self.run, self.config, self.schemas, resume)
            self._remember_accepted()
            self.sites.start(state, fresh)
            self._write_provenance(infos)
            groups = plan_groups(self.config)
            for name in (site for site in self.config.sites if site not in infos):
                self.callbacks.on_site_status(name, ABSENT, f"not joined ({len(infos)} of {len(self.config.sites)} sites are)")
            self.callbacks.on_run_start(RunInfo(self.config, self.run.path, self.config.total_visits, state.visits_done, self.sites.mode))
            for rnd in range(self.config.rounds):
                groups = self._admit_members(state, rnd, groups)
                if any(g[-1].visit >= state.visits_done for g in groups if g[0].round == rnd):
                    self._join_late(state, rnd)
                for group in (g for g in groups if g[0].round == rnd and g[-1].visit >= state.visits_done):
                    self._train_group(state, self._with_lr(group))
                if rnd not in evaluated:
                    self._evaluate(state, rnd, started)
            self.run.save_weights(state)
            summary = build_summary(self.config, self.run.read_metrics(), time.perf_counter() - started, self.schemas)
            self.run.write_summary(summary)
            self.callbacks.on_run_end(summary)
            return summary
        finally:
            self.callbacks.close()

    def _check_secure(self) -> None:
        if not self.config.secure_aggregation:
            return
        if self.sites.mode == "local" or not hasattr(self.sites, "secure_mean"):
            raise ArkfedError("secure_aggregation is for federated runs (arkfed coordinator, arkfed train --federated): in a "
                              "local run every site's update is in this process anyway")
        if not self.max_update_norm:
            raise ArkfedError("secure_aggregation needs max_update_norm (arkfed coordinator --max-update-norm N): each site "
                              "clips its own update to it before masking, as the coordinator cannot check single updates")

    def _admit_members(self, state: RunState, rnd: int, groups: list) -> list:
        """Sites admitted into the run from round ``rnd`` (a federation's signed membership change,
        if the sites implementation offers ``admit``): the run continues with the new configuration,
        re-planned (every visit made keeps its index and plan) and written to ``config.yaml``."""
        admit = getattr(self.sites, "admit", None)
        config = admit(self.config, rnd) if admit is not None else None
        if config is None:
            return groups
        new = [s for s in config.sites if s not in self.config.sites]
        self.config = config
        self.run.write_config(config)
        self.callbacks.on_sites_admitted(config)
        self.infos = dict(self.sites.join(config))
        self.schemas = {name: info.schema for name, info in self.infos.items()}
        self._write_provenance(self.infos)
        self.sites.start(state, False)  # the admitted sites' initial heads, seeded exactly as at the start (as for late joins)
        self.warn(f"sites {new} admitted from round {rnd + 1}: {config.total_visits} visits planned in all")
        return plan_groups(config)

    def _remember_accepted(self) -> None:
        """A resumed run's adaptive bound starts from the updates it accepted before (their norms
        are in the visit records ``metrics.jsonl`` kept), and its count of missed turns too."""
        self.attendance.restore(self.run.read_metrics(), self.infos)
        for record in self.run.read_metrics():
            if record.get("kind") == "visit" and isinstance(record.get("update_norm"), (int, float)) and record.get("site") in self.infos:
                self.guard.remember(Accepted(float(record["update_norm"]), self._examples(record["site"]), float(record["lr"])))

    def _write_provenance(self, infos: Mapping[str, SiteInfo]) -> None:
        from arkfed.run.provenance import write_provenance

        write_provenance(self.run.path, {name: info.fingerprint for name, info in infos.items()})


