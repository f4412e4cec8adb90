"""What differential privacy costs: ``arkfed benchmark privacy``.

The demo federation (demo-nih, demo-chexpert, demo-shenzhen; demo-vindr held out) trained with
cyclic Ark at every site without DP and with every site's budget at epsilon = 8, 4 and 1
(:mod:`arkfed.ark.privacy`: DP-SGD with Opacus, ``max_grad_norm`` 1, delta 1 / (10 N), RDP
accountant, the whole budget for this one run), paired by seed (same initialisation, data order
and visit seeds in every arm). All arms use ``norm: group`` (GroupNorm in test_resnet: DP-SGD
cannot train BatchNorm), so the arms differ only in DP. Per arm, mean over seeds with a 95%
t-interval (:func:`arkfed.evaluation.stats.mean_ci`):

- each site's own test mean AUC of the teacher with its teacher head (the loop's last evaluation);
- the held-out site's linear probe on the teacher's frozen backbone features (all labels);
- the membership-inference audit (:mod:`arkfed.evaluation.privacy_audit`, loss threshold, training
  vs test images of each site with its teacher head; the mean over the sites per seed), and its
  TPR at 1% FPR;
- epsilon spent (the largest over the sites, as their budgets' accountants report it) and the
  visit time of DP over no DP (the mean visit's wall-clock seconds, same seed and site, on this
  machine's CPU), with the whole arm's CPU time (training and scoring, one torch thread) beside it:
  on a shared machine wall-clock time is inflated by the others' load, CPU time much less.

Each site's budget ledger lives in its own state folder per arm and seed (``OUT/state/``), fresh
each run: the budget is for this run alone. ``records.jsonl`` keeps one line per (arm, seed); a
rerun with the same ``--out`` skips what is there. Budgets as :mod:`arkfed.benchmarking.budget`.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from arkfed.benchmarking.accrual import DEMO_HELD_OUT, benchmark_sites, cache_images, environment
from arkfed.benchmarking.arms import compute_settings, train_config
from arkfed.benchmarking.budget import Budget, torch_device

Log = Callable[[str], None]
EPSILONS: tuple[float | None, ...] = (None, 8.0, 4.0, 1.0)


def arm_name(epsilon: float | None) -> str:
    return "no DP" if epsilon is None else f"eps {epsilon:g}"


def private_sites(sites: Mapping, epsilon: float | None, state: Path) -> dict:
    """The sites with ``privacy: {epsilon}`` in their policy and a fresh state folder each (their ledgers)."""
    from arkfed.site.policy import PrivacyPolicy

    out = {}
    for name, site in sites.items():
        shutil.rmtree(state / name, ignore_errors=True)
        policy = site.config.policy.model_copy(update={"privacy": None if epsilon is None else PrivacyPolicy(epsilon=epsilon)})
        out[name] = dataclasses.replace(site, config=site.config.model_copy(update={"policy": policy, "state_dir": state / name}))
    return out


def held_out_probe(teacher, target, budget: Budget, seed: int) -> float:
    """The held-out site's linear probe (all labels) on the teacher's frozen backbone features."""
    from arkfed.evaluation.embeddings import embed_table
    from arkfed.evaluation.linear_probe import probe_embeddings

    device = str(torch_device(budget))
    train, test = (embed_table(teacher, target.split(s), target.schema, "backbone", 64, device) for s in ("train", "test"))
    return float(probe_embeddings(train, test, target.schema, None, seed=seed)["mean_auc"])


def run_arm(epsilon: float | None, sources: Sequence[str], sites: Mapping, held_out: str, budget: Budget, seed: int,
            out: Path, log: Log) -> dict:
    """Train one arm (one seed), then score it: own test AUCs, held-out probe, audit, epsilon, visit times."""
    from arkfed.evaluation.privacy_audit import audit_privacy
    from arkfed.evaluation.sources import model_heads
    from arkfed.model.weights import load_ark_model
    from arkfed.run.folder import read_metrics
    from arkfed.run.local import train_local

    key = f"{arm_name(epsilon)}:s{seed}"
    folder = out / "runs" / key.replace(" ", "-").replace(":", "_")
    shutil.rmtree(folder, ignore_errors=True)
    chosen = private_sites({n: sites[n] for n in sources}, epsilon, out / "state" / folder.name)
    config = train_config(sources, budget, seed)
    config = config.model_copy(update={"model": config.model.model_copy(update={"norm": "group"})})
    start, cpu = time.perf_counter(), time.process_time()
    summary = train_local(config, folder, sites=chosen, compute={n: compute_settings(budget) for n in sources})
    train_seconds = time.perf_counter() - start
    records = read_metrics(folder)
    teacher = load_ark_model(folder, "teacher").eval()
    heads, _ = model_heads(folder, "teacher")
    audits = {n: audit_privacy(teacher, heads[n], chosen[n], "test", str(torch_device(budget)), 64, n_boot=0, seed=seed)
              for n in sources if n in heads}
    record = {
        "key": key, "arm": arm_name(epsilon), "epsilon": epsilon, "seed": seed, "train_seconds": train_seconds,
        "own": {n: _auc(summary["sites"].get(n, {}).get("teacher", {}).get("mean_auc")) for n in sources},
        "held_out_probe": held_out_probe(teacher, sites[held_out], budget, seed),
        "attack_auc": {n: a["attack_auc"] for n, a in audits.items()},
        "tpr_at_1pct_fpr": {n: a["tpr_at_0.01_fpr"] for n, a in audits.items()},
        **visit_figures(records, sources), "cpu_seconds": time.process_time() - cpu,
    }
    log(f"{key}: trained in {train_seconds:.0f}s; own {_short(record['own'])}; held-out probe {record['held_out_probe']:.3f}; "
        f"attack {_short(record['attack_auc'])}; epsilon {_short(record['epsilon_spent'])}")
    return record


def visit_figures(records: Sequence[dict], sources: Sequence[str]) -> dict:
    """From a run's metrics: each site's last epsilon spent, mean visit seconds, and the visits refused for privacy."""
    visits = [r for r in records if r.get("kind") == "visit"]

    def spent(name):
        return max((r["epsilon_spent"] for r in visits if r["site"] == name and "epsilon_spent" in r), default=None)

    return {"epsilon_spent": {n: spent(n) for n in sources},
            "visit_seconds": {n: float(np.mean([r["seconds"] for r in visits if r["site"] == n] or [np.nan])) for n in sources},
            "refused": sum(1 for r in records if r.get("kind") == "skip" and "privacy" in str(r.get("reason")))}


def random_init_record(sources: Sequence[str], sites: Mapping, held_out: str, budget: Budget, seed: int) -> dict:
    """The reference for the held-out probe: the same probe on a randomly initialised backbone."""
    from arkfed.evaluation.linear_probe import random_model
    from arkfed.spec import ModelSpec

    spec = ModelSpec(model=budget.model, img_size=budget.img_size, projector_dim=budget.projector_dim, norm="group")
    cpu = time.process_time()
    probe = held_out_probe(random_model(spec, seed).eval(), sites[held_out], budget, seed)
    return {"key": f"random init:s{seed}", "arm": "random init", "epsilon": "random", "seed": seed, "held_out_probe": probe,
            "cpu_seconds": time.process_time() - cpu}


def _auc(value) -> float:
    return float("nan") if value is None else float(value)


def _short(values: Mapping) -> str:
    return ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())


def summarise(records: Sequence[dict], sources: Sequence[str]) -> dict:
    """Per arm, mean and 95% t-interval over seeds of every figure (the time ratios paired by seed, and site)."""
    from arkfed.evaluation.stats import mean_ci

    plain = {r["seed"]: r for r in records if r["epsilon"] is None}
    arms = {}
    for epsilon in EPSILONS:
        rows = sorted((r for r in records if r["epsilon"] == epsilon), key=lambda r: r["seed"])
        if rows:
            arms[arm_name(epsilon)] = _arm_summary(rows, None if epsilon is None else plain, sources)
    randoms = [r["held_out_probe"] for r in records if r["epsilon"] == "random"]
    if randoms:
        arms["random init"] = {"held_out_probe": mean_ci(randoms, (0, 1))}
    return arms


def _arm_summary(rows: Sequence[dict], plain: Mapping[int, dict] | None, sources: Sequence[str]) -> dict:
    """One arm's figures over its seeds; ``plain``: the no-DP records by seed (None for the no-DP arm itself)."""
    from arkfed.evaluation.stats import mean_ci

    paired = [r for r in rows if plain and r["seed"] in plain]
    return {
        "seeds": [r["seed"] for r in rows],
        "own": {n: mean_ci([r["own"][n] for r in rows], (0, 1)) for n in sources},
        "held_out_probe": mean_ci([r["held_out_probe"] for r in rows], (0, 1)),
        "attack_auc": mean_ci([np.mean(list(r["attack_auc"].values())) for r in rows], (0, 1)),
        "tpr_at_1pct_fpr": mean_ci([np.mean(list(r["tpr_at_1pct_fpr"].values())) for r in rows], (0, 1)),
        "epsilon_spent": max((v for r in rows for v in r["epsilon_spent"].values() if v is not None), default=None),
        "visit_time_ratio": mean_ci([r["visit_seconds"][n] / plain[r["seed"]]["visit_seconds"][n] for r in paired for n in sources])
        if plain else None,
        "arm_cpu_ratio": mean_ci([r["cpu_seconds"] / plain[r["seed"]]["cpu_seconds"] for r in paired]) if plain else None,
        "refused_visits": sum(r["refused"] for r in rows),
    }


def _cell(ci: dict | None) -> str:
    if ci is None:
        return "-"
    low, high = ci["ci95"]
    return f"{ci['mean']:.3f}" + ("" if not np.isfinite(low) else f" [{low:.3f}, {high:.3f}]")


def markdown(results: dict) -> str:
    sources, arms = results["sources"], results["arms"]
    head = ["arm", *[f"{n} own test AUC" for n in sources], f"{results['held_out']} probe AUC", "attack AUC", "TPR@1%FPR",
            "epsilon spent", "visit time DP/no DP", "arm CPU time DP/no DP"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, arm in arms.items():
        if "own" not in arm:  # the random-init reference: the probe only
            lines.append("| " + " | ".join([name, *["-"] * len(sources), _cell(arm["held_out_probe"]), *["-"] * 5]) + " |")
            continue
        eps = "-" if arm["epsilon_spent"] is None else f"{arm['epsilon_spent']:.2f}"
        ratio = "1" if arm["visit_time_ratio"] is None else _cell(arm["visit_time_ratio"])
        cpu = "1" if arm.get("arm_cpu_ratio") is None else _cell(arm["arm_cpu_ratio"])
        cells = [name, *[_cell(arm["own"][n]) for n in sources], _cell(arm["held_out_probe"]), _cell(arm["attack_auc"]),
                 _cell(arm["tpr_at_1pct_fpr"]), eps, ratio, cpu]
        lines.append("| " + " | ".join(cells) + " |")
    b = results["budget"]
    lines.append("")
    lines.append(f"Mean over seeds {results['seeds']} with 95% t-intervals. {b['model']} (GroupNorm) at {b['img_size']} px, "
                 f"{b['epochs']} rounds of cyclic Ark, batch {b['batch_size']}, lr {b['lr']}; DP: max_grad_norm 1, "
                 f"delta 1/(10 N), RDP accountant. Training {results['train_minutes']:.0f} min wall-clock, "
                 f"{results['cpu_minutes']:.0f} CPU-min with scoring, all arms and seeds, on {results['environment']['device']} "
                 f"({results['environment']['cpu_count']} cores; load average when summarised "
                 f"{', '.join(f'{x:.1f}' for x in results['environment']['load_average'] or [])}).")
    return "\n".join(lines) + "\n"


def benchmark_privacy(budget: Budget, out: Path, epsilons: Sequence[float | None] = EPSILONS, log: Log | None = None) -> dict:
    """Every arm of every seed (skipping those in ``out/records.jsonl``), then ``results.json`` and ``results.md``."""
    from arkfed.benchmarking.resume import add_record, read_records
    from arkfed.evaluation.sources import write_results
    from arkfed.io import atomic_write

    log = log or (lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True))
    out.mkdir(parents=True, exist_ok=True)
    sites = cache_images(benchmark_sites(None, budget, out), budget.img_size, log)
    sources = [n for n in sites if n != DEMO_HELD_OUT]
    done = read_records(out)
    start = time.perf_counter()
    for seed in budget.seeds:
        if f"random init:s{seed}" not in done:
            add_record(out, done, random_init_record(sources, sites, DEMO_HELD_OUT, budget, seed))
        for epsilon in epsilons:
            if f"{arm_name(epsilon)}:s{seed}" not in done:
                add_record(out, done, run_arm(epsilon, sources, sites, DEMO_HELD_OUT, budget, seed, out, log))
    records = [r for r in done.values() if r["seed"] in budget.seeds]
    results = {"sources": sources, "held_out": DEMO_HELD_OUT, "seeds": list(budget.seeds), "budget": dataclasses.asdict(budget),
               "minutes": (time.perf_counter() - start) / 60, "environment": environment(budget),
               "train_minutes": sum(r.get("train_seconds", 0.0) for r in done.values() if r["seed"] in budget.seeds) / 60,
               "cpu_minutes": sum(r["cpu_seconds"] for r in done.values() if r["seed"] in budget.seeds) / 60,
               "arms": summarise(records, sources), "records": records}
    write_results(out, results)
    text = markdown(results)
    atomic_write(out / "results.md", lambda tmp: tmp.write_text(text))
    attack = {k: v["attack_auc"]["mean"] for k, v in results["arms"].items() if "attack_auc" in v}
    log(f"results: {out / 'results.json'}, {out / 'results.md'}; attack AUC {json.dumps(attack)}")
    return results
