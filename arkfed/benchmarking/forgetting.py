"""Forgetting and gain: ``arkfed benchmark forgetting``: accrue a new site into a released model.

Per seed, all arms paired by it (same init, data order and draws): Ark on the old sites for E
rounds (default: the three ``make demo`` sites), released (``arkfed release``,
:mod:`arkfed.evaluation.release`); then that release continued with the new site added
(``--from RELEASE``, old sites keeping their heads, the teacher's schedules continuing) for E more
rounds; and the new site trained alone for E rounds (the same Ark loop). Reported, as the mean
over seeds with a 95% t-interval and the paired difference (:mod:`arkfed.evaluation.stats`):

- each old site's own test mean AUC (teacher, its teacher head, BatchNorm re-estimated on its
  training images, as the loop scores) in the release and after accrual: forgetting = before -
  after; after accrual (old sites visited again in the continued run) and after a continued run
  of the new site alone (the old sites not visited; scored with the release's heads, the teacher's
  head caught up with the run's teacher steps): the second is forgetting without rehearsal;
- the new site's own test AUC after accrual vs trained alone for the same E epochs of its data;
- the new site's linear probe (all its training labels, on the frozen teacher backbone's
  features) before accrual (the release never saw the site: a held-out probe) and after.

Outputs in ``--out``: ``records.jsonl`` (one line per seed; a rerun skips seeds already there),
``results.json`` and ``results.md``. Sizes come from the accrual benchmark's budgets
(:mod:`arkfed.benchmarking.budget`).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Mapping, Sequence

from arkfed.benchmarking.arms import compute_settings, train_config
from arkfed.benchmarking.budget import Budget, torch_device
from arkfed.errors import ArkfedError

Log = Callable[[str], None]
DEMO_OLD = ("demo-nih", "demo-chexpert", "demo-shenzhen")
DEMO_NEW = "demo-vindr"


def _auc(value) -> float:
    return float("nan") if value is None else float(value)


def _teacher_aucs(summary: dict, names: Sequence[str]) -> dict[str, float]:
    return {n: _auc(summary["sites"][n].get("teacher", {}).get("mean_auc")) for n in names}


def _probe(run_or_release: Path, site, budget: Budget, seed: int) -> float:
    from arkfed.evaluation.embeddings import embed_table
    from arkfed.evaluation.linear_probe import probe_embeddings
    from arkfed.model.weights import load_ark_model

    model = load_ark_model(run_or_release, "teacher").eval()
    device = str(torch_device(budget))
    train, test = (embed_table(model, site.split(s), site.schema, "backbone", 64, device) for s in ("train", "test"))
    return float(probe_embeddings(train, test, site.schema, None, seed=seed)["mean_auc"])


def _release_head_scores(run_dir: Path, release: Path, names: Sequence[str], sites: Mapping, budget: Budget) -> dict[str, float]:
    """Own test AUC (teacher) of sites a continued run did not visit, with the release's heads:
    the teacher's head caught up with every teacher step the run took, as the loop would."""
    from arkfed.ark.pair import ArkPair, SiteHeads
    from arkfed.ark.tasks import evaluate_site_models
    from arkfed.config import TrainSettings
    from arkfed.model.lineage import STUDENT_HEADS_DIR
    from arkfed.model.weights import load_heads
    from arkfed.run.folder import RunFolder

    state = RunFolder(run_dir).load_checkpoint()
    students, teachers = load_heads(release / STUDENT_HEADS_DIR), load_heads(release / "heads")
    settings = TrainSettings(batch_size=max(budget.batch_size, 64))
    out = {}
    for name in names:
        pair = ArkPair(state.student, state.teacher, SiteHeads(students[name], teachers[name]))
        scored = evaluate_site_models(pair, sites[name], settings, "test", state.clock.pending(name), compute_settings(budget))
        out[name] = _auc(scored["teacher"]["mean_auc"])
    return out


def run_seed(old: Sequence[str], new: str, sites: Mapping, budget: Budget, seed: int, work: Path, log: Log) -> dict:
    """One seed: the release of the old sites, its continuation with ``new``, ``new`` alone."""
    import shutil

    from arkfed.evaluation.release import write_release
    from arkfed.model.lineage import schedule_steps
    from arkfed.run.local import train_local

    folder = work / "runs" / f"s{seed}"
    shutil.rmtree(folder, ignore_errors=True)
    compute = compute_settings(budget)
    start = time.perf_counter()

    def train(names, out, **update):
        config = train_config(names, budget, seed).model_copy(update=update)
        return train_local(config, out, sites={n: sites[n] for n in names}, compute={n: compute for n in names})

    base = train(old, folder / "base")
    lineage = write_release(folder / "base", folder / "release")
    release = folder / "release"
    continued = train([*old, new], folder / "continued", init=str(release), schedule_offset=schedule_steps(release))
    only = train([new], folder / "only", init=str(release), schedule_offset=schedule_steps(release))  # old sites not visited
    alone = train([new], folder / "alone")
    record = {
        "seed": seed, "release": lineage["id"],
        "old_before": _teacher_aucs(base, old), "old_after": _teacher_aucs(continued, old),
        "old_after_new_only": _release_head_scores(folder / "only", release, old, sites, budget),
        "new_only": _teacher_aucs(only, [new])[new],
        "new_continued": _teacher_aucs(continued, [new])[new], "new_alone": _teacher_aucs(alone, [new])[new],
        "probe_before": _probe(release, sites[new], budget, seed), "probe_after": _probe(folder / "continued", sites[new], budget, seed),
        "seconds": time.perf_counter() - start,
    }
    log(f"seed {seed}: release {lineage['id']}; old before {_fmt_map(record['old_before'])}, after {_fmt_map(record['old_after'])}, "
        f"after the new site alone {_fmt_map(record['old_after_new_only'])}; "
        f"{new} continued {record['new_continued']:.3f} vs alone {record['new_alone']:.3f}; probe {record['probe_before']:.3f} -> "
        f"{record['probe_after']:.3f} ({record['seconds']:.0f}s)")
    return record


def _fmt_map(values: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in values.items())


def summarise(records: Sequence[dict], old: Sequence[str], new: str) -> dict:
    """Means with intervals and paired differences over the seeds' records."""
    from arkfed.evaluation.stats import mean_ci, paired_difference

    def rows(before: list, after: list) -> dict:
        return {"before": mean_ci(before, (0, 1)), "after": mean_ci(after, (0, 1)), "after_minus_before": paired_difference(after, before)}

    out = {"seeds": [r["seed"] for r in records], "old": {}, "new": {}, "probe": {}}
    for name in old:
        out["old"][name] = rows([r["old_before"][name] for r in records], [r["old_after"][name] for r in records])
        out["old_new_only"] = out.get("old_new_only", {})
        out["old_new_only"][name] = rows([r["old_before"][name] for r in records], [r["old_after_new_only"][name] for r in records])
    out["new"] = {"alone": mean_ci([r["new_alone"] for r in records], (0, 1)),
                  "continued": mean_ci([r["new_continued"] for r in records], (0, 1)),
                  "new_only": mean_ci([r["new_only"] for r in records], (0, 1)),
                  "new_only_minus_alone": paired_difference([r["new_only"] for r in records], [r["new_alone"] for r in records]),
                  "continued_minus_alone": paired_difference([r["new_continued"] for r in records], [r["new_alone"] for r in records])}
    out["probe"] = rows([r["probe_before"] for r in records], [r["probe_after"] for r in records])
    out["new_site"] = new
    return out


def _ci(entry: dict) -> str:
    low, high = entry["ci95"]
    return f"{entry['mean']:.3f} [{low:.3f}, {high:.3f}]"


def _diff(entry: dict) -> str:
    low, high = entry["ci95"]
    return f"{entry['mean']:+.3f} [{low:+.3f}, {high:+.3f}], p={entry['p']:.2g}{' (resolved)' if entry['resolved'] else ''}"


def results_markdown(results: dict) -> str:
    new = results["new_site"]
    lines = [f"# Forgetting and gain: accruing {new} into a release of {', '.join(results['old'])}", "",
             f"Seeds {results['seeds']}; mean [95% t-interval]; differences paired by seed. Budget: {results['budget_name']} "
             f"{json.dumps(results['budget'])}.", "",
             "| old site (own test AUC, teacher) | release | after accrual | after - before (forgetting = -) |", "|---|---|---|---|"]
    for name, row in results["old"].items():
        lines.append(f"| {name} | {_ci(row['before'])} | {_ci(row['after'])} | {_diff(row['after_minus_before'])} |")
    lines += ["", "| old site, after a continued run of the new site alone (release heads, not visited) | release | after | "
              "after - before (forgetting = -) |", "|---|---|---|---|"]
    for name, row in results["old_new_only"].items():
        lines.append(f"| {name} | {_ci(row['before'])} | {_ci(row['after'])} | {_diff(row['after_minus_before'])} |")
    n = results["new"]
    lines += ["", f"| {new} (own test AUC, teacher) | alone | accrued into the release | accrued - alone |", "|---|---|---|---|",
              f"| {new} | {_ci(n['alone'])} | {_ci(n['continued'])} | {_diff(n['continued_minus_alone'])} |",
              f"| {new}, continued alone from the release | {_ci(n['alone'])} | {_ci(n['new_only'])} | "
              f"{_diff(n['new_only_minus_alone'])} |",
              "",
              f"| {new} linear probe, frozen teacher | release (held out) | after accrual | after - before |", "|---|---|---|---|",
              f"| probe all labels | {_ci(results['probe']['before'])} | {_ci(results['probe']['after'])} | "
              f"{_diff(results['probe']['after_minus_before'])} |", "",
              f"Wall time {results['minutes']:.1f} min on {results['environment']}.", ""]
    return "\n".join(lines)


def benchmark_forgetting(site_refs: Sequence[str] | None, new: str | None, budget: Budget, out: Path, budget_name: str = "custom",
                         log: Log | None = None) -> dict:
    """The whole benchmark into ``out``; returns the results (also ``results.json`` / ``results.md``)."""
    import os

    from arkfed.benchmarking.accrual import benchmark_sites, cache_images
    from arkfed.benchmarking.resume import add_record, read_records
    from arkfed.io import write_text_atomic

    log = log or (lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True))
    sites = cache_images(benchmark_sites(site_refs, budget, out), budget.img_size, log)
    new = new or (DEMO_NEW if not site_refs else list(sites)[-1])
    if new not in sites:
        raise ArkfedError(f"--new {new!r} is not one of the sites {sorted(sites)}")
    old = [n for n in sites if n != new]
    if not old:
        raise ArkfedError("the benchmark needs at least one old site besides the new one")
    out.mkdir(parents=True, exist_ok=True)
    from arkfed.benchmarking.accrual import budget_setup
    from arkfed.benchmarking.resume import check_setup

    check_setup({"benchmark": "forgetting", "budget": budget_setup(budget), "old": old, "new": new}, out)
    done = read_records(out)
    start = time.perf_counter()
    for seed in budget.seeds:
        if f"seed:{seed}" not in done:
            add_record(out, done, {"key": f"seed:{seed}", **run_seed(old, new, sites, budget, seed, out, log)})
    records = sorted((r for r in done.values() if r["seed"] in budget.seeds), key=lambda r: r["seed"])
    results = summarise(records, old, new)
    results.update({"budget_name": budget_name, "budget": asdict(budget), "minutes": (time.perf_counter() - start) / 60,
                    "environment": f"{os.cpu_count()} CPUs, load {', '.join(f'{x:.1f}' for x in os.getloadavg())}"})
    write_text_atomic(out / "results.json", json.dumps(results, indent=2, allow_nan=True) + "\n")
    write_text_atomic(out / "results.md", results_markdown(results))
    return results
