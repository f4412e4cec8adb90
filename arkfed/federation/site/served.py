"""What a site has served, so that a signed run or visit is served once (replays are refused).

A signed claim (:mod:`arkfed.federation.signing`) carries a random nonce. The site keeps, under
its ``state_dir`` (0700)::

    <state_dir>/served/run-<nonce>.json             the signed run: its run id, fingerprint, expiry and
                                                    the Flower run that first brought it
    <state_dir>/served/<nonce>-visit-00007.json     visit 7 of that run was served (the weights' hash)
    <state_dir>/served/<nonce>-eval-val-r0001.json  the evaluation of round 1 on val was served

- every message of a signed run must come from the Flower run that first brought its claim: the
  same claim submitted again (a new Flower run) is a replay and is refused;
- each visit and each evaluation of a claim is served once: the record is made with ``O_EXCL``
  before the site trains (two copies of one request cannot both run) and removed again if the
  request fails or is refused (or the task process died while serving it: the site was stopped),
  so the coordinator's retry of a failed visit still works. A visit the site finished but whose
  reply was lost is not served twice: the coordinator records a skip.

A resumed run is a new claim (new nonce, submitted afresh), so its visits are new ones. Records
of expired claims are removed (an expired claim is refused anyway), so the folder stays small.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

from arkfed.federation.signing import RunRefused, claim_fingerprint

SERVED_DIR = "served"
SPLIT_NAME = re.compile(r"[A-Za-z0-9_-]{1,32}")


class ServedRecords:
    """The runs and visits one site served (see the module docstring)."""

    def __init__(self, state_dir: str | Path):
        self.folder = Path(state_dir) / SERVED_DIR
        self.folder.mkdir(parents=True, exist_ok=True)
        os.chmod(self.folder, 0o700)

    def _create(self, path: Path, entry: dict) -> bool:
        """Write ``entry`` to a new file; False if it already exists."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(entry, f)
        return True

    def _read(self, path: Path) -> dict:
        for _ in range(50):  # a record another task has just created may still be empty
            try:
                text = path.read_text()
                if text:
                    return json.loads(text)
            except (OSError, ValueError):
                pass
            time.sleep(0.01)
        return {}

    def check_run(self, claim: Mapping, flower_run_id: int) -> None:
        """Bind the claim to the Flower run that first brought it; refuse it from any other run."""
        path = self.folder / f"run-{claim['nonce']}.json"
        entry = {"run_uid": claim["run_uid"], "fingerprint": claim_fingerprint(claim), "expires_at": claim["expires_at"],
                 "flower_run": int(flower_run_id), "first_seen": time.strftime("%Y-%m-%dT%H:%M:%S")}
        if not path.exists():
            self.prune()  # a new run: forget the expired ones first
        if self._create(path, entry):
            return
        if self._read(path).get("flower_run") != int(flower_run_id):
            raise RunRefused(f"replay: this signed run ({claim_fingerprint(claim)}) was already served to another "
                             "submission; a signed run is served once")

    @contextmanager
    def serve(self, claim: Mapping, what: str, detail: dict) -> Iterator[None]:
        """Hold the record of ``what`` (``visit-00007``, ``eval-val-r0001``) while serving it; a
        second request for it is refused. The record is removed if the body raises."""
        path = self.folder / f"{claim['nonce']}-{what}.json"
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "state": "serving", "pid": os.getpid(), **detail}
        if not self._create(path, entry):
            if not self._abandoned(path) or not self._create(path, entry):
                raise RunRefused(f"replay: {what.replace('-', ' ', 1)} of this signed run was already served")
        try:
            yield
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        path.write_text(json.dumps(entry | {"state": "served"}))

    def _abandoned(self, path: Path) -> bool:
        """A record left by a task process that died while serving (the site was killed): removed,
        so that the coordinator's retry after the site restarts is served."""
        entry = self._read(path)
        if entry.get("state") != "serving" or not isinstance(entry.get("pid"), int):
            return False
        try:
            os.kill(entry["pid"], 0)
            return False  # still serving (or the pid was reused: refused, the safe side)
        except ProcessLookupError:
            path.unlink(missing_ok=True)
            return True
        except PermissionError:
            return False

    def release(self, claim: Mapping, what: str) -> None:
        (self.folder / f"{claim['nonce']}-{what}.json").unlink(missing_ok=True)

    def prune(self, now: dt.datetime | None = None) -> int:
        """Remove the records of claims that have expired; how many runs were removed."""
        moment = now or dt.datetime.now(dt.timezone.utc)
        removed = 0
        for path in self.folder.glob("run-*.json"):
            try:
                expired = dt.datetime.fromisoformat(self._read(path)["expires_at"]) < moment
            except (KeyError, TypeError, ValueError):
                continue
            if expired:
                nonce = path.stem.removeprefix("run-")
                for record in self.folder.glob(f"{nonce}-*.json"):
                    record.unlink(missing_ok=True)
                path.unlink(missing_ok=True)
                removed += 1
        return removed


def served_item(message_type: str, fields: Mapping) -> str | None:
    """The record name of a request (``visit-00007``, ``eval-val-r0001``); None for a hello."""
    from arkfed.federation import messages as m

    if message_type == m.VISIT:
        return f"visit-{int(fields['plan']['visit']):05d}"
    if message_type == m.EVALUATE:
        split = str(fields["split"])
        if not SPLIT_NAME.fullmatch(split):
            raise RunRefused("the request's evaluation split is not a plain name")
        return f"eval-{split}-r{int(fields['round']):04d}"
    return None
