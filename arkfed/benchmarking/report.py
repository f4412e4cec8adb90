"""The accrual benchmark's summary, markdown tables and figure, from its per-seed records.

Everything here is a pure function of ``records.jsonl`` (one record per trained arm and seed),
so the tables and the figure can be rebuilt from a finished or a partial run without retraining.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from arkfed.evaluation.stats import PAIRED_DIFFERENCE_TEST, mean_ci, paired_difference

HELD_OUT_ORDER = ("probe all", "finetune")


def _index(records: Sequence[dict]) -> dict[tuple, dict[int, dict]]:
    """(arm, sites) -> seed -> record."""
    out: dict[tuple, dict[int, dict]] = {}
    for r in records:
        out.setdefault((r["arm"], tuple(r["sites"])), {})[int(r["seed"])] = r
    return out


def _value(record: dict | None, *path: str) -> float:
    for key in path:
        if record is None or not isinstance(record, dict) or key not in record:
            return float("nan")
        record = record[key]
    return float("nan") if record is None else float(record)


def held_out_metrics(records: Sequence[dict]) -> list[str]:
    names: list[str] = []
    for r in records:
        for key in r.get("held_out") or {}:
            if key not in names:
                names.append(key)
    return sorted(names, key=lambda k: (k != "probe all", k == "finetune", k))


class _Series:
    """Per-seed values of one quantity of one arm, read from the records (NaN where missing)."""

    def __init__(self, records: Sequence[dict], seeds: Sequence[int]):
        self.idx = _index(records)
        self.seeds = list(seeds)

    def __call__(self, arm: str, names: Sequence[str], *path: str) -> list[float]:
        runs = self.idx.get((arm, tuple(names)), {})
        return [_value(runs.get(s), *path) for s in self.seeds]

    def has(self, arm: str, names: tuple[str, ...]) -> bool:
        return (arm, names) in self.idx


def _seed_means(columns: Sequence[Sequence[float]]) -> list[float]:
    """The mean of each row of per-seed values (NaN where a row has none)."""
    return [float(np.nanmean(v)) if np.isfinite(v).any() else float("nan") for v in np.asarray(columns, dtype=float)]


def _join_vs_alone(plan, series: _Series) -> dict:
    """Per site and own metric: alone, joined (all sites) and the paired joined - alone."""
    from arkfed.benchmarking.plan import OWN_METRICS

    join: dict = {}
    for site in plan.sites:
        join[site] = {}
        for metric in OWN_METRICS:
            alone, joined = series("ark", (site,), "own", site, metric), series("ark", tuple(plan.sites), "own", site, metric)
            join[site][metric] = {"alone": {**mean_ci(alone), "values": alone}, "joined": {**mean_ci(joined), "values": joined},
                                  "joined_minus_alone": paired_difference(joined, alone)}
    return join


def _curve_point(feds: Sequence[tuple[str, ...]], metrics: Sequence[str], series: _Series) -> dict:
    """One k of the curve: per held-out metric, each federation's per-seed values and their mean."""
    point: dict = {"federations": [list(f) for f in feds]}
    for metric in metrics:
        per_fed = {"+".join(f): series("ark", f, "held_out", metric) for f in feds}
        per_seed = _seed_means(np.array(list(per_fed.values())).T) if per_fed else []
        point[metric] = {**mean_ci(per_seed), "values": per_seed, "per_federation": per_fed}
    return point


def _accrual_curve(plan, metrics: Sequence[str], series: _Series) -> dict:
    """The held-out site's scores after Ark on k of the sources, and the rise from k = 1 to the top."""
    from arkfed.benchmarking.plan import curve_subsets

    subsets = curve_subsets(plan.sources, plan.budget.orderings)
    curve: dict = {"held_out": plan.held_out, "orderings": [list(o) for o in _orderings(plan)], "points": {}}
    for k, feds in subsets.items():
        curve["points"][k] = _curve_point(feds, metrics, series)
    top = max(subsets)
    points = curve["points"]
    curve["rise"] = {m: paired_difference(points[top][m]["values"], points[1][m]["values"]) for m in metrics} if top > 1 else {}
    return curve


def _baseline_arms(plan) -> list[tuple[str, str, tuple[str, ...]]]:
    """(label, arm, sites) of every baseline row, in table order."""
    sources = tuple(plan.sources)
    arms = [(f"single {s}", "ark", (s,)) for s in plan.sources]
    arms += [(matched_label(s), "matched", (s,)) for s in plan.sources]
    arms += [("Ark (cyclic)", "ark", sources), ("Ark, c = 0", "ark-c0", sources), ("pooled multi-task", "pooled", sources),
             (f"parallel ({plan.weighting})", "parallel", sources), ("random init", "random", ()),
             ("ImageNet init", "imagenet", ())]
    return arms


def matched_label(site: str) -> str:
    return f"single {site}, Ark's steps"


def _baselines(plan, metrics: Sequence[str], series: _Series) -> dict:
    """Each arm that ran: its held-out scores, Ark minus it (paired), its own sites' teacher AUC,
    and the training steps and images it took (mean over seeds)."""
    reference = {m: series("ark", tuple(plan.sources), "held_out", m) for m in metrics}
    baselines: dict = {}
    for label, arm, names in _baseline_arms(plan):
        if not series.has(arm, names):
            continue
        row: dict = {"arm": arm, "sites": list(names)}
        for count in ("steps", "images"):
            row[count] = mean_ci(series(arm, names, count))["mean"]
        for m in metrics:
            values = series(arm, names, "held_out", m)
            row[m] = {**mean_ci(values), "values": values, "ark_minus_this": paired_difference(reference[m], values)}
        if names:
            own_mean = _seed_means(np.array([series(arm, names, "own", n, "teacher") for n in names]).T)
            row["own_teacher"] = {**mean_ci(own_mean), "values": own_mean}
        baselines[label] = row
    return baselines


def _complete_seeds(plan, records: Sequence[dict], seeds: Sequence[int]) -> list[int]:
    """The seeds for which every planned job has a record."""
    from arkfed.benchmarking.plan import run_key

    expected = [run_key(arm, names, 0).rsplit(":", 1)[0] for arm, names in plan.jobs]
    keys = {r["key"] for r in records}
    return [s for s in seeds if all(f"{k}:s{s}" in keys for k in expected)]


def summarise(plan, records: Sequence[dict], minutes: float) -> dict:
    """Join vs alone per site, the accrual curve and the baselines, each with per-seed values."""
    seeds = list(plan.budget.seeds)
    series = _Series(records, seeds)
    metrics = held_out_metrics(records)
    job_minutes = sum(r.get("train_seconds", 0.0) + r.get("eval_seconds", 0.0) for r in records) / 60
    return {"sites": list(plan.sites), "held_out": plan.held_out, "sources": list(plan.sources), "seeds": seeds,
            "complete_seeds": _complete_seeds(plan, records, seeds), "job_minutes": job_minutes,
            "weighting": plan.weighting, "imagenet": str(plan.imagenet) if plan.imagenet else None, "test": PAIRED_DIFFERENCE_TEST,
            "minutes": minutes, "records": len(records), "join_vs_alone": _join_vs_alone(plan, series),
            "accrual": _accrual_curve(plan, metrics, series), "baselines": _baselines(plan, metrics, series),
            "held_out_metrics": metrics}


def _orderings(plan) -> list[tuple[str, ...]]:
    from arkfed.benchmarking.plan import orderings

    return orderings(plan.sources, plan.budget.orderings)


# --- markdown ------------------------------------------------------------------------------------


def _fmt(stat: dict) -> str:
    mean = stat.get("mean", float("nan"))
    if mean is None or not math.isfinite(mean):
        return "–"
    low, high = stat.get("ci95", [None, None])
    if low is None or not math.isfinite(low):
        return f"{mean:.3f}"
    return f"{mean:.3f} [{low:.3f}, {high:.3f}]"


def _fmt_diff(stat: dict) -> str:
    mean = stat.get("mean", float("nan"))
    if mean is None or not math.isfinite(mean):
        return "–"
    text = f"{mean:+.3f}"
    low, high = stat.get("ci95", [None, None])
    if low is not None and math.isfinite(low):
        text += f" [{low:+.3f}, {high:+.3f}]"
    p = stat.get("p")
    if p is not None and math.isfinite(p):
        text += f" p={p:.2g}"
    return text + (" **resolved**" if stat.get("resolved") else "")


def _load(env: dict) -> str:
    load = env.get("load_average")
    return "?" if not load else "/".join(f"{x:.1f}" for x in load)


def _md_header(results: dict) -> list[str]:
    """Title, setup (sites, budget, time, machine) and how to read the tables."""
    b = results.get("budget", {})
    env = results.get("environment", {})
    n = len(results["seeds"])
    partial = [] if len(results.get("complete_seeds", [])) == n else [
        "", f"**PARTIAL**: all arms finished for seeds {results.get('complete_seeds')} of {results['seeds']}; "
        "the other seeds count only where their arm finished (paired statistics use complete pairs)."]
    return [
        "# Does joining pay? (`arkfed benchmark accrual`)",
        "",
        f"Sites {', '.join(results['sites'])}; held out for the curve: **{results['held_out']}**. Budget "
        f"`{results.get('budget_name', '?')}`: {b.get('model')} at {b.get('img_size')} px, E = {b.get('epochs')} epochs of each "
        f"site's data (batch {b.get('batch_size')}, lr {b.get('lr')}, EMA per {b.get('ema')}), {n} seeds "
        f"{results['seeds']}, {b.get('finetune_epochs')} fine-tuning epochs. Its jobs took {results.get('job_minutes', 0):.1f} min "
        f"wall summed ({results.get('cpu_minutes', 0):.1f} CPU-min) on {env.get('device', '?')} ({env.get('cpu_count', '?')} CPUs, "
        f"torch threads {env.get('torch_threads')}, load {_load(env)}), {env.get('date', '')}.",
        "",
        f"Test mean AUC, mean over seeds [95% t-interval]; differences are paired by seed, {results['test']}; "
        "**resolved** = the interval excludes 0.",
        *partial,
    ]


def _md_join(results: dict) -> list[str]:
    """Table 1: each site alone vs joined."""
    lines = ["", "## 1. Join vs alone: each site's own test AUC", "",
             "| site | model | alone | joined (all sites) | joined − alone |", "| --- | --- | --- | --- | --- |"]
    for site, entry in results["join_vs_alone"].items():
        for metric, label in (("teacher", "teacher, own head"), ("student", "student, own head"), ("finetune", "fine-tuned teacher")):
            e = entry[metric]
            lines.append(f"| {site} | {label} | {_fmt(e['alone'])} | {_fmt(e['joined'])} | {_fmt_diff(e['joined_minus_alone'])} |")
    return lines


def _md_curve(results: dict) -> list[str]:
    """Table 2: the accrual curve on the held-out site, and its rise."""
    curve = results["accrual"]
    metrics = results["held_out_metrics"]
    lines = ["", f"## 2. The accrual curve on {results['held_out']} (Ark on k of the other sites)", "",
             f"Orderings: {'; '.join(' → '.join(o) for o in curve['orderings'])}.", "",
             "| k | federations | " + " | ".join(metrics) + " |", "| --- | --- | " + " | ".join("---" for _ in metrics) + " |"]
    for k, point in curve["points"].items():
        feds = ", ".join("+".join(f) for f in point["federations"])
        lines.append(f"| {k} | {feds} | " + " | ".join(_fmt(point.get(m, {})) for m in metrics) + " |")
    if curve.get("rise"):
        top = max(int(k) for k in curve["points"])
        lines += ["", f"Rise (k = {top} − mean of k = 1): " + "; ".join(f"{m} {_fmt_diff(v)}" for m, v in curve["rise"].items())]
    return lines


def _md_baselines(results: dict) -> list[str]:
    """Table 3: the baselines on the sources, and Ark minus each."""
    metrics = results["held_out_metrics"]
    lines = ["", f"## 3. Baselines on the sources ({', '.join(results['sources'])}), same budget", "",
             "| arm | training steps / images | own sites' teacher AUC | " + " | ".join(f"held-out {m}" for m in metrics)
             + " | Ark − arm, " + " | Ark − arm, ".join(HELD_OUT_ORDER) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in metrics) + " | " + " | ".join("---" for _ in HELD_OUT_ORDER) + " |"]
    for label, row in results["baselines"].items():
        own = _fmt(row["own_teacher"]) if "own_teacher" in row else "–"
        cost = f"{_count(row.get('steps'))} / {_count(row.get('images'))}" if row.get("sites") else "–"
        diffs = [_fmt_diff(row[m]["ark_minus_this"]) if m in row and label != "Ark (cyclic)" else "–" for m in HELD_OUT_ORDER]
        scores = " | ".join(_fmt(row.get(m, {})) for m in metrics)
        lines.append(f"| {label} | {cost} | {own} | {scores} | " + " | ".join(diffs) + " |")
    return lines


def _count(value) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.0f}"


def _md_same_cost(results: dict) -> list[str]:
    """Table 3b: Ark on the sources vs each source alone, for E epochs and at Ark's cost."""
    rows, ark = results["baselines"], results["baselines"].get("Ark (cyclic)")
    if ark is None or not any(matched_label(s) in rows for s in results["sources"]):
        return []
    lines = ["", "## 3b. Is Ark better than one big site at the same cost?", "",
             f"Each source alone for E epochs of its data (fewer steps than Ark) and for as many steps and images as Ark on all "
             f"the sources ({_count(ark.get('steps'))} steps, {_count(ark.get('images'))} images); held-out {results['held_out']}.", "",
             "| site | steps / images, E epochs | Ark − single (E epochs): " + ", ".join(HELD_OUT_ORDER)
             + " | steps / images, Ark's cost | Ark − single (Ark's cost): " + ", ".join(HELD_OUT_ORDER) + " |",
             "| --- | --- | --- | --- | --- |"]
    for site in results["sources"]:
        single, matched = rows.get(f"single {site}", {}), rows.get(matched_label(site), {})
        cells = []
        for row in (single, matched):
            cells.append(f"{_count(row.get('steps'))} / {_count(row.get('images'))}")
            cells.append("; ".join(_fmt_diff(row[m]["ark_minus_this"]) if m in row else "–" for m in HELD_OUT_ORDER))
        lines.append(f"| {site} | " + " | ".join(cells) + " |")
    return lines


def markdown(results: dict) -> str:
    """``results.md``: the setup, then the tables."""
    lines = [*_md_header(results), *_md_join(results), *_md_curve(results), *_md_baselines(results), *_md_same_cost(results)]
    return "\n".join(lines) + "\n"


# --- figure --------------------------------------------------------------------------------------


def figure(results: dict, path: Path) -> None:
    """Three panels: joined − alone per site, the accrual curve, the baselines on the held-out site;
    each 95% interval drawn from its lower to its upper end, missing values left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from arkfed.evaluation.plots import as_floats, draw_intervals

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    ax = axes[0]
    sites = list(results["join_vs_alone"])
    width = 0.27
    for i, metric in enumerate(("teacher", "student", "finetune")):
        diffs = [results["join_vs_alone"][s][metric]["joined_minus_alone"] for s in sites]
        at = np.arange(len(sites)) + (i - 1) * width
        ax.bar(at, as_floats(d.get("mean") for d in diffs), width, label=metric)
        draw_intervals(ax, at, *_bounds(diffs), capsize=3)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(sites)), sites, rotation=15)
    ax.set_ylabel("joined − alone, own test mean AUC")
    ax.set_title("1. Does joining pay? (95% CI)")
    ax.legend(fontsize=8)

    ax = axes[1]
    curve = results["accrual"]
    ks = sorted(int(k) for k in curve["points"])
    for metric in results["held_out_metrics"]:
        stats = [curve["points"][_key(curve["points"], k)][metric] for k in ks]
        (line,) = ax.plot(ks, as_floats(s.get("mean") for s in stats), marker="o", label=metric)
        draw_intervals(ax, ks, *_bounds(stats), ecolor=line.get_color(), capsize=3)
    ax.set_xticks(ks)
    ax.set_xlabel("k: sites Ark trained on")
    ax.set_ylabel(f"{curve['held_out']} test mean AUC")
    ax.set_title("2. Accrual curve (held-out site)")
    ax.legend(fontsize=8)

    ax = axes[2]
    labels = list(results["baselines"])
    shown = []
    for i, metric in enumerate(HELD_OUT_ORDER):
        stats = [results["baselines"][a].get(metric, {}) for a in labels]
        at = np.arange(len(labels)) + (i - 0.5) * 0.4
        means, (low, high) = as_floats(s.get("mean") for s in stats), _bounds(stats)
        ax.barh(at, means, 0.4, label=metric)
        draw_intervals(ax, at, low, high, horizontal=True)
        shown += [v for v in (*means, *low, *high) if math.isfinite(v)]
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    if shown:
        ax.set_xlim(max(0.0, min(shown) - 0.05), min(1.0, max(shown) + 0.05))
    ax.set_xlabel(f"{results['held_out']} test mean AUC")
    ax.set_title("3. Baselines on the sources")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _key(points: dict, k: int):
    return k if k in points else str(k)


def _bounds(stats: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper ends of the 95% intervals (NaN where there is none)."""
    from arkfed.evaluation.plots import interval_bounds

    return interval_bounds([s.get("ci95") for s in stats])


def write_outputs(results: dict, out: Path) -> None:
    from arkfed.io import json_safe, write_text_atomic

    write_text_atomic(out / "results.json", json.dumps(json_safe(results), indent=2) + "\n")
    write_text_atomic(out / "results.md", markdown(results))
    from arkfed.evaluation.plots import try_figure

    try_figure(lambda: figure(results, out / "accrual.png"), "accrual.png")  # a failure warns; the numbers above stay
