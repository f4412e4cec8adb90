"""The rich tables the reuse commands print: one builder per command, over the command's results.

Each builder takes the dict a command writes to ``results.json`` (plus the few settings the dict
does not carry) and returns a :class:`rich.table.Table` with a caption saying what the numbers
are; the ``arkfed`` commands only print it.
"""

from __future__ import annotations

import math

from rich.table import Table

from arkfed.data.schema import LabelSchema
from arkfed.evaluation.curves import shown_ci
from arkfed.evaluation.evaluate import TOO_FEW

BOOT_NOTE = "† no variation over seeds: 95% CI from a percentile bootstrap over test cases of one run"


def fmt(value) -> str:
    """A score with three decimals; None and NaN read ``n/a``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.3f}"


def fmt_ci(ci) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "n/a"


def protocol_caption(result: dict) -> list[str]:
    """The reading protocol the site was read under (and its note): the end of every caption over a site."""
    if "protocol" not in result:
        return []
    return [f"protocol {result['protocol']}", *([result["protocol_note"]] if result.get("protocol_note") else [])]


def new_table(title: str, *columns: str, numbers: bool = True) -> Table:
    """The first column left-aligned and unwrapped; the others right-aligned when they hold numbers."""
    table = Table(title=title)
    for i, name in enumerate(columns):
        if i == 0:
            table.add_column(name, justify="left", no_wrap=True)
        else:
            table.add_column(name, justify="right" if numbers else "left")
    return table


# -- export -----------------------------------------------------------------------------------
def export_table(result: dict) -> Table:
    """The files of an export folder (``ExportResult.to_json()``) and what each holds."""
    calibrated = [f.removeprefix("batchnorm/").removesuffix(".safetensors") for f in result["files"] if f.startswith("batchnorm/")]
    table = new_table(f"export {result['folder']}", "file", "content", numbers=False)
    bn = f", BatchNorm statistics of site {calibrated[0]}" if calibrated else ""
    table.add_row("model.safetensors", f"{result['architecture']} backbone, {result['num_features']} features{bn}")
    table.add_row("config.json", "timm pretrained config + arkfed spec")
    for site, classes in sorted(result["heads"].items()):
        table.add_row(f"heads/{site}.safetensors", f"{result['heads_of']} head: " + ", ".join(classes))
    for name in calibrated:
        table.add_row(f"batchnorm/{name}.safetensors", "BatchNorm statistics of its training images")
    table.add_row("README.md", "model card")
    if result["notes"]:
        table.caption = result["notes"][0]
    return table


# -- evaluate ---------------------------------------------------------------------------------
def evaluate_table(result: dict, schema: LabelSchema, min_positives: int) -> Table:
    """Per class: positives, each model's AUC and 95% CI; then the mean AUC (and accuracy for multiclass)."""
    models = result["models"]
    names = list(models)
    first = models[names[0]]
    table = new_table(f"{result['site']} / {result['split']} ({'ten-crop' if result['ten_crop'] else 'single crop'})", "class", "positives",
                      *[f"{n} AUC" for n in names], *[f"{n} 95% CI" for n in names])
    for c in schema.classes:
        mark = f" ({TOO_FEW})" if c in first["too_few_positives"] else ""
        table.add_row(c + mark, str(first["positives"][c]), *[fmt(models[n]["auc"].get(c)) for n in names],
                      *[fmt_ci(models[n].get("auc_ci", {}).get(c)) for n in names])
    table.add_row("[b]mean AUC[/b]", "", *[fmt(models[n]["mean_auc"]) for n in names],
                  *[fmt_ci(models[n].get("mean_auc_ci")) for n in names])
    if schema.task == "multiclass":
        table.add_row("accuracy", "", *[fmt(models[n].get("accuracy")) for n in names],
                      *[fmt_ci(models[n].get("accuracy_ci")) for n in names])
    table.caption = evaluate_caption(result, first, min_positives)
    return table


def evaluate_caption(result: dict, first: dict, min_positives: int) -> str:
    """What the table's numbers are: the CI unit, the mean's classes, the heads and BatchNorm."""
    parts = []
    if "bootstrap" in first:
        b = first["bootstrap"]
        parts.append(f"95% CIs: percentile bootstrap over {b['unit']}s ({b['resamples']} resamples)")
    if first["too_few_positives"]:
        parts.append(f"classes with fewer than {min_positives} positives are marked '{TOO_FEW}'; mean AUC without them: "
                     + ", ".join(f"{n} {fmt(m.get('mean_auc_min_positives'))}" for n, m in result["models"].items()))
    heads = ", ".join(f"{n}: {h}/" for n, h in result.get("heads", {}).items())
    if heads:
        parts.append(f"heads {heads}")
    if any(m.get("bn_recalibrated") for m in result["models"].values()):
        parts.append("BatchNorm statistics re-estimated on the site's training images (as in training)")
    parts += result.get("notes", []) + protocol_caption(result)
    return "; ".join(parts)


# -- curves (linear-probe, finetune, segment) -------------------------------------------------
def curve_point(point: dict) -> str:
    """``mean [CI]`` of a curve point; † marks a bootstrap CI (see :func:`curves.shown_ci`)."""
    ci = shown_ci(point)
    return f"{fmt(point['mean'])} {fmt_ci(ci)}{'†' if ci is not None and ci is point.get('bootstrap_ci') else ''}"


def any_bootstrap(curve: dict) -> bool:
    """Whether some point of the curve shows a bootstrap CI (the table then explains the †)."""
    points = [p for pts in curve["inits"].values() for p in pts.values()]
    return any(p.get("bootstrap_ci") is not None and shown_ci(p) is p.get("bootstrap_ci") for p in points)


def delta(difference: float, c: dict) -> str:
    """A difference with its star and adjusted p-value, or "not tested"."""
    if c.get("p") is None or not c["p"] == c["p"]:  # NaN: not tested
        return f"{difference:+.3f} (not tested)"
    return f"{difference:+.3f}{'*' if c['significant'] else ''} ({fmt(c['p_adjusted'])})"


def curve_table(curve: dict, title: str, extra_caption: str = "", result: dict | None = None) -> Table:
    """Rows: training-set sizes; columns: each initialisation's mean [95% CI], then the model's
    difference to each other initialisation with its adjusted p-value."""
    inits = list(curve["inits"])
    others = list(curve["comparisons"])
    table = new_table(title, "size", *[f"{i} {curve['metric']} [95% CI]" for i in inits], *[f"model − {o} (p adj)" for o in others])
    for label in curve["sizes"]:
        n = curve["inits"]["model"][label]["train_size"]
        cells = [curve_point(curve["inits"][i][label]) for i in inits]
        for o in others:
            c = curve["comparisons"][o][label]
            cells.append(delta(c["difference"], c))
        table.add_row(f"{label} ({n})" if label == "all" else label, *cells)
    caption = [curve["pretraining"]["sentence"],
               f"CIs: {curve['interval']}; p: {curve['test']}, {curve['correction_name']}-adjusted over {curve['tests_in_family']} tests; "
               f"* p adj < {curve['alpha']}"]
    if any_bootstrap(curve):
        caption.append(BOOT_NOTE)
    if extra_caption:
        caption.append(extra_caption)
    table.caption = "; ".join(caption + protocol_caption(result or {}))
    return table


def _left_out(few: list[str], min_positives: int) -> str:
    return f"classes with fewer than {min_positives} test positives: {', '.join(few)}" if few else ""


def linear_probe_table(result: dict) -> Table:
    """:func:`curve_table` of ``arkfed linear-probe``."""
    title = f"linear probe on {result['site']}: test mean AUC by shots per class ({result['features']} features)"
    return curve_table(result["curve"], title, _left_out(result["too_few_positives"], result["min_positives"]), result)


def finetune_table(result: dict, epochs: int, min_positives: int) -> Table:
    """:func:`curve_table` of ``arkfed finetune``."""
    few = result["runs"][0]["test"].get("too_few_positives", [])
    return curve_table(result["curve"], f"fine-tuning on {result['site']} ({epochs} epochs): test mean AUC by training-set size",
                       _left_out(few, min_positives), result)


def segment_table(result: dict) -> Table:
    """:func:`curve_table` of ``arkfed segment``."""
    return curve_table(result["curve"], f"segmentation transfer: Dice on {result['test_pairs']} held-out pairs "
                       f"({result['encoder']} encoder, {result['img_size']} px)", f"all-foreground mask Dice {fmt(result['trivial_dice'])}")


# -- bias -------------------------------------------------------------------------------------
BIAS_PAIRS = ("M->M", "F->M", "F->F", "M->F")


def _bias_cells(e: dict, sex: str) -> list[str]:
    """The five cells of one test sex: same-sex AUC [CI], other-sex AUC, gap (starred), p, p adj."""
    other = "F" if sex == "M" else "M"
    ci = e.get(f"{sex}->{sex}_ci")
    p_adjusted = f"({TOO_FEW}: {e[f'positives_on_{sex}']})" if e[f"too_few_on_{sex}"] else fmt(e[f"p_adjusted_on_{sex}"])
    return [f"{fmt(e[f'{sex}->{sex}'])} {fmt_ci(ci) if ci else ''}".strip(), fmt(e[f"{other}->{sex}"]),
            fmt(e[f"gap_on_{sex}"]) + ("*" if e[f"significant_on_{sex}"] else ""), fmt(e[f"p_on_{sex}"]), p_adjusted]


def _bias_caption(result: dict, unscored: list[str]) -> str:
    resamples = result["bootstrap"]["resamples"]
    caption = [f"* {result['correction_name']}-adjusted DeLong p < {result['alpha']} over {result['tests_in_family']} tests",
               f"CIs: percentile bootstrap over {result['bootstrap']['unit']}s ({resamples} resamples)"
               if resamples else "no CIs (--bootstrap 0)"]
    if result["too_few_positives"]:
        caption.append(f"findings with fewer than {result['min_positives']} positives in a test group are marked '{TOO_FEW}' "
                       f"({', '.join(result['too_few_positives'])}): not tested, not starred, left out of the means")
    if unscored:
        caption.append(f"not scorable on this test split (one label value): {', '.join(unscored)}")
    return "; ".join(caption + protocol_caption(result))


def bias_table(result: dict) -> Table:
    """Per finding and test sex: the AUC of the same-sex and the other-sex probe, the gap and its
    DeLong p-values; findings the test split cannot score are named in the caption."""
    table = new_table(f"gender bias on {result['site']} (train {result['train_sizes']}, test {result['test_sizes']}); "
                      "A→B: trained on A, tested on B",
                      "finding", "M→M [95% CI]", "F→M", "gap M", "p", "p adj", "F→F [95% CI]", "M→F", "gap F", "p", "p adj")
    unscored = []
    for name, e in result["findings"].items():
        if all(fmt(e[k]) == "n/a" for k in BIAS_PAIRS):
            unscored.append(name)
            continue
        table.add_row(name, *_bias_cells(e, "M"), *_bias_cells(e, "F"))
    means = result["mean_auc"]
    table.add_row("[b]mean AUC[/b]", fmt(means["M->M"]), fmt(means["F->M"]), "", "", "", fmt(means["F->F"]), fmt(means["M->F"]), "", "", "")
    table.caption = _bias_caption(result, unscored)
    return table


# -- compare ----------------------------------------------------------------------------------
def _shots_label(label: str) -> str:
    return f"{label}-shot" if label != "all" else label


def compared_size(curve: dict) -> str:
    """The size of the comparison column: the largest the seeds could test (at "all" a probe is deterministic)."""
    tested = [lab for lab in curve["sizes"] if any(c[lab]["p"] == c[lab]["p"] for c in curve["comparisons"].values())]
    return (tested or curve["sizes"])[-1]


def _compare_columns(result: dict, at: str, with_bias: bool) -> list[str]:
    curve = result["probe"]["curve"]
    columns = ["model", "own head AUC [95% CI]", *[f"probe {_shots_label(lab)} [95% CI]" for lab in curve["sizes"]],
               f"Δ vs {result['reference']} ({_shots_label(at)}; p adj)"]
    if result.get("zero_shot"):
        columns.append("zero-shot AUC [95% CI]")
    if "finetune" in result:
        columns.append("fine-tuned [95% CI]")
    if with_bias:
        columns.append("bias: significant gaps")
    return columns


def _compare_cells(row: dict, result: dict, at: str, with_bias: bool) -> list[str]:
    """One model's cells: own head, probe per size, Δ to the reference, fine-tuned, bias counts."""
    curve = result["probe"]["curve"]
    key = row["key"]
    own = row.get("own head")
    cells = [f"{fmt(own[0])} {fmt_ci(own[1])}" if own else "n/a (no head)"]
    cells += [curve_point(curve["inits"][key][lab]) for lab in curve["sizes"]]
    c = curve["comparisons"].get(key, {}).get(at)
    cells.append("reference" if key == "model" else delta(-c["difference"], c))
    if result.get("zero_shot"):
        z = row.get("zero-shot")
        missing = "n/a (no class known)" if row["name"] in result["zero_shot"] else "n/a (no heads)"
        cells.append(f"{fmt(z[0])} {fmt_ci(z[1])}" if z else missing)
    if "finetune" in result:
        f = row.get("fine-tuned")
        cells.append(f"{fmt(f[0])} {fmt_ci(f[1])}" if f else "n/a")
    if with_bias:
        b = row.get("bias")
        cells.append(f"{b['significant_gaps']} of {b['tests']}" if b else "n/a")
    return cells


def _compare_caption(result: dict) -> str:
    curve = result["probe"]["curve"]
    settings = result["settings"]
    own_unit = (next(iter(result["own_head"].values()))["bootstrap"]["unit"] + "s" if result["own_head"] and settings["n_boot"]
                else "test cases")
    caption = [f"probe CIs: {curve['interval']}; Δ: {curve['test']}, {curve['correction_name']}-adjusted; * p adj < {curve['alpha']}",
               f"own head: BatchNorm recalibrated on the site's training images, bootstrap CI over {own_unit}"]
    if any_bootstrap(curve):
        caption.append(BOOT_NOTE)
    if result["probe"]["too_few_positives"]:
        few = ", ".join(result["probe"]["too_few_positives"])
        caption.append(f"classes with fewer than {settings['min_positives']} test positives: {few}")
    if "skipped" in result.get("bias", {}):
        caption.append(f"bias skipped: {result['bias']['skipped']}")
    caption += _zero_shot_caption(result.get("zero_shot", {}))
    caption += result["notes"] + protocol_caption(result)
    return "; ".join(caption)


def compare_table(result: dict) -> Table:
    """``arkfed compare``: one row per model (:func:`arkfed.evaluation.compare.comparison_rows`) and the
    random init's probe curve."""
    from arkfed.evaluation.compare import comparison_rows

    curve = result["probe"]["curve"]
    at = compared_size(curve)
    with_bias = result["settings"]["bias"] and "skipped" not in result.get("bias", {})
    columns = _compare_columns(result, at, with_bias)
    seeds = len(curve["inits"]["model"][curve["sizes"][0]]["seeds"])
    table = new_table(f"comparison on {result['site']} (test split, {seeds} seeds)", *columns)
    for row in comparison_rows(result):
        table.add_row(row["name"], *_compare_cells(row, result, at, with_bias))
    if "random" in curve["inits"]:
        table.add_row("random init", "", *[curve_point(curve["inits"]["random"][lab]) for lab in curve["sizes"]], "",
                      *([""] * (len(columns) - 3 - len(curve["sizes"]))))
    table.caption = _compare_caption(result)
    return table


def _zero_shot_caption(zero: dict) -> list[str]:
    """What the zero-shot column scores, and per model the classes it could not."""
    if not zero:
        return []
    caption = ["zero-shot: the model's heads for other sites, mapped through the findings vocabulary (mean probability where "
               "several serve a class), own BatchNorm statistics, no training; mean AUC over the mapped classes only"]
    for name, z in zero.items():
        if "skipped" in z:
            caption.append(f"zero-shot {name}: {z['skipped']}")
        elif z["unknown_classes"]:
            caption.append(f"zero-shot {name}: not scored (no head knows them): {', '.join(z['unknown_classes'])}")
    return caption


# -- zero-shot --------------------------------------------------------------------------------
def zero_shot_table(result: dict) -> Table:
    """Per class of the site: the canonical finding, the heads/classes that served it, positives,
    AUC and 95% CI; classes no head knows are rows marked 'not scored'; then the mean AUC."""
    scores = result["scores"]
    table = new_table(f"zero-shot on {result['site']} / {result['split']} ({'ten-crop' if result['ten_crop'] else 'single crop'})",
                      "class", "served by", "positives", "AUC", "95% CI")
    for name, entry in result["classes"].items():
        if not entry["from"]:
            table.add_row(name, f"not scored: {result['unknown_reasons'][name]}", "", "", "")
            continue
        mark = f" ({TOO_FEW})" if name in scores["too_few_positives"] else ""
        canonical = f"{entry['canonical']}: " if entry["canonical"] != name else ""
        table.add_row(name + mark, canonical + ", ".join(entry["from"]), str(scores["positives"][name]), fmt(scores["auc"][name]),
                      fmt_ci(scores.get("auc_ci", {}).get(name)))
    table.add_row("[b]mean AUC[/b]", f"over {', '.join(result['mean_auc_classes'])}", "", fmt(scores["mean_auc"]),
                  fmt_ci(scores.get("mean_auc_ci")))
    caption = [f"several heads for one class: {result['combine']}"]
    if "bootstrap" in scores:
        caption.append(f"95% CIs: percentile bootstrap over {scores['bootstrap']['unit']}s ({scores['bootstrap']['resamples']} resamples)")
    caption.append("BatchNorm statistics re-estimated on the site's training images (no labels)" if result["bn_recalibrated"]
                   else "the model's own BatchNorm statistics (no adaptation)")
    table.caption = "; ".join(caption + result["notes"] + protocol_caption(result))
    return table


# -- predict, report --------------------------------------------------------------------------
def predict_table(result: dict) -> Table:
    """Per head/class (and combined shared finding), the probability of each image."""
    from pathlib import Path

    entries = result["images"]
    table = new_table("zero-shot predictions (probabilities)", "head / class", *[Path(e["image"]).name for e in entries])
    for key in entries[0]["scores"]:
        table.add_row(key, *[fmt(e["scores"][key]) for e in entries])
    for finding in entries[0]["combined"]:
        table.add_row(f"[b]{finding}[/b] (combined: {', '.join(entries[0]['combined'][finding]['from'])})",
                      *[fmt(e["combined"][finding]["score"]) for e in entries])
    if result["notes"]:
        table.caption = result["notes"][0]
    return table


def report_table(result: dict) -> Table:
    """Per site of a run: last and best teacher mean AUC, last student mean AUC."""
    table = new_table(f"run {result['run']} ({result['rounds_evaluated']} rounds, {result['visits']} visits)",
                      "site", "teacher mean AUC", "student mean AUC", "best teacher", "best round")
    for row in result["sites"]:
        table.add_row(row["site"], fmt(row["teacher_mean_auc"]), fmt(row["student_mean_auc"]), fmt(row["best_teacher_mean_auc"]),
                      str(row["best_round"] or "n/a"))
    return table
