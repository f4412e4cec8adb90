"""The site's privacy budget (arkfed.site.budget): Opacus' own accountants, a ledger that survives
the process, the noise the budget allows, and the refusal of a visit it cannot pay for."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from arkfed.site.budget import BudgetLedger, PrivacyRefused, epsilon_of, noise_for, private_seed
from arkfed.site.config import SiteConfig
from arkfed.site.policy import PrivacyPolicy, Refusal


@pytest.mark.parametrize("kind, accountant", [("rdp", RDPAccountant), ("prv", PRVAccountant)])
def test_epsilon_is_opacus_accountant_stepped_directly(kind, accountant):
    sigma, q, steps, delta = 1.1, 0.05, 120, 1e-4
    direct = accountant()
    for _ in range(steps):
        direct.step(noise_multiplier=sigma, sample_rate=q)
    assert epsilon_of([(sigma, q, steps)], delta, kind) == pytest.approx(direct.get_epsilon(delta), rel=1e-6)
    # two visits in the ledger compose as Opacus composes them
    two = accountant()
    for s, n in ((sigma, 40), (2.0, 30)):
        for _ in range(n):
            two.step(noise_multiplier=s, sample_rate=q)
    assert epsilon_of([(sigma, q, 40), (2.0, q, 30)], delta, kind) == pytest.approx(two.get_epsilon(delta), rel=1e-6)


def test_noise_is_the_least_that_fits_the_planned_visits():
    q, steps, budget, delta = 0.1, 20, 4.0, 1e-4
    sigma = noise_for([], q, 3 * steps, budget, delta, "rdp")
    assert epsilon_of([(sigma, q, 3 * steps)], delta, "rdp") <= budget
    assert epsilon_of([(sigma * 0.98, q, 3 * steps)], delta, "rdp") > budget
    assert noise_for([], q, 3 * steps, 1e-3, delta, "rdp", high=10.0) is None  # even the most noise allowed exceeds it


def test_bad_privacy_keys_are_errors_naming_the_field(tmp_path):
    from arkfed.site.config import load_site_config

    path = tmp_path / "s.yaml"
    path.write_text("name: s\ndataset: x\nroot: .\npolicy:\n  privacy: {epsilon: 8, accountant: gdp}\n")
    with pytest.raises(Exception, match="policy.privacy.accountant"):
        load_site_config(path)
    assert SiteConfig(name="s", dataset="x", root=".", policy={"per_class_metrics": True}).policy.released_metrics == "per_class"
    assert SiteConfig(name="s", dataset="x", root=".", policy={"send_metrics": "none"}).policy.released_metrics == "none"


CHARGE = """
import sys
from arkfed.site.budget import BudgetLedger
from arkfed.site.policy import PrivacyPolicy
ledger = BudgetLedger(sys.argv[1], PrivacyPolicy(epsilon=6.0), train_size=200)
charge = ledger.charge(0.08, 25, visits_left=int(sys.argv[2]), label="visit " + sys.argv[2])
print(charge.noise_multiplier, charge.spent)
"""


def test_a_new_process_continues_the_same_history(tmp_path):
    ledger = BudgetLedger(tmp_path, PrivacyPolicy(epsilon=6.0), train_size=200)
    first = ledger.charge(0.08, 25, visits_left=3, label="visit 3")
    run = subprocess.run([sys.executable, "-c", CHARGE, str(tmp_path), "2"], capture_output=True, text=True, check=True,
                         env=os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)})
    (sigma1, spent1), (sigma2, spent2) = (first.noise_multiplier, first.spent), tuple(map(float, run.stdout.split()))
    assert [e["label"] for e in ledger.entries()] == ["visit 3", "visit 2"]
    direct = RDPAccountant()
    for sigma in (sigma1, sigma2):
        for _ in range(25):
            direct.step(noise_multiplier=sigma, sample_rate=0.08)
    assert ledger.spent() == pytest.approx(direct.get_epsilon(1 / 2000), rel=1e-6) == pytest.approx(spent2, rel=1e-6)
    assert spent1 < spent2 <= 6.0
    assert json.loads((tmp_path / "privacy-ledger.json").read_text())["accountant"] == "rdp"


def test_a_nearly_spent_budget_refuses_the_next_visit_with_the_policy_reason(tmp_path):
    ledger = BudgetLedger(tmp_path, PrivacyPolicy(epsilon=2.0, max_noise_multiplier=3.0), train_size=100)
    ledger.charge(0.1, 30, visits_left=1)  # the whole budget in one visit
    quote = ledger.quote(0.1, 30, visits_left=1)
    assert isinstance(quote, Refusal) and quote.key == "privacy.epsilon"
    assert re.fullmatch(r"policy_refused: privacy\.epsilon: (1\.9\d|2\.00) of 2\.00 spent, this visit needs \d\.\d\d", str(quote))
    with pytest.raises(PrivacyRefused) as refused:
        ledger.charge(0.1, 30, visits_left=1, label="visit 7")
    assert refused.value.refusal == quote
    assert len(ledger.entries()) == 1  # a refused visit is not charged
    assert "refused visit 7: policy_refused: privacy.epsilon" in (tmp_path / "logs" / "privacy.log").read_text()


def test_the_noise_seed_is_the_sites_secret(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert private_seed(a, 5, "noise") == private_seed(a, 5, "noise") != private_seed(a, 6, "noise")
    assert private_seed(a, 5, "noise") != private_seed(b, 5, "noise")  # another site (secret) draws other noise
    assert (a / "privacy-secret").stat().st_mode & 0o777 == 0o600
