"""A run with a DP site (in-process sites: the visit code a federated site runs too): epsilon per
visit in metrics.jsonl and the report, the budget charged across runs, and a spent budget refusing
the next visit while the run finishes with the other site, the refusal in both ends' logs."""

from __future__ import annotations

import json

from arkfed.config import TrainConfig, TrainSettings
from arkfed.run.local import train_local
from arkfed.site.budget import BudgetLedger
from arkfed.site.policy import SitePolicy
from arkfed.spec import ModelSpec
from run.test_train_local import synthetic_site

GROUP = ModelSpec(model="test_resnet", img_size=32, projector_dim=16, norm="group")


def sites(state_dir):
    dp = synthetic_site("a", ("x", "y"), 0, n=32)
    policy = SitePolicy(privacy={"epsilon": 3.0, "max_noise_multiplier": 2.0})
    dp.config = dp.config.model_copy(update={"state_dir": state_dir, "policy": policy})
    return {"a": dp, "b": synthetic_site("b", ("t",), 1, n=32)}


def config(rounds) -> TrainConfig:
    settings = TrainSettings(batch_size=8, max_steps_per_visit=2, lr=3e-3, crop_scale=(0.5, 1.0), ema="iteration")
    return TrainConfig(sites=["a", "b"], rounds=rounds, seed=5, model=GROUP, settings=settings)


def records(folder, kind):
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r.get("kind") == kind]


def test_a_spent_budget_refuses_the_next_run_and_the_run_goes_on_with_the_other_site(tmp_path):
    state = tmp_path / "site-a-state"
    train_local(config(2), tmp_path / "first", sites=sites(state))
    visits = records(tmp_path / "first", "visit")
    dp = [r for r in visits if r["site"] == "a"]
    assert len(dp) == 2 and all(r["epsilon_budget"] == 3.0 for r in dp)
    assert 0 < dp[0]["epsilon_spent"] < dp[1]["epsilon_spent"] <= 3.0
    assert all("epsilon_spent" not in r for r in visits if r["site"] == "b")
    ledger = BudgetLedger(state, sites(state)["a"].config.policy.privacy, 32)
    assert ledger.spent() == dp[1]["epsilon_spent"]

    summary = train_local(config(1), tmp_path / "second", sites=sites(state))  # another run on the same data
    skips = records(tmp_path / "second", "skip")
    assert [(s["site"], s["stage"]) for s in skips] == [("a", "visit")]
    assert skips[0]["reason"].startswith("policy_refused: privacy.epsilon: ") and "of 3.00 spent, this visit needs" in skips[0]["reason"]
    assert [r["site"] for r in records(tmp_path / "second", "visit")] == ["b"]
    assert summary and (tmp_path / "second" / "summary.json").is_file()  # the run finished
    assert "refused visit 0" in (state / "logs" / "privacy.log").read_text()  # the site's own log
    assert len(ledger.entries()) == 2  # the refused visit was not charged

    from arkfed.evaluation.recorded_run import read_run
    from arkfed.evaluation.report import summary_rows

    rows = {row["site"]: row for row in summary_rows(read_run(tmp_path / "first"))}
    assert rows["a"]["epsilon_spent"] == dp[1]["epsilon_spent"] and rows["b"]["epsilon_spent"] is None
