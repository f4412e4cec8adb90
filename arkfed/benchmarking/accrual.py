"""Does joining pay?  ``arkfed benchmark accrual``: each site's question, Ark's claim, Ark's ablations.

Three questions, one protocol, every arm paired by seed (same init, data order, few-shot draws and
fine-tuning seed), ``E`` epochs of each site's own data everywhere (a round = one visit = one
epoch of that site's training split; a federation of k sites therefore takes k times the steps of
one site alone, as joining does):

1. **Join vs alone, per site** (what a hospital asks): Ark on the site alone for E epochs vs Ark
   on all N sites, which also gives it E epochs of its own data. Scored on the site's own test
   split with its own head, teacher and student (BatchNorm re-estimated on the site's training
   images, as in training), and after fine-tuning the teacher's backbone with a new head (best
   validation epoch). Mean over seeds with a 95% t-interval, and the joined - alone difference per
   site with a two-sided paired t-test over seeds.
2. **The accrual curve** (what Ark claims): for a held-out site H, Ark on the first k = 1 .. N-1
   of the other sites, for several orderings of them (rotations), each scored on H by a linear
   probe on the frozen teacher's backbone features (all of H's training labels, and K-shot) and
   by fine-tuning. k = 1 is each single site. Does the curve rise (k = N-1 vs the mean of k = 1,
   paired by seed)?
3. **Baselines** on the same N-1 source sites and budget, scored on H and on the sources' own
   test splits: each single site (E epochs of its own data); each single site at Ark's cost
   (``matched``: Ark on that site alone for as many steps, and images, as Ark on all the sources:
   E visits, each as long as one Ark round, i.e. one epoch of every source; see
   :func:`arkfed.benchmarking.arms.matched_visit`), which separates "more data" from "more
   compute" in Ark - single; multi-task pooled training (all sites' batches interleaved,
   each with its own head, no teacher: Ark+'s "concurrent" ablation,
   :func:`arkfed.benchmarking.baselines.train_pooled`); Ark without the consistency term
   (``max_consistency: 0``); a parallel federation (one visit per site per round from the same
   student, averaged with ``--weighting equal|samples``); random init; ImageNet init when a local
   weights file is given (``--imagenet PATH``; no download).

Outputs in ``--out``: ``results.json`` (every number, per seed), ``results.md`` (the tables),
``accrual.png`` (the figure), ``records.jsonl`` (one line per trained arm and seed: a rerun with
the same ``--out`` skips what is there, so an interrupted run resumes and partial results are
readable), ``runs/`` (the cyclic runs' folders).

Budgets (``--budget``, :mod:`arkfed.benchmarking.budget`): ``default`` is sized for 2 CPU cores (timm's test_resnet at 64 px on
the 128 px demo images, E = 2 epochs, 3 seeds, 10-shot probes, 2 fine-tuning epochs; measured
15.9 CPU-minutes with one torch thread, 2026-12-01); ``smoke`` checks the pipeline in seconds and
its numbers mean nothing; ``gpu`` is resnet18 at 128 px on a 4x larger demo federation, E = 6,
5 seeds, for a CUDA machine (not run yet: no GPU was available). Every image is decoded once into
memory (:func:`cache_images`); keep ``OMP_NUM_THREADS=1`` on a busy machine (OpenMP spin-waiting
multiplied the CPU time about eightfold with 2 threads under load).

The answer on the demo (default budget, 3 seeds, held-out demo-vindr; README "Does joining
pay?", ``benchmarks/results/accrual-default/``): joining pays for every site that has something
left to learn: joined - alone, own test AUC of the teacher, +0.173 demo-vindr, +0.046
demo-chexpert (both resolved), +0.035 demo-nih (not resolved), +0.015 demo-shenzhen (at AUC ~1
alone); the curve rises (held-out probe 0.853 -> 0.887 -> 0.900 for k = 1, 2, 3; +0.046 resolved;
fine-tune +0.053 not resolved); cyclic Ark beats parallel (+0.050 probe), pooled (+0.040, not
resolved) and random init (+0.10), and equals Ark with c = 0. A joined site trains on more images
in total; at equal steps on the three-site demo the best single site won (the old benchmark),
and so it does here: each source alone for as many steps and images as Ark on the sources
(the matched arm; 2026-12-06, ``benchmarks/results/accrual-matched/``) gave demo-nih 0.936 /
0.906 (probe / fine-tune) vs Ark's 0.906 / 0.882, where demo-nih for E epochs gave 0.885 / 0.850:
Ark's edge over one site is its extra steps.

Why a per-iteration EMA teacher in every budget: with Ark's visit-wise EMA (momentum 0.9 rising
to 1) a teacher after a handful of visits is still mostly its random initialisation, so a short
benchmark would compare random inits; ``--ema visit`` gives Ark's schedule.

Default demo: the three ``make demo`` sites plus ``demo-vindr`` (opt-in site, VinDr-CXR layout,
findings drawn from all three others under its own acquisition style; see :mod:`arkfed.demo.generate`),
held out by default: no single other site has all its findings, so accrual has something to
show if it works. Results: see README "Does joining pay?" (kept there, with the regime and the
time it took).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from arkfed.benchmarking.arms import finetune_auc, own_scores, train_arm, transfer
from arkfed.benchmarking.budget import Budget, torch_device
from arkfed.benchmarking.plan import curve_subsets, run_key
from arkfed.errors import ArkfedError

Log = Callable[[str], None]


DEMO_BENCHMARK_SITES = ("demo-nih", "demo-chexpert", "demo-shenzhen", "demo-vindr")
DEMO_HELD_OUT = "demo-vindr"


# --- sites ---------------------------------------------------------------------------------------


def benchmark_sites(refs: Sequence[str] | None, budget: Budget, work: Path) -> dict:
    """The benchmark's sites: YAML paths / names (:func:`arkfed.site.load.load_sites`), or (none
    given) the demo federation with demo-vindr."""
    from arkfed.site.load import load_site, load_sites

    if refs:
        return load_sites(refs)
    return {site.name: site for site in (load_site(p) for p in demo_site_paths(budget, work))}


def demo_site_paths(budget: Budget, work: Path) -> list[Path]:
    """The demo federation with demo-vindr at the budget's image size and counts, drawn into
    ``work`` unless already there: its site YAMLs."""
    from arkfed.demo.generate import ensure_demo_federation

    tag = "default" if budget.demo_counts is None else "x".join(str(v) for v in budget.demo_counts.values())
    return ensure_demo_federation(work / f"demo-{budget.demo_size}-{tag}", seed=0, size=budget.demo_size,
                                  counts=budget.demo_counts, sites=DEMO_BENCHMARK_SITES)


CACHE_LIMIT_BYTES = 2 * 1024**3


def cache_images(sites: Mapping, size: int, log: Log) -> dict:
    """The sites with every split's images decoded once and resized to ``size`` in memory.

    Every arm and seed reads the same images; decoding them from disk each time was most of a
    step's cost on CPU (a 128 px PNG decode + resize costs more than test_resnet's forward pass at
    64 px). The data pipeline resizes each image to ``size`` x ``size`` before augmenting it, so
    resizing it here once gives the same pixels. Skipped (with a note) past 2 GiB.
    """
    import dataclasses

    from arkfed.data.loaders import read_resized
    from arkfed.data.tables import ArrayImages, DatasetTable

    total = sum(len(t) for s in sites.values() for t in s.splits.values()) * size * size
    if total > CACHE_LIMIT_BYTES:
        log(f"images not cached in memory ({total / 1024**3:.1f} GiB at {size} px): read from disk at every step")
        return dict(sites)
    start = time.perf_counter()
    out = {}
    for name, site in sites.items():
        splits = {}
        for split, table in site.splits.items():
            pixels = np.stack([read_resized(table, i, size)[0].numpy() for i in range(len(table))]) if len(table) else \
                np.zeros((0, size, size), dtype=np.uint8)
            splits[split] = DatasetTable(images=ArrayImages(pixels, f"{name}/{split} (cached at {size} px)"), labels=table.labels,
                                         meta=table.meta, classes=table.classes)
        out[name] = dataclasses.replace(site, splits=splits)
    log(f"images decoded once into memory at {size} px ({total / 1024**2:.0f} MiB) in {time.perf_counter() - start:.0f}s")
    return out


# --- the protocol --------------------------------------------------------------------------------


@dataclass
class Plan:
    """What one seed trains: (arm, sites, role) in order, and what each is scored on."""

    sites: list[str]
    held_out: str
    budget: Budget
    weighting: str = "equal"
    imagenet: Path | None = None
    jobs: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.held_out not in self.sites:
            raise ArkfedError(f"--held-out {self.held_out!r} is not one of the sites {self.sites}")
        if len(self.sites) < 2:
            raise ArkfedError(f"the benchmark needs at least 2 sites, got {self.sites}")
        # Order: what answers most first (a cut-short run still has join vs alone, both ends of the
        # curve and the ablations); the curve's middle points come last.
        sources = tuple(self.sources)
        jobs = [("ark", (s,)) for s in self.sites]  # alone (k = 1 on the curve for the sources)
        jobs.append(("ark", tuple(self.sites)))  # joined
        jobs.append(("ark", sources))  # k = N-1
        jobs += [("pooled", sources), ("ark-c0", sources)]
        if len(sources) > 1:  # with one source, parallel and matched are that site alone
            jobs.append(("parallel", sources))
            jobs += [("matched", (s,)) for s in sources]  # each source alone, as many steps as Ark on all
        for k, subsets in curve_subsets(sources, self.budget.orderings).items():
            jobs += [("ark", s) for s in subsets if 1 < k < len(sources)]
        self.jobs = list(dict.fromkeys(jobs))

    @property
    def sources(self) -> list[str]:
        return [s for s in self.sites if s != self.held_out]


def run_job(arm: str, names: tuple[str, ...], plan: Plan, sites: Mapping, seed: int, work: Path, log: Log) -> dict:
    """Train one arm and score it: own sites always; fine-tuning on own sites for the alone and
    joined runs; transfer to the held-out site when it was not trained on."""
    budget = plan.budget
    cpu = time.process_time()
    trained = train_arm(arm, names, sites, budget, seed, work, plan.weighting, match=plan.sources)
    record = {"key": run_key(arm, names, seed), "arm": arm, "sites": list(names), "seed": seed,
              "train_seconds": trained.seconds, "steps": trained.steps, "images": trained.images}
    start = time.perf_counter()
    record["own"] = trained.own or own_scores(trained, names, sites, budget)
    if arm == "ark" and (len(names) == 1 or len(names) == len(plan.sites)):
        for name in names:
            record["own"][name]["finetune"] = finetune_auc(trained.teacher, sites[name], budget, seed)
    if plan.held_out not in names:
        record["held_out"] = transfer(trained.teacher, sites[plan.held_out], budget, seed)
    record["eval_seconds"] = time.perf_counter() - start
    record["cpu_seconds"] = time.process_time() - cpu  # all threads: what a busy shared machine cannot inflate
    log(f"seed {seed}: {arm} on {'+'.join(names)}: {trained.steps} steps ({trained.images} images) in {trained.seconds:.0f}s, "
        f"scored in {record['eval_seconds']:.0f}s ({record['cpu_seconds']:.0f} CPU-s); held-out {_short(record.get('held_out'))}")
    return record


def init_job(init: str, plan: Plan, sites: Mapping, seed: int, log: Log) -> dict:
    """The random-init (and ImageNet-init) baselines on the held-out site."""
    from arkfed.model.ark import ArkModel
    from arkfed.model.weights import load_ark_model
    from arkfed.spec import ModelSpec

    budget = plan.budget
    spec = ModelSpec(model=budget.model, img_size=budget.img_size, projector_dim=budget.projector_dim)
    start, cpu = time.perf_counter(), time.process_time()
    if init == "imagenet":
        model = load_ark_model(plan.imagenet, spec=spec).eval()
        scores = transfer(model, sites[plan.held_out], budget, seed)
    else:
        scores = transfer(ArkModel(spec).eval(), sites[plan.held_out], budget, seed, init="random")
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    log(f"seed {seed}: {init} init: held-out {_short(scores)} in {seconds:.0f}s ({cpu:.0f} CPU-s)")
    return {"key": f"{init}:s{seed}", "arm": init, "sites": [], "seed": seed, "held_out": scores,
            "eval_seconds": seconds, "cpu_seconds": cpu}


def _short(scores: dict | None) -> str:
    return "-" if not scores else ", ".join(f"{k} {v:.3f}" for k, v in scores.items())


def budget_setup(budget: Budget) -> dict:
    """The budget as a setup key: without what only changes how many seeds run, or where."""
    return {k: v for k, v in asdict(budget).items() if k not in ("seeds", "device", "num_workers")}


def check_same_setup(plan: Plan, out: Path) -> None:
    """A rerun into the same folder resumes it, so it must be the same setup (budget without
    seeds, sites, held-out site, weighting): otherwise records of two setups would be mixed."""
    from arkfed.benchmarking.resume import check_setup

    check_setup({"budget": budget_setup(plan.budget), "sites": plan.sites, "held_out": plan.held_out, "weighting": plan.weighting}, out)


def run_benchmark(plan: Plan, sites: Mapping, out: Path, log: Log, train: bool = True) -> dict:
    """Every job of every seed (skipping those already in ``out/records.jsonl``), then the summary.
    ``train=False`` only summarises the records there (a partial run's tables and figure)."""
    from arkfed.benchmarking.resume import add_record, read_records

    out.mkdir(parents=True, exist_ok=True)
    check_same_setup(plan, out)
    done = read_records(out)
    start = time.perf_counter()
    for seed in plan.budget.seeds if train else ():
        inits = ["random"] + (["imagenet"] if plan.imagenet else [])
        for init in inits:
            if f"{init}:s{seed}" not in done:
                add_record(out, done, init_job(init, plan, sites, seed, log))
        for arm, names in plan.jobs:
            if run_key(arm, names, seed) not in done:
                add_record(out, done, run_job(arm, names, plan, sites, seed, out, log))
    minutes = (time.perf_counter() - start) / 60
    from arkfed.benchmarking.report import summarise

    results = summarise(plan, list(done.values()), minutes)
    results["cpu_minutes"] = sum(r.get("cpu_seconds", 0.0) for r in done.values()) / 60
    return results


def environment(budget: Budget) -> dict:
    import platform

    import torch

    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "device": str(torch_device(budget)),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() and torch_device(budget).type == "cuda" else None,
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "python": platform.python_version(), "torch": torch.__version__}


def benchmark_accrual(site_refs: Sequence[str] | None, held_out: str | None, budget: Budget, out: Path,
                      weighting: str = "equal", imagenet: Path | None = None, budget_name: str = "custom",
                      log: Log | None = None, report_only: bool = False) -> dict:
    """The whole benchmark: sites, plan, jobs, ``results.json``, ``results.md`` and ``accrual.png``."""
    from arkfed.benchmarking.report import write_outputs

    log = log or (lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True))
    if imagenet is not None and not Path(imagenet).is_file():
        raise ArkfedError(f"--imagenet {imagenet}: no such weights file (a local timm {budget.model} checkpoint)")
    if weighting not in ("equal", "samples"):
        raise ArkfedError(f"--weighting must be equal or samples, got {weighting!r}")
    sites = benchmark_sites(site_refs, budget, out)
    if not report_only:
        sites = cache_images(sites, budget.img_size, log)
    held_out = held_out or (DEMO_HELD_OUT if not site_refs else list(sites)[-1])
    plan = Plan(list(sites), held_out, budget, weighting, imagenet)
    log(f"budget {budget_name}: {json.dumps(asdict(budget))}")
    log("sites: " + ", ".join(f"{n} ({len(s.split('train'))} train / {len(s.split('test'))} test)" for n, s in sites.items())
        + f"; held out: {held_out}; {len(plan.jobs)} trained arms per seed")
    results = run_benchmark(plan, sites, out, log, train=not report_only)
    results.update({"budget_name": budget_name, "budget": asdict(budget), "environment": environment(budget),
                    "site_sizes": {n: {k: len(v) for k, v in s.splits.items()} for n, s in sites.items()}})
    write_outputs(results, out)
    log(f"results: {out / 'results.json'}, {out / 'results.md'}, {out / 'accrual.png'}")
    return results
