"""The in-process implementation of the loop's :class:`~arkfed.run.loop.Sites` interface: every
site's data in this process, each visit and evaluation through :mod:`arkfed.ark.tasks` exactly as
a Flower site runs them. :func:`train_local` is ``arkfed train`` without ``--federated``.

With ``optimizer_state="carry"`` (local runs only) the run's optimizer state (``RunState.optimizer``)
goes into every visit and the visit's state replaces it when the visit is accepted: one optimizer
over the student and every head, as Ark's."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Mapping, Sequence

from arkfed.ark.pair import ArkPair, SiteHeads
from arkfed.ark.tasks import evaluate_site_models, visit_site
from arkfed.config import TrainConfig, VisitPlan
from arkfed.errors import ArkfedError
from arkfed.run.callbacks import CallbackList, LoopCallback
from arkfed.run.folder import RunFolder, RunState
from arkfed.run.loop import ArkLoop, SiteFailure, SiteInfo, VisitReply
from arkfed.site.budget import PrivacyRefused
from arkfed.site.config import ComputeSettings
from arkfed.site.load import Site, load_sites


# -- in-process sites -----------------------------------------------------------------------------
class InProcessSites:
    """Sites whose data this process reads: visits run :func:`arkfed.ark.tasks.visit_site` on a
    copy of the student, so a visit's result is checked and accepted exactly like a remote one."""

    mode = "local"

    def __init__(self, sites: Mapping[str, Site], compute: Mapping[str, ComputeSettings] | None = None,
                 callbacks: LoopCallback | None = None):
        self.sites = dict(sites)
        self.compute = {name: (compute or {}).get(name) or site.config.compute for name, site in self.sites.items()}
        self.callbacks = callbacks or LoopCallback()
        self.settings = None
        self.optimizer: dict = {}  # visit -> its carried optimizer state, kept if the visit is accepted

    def join(self, config: TrainConfig) -> dict[str, SiteInfo]:
        self.settings = config.settings
        missing = [name for name in config.sites if name not in self.sites]
        if missing:
            raise ArkfedError(f"no site config for {missing} (sites given: {sorted(self.sites)})")
        from arkfed.run.provenance import dataset_fingerprint

        return {name: SiteInfo(self.sites[name].schema, {k: len(v) for k, v in self.sites[name].splits.items()},
                               dataset_fingerprint(self.sites[name]))
                for name in config.sites}

    def start(self, state: RunState, fresh: bool) -> None:
        for name, head in state.heads.items():  # checkpoints from before teacher heads existed
            state.teacher_heads.setdefault(name, SiteHeads.fresh(head).teacher)

    @staticmethod
    def _pair(state: RunState, name: str) -> ArkPair:
        """The run's student and teacher with the site's two heads (the run's own modules, not copies)."""
        return ArkPair(state.student, state.teacher, SiteHeads(state.heads[name], state.teacher_heads[name]))

    def visit(self, state: RunState, plans: Sequence[VisitPlan]) -> dict[str, VisitReply | SiteFailure]:
        replies: dict[str, VisitReply | SiteFailure] = {}
        self.optimizer = {}
        for plan in plans:
            site = self.sites[plan.site]
            pair = copy.deepcopy(self._pair(state, plan.site))
            carried = dict(state.optimizer) if self.settings.optimizer_state == "carry" else None
            try:
                result = visit_site(pair, site, self.settings, plan, state.clock.pending(plan.site), self.compute[plan.site],
                                    progress=self.callbacks.on_step, optimizer_state=carried)
            except PrivacyRefused as exc:  # the site's budget refuses, as a federated site would: the run goes on
                replies[plan.site] = SiteFailure(str(exc.refusal), refused=True)
                continue
            if carried is not None:
                self.optimizer[plan.visit] = carried
            teacher_state = pair.teacher.state_dict() if self.settings.ema == "iteration" else None
            replies[plan.site] = VisitReply(result, pair.student.state_dict(), teacher_state, heads=pair.heads)
        return replies

    def accept(self, state: RunState, plan: VisitPlan, reply: VisitReply) -> None:
        state.heads[plan.site], state.teacher_heads[plan.site] = reply.heads.student, reply.heads.teacher
        if plan.visit in self.optimizer:  # optimizer_state "carry": one optimizer through the accepted visits
            state.optimizer = self.optimizer.pop(plan.visit)

    def evaluate(self, state: RunState, split: str) -> dict[str, dict[str, dict] | SiteFailure]:
        return {
            name: evaluate_site_models(self._pair(state, name), site, self.settings, split, state.clock.pending(name), self.compute[name])
            for name, site in self.sites.items() if name in state.heads
        }


def train_local(
    config: TrainConfig,
    out: str | Path,
    resume: bool = False,
    sites: Mapping[str, Site] | None = None,
    callbacks: Sequence[LoopCallback] = (),
    compute: Mapping[str, ComputeSettings] | None = None,
    site_configs: Sequence[str | Path] = (),
    plugins_dirs=(),
) -> dict:
    """Run (or resume) Ark with in-process sites into ``out``; returns the summary.

    Sites come from ``sites`` or from the site YAMLs (``site_configs``, recorded in
    ``RUN/sites.yaml`` so that ``--resume`` finds them again).
    """
    run = RunFolder(out)
    refs = [str(Path(r).resolve()) for r in site_configs] or run.read_site_configs()
    if sites is None:
        if not refs:
            raise ArkfedError(f"{run.path}: no site configs given or recorded")
        sites = load_sites(refs, config.sites, plugins_dirs)
    if refs and not resume and not run.has_run():
        run.write_site_configs(refs)
    callback_list = CallbackList(list(callbacks))
    in_process = InProcessSites(sites, compute, callback_list)
    return ArkLoop(config, run, in_process, callbacks).run_loop(resume)
