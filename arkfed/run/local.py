"""The in-process implementation of the loop's :class:`~arkfed.run.loop.Sites` interface: every
site's data in this process, each visit and evaluation through :mod:`arkfed.ark.tasks` exactly as
a Flower site runs them. :func:`train_local` is ``arkfed train`` without ``--federated``.

With ``optimizer_state="carry"`` (local runs only) the run's optimizer state (``RunState.optimizer``)
goes into every visit and the visit's state replaces it when the visit is accepted: one optimizer
over the student and every head, as Ark's.

A quorum (``min_sites``) in a local run: every site is read at the start; a site whose data cannot be
read (missing folder, unreadable labels, a plugin error) is absent for the run, named in a warning,
and its visits are skipped with reason ``absent``, as long as ``min_sites`` sites load; otherwise,
and always without ``min_sites``, the first such error stops the run before it starts. ``--resume``
reads every site again, so a site whose data can be read by then takes part from the next round."""

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
from arkfed.run.start import init_heads
from arkfed.site.budget import PrivacyRefused
from arkfed.site.config import ComputeSettings
from arkfed.site.load import Site, load_site, load_sites, resolve_site_path


# -- in-process sites -----------------------------------------------------------------------------
class InProcessSites:
    """Sites whose data this process reads: visits run :func:`arkfed.ark.tasks.visit_site` on a
    copy of the student, so a visit's result is checked and accepted exactly like a remote one."""

    mode = "local"

    def __init__(self, sites: Mapping[str, Site], compute: Mapping[str, ComputeSettings] | None = None,
                 callbacks: LoopCallback | None = None, unreadable: Mapping[str, str] | None = None):
        self.sites = dict(sites)
        self.compute = {name: (compute or {}).get(name) or site.config.compute for name, site in self.sites.items()}
        self.callbacks = callbacks or LoopCallback()
        self.unreadable = dict(unreadable or {})  # site -> why its data could not be read (absent for this run)
        self.config: TrainConfig | None = None
        self.settings = None
        self.optimizer: dict = {}  # visit -> its carried optimizer state, kept if the visit is accepted

    def join(self, config: TrainConfig) -> dict[str, SiteInfo]:
        self.config, self.settings = config, config.settings
        missing = [name for name in config.sites if name not in self.sites]
        unknown = [name for name in missing if name not in self.unreadable]
        if unknown:
            raise ArkfedError(f"no site config for {unknown} (sites given: {sorted(self.sites)})")
        if len(config.sites) - len(missing) < config.quorum:
            why = "; ".join(self.unreadable[name] for name in missing)
            raise ArkfedError(f"sites {missing} cannot take part ({why}); {len(config.sites) - len(missing)} of "
                              f"{len(config.sites)} can, the run needs {config.quorum} (--min-sites)")
        for name in missing:
            self.callbacks.on_warning(f"site {name!r} is absent from this run: {self.unreadable[name]}")
        from arkfed.run.provenance import dataset_fingerprint

        return {name: SiteInfo(self.sites[name].schema, {k: len(v) for k, v in self.sites[name].splits.items()},
                               dataset_fingerprint(self.sites[name]))
                for name in config.sites if name in self.sites}

    def joined_since(self) -> dict[str, SiteInfo]:
        return {}  # every site was read at the start

    def start(self, state: RunState, fresh: bool) -> None:
        """Heads for loaded sites a resumed checkpoint lacks (absent before), and teacher heads
        for checkpoints from before teacher heads existed."""
        new = {name: site.schema for name, site in self.sites.items() if name not in state.heads}
        state.heads.update(init_heads(self.config, new, state.student.embed_dim) if new else {})
        for name, head in state.heads.items():
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

    def evaluate(self, state: RunState, split: str, sites: Sequence[str]) -> dict[str, dict[str, dict] | SiteFailure]:
        return {
            name: evaluate_site_models(self._pair(state, name), site, self.settings, split, state.clock.pending(name), self.compute[name])
            for name, site in self.sites.items() if name in state.heads and name in sites
        }


def load_quorum(refs: Sequence[str | Path], config: TrainConfig, plugins_dirs=()) -> tuple[dict[str, Site], dict[str, str]]:
    """The listed sites whose data can be read, and why each other one cannot (a run with
    ``min_sites`` goes on without them; see the module docstring). Without ``min_sites`` this is
    :func:`arkfed.site.load.load_sites`: the first error stops the run."""
    if config.min_sites is None:
        return load_sites(refs, config.sites, plugins_dirs), {}
    from arkfed.site.config import load_site_config

    sites, unreadable = {}, {}
    for ref in refs:
        path = resolve_site_path(ref).resolve()
        name = load_site_config(path).name  # an unreadable YAML has no name to call it absent by: it stops the run
        if name not in config.sites:
            continue
        try:
            sites[name] = load_site(path, plugins_dirs)
        except ArkfedError as exc:
            unreadable[name] = str(exc)
    return sites, unreadable


def train_local(
    config: TrainConfig,
    out: str | Path,
    resume: bool = False,
    sites: Mapping[str, Site] | None = None,
    callbacks: Sequence[LoopCallback] = (),
    compute: Mapping[str, ComputeSettings] | None = None,
    site_configs: Sequence[str | Path] = (),
    plugins_dirs=(),
    unreadable: Mapping[str, str] | None = None,
) -> dict:
    """Run (or resume) Ark with in-process sites into ``out``; returns the summary.

    Sites come from ``sites`` (with ``unreadable``: the listed sites left out, and why) or from the
    site YAMLs (``site_configs``, recorded in ``RUN/sites.yaml`` so that ``--resume`` finds them
    again; read by :func:`load_quorum`).
    """
    run = RunFolder(out)
    refs = [str(Path(r).resolve()) for r in site_configs] or run.read_site_configs()
    unreadable = dict(unreadable or {})
    if sites is None:
        if not refs:
            raise ArkfedError(f"{run.path}: no site configs given or recorded")
        sites, unreadable = load_quorum(refs, config, plugins_dirs)
    if refs and not resume and not run.has_run():
        run.write_site_configs(refs)
    callback_list = CallbackList(list(callbacks))
    in_process = InProcessSites(sites, compute, callback_list, unreadable)
    return ArkLoop(config, run, in_process, callbacks).run_loop(resume)
