"""The paper's table from one command: ``arkfed benchmark paper``.

Ark's transfer protocol on every target dataset present locally: each site whose dataset plugin
reads one of the paper's targets (:data:`arkfed.benchmarking.published.PUBLISHED`: CheXpert,
ChestX-ray14, RSNA Pneumonia, VinDr-CXR, Shenzhen) is fine-tuned, ``--runs`` times (seeds 0 ..
runs-1; default the paper's count, :data:`~arkfed.benchmarking.published.PAPER_RUNS`), from

- the model: ``--model`` (a run folder, an export, or a weights file; ``--arch`` for a plain
  backbone file such as the released Ark-6 teacher), or, without one, Ark trained here on all the
  ``--sites`` at the budget (the paper's Ark-6 is likewise pretrained on its targets, and on
  MIMIC-CXR, before it is fine-tuned on each);
- ImageNet: ``--imagenet PATH``, a local timm weights file of the model's architecture; without
  it that column says "not run (no local weights)". Nothing is ever downloaded;
- random init: the same architecture.

Every fine-tuning is :func:`arkfed.evaluation.finetune.finetune` (a new linear head, every weight
trained, the best validation epoch tested) at the budget's settings, scored with the paper's
metric: mean AUC over the site's reported classes (CheXpert's five, as the paper), accuracy for
RSNA Pneumonia. ``--protocol ark`` (default) reads each site as Ark's reference code does where
its plugin has a ``protocol`` option (:func:`arkfed.site.load.with_protocol`).

The measured numbers mean something only on the real datasets with a GPU, a budget like the
paper's (:data:`~arkfed.benchmarking.published.PAPER_PROTOCOL`) and the released Ark-6 model or
one pretrained like it; results.md states the budget, the hardware, the protocol and the model
beside every number. Without ``--sites`` it runs on the synthetic demo federation, which checks
the pipeline only. Outputs in ``--out``: ``results.json``, ``results.md``, ``records.jsonl`` (one
line per fine-tuning run; a rerun with the same ``--out`` resumes), ``setup.json``, ``runs/``
(the Ark run trained here, if any).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

from arkfed.benchmarking.budget import Budget
from arkfed.benchmarking.published import PAPER_RUNS, Published, published_for
from arkfed.errors import ArkfedError

Log = Callable[[str], None]
PROTOCOLS = ("ark", "arkfed")


# --- sites ---------------------------------------------------------------------------------------


@dataclass
class PaperSites:
    """The sites as read for the table, whether they are the synthetic demo, and how each was read."""

    sites: dict
    synthetic: bool
    reading: dict[str, str]


def load_paper_sites(refs: Sequence[str] | None, budget: Budget, work: Path, protocol: str) -> PaperSites:
    """The ``--sites`` (names or YAML paths), or the demo federation with demo-vindr, each read under ``protocol``."""
    from arkfed.benchmarking.accrual import demo_site_paths
    from arkfed.site.config import load_site_config, resolve_site_path
    from arkfed.site.load import load_site, with_protocol

    paths = [resolve_site_path(r).resolve() for r in refs] if refs else demo_site_paths(budget, work)
    sites, reading = {}, {}
    for path in paths:
        config = load_site_config(path)
        if not refs and config.dataset == "vindr_cxr" and protocol == "ark":
            # the demo's VinDr site reads all 28 labels (for the accrual benchmark); the table scores Ark's six
            config = config.model_copy(update={"options": {k: v for k, v in config.options.items() if k != "labels"}})
        read, note = with_protocol(config, protocol)
        if read.name in sites:
            raise ArkfedError(f"site {read.name!r} given twice")
        sites[read.name] = load_site(read)
        reading[read.name] = note or f"protocol: {protocol}"
    return PaperSites(sites, not refs, reading)


def targets(sites: Mapping) -> list[tuple[Published, str | None]]:
    """(the paper's target, the local site that is it, or None), in the paper's order; a target
    present at several sites gets a row per site."""
    from arkfed.benchmarking.published import PUBLISHED

    rows: list[tuple[Published, str | None]] = []
    for published in PUBLISHED:
        local = [name for name, site in sites.items() if site.config.dataset == published.dataset]
        rows += [(published, name) for name in local] or [(published, None)]
    return rows


# --- the model -----------------------------------------------------------------------------------


def given_model(model: Path, arch: str | None, img_size: int | None):
    """``--model`` (its teacher where it has one) and what it is; ``arch`` and ``img_size``
    (default 224, the paper's) only for a plain backbone file, which carries neither."""
    from arkfed.evaluation.sources import load_source

    loaded = load_source(model, "teacher", arch, img_size or 224).eval()
    return loaded, {"source": str(model), "trained_here": False, "spec": loaded.spec.model_dump()}


def trained_model(sites: Mapping, budget: Budget, out: Path, done: dict, log: Log, load: bool = True):
    """Ark trained here on every site (seed 0, the budget's E rounds), kept in ``out/runs`` and
    reused by a rerun, and what it is; ``load=False``: only what it is (None before it was trained)."""
    from arkfed.benchmarking.resume import add_record
    from arkfed.model.weights import load_ark_model

    if "pretrain" not in done and load:
        from arkfed.benchmarking.arms import train_arm
        from arkfed.benchmarking.plan import run_key

        names = tuple(sites)
        log(f"no --model: training Ark on {', '.join(names)} ({budget.epochs} rounds of the budget)")
        trained = train_arm("ark", names, sites, budget, 0, out)
        folder = Path("runs") / run_key("ark", names, 0).replace(":", "_")
        add_record(out, done, {"key": "pretrain", "folder": str(folder), "sites": list(names), "steps": trained.steps,
                               "images": trained.images, "train_seconds": trained.seconds})
    info = done.get("pretrain")
    if info is None:
        return None, {"source": "Ark to be trained here (not yet)", "trained_here": True}
    about = {"source": f"Ark trained here on {', '.join(info['sites'])}", "trained_here": True, "folder": info["folder"],
             "steps": info["steps"], "images": info.get("images"), "rounds": budget.epochs,
             "spec": {"model": budget.model, "img_size": budget.img_size}}
    return (load_ark_model(out / info["folder"], "teacher").eval() if load else None), about


# --- fine-tuning ---------------------------------------------------------------------------------


def paper_score(test: dict, published: Published) -> float:
    """The paper's metric from a fine-tuning's test metrics, in percent (NaN when undefined)."""
    value = test.get("accuracy") if published.metric == "accuracy" else test.get("mean_auc")
    return float("nan") if value is None else 100.0 * float(value)


def finetune_job(model, init: str, site, published: Published, budget: Budget, seed: int, log: Log) -> dict:
    """One fine-tuning of ``site`` from ``model`` (``init`` model | imagenet: weights loaded from a
    local file, fine-tuned as a model) or from a random init of its architecture."""
    from arkfed.benchmarking.arms import finetune_run

    start, cpu = time.perf_counter(), time.process_time()
    run = finetune_run(model, site, budget, seed, "random" if init == "random" else "model")
    test = run["test"]
    record = {"key": f"{init}:{site.name}:s{seed}", "init": init, "site": site.name, "target": published.target, "seed": seed,
              "metric": published.metric, "score": paper_score(test, published), "mean_auc": test.get("mean_auc"),
              "accuracy": test.get("accuracy"), "auc": test.get("auc"), "best_epoch": run["best_epoch"],
              "seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu}
    log(f"seed {seed}: {site.name} from {init}: {published.metric} {record['score']:.2f} in {record['seconds']:.0f}s")
    return record


def run_paper(models: Mapping[str, object], rows: Sequence[tuple[Published, str | None]], sites: Mapping, budget: Budget,
              out: Path, done: dict, log: Log) -> None:
    """Every (seed, target site, init) fine-tuning not yet in ``out/records.jsonl``."""
    from arkfed.benchmarking.resume import add_record

    for seed in budget.seeds:
        for published, name in rows:
            for init, model in models.items():
                if name is not None and f"{init}:{name}:s{seed}" not in done:
                    add_record(out, done, finetune_job(model, init, sites[name], published, budget, seed, log))


def initial_models(model, imagenet: Path | None) -> dict:
    """What each column fine-tunes: the model; its architecture from ImageNet weights read from
    a local file (only with ``--imagenet``); the model again for ``random`` (its backbone is drawn anew)."""
    inits = {"model": model}
    if imagenet is not None:
        from arkfed.model.weights import load_ark_model

        inits["imagenet"] = load_ark_model(imagenet, spec=model.spec).eval()
    inits["random"] = model
    return inits


def check_arguments(protocol: str, model: Path | None, imagenet: Path | None) -> None:
    if protocol not in PROTOCOLS:
        raise ArkfedError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    for flag, path in (("--imagenet", imagenet), ("--model", model)):
        if path is not None and not Path(path).exists():
            raise ArkfedError(f"{flag} {path}: no such file or folder (local weights only; nothing is downloaded)")


def measure(read: PaperSites, rows: list, budget: Budget, out: Path, done: dict, log: Log, model: Path | None, arch: str | None,
            img_size: int | None, imagenet: Path | None) -> dict:
    """Load (or train) the model, fine-tune every target not yet recorded; what the model is."""
    from arkfed.benchmarking.accrual import cache_images

    source, about = given_model(model, arch, img_size) if model else (None, None)
    sites = cache_images(read.sites, source.spec.img_size if source else budget.img_size, log)
    if source is None:
        source, about = trained_model(sites, budget, out, done, log)
    run_paper(initial_models(source, imagenet), rows, sites, budget, out, done, log)
    return about


def benchmark_paper(site_refs: Sequence[str] | None, budget: Budget, out: Path, *, runs: int | None = None, protocol: str = "ark",
                    model: Path | None = None, arch: str | None = None, img_size: int | None = None, imagenet: Path | None = None,
                    budget_name: str = "custom", log: Log | None = None, report_only: bool = False) -> dict:
    """The whole command: sites, the model, every fine-tuning, ``results.json`` and ``results.md``."""
    from arkfed.benchmarking.accrual import budget_setup, environment
    from arkfed.benchmarking.paper_report import summarise_paper, write_paper_outputs
    from arkfed.benchmarking.resume import check_setup, read_records

    log = log or (lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True))
    check_arguments(protocol, model, imagenet)
    runs = runs or (2 if budget_name == "smoke" else PAPER_RUNS)
    budget = replace(budget, seeds=tuple(range(runs)))
    out.mkdir(parents=True, exist_ok=True)
    setup = {"command": "benchmark paper", "budget": budget_setup(budget), "sites": list(site_refs or ["demo"]), "protocol": protocol,
             "model": str(model) if model else None, "arch": arch, "img_size": img_size, "imagenet": str(imagenet) if imagenet else None}
    check_setup(setup, out)
    read = load_paper_sites(site_refs, budget, out, protocol)
    rows = targets(read.sites)
    done = read_records(out)
    start = time.perf_counter()
    if report_only:
        about = {"source": str(model)} if model else trained_model(read.sites, budget, out, done, log, load=False)[1]
    else:
        about = measure(read, rows, budget, out, done, log, model, arch, img_size, imagenet)
    results = summarise_paper(rows, list(done.values()), budget.seeds, imagenet is not None)
    results.update({"budget_name": budget_name, "budget": asdict(budget), "environment": environment(budget), "protocol": protocol,
                    "reading": read.reading, "synthetic": read.synthetic, "model": about, "imagenet": setup["imagenet"],
                    "runs": runs, "minutes": (time.perf_counter() - start) / 60,
                    "pretraining_only": [n for n, s in read.sites.items() if published_for(s.config.dataset) is None],
                    "site_sizes": {n: {k: len(v) for k, v in s.splits.items()} for n, s in read.sites.items()}})
    write_paper_outputs(results, out)
    log(f"results: {out / 'results.json'}, {out / 'results.md'}")
    return results
