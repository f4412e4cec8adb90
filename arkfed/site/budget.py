"""A site's differential-privacy budget: the ledger of every DP-SGD step ever taken on its
training data, kept in the site's ``state_dir`` and charged by every run, local or federated.

The budget belongs to the data, not to a run. Each visit's noisy steps are a Gaussian mechanism
on Poisson-sampled batches, described by Opacus' accountant history entries
``(noise_multiplier, sample_rate, steps)``; the ledger stores that history (``privacy-ledger.json``,
written atomically under a lock) and the spent epsilon is what Opacus' own accountant (RDP or PRV,
the policy's ``accountant``) computes over the whole history at the policy's ``delta``. Nothing
here composes privacy by hand: :func:`epsilon_of` hands the history to Opacus.

Before a visit trains, :meth:`BudgetLedger.charge` picks the visit's noise multiplier and charges
the visit *before* its first step (a visit that fails half-way stays charged: conservative):

- the smallest noise multiplier (bisection, to 1 %) at which the run's remaining planned visits at
  this site, this one included, all fit in what is left of the budget;
- if that would exceed the policy's ``max_noise_multiplier``, the visit trains at that maximum when
  its own cost still fits (later visits will be refused), else it is refused with a
  :class:`~arkfed.site.policy.Refusal` (``privacy.epsilon: 7.90 of 8.00 spent, this visit needs 0.40``).

What the coordinator controls is only how the budget is spread (how many visits it plans); it
cannot make the site exceed it. Each charge and refusal is also logged at the site
(``<state_dir>/logs/privacy.log``).
"""

from __future__ import annotations

import fcntl
import json
import math
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from arkfed.errors import ArkfedError
from arkfed.site.policy import PrivacyPolicy, Refusal

LEDGER_FILE = "privacy-ledger.json"
LOG_FILE = Path("logs") / "privacy.log"
History = list[tuple[float, float, int]]
"""Opacus' accountant history: (noise multiplier, sample rate, steps) per entry."""


class PrivacyRefused(ArkfedError):
    """A DP visit the site's budget cannot pay for; ``refusal`` is the policy's one-line reason."""

    def __init__(self, refusal: Refusal, site: str | None = None):
        super().__init__(f"refused by the site's policy: {refusal}", site=site)
        self.refusal = refusal


def default_delta(train_size: int) -> float:
    """``1 / (10 * N)``: well below the 1/N at which releasing one record outright would be allowed."""
    return 1.0 / (10 * max(train_size, 1))


def epsilon_of(history: Sequence[tuple[float, float, int]], delta: float, accountant: str) -> float:
    """Epsilon of ``history`` at ``delta``, as Opacus' ``accountant`` (``rdp`` | ``prv``) computes it."""
    from opacus.accountants import create_accountant

    if not history:
        return 0.0
    acc = create_accountant(accountant)
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    with warnings.catch_warnings():  # RDP at Opacus' default orders: with much noise the best order is past the
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")  # last, so epsilon is
        return float(acc.get_epsilon(delta))  # overstated (conservative), never understated


def noise_for(history: History, sample_rate: float, steps: int, budget: float, delta: float, accountant: str,
              low: float = 0.3, high: float = 10.0, rel_tol: float = 0.01) -> float | None:
    """The smallest noise multiplier in ``[low, high]`` (to ``rel_tol``) at which ``history`` plus
    ``steps`` steps at ``sample_rate`` stays within ``budget``; None if even ``high`` does not."""
    def fits(sigma: float) -> bool:
        return epsilon_of([*history, (sigma, sample_rate, steps)], delta, accountant) <= budget

    if not fits(high):
        return None
    if fits(low):
        return low
    while high / low > 1 + rel_tol:
        mid = math.sqrt(low * high)
        low, high = (low, mid) if fits(mid) else (mid, high)
    return high


@dataclass(frozen=True)
class VisitCharge:
    """What one DP visit was charged: its noise multiplier, the sample rate and steps it takes,
    and epsilon spent (after the visit) of the budget at ``delta``."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    spent: float
    budget: float
    delta: float


SECRET_FILE = "privacy-secret"


def private_seed(state_dir: str | Path, seed: int, purpose: str) -> int:
    """A seed for the DP noise and the Poisson sampling that only this site can know: SHA-256 of
    the site's secret (``<state_dir>/privacy-secret``, 32 random bytes made on first use, owner-only)
    with the visit's seed. The coordinator picks the visit seed; were the noise drawn from it, the
    coordinator could draw the same noise and subtract it. The same visit at the same site reproduces."""
    import hashlib
    import os

    from arkfed.io import PRIVATE, atomic_write

    path = Path(state_dir) / SECRET_FILE
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        secret = os.urandom(32)
        atomic_write(path, lambda tmp: tmp.write_bytes(secret), PRIVATE)
    digest = hashlib.sha256(path.read_bytes() + f"|{seed}|{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class BudgetLedger:
    """``<state_dir>/privacy-ledger.json``: the DP history of one site's training data."""

    def __init__(self, state_dir: str | Path, policy: PrivacyPolicy, train_size: int, site: str | None = None):
        self.state_dir, self.policy, self.train_size, self.site = Path(state_dir), policy, train_size, site
        self.path = self.state_dir / LEDGER_FILE
        self.delta = policy.delta if policy.delta is not None else default_delta(train_size)

    # -- reading ----------------------------------------------------------------------------
    def entries(self) -> list[dict]:
        """Every charged visit so far (oldest first)."""
        if not self.path.is_file():
            return []
        try:
            data = json.loads(self.path.read_text())
            return list(data["visits"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ArkfedError(f"{self.path}: unreadable privacy ledger ({type(exc).__name__}); the budget cannot be "
                              "known, so no DP visit trains until it is restored from a backup", site=self.site) from None

    def history(self) -> History:
        """The ledger as Opacus' accountant history."""
        return [(float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"])) for e in self.entries()]

    def spent(self) -> float:
        """Epsilon spent so far on this site's data (Opacus' accountant over the whole history)."""
        return epsilon_of(self.history(), self.delta, self.policy.accountant)

    # -- charging ---------------------------------------------------------------------------
    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.state_dir / f"{LEDGER_FILE}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _log(self, text: str) -> None:
        from arkfed.io import PRIVATE, append_text

        append_text(self.state_dir / LOG_FILE, f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {text}\n", PRIVATE)

    def _write(self, entries: list[dict]) -> None:
        from arkfed.io import atomic_write

        text = json.dumps({"accountant": self.policy.accountant, "visits": entries}, indent=1)
        atomic_write(self.path, lambda tmp: tmp.write_text(text))

    def quote(self, sample_rate: float, steps: int, visits_left: int) -> VisitCharge | Refusal:
        """What the next visit would be charged (see the module docstring), or why it is refused."""
        history, budget, acc = self.history(), self.policy.epsilon, self.policy.accountant
        spent = epsilon_of(history, self.delta, acc)
        top = self.policy.max_noise_multiplier
        sigma = noise_for(history, sample_rate, steps * max(visits_left, 1), budget, self.delta, acc, low=min(0.3, top), high=top)
        if sigma is None:  # the run's plan does not fit: this visit alone, at the most noise allowed?
            sigma = top
        after = epsilon_of([*history, (sigma, sample_rate, steps)], self.delta, acc)
        if after > budget:
            return Refusal("privacy.epsilon", f"{spent:.2f} of {budget:.2f} spent, this visit needs {after - spent:.2f}")
        return VisitCharge(sigma, sample_rate, steps, after, budget, self.delta)

    def charge(self, sample_rate: float, steps: int, visits_left: int, label: str = "") -> VisitCharge:
        """Charge the next visit (under the ledger's lock) and return its charge; raises
        :class:`PrivacyRefused` when the budget cannot pay for it. Logged at the site either way."""
        with self._locked():
            quote = self.quote(sample_rate, steps, visits_left)
            if isinstance(quote, Refusal):
                self._log(f"refused {label}: {quote}")
                raise PrivacyRefused(quote, self.site)
            entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "label": label, "noise_multiplier": quote.noise_multiplier,
                     "sample_rate": sample_rate, "steps": steps, "epsilon_after": quote.spent, "delta": self.delta}
            self._write([*self.entries(), entry])
            self._log(f"charged {label}: noise multiplier {quote.noise_multiplier:.3f}, sample rate {sample_rate:.4g}, "
                      f"{steps} steps; epsilon {quote.spent:.3f} of {quote.budget:.2f} spent (delta {self.delta:.2g})")
            return quote
