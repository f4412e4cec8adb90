"""The accrual benchmark: its statistics, its baselines and the whole command on a tiny federation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from arkfed.benchmarking.accrual import Plan
from arkfed.benchmarking.arms import train_config
from arkfed.benchmarking.baselines import pooled_schedule, train_pooled
from arkfed.benchmarking.budget import BUDGETS
from arkfed.benchmarking.plan import curve_subsets, orderings
from arkfed.demo.generate import ALL_DEMO_SITES, generate_demo_federation
from arkfed.errors import ArkfedError
from arkfed.evaluation.stats import mean_ci, paired_difference
from arkfed.site.load import load_site

SMOKE = BUDGETS["smoke"]
COUNTS = {"demo-nih": 40, "demo-chexpert": 40, "demo-shenzhen": 40, "demo-vindr": 48}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """All four demo sites at 32 px, a few dozen images each."""
    out = tmp_path_factory.mktemp("accrual-demo")
    paths = generate_demo_federation(out, seed=0, size=32, counts=COUNTS, sites=[s.name for s in ALL_DEMO_SITES])
    return {site.name: site for site in (load_site(p) for p in paths)}


@pytest.fixture(scope="module")
def tiny_yamls(tiny):
    return {name: site.config.root.parent / "sites" / f"{name}.yaml" for name, site in tiny.items()}


def test_paired_statistics_match_the_t_distribution():
    # differences 1, 1, 2: mean 4/3, sd 1/sqrt(3), t = 4 with 2 d.o.f. -> p = 0.0572, half-width 4.303 / 3
    result = paired_difference([1.0, 2.0, 3.0], [0.0, 1.0, 1.0])
    assert result["mean"] == pytest.approx(4 / 3)
    assert result["p"] == pytest.approx(0.05719, abs=1e-4)
    assert result["ci95"][0] == pytest.approx(4 / 3 - 4.3027 / 3, abs=1e-3)
    assert not result["resolved"]  # the interval still contains 0
    assert paired_difference([1.0, 2.0, 3.0, 4.0], [0.0, 1.1, 1.9, 3.0])["resolved"]
    nan_pair = paired_difference([1.0, float("nan"), 3.0], [0.0, 1.0, 1.0])  # a missing seed drops its pair
    assert nan_pair["n"] == 2 and nan_pair["mean"] == pytest.approx(1.5)
    assert np.isnan(mean_ci([0.7])["ci95"][0])  # one seed: no interval, never a claim


def test_curve_uses_rotations_and_every_single_site():
    assert orderings(["a", "b", "c"], 3) == [("a", "b", "c"), ("b", "c", "a"), ("c", "a", "b")]
    subsets = curve_subsets(["a", "b", "c"], 2)
    assert subsets[1] == [("a",), ("b",), ("c",)]  # k = 1: every source, whatever the orderings
    assert subsets[2] == [("a", "b"), ("b", "c")] and subsets[3] == [("a", "b", "c")]
    plan = Plan(["a", "b", "c", "h"], "h", BUDGETS["default"])
    assert ("ark", ("a", "b", "c", "h")) in plan.jobs and ("ark", ("h",)) in plan.jobs  # joined, alone
    assert {arm for arm, _ in plan.jobs} == {"ark", "ark-c0", "pooled", "parallel", "matched"}
    assert [names for arm, names in plan.jobs if arm == "matched"] == [("a",), ("b",), ("c",)]  # each source at Ark's cost
    assert len(plan.jobs) == len(set(plan.jobs)) == 4 + 1 + 3 + 1 + 3 + 3
    with pytest.raises(ArkfedError, match="not one of the sites"):
        Plan(["a", "b"], "z", SMOKE)


def test_pooled_interleaves_every_site_and_trains_each_head_on_its_own_batches(tiny):
    schedule = pooled_schedule({"a": 3, "b": 2}, seed=1)
    assert sorted(schedule) == ["a", "a", "a", "b", "b"] and schedule != pooled_schedule({"a": 3, "b": 2}, seed=2)
    sites = {n: tiny[n] for n in ("demo-nih", "demo-shenzhen")}
    config = train_config(list(sites), SMOKE, seed=0)
    from arkfed.run.start import initial_state

    before = initial_state(config, {n: s.schema for n, s in sites.items()})
    state = train_pooled(config, sites)
    assert state.teacher is state.student  # no teacher
    for name in sites:  # both heads moved: each got its site's batches
        assert not torch.equal(state.heads[name].weight, before.heads[name].weight.to(state.heads[name].weight.device))
    again = train_pooled(config, sites)
    assert all(torch.equal(a, b) for a, b in zip(state.student.state_dict().values(), again.student.state_dict().values()))


def test_benchmark_command_writes_results_table_and_figure_and_resumes(tiny_yamls, tmp_path):
    from arkfed.cli import app

    sites = ",".join(str(tiny_yamls[n]) for n in ("demo-nih", "demo-shenzhen", "demo-vindr"))
    out = tmp_path / "bench"
    args = ["benchmark", "accrual", "--sites", sites, "--held-out", "demo-vindr", "--budget", "smoke", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["held_out"] == "demo-vindr" and results["sources"] == ["demo-nih", "demo-shenzhen"]
    join = results["join_vs_alone"]
    assert set(join) == {"demo-nih", "demo-shenzhen", "demo-vindr"}
    for entry in join.values():
        for metric in ("teacher", "student", "finetune"):
            assert 0.0 <= entry[metric]["alone"]["mean"] <= 1.0 and 0.0 <= entry[metric]["joined"]["mean"] <= 1.0
    points = results["accrual"]["points"]
    assert sorted(points) == ["1", "2"] and points["1"]["federations"] == [["demo-nih"], ["demo-shenzhen"]]
    assert set(results["held_out_metrics"]) == {"probe all", "probe 2-shot", "finetune"}
    assert {"single demo-nih", "Ark (cyclic)", "Ark, c = 0", "pooled multi-task", "random init"} <= set(results["baselines"])
    assert "Join vs alone" in (out / "results.md").read_text() and (out / "accrual.png").stat().st_size > 10_000
    records = (out / "records.jsonl").read_text().splitlines()
    # random init, 3 alone, joined, Ark on the sources (k = 2), c0, pooled, parallel, 2 sources at Ark's cost
    assert len(records) == 1 + 3 + 1 + 1 + 3 + 2
    _check_matched_arm(results, [json.loads(r) for r in records], (out / "results.md").read_text())

    parallel = yaml.safe_load((out / "runs" / "parallel_demo-nih+demo-shenzhen_s0" / "config.yaml").read_text())
    assert (parallel["mode"], parallel["weighting"]) == ("parallel", "equal")  # the one loop, Ark+'s equal average
    c0 = yaml.safe_load((out / "runs" / "ark-c0_demo-nih+demo-shenzhen_s0" / "config.yaml").read_text())
    assert c0["settings"]["max_consistency"] == 0

    again = CliRunner().invoke(app, args)  # everything is in records.jsonl: nothing retrains
    assert again.exit_code == 0 and (out / "records.jsonl").read_text().splitlines() == records
    other = CliRunner().invoke(app, [*args, "--epochs", "2"])
    assert isinstance(other.exception, ArkfedError) and "another setup" in str(other.exception)


def _check_matched_arm(results: dict, records: list[dict], md: str) -> None:
    """Each source alone at Ark's cost: as many counted steps and images as Ark on the sources,
    more than E epochs of that site alone, and Ark minus it reported beside Ark minus the single site."""
    by_key = {r["key"]: r for r in records}
    ark = by_key["ark:demo-nih+demo-shenzhen:s0"]
    assert ark["steps"] == 2 * 2 and ark["images"] == ark["steps"] * SMOKE.batch_size  # E = 1 round, 2 capped visits
    for site in ("demo-nih", "demo-shenzhen"):
        matched, single = by_key[f"matched:{site}:s0"], by_key[f"ark:{site}:s0"]
        assert (matched["steps"], matched["images"]) == (ark["steps"], ark["images"])
        assert single["steps"] < matched["steps"] and matched["sites"] == [site]
        row = results["baselines"][f"single {site}, Ark's steps"]
        assert row["arm"] == "matched" and row["steps"] == ark["steps"] and "ark_minus_this" in row["finetune"]
    assert "Is Ark better than one big site at the same cost?" in md and "Ark − single (Ark's cost)" in md
