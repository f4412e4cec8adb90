"""``arkfed benchmark paper``'s summary and table, from its per-run records: the paper's published
value beside each measured one, with the budget, hardware, protocol, model and runs it was
measured under. A pure function of ``records.jsonl`` (plus the setup), so a partial run has a table."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

from arkfed.benchmarking.published import CODE_SOURCE, PAPER, PAPER_PROTOCOL, PAPER_RUNS_SOURCE, VALUES_SOURCE, Published
from arkfed.evaluation.stats import PAIRED_DIFFERENCE_TEST, mean_ci, paired_difference

INITS = ("model", "imagenet", "random")
NOT_PRESENT = "not present locally"
NO_IMAGENET = "not run (no local weights)"


def _score(record: dict | None) -> float:
    value = None if record is None else record.get("score")
    return float("nan") if value is None else float(value)


def _row(published: Published, site: str | None, by: dict, seeds: Sequence[int], imagenet: bool) -> dict:
    """One target: its published value and, where the site is here, each init's runs and the paired differences."""
    row: dict = {"target": published.target, "dataset": published.dataset, "metric": published.metric, "published": published.value,
                 "published_classes": published.classes, "published_source": published.source, "site": site}
    if site is None:
        return {**row, "status": NOT_PRESENT}
    values = {init: [_score(by.get((init, site, s))) for s in seeds] for init in INITS}
    row["status"] = "measured"
    for init in INITS:
        row[init] = {"status": NO_IMAGENET} if init == "imagenet" and not imagenet else \
            {**mean_ci(values[init], bounds=(0.0, 100.0)), "values": values[init]}
    row["model_minus_random"] = paired_difference(values["model"], values["random"])
    if imagenet:
        row["model_minus_imagenet"] = paired_difference(values["model"], values["imagenet"])
    return row


def summarise_paper(rows: Sequence[tuple[Published, str | None]], records: Sequence[dict], seeds: Sequence[int], imagenet: bool) -> dict:
    """Every target of the paper, measured where present (mean over runs, 95% t-interval, paired differences)."""
    by = {(r["init"], r["site"], int(r["seed"])): r for r in records if "init" in r}
    expected = {(init, site, s) for _, site in rows if site for init in INITS if init != "imagenet" or imagenet for s in seeds}
    complete = [s for s in seeds if all(k in by for k in expected if k[2] == s)]
    return {"rows": [_row(p, site, by, seeds, imagenet) for p, site in rows], "seeds": list(seeds), "complete_runs": complete,
            "paper": PAPER, "published_source": VALUES_SOURCE, "paper_protocol": PAPER_PROTOCOL, "code_source": CODE_SOURCE,
            "test": PAIRED_DIFFERENCE_TEST, "records": len(records),
            "cpu_minutes": sum(r.get("cpu_seconds", 0.0) for r in records) / 60}


# --- markdown ------------------------------------------------------------------------------------


def _cell(stat: dict) -> str:
    if "status" in stat and "mean" not in stat:
        return stat["status"]
    mean, n = stat.get("mean"), stat.get("n", 0)
    if mean is None or not math.isfinite(mean):
        return "–"
    low, high = stat.get("ci95", [None, None])
    interval = f" [{low:.2f}, {high:.2f}]" if low is not None and math.isfinite(low) else ""
    return f"{mean:.2f}{interval} (n = {n})"


def _diff(stat: dict | None) -> str:
    if not stat or stat.get("mean") is None or not math.isfinite(stat["mean"]):
        return "–"
    low, high = stat.get("ci95", [None, None])
    text = f"{stat['mean']:+.2f}" + (f" [{low:+.2f}, {high:+.2f}]" if low is not None and math.isfinite(low) else "")
    return text + (" **resolved**" if stat.get("resolved") else "")


def _hardware(env: dict) -> str:
    device = env.get("device", "?")
    gpu = f", {env['gpu']}" if env.get("gpu") else ""
    return f"{device}{gpu} ({env.get('cpu_count', '?')} CPUs, torch threads {env.get('torch_threads')}, torch {env.get('torch')})"


def _model(about: dict) -> str:
    spec = about.get("spec") or {}
    arch = f" ({spec['model']} at {spec.get('img_size')} px)" if spec.get("model") else ""
    if about.get("trained_here") and about.get("steps") is not None:
        return f"{about['source']}{arch}, E = {about.get('rounds')} rounds, {about['steps']} steps, {about.get('images')} images"
    return f"{about.get('source', '?')}{arch}"


def _md_header(results: dict) -> list[str]:
    b, env = results.get("budget", {}), results.get("environment", {})
    seeds = results["seeds"]
    demo = ["", "**Synthetic demo data: these numbers check the pipeline only; they are not comparable with the paper's.**"] \
        if results.get("synthetic") else []
    partial = [] if len(results.get("complete_runs", [])) == len(seeds) else [
        "", f"**PARTIAL**: every fine-tuning finished for runs {results.get('complete_runs')} of {seeds}."]
    reading = "; ".join(f"{site}: {how}" for site, how in results.get("reading", {}).items())
    return [
        "# The paper's table (`arkfed benchmark paper`)", *demo, *partial, "",
        f"- **Measured** under budget `{results.get('budget_name', '?')}`: fine-tuning epochs {b.get('finetune_epochs')} (lr "
        f"{b.get('finetune_lr')}, batch {b.get('batch_size')}, at most {b.get('finetune_max_steps') or 'all'} steps per epoch, "
        "AdamW, one-cycle schedule, best validation epoch tested; arkfed.evaluation.finetune).",
        f"- **Model**: {_model(results.get('model', {}))}. ImageNet: {results.get('imagenet') or NO_IMAGENET}.",
        f"- **Hardware**: {_hardware(env)}; {env.get('date', '')}; {results.get('cpu_minutes', 0):.1f} CPU-minutes of fine-tuning.",
        f"- **Protocol** `{results.get('protocol')}`: {reading}.",
        f"- **Runs**: n = {len(seeds)} per cell (seeds {seeds[0]}–{seeds[-1]}); the paper: {PAPER_RUNS_SOURCE}.",
        f"- **Published**: {VALUES_SOURCE}; {PAPER}.",
        "", f"Percent; measured = mean over runs [95% t-interval]; differences paired by run, {results['test']}; "
        "**resolved** = the interval excludes 0.",
    ]


def markdown(results: dict) -> str:
    """``results.md``: the setup, the table, the paper's protocol."""
    lines = [*_md_header(results), "",
             "| target | site here | metric | Ark-6, published | from the model, measured | from ImageNet, measured "
             "| from random init, measured | model − random | model − ImageNet |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in results["rows"]:
        head = f"| {row['target']} | {row['site'] or '–'} | {row['metric']} | {row['published']:.2f} (published)"
        if row["status"] == NOT_PRESENT:
            lines.append(f"{head} | {NOT_PRESENT} | – | – | – | – |")
            continue
        cells = [_cell(row[i]) for i in INITS] + [_diff(row.get("model_minus_random")), _diff(row.get("model_minus_imagenet"))]
        lines.append(f"{head} | " + " | ".join(cells) + " |")
    lines += ["", "What each published number averages: " + "; ".join(f"{r['target']}: {r['published_classes']}" for r in results["rows"])
              + ". Measured mAUC: the site's reported classes with both labels in its test split (CheXpert: the same five)."]
    if results.get("pretraining_only"):
        lines += ["", f"Sites not among the paper's targets (pretraining only): {', '.join(results['pretraining_only'])}."]
    lines += ["", "The paper's protocol (compare before reading a difference as arkfed's):", ""]
    lines += [f"- {key}: {value}" for key, value in results.get("paper_protocol", {}).items()]
    return "\n".join(lines) + "\n"


def write_paper_outputs(results: dict, out: Path) -> None:
    from arkfed.io import json_safe, write_text_atomic

    write_text_atomic(out / "results.json", json.dumps(json_safe(results), indent=2) + "\n")
    write_text_atomic(out / "results.md", markdown(results))
