"""Who is there: the sites of a run that come and go (issue 17), counted the same way in local and
federated runs.

A turn is *missed* when the site was not there for it: it had not joined (``absent``), Flower no
longer listed it, it vanished mid-visit or never replied. A turn it answered, even with an error or
a refused update, is not missed: the site is there. After ``max_absent`` missed turns in a row the
site is *dropped*: its turns are skipped at once (reason ``dropped``), nothing is sent and nobody
waits, until it joins again. The count lives in the run's records (``away: true`` on a skip), so a
resumed run goes on counting where it stopped.
"""

from __future__ import annotations

from typing import Collection, Iterable

ABSENT, DROPPED = "absent", "dropped"
"""Skip reasons: the site is not there (never joined, or known to be gone), or was given up on (``max_absent``)."""


class Attendance:
    """Missed turns in a row per site, and the sites dropped for them (see the module docstring)."""

    def __init__(self, max_absent: int | None):
        self.max_absent = max_absent
        self.missed: dict[str, int] = {}
        self.dropped: set[str] = set()

    def away(self, site: str, joined: Collection[str]) -> str | None:
        """Why ``site`` is not asked at all (no request, no wait), or None: it is there."""
        return DROPPED if site in self.dropped else ABSENT if site not in joined else None

    def turn(self, site: str, away: bool) -> bool:
        """Count one turn of ``site``; True when this missed turn drops it."""
        self.missed[site] = self.missed.get(site, 0) + 1 if away else 0
        if away and self.max_absent and self.missed[site] >= self.max_absent and site not in self.dropped:
            self.dropped.add(site)
            return True
        return False

    def back(self, site: str) -> bool:
        """``site`` joined again; True if it had been dropped."""
        self.missed[site] = 0
        if site in self.dropped:
            self.dropped.discard(site)
            return True
        return False

    def restore(self, records: Iterable[dict], joined: Collection[str]) -> None:
        """Resume: the count from the run's visit and skip records; a site over the limit that has
        not joined this time stays dropped."""
        for r in records:
            if r.get("kind") == "visit" or (r.get("kind") == "skip" and r.get("stage") == "visit"):
                self.missed[r["site"]] = self.missed.get(r["site"], 0) + 1 if r.get("away") else 0
        limit = self.max_absent
        self.dropped = {site for site, n in self.missed.items() if limit and n >= limit and site not in joined}
