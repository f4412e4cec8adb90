"""Label-efficiency curves: a transfer score per initialisation at several training-set sizes.

With a few hundred labelled images lung segmentation saturates whatever the encoder (a random
init scored as well as a pretrained one), so one number at "all" cannot say what pretraining is
worth. Ark reports transfer as a curve over the number of labelled images; so do ``segment``,
``finetune`` and ``linear-probe``:

- each seed draws one training subset per size, shared by every initialisation (the
  comparison is paired);
- per initialisation and size: the mean over seeds with a Student-t 95% interval;
- per size, the model against each other initialisation (random init, ``--compare`` models):
  a paired test (named in the output), with all the tests of the report corrected together
  (Holm by default);
- a sentence saying at which sizes pretraining (the model vs random init) helps, hurts or makes
  no detectable difference; and one PNG with the curves.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from arkfed.errors import ArkfedError
from arkfed.evaluation.plots import as_floats, draw_intervals, interval_bounds
from arkfed.evaluation.stats import CORRECTION_NAMES, PAIRED_T, WILCOXON, Correction, adjust_pvalues, mean_ci, paired_t, wilcoxon_p
from arkfed.io import atomic_write

ALL = "all"
REFERENCE = "model"
RANDOM = "random"


def parse_sizes(text: str) -> list[int | None]:
    """``"5,10,20,all"`` -> ``[5, 10, 20, None]`` (None: the whole training split)."""
    sizes: list[int | None] = []
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        if part.lower() == ALL:
            sizes.append(None)
            continue
        try:
            value = int(part)
        except ValueError:
            raise ArkfedError(f"--train-sizes takes comma-separated counts and 'all', got {text!r}") from None
        if value < 1:
            raise ArkfedError(f"--train-sizes: sizes must be at least 1, got {value}")
        sizes.append(value)
    if not sizes:
        raise ArkfedError("--train-sizes is empty")
    return sorted(set(sizes), key=lambda s: float("inf") if s is None else s)


def size_label(size: int | None) -> str:
    return ALL if size is None else str(size)


def subset_rows(pool: int, size: int | None, seed: int) -> np.ndarray:
    """The training rows of one (size, seed): the same for every initialisation; nested over
    sizes (a seed's 10 rows contain its 5), so a curve's steps differ only by the added data."""
    if size is None or size >= pool:
        return np.arange(pool)
    order = np.random.default_rng([seed, 0xC0FFEE]).permutation(pool)
    return np.sort(order[:size])


def _mean_and_ci(scores: list[float]) -> tuple[float, list[float] | None]:
    """A curve point: the mean over seeds and its 95% t-interval within [0, 1] (None with fewer
    than two seeds)."""
    stat = mean_ci(scores, bounds=(0.0, 1.0))
    return stat["mean"], stat["ci95"] if stat["n"] >= 2 else None


def summarise_curves(records: list[dict], sizes: list[int | None], metric: str, per_case: dict | None = None,
                     correction: Correction = "holm", alpha: float = 0.05, unit: str = "training images") -> dict:
    """Means, CIs and the paired, corrected comparisons of a curve.

    ``records``: ``{"init", "size" (label), "seed", "score", "train_size"}``. ``per_case``:
    ``{(init, size label): seeds x test cases}`` scores; when given the test is the Wilcoxon
    signed-rank test over test cases (per-case scores averaged over seeds), else the paired
    t-test over seeds.
    """
    inits = list(dict.fromkeys(r["init"] for r in records))
    labels = [size_label(s) for s in sizes]
    table = {init: {label: _curve_point(records, init, label) for label in labels} for init in inits}
    comparisons, family = _comparisons(table, [i for i in inits if i != REFERENCE], labels, per_case)
    _adjust(comparisons, family, correction, alpha, per_case is None)
    return {
        "metric": metric, "unit": unit, "sizes": labels, "inits": table, "reference": REFERENCE, "comparisons": comparisons,
        "test": WILCOXON if per_case else PAIRED_T, "correction": correction, "correction_name": CORRECTION_NAMES[correction],
        "alpha": alpha, "tests_in_family": int(np.isfinite([comparisons[o][lab]["p"] for o, lab in family]).sum()) if family else 0,
        "interval": "mean over seeds with a Student-t 95% CI",
        "pretraining": pretraining_verdict(comparisons.get(RANDOM), labels, unit, len({r["seed"] for r in records})),
    }


def _curve_point(records: list[dict], init: str, label: str) -> dict:
    """One initialisation at one size: the mean over seeds with its Student-t CI, and the values by seed."""
    rows = sorted((r for r in records if r["init"] == init and r["size"] == label), key=lambda r: r["seed"])
    mean, ci = _mean_and_ci([r["score"] for r in rows])
    return {"mean": mean, "ci": ci, "seeds": [r["seed"] for r in rows], "values": [r["score"] for r in rows],
            "train_size": rows[0]["train_size"] if rows else None}


def _paired_p(ref: dict, oth: dict, per_case: dict | None, other: str, label: str) -> float:
    """The model against ``other`` at one size: Wilcoxon over test cases, or the paired t-test over shared seeds."""
    if per_case:
        return wilcoxon_p(np.nanmean(per_case[(REFERENCE, label)], axis=0), np.nanmean(per_case[(other, label)], axis=0))
    by_seed = {s: v for s, v in zip(oth["seeds"], oth["values"])}
    pairs = [(v, by_seed[s]) for s, v in zip(ref["seeds"], ref["values"]) if s in by_seed]
    return paired_t([a for a, _ in pairs], [b for _, b in pairs])


def _comparisons(table: dict, others: list[str], labels: list[str], per_case: dict | None) -> tuple[dict, list[tuple[str, str]]]:
    """Per other initialisation and size: the model's difference and raw p; and the family of tests, in order."""
    comparisons: dict = {}
    family = []
    for other in others:
        comparisons[other] = {}
        for label in labels:
            ref, oth = table[REFERENCE][label], table[other][label]
            comparisons[other][label] = {"difference": ref["mean"] - oth["mean"], "p": _paired_p(ref, oth, per_case, other, label)}
            family.append((other, label))
    return comparisons, family


def _adjust(comparisons: dict, family: list[tuple[str, str]], correction: Correction, alpha: float, over_seeds: bool) -> None:
    """Adjust the family's p-values together; mark each comparison significant or not, with its verdict."""
    adjusted = adjust_pvalues([comparisons[o][lab]["p"] for o, lab in family], correction)
    for (other, label), q in zip(family, adjusted):
        entry = comparisons[other][label]
        entry["p_adjusted"] = float(q)
        entry["significant"] = bool(np.isfinite(q) and q < alpha)
        entry["verdict"] = _verdict(entry, over_seeds)


def _verdict(entry: dict, over_seeds: bool) -> str:
    if not np.isfinite(entry["p"]):
        return "not tested (no variation over seeds)" if over_seeds else "not tested"
    if not entry["significant"]:
        return "no significant difference"
    return "model better" if entry["difference"] > 0 else "model worse"


def pretraining_verdict(vs_random: dict | None, labels: list[str], unit: str, seeds: int = 2) -> dict:
    """Where the model beats (or loses to) its random initialisation, in one sentence."""
    if not vs_random:
        return {"helps_at": [], "hurts_at": [], "sentence": "no random-init baseline in this report"}
    helps = [lab for lab in labels if vs_random[lab]["significant"] and vs_random[lab]["difference"] > 0]
    hurts = [lab for lab in labels if vs_random[lab]["significant"] and vs_random[lab]["difference"] < 0]
    parts = []
    if helps:
        parts.append(f"pretraining helps at {', '.join(helps)} {unit}")
    if hurts:
        parts.append(f"random init is better at {', '.join(hurts)} {unit}")
    untested = [lab for lab in labels if not np.isfinite(vs_random[lab]["p"])]
    rest = [lab for lab in labels if lab not in helps and lab not in hurts and lab not in untested]
    if rest:
        parts.append(f"no significant difference at {', '.join(rest)} {unit}")
    if untested:
        why = "one seed: give --seeds 0,1,2 to test" if seeds < 2 else "no variation over seeds"
        parts.append(f"not tested at {', '.join(untested)} {unit} ({why})")
    return {"helps_at": helps, "hurts_at": hurts, "untested_at": untested, "sentence": "; ".join(parts)}


def shown_ci(point: dict) -> list[float] | None:
    """The interval a table or figure shows for a curve point: the one over seeds, or, when the
    seeds do not vary (one seed, or a deterministic fit on all labels), the bootstrap over test
    cases of the first seed's run."""
    ci = point.get("ci")
    if ci and None not in ci and ci[1] - ci[0] > 1e-12:
        return ci
    return point.get("bootstrap_ci") or ci


def draw_curves(ax, summary: dict, ylabel: str, names: dict[str, str] | None = None) -> None:
    """Mean and 95% CI (band and capped interval, whether or not it contains the mean) per
    initialisation over training-set size on ``ax`` (log scale; 'all' at its real size); '*'
    above a size where the model differs from random init after correction."""
    import matplotlib.pyplot as plt

    names = names or {}
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    xs_all = []
    for i, (init, points) in enumerate(summary["inits"].items()):
        shown = [points[label] for label in summary["sizes"]
                 if points[label]["train_size"] is not None and np.isfinite(as_floats([points[label]["mean"]])[0])]
        xs, ys = [p["train_size"] for p in shown], [p["mean"] for p in shown]
        lows, highs = interval_bounds([shown_ci(p) for p in shown])  # NaN where a point has no interval: no band there
        xs_all += xs
        style = "-" if init == REFERENCE else ("--" if init == RANDOM else "-.")
        ax.plot(xs, ys, style, marker="o", ms=4, color=colours[i % len(colours)], label=names.get(init, init))
        ax.fill_between(xs, lows, highs, color=colours[i % len(colours)], alpha=0.15, lw=0)
        draw_intervals(ax, xs, lows, highs, ecolor=colours[i % len(colours)], alpha=0.6)  # also where the band has no neighbour
    vs_random = summary["comparisons"].get(RANDOM, {})
    for label in summary["sizes"]:
        if vs_random.get(label, {}).get("significant"):
            p = summary["inits"][REFERENCE][label]
            top = as_floats([p["mean"], summary["inits"][RANDOM][label]["mean"]])
            if p["train_size"] is not None and np.isfinite(top).any():
                ax.annotate("*", (p["train_size"], float(np.nanmax(top))), textcoords="offset points", xytext=(0, 8), ha="center",
                            fontsize=14)
    if xs_all and min(xs_all) > 0:
        ax.set_xscale("log")
        ticks = sorted(set(xs_all))
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
    low, high = ax.get_ylim()  # scores live in [0, 1]; a wide CI from two seeds must not hide the curves
    ax.set_ylim(max(low, 0.0), min(high, 1.02))
    ax.set_xlabel(f"{summary['unit']} (log scale)")
    ax.set_ylabel(f"{ylabel} (mean, 95% CI over seeds)")
    ax.legend(fontsize=8)


def plot_curves(summary: dict, path: Path, ylabel: str, title: str) -> Path:
    """One PNG with the curves of :func:`draw_curves` and the test that set the stars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    draw_curves(ax, summary, ylabel)
    ax.set_title(title, fontsize=10)
    test = summary["test"].split(" (")[0]
    fig.text(0.01, 0.01, f"* model vs random init: {test}, {summary['correction']}-adjusted p < {summary['alpha']}",
             fontsize=7, color="grey")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path
