"""Admitting a site into a running federation (``arkfed coordinator-admit``) and what the ServerApp
does with it between rounds (:mod:`arkfed.federation.membership` says what is signed and checked).

At the coordinator, :func:`admit_site` (the operator's command, this account, holding the
certificate folder): registers the site's public key (as ``arkfed certs add-site``) and with the
running SuperLink (``flwr supernode register``, the loopback Control API), then signs a
membership change extending the run's current claim (the submitted one plus the changes since)
from the next round that has not started, and appends it to ``RUN/membership.jsonl``.

In the ServerApp, :func:`pending_admission` (called by the loop at the start of every round,
through ``FlowerSites.admit``) re-reads that file: when the changes admit sites from this round,
the run continues with the signed configuration (the loop re-plans; the new sites join; their
heads start as they would have at the start, same seed) and every request from then on carries the
chain of changes, which the signing service and each site verify. A change for a round that has
already started is not applied (a warning at each round's start); admit the site again.
"""

from __future__ import annotations

import json
from pathlib import Path

from arkfed.errors import ArkfedError
from arkfed.federation.membership import CHANGES_FILE, current_chain, make_change, sign_change


def submitted_claim(run_dir: Path) -> dict:
    """The claim the run was submitted with (the generated app's run config)."""
    import tomllib

    from arkfed.federation.signing import claim_of

    path = Path(run_dir) / "flower" / "app" / "pyproject.toml"
    try:
        entries = tomllib.loads(path.read_text())["tool"]["flwr"]["app"]["config"]
    except (OSError, KeyError, ValueError):
        raise ArkfedError(f"{path}: no submitted run here (start it with `arkfed coordinator` first)") from None
    claim = claim_of(entries)
    if claim is None:
        raise ArkfedError(f"{run_dir}: the run is not signed (an --insecure trial): membership changes need a signed run")
    return claim


def next_round(run_dir: Path) -> int:
    """The first round no visit of which has been recorded."""
    from arkfed.run.folder import read_metrics

    rounds = [int(r["round"]) for r in read_metrics(run_dir) if r.get("kind") in ("visit", "skip", "eval") and "round" in r]
    return max(rounds) + 1 if rounds else 0


def admit_site(run_dir: Path, site: str, public_key: Path, certs, from_round: int | None = None, register: bool = True) -> dict:
    """Sign and record a membership change admitting ``site``; returns the change (decoded)."""
    from arkfed.federation.certs import add_site, read_site_public_key
    from arkfed.io import PRIVATE, append_jsonl

    run_dir = Path(run_dir)
    certs.check_coordinator()
    _, effective = current_chain(run_dir, submitted_claim(run_dir))
    rnd = next_round(run_dir) if from_round is None else from_round
    key = read_site_public_key(public_key)
    change = make_change(effective, site, key, rnd)  # refuses a member, or a round past the run's end
    path = add_site(certs, site, public_key)
    if register:
        _register(run_dir, site, path)
    append_jsonl(run_dir / CHANGES_FILE, sign_change(change, certs.coordinator_key, certs.coordinator_cert), PRIVATE)
    return change


def _register(run_dir: Path, site: str, key_path: Path) -> None:
    from arkfed.federation.flower_app import CONNECTION
    from arkfed.federation.processes import flower_env, run_flower_cli

    try:
        args = ["supernode", "register", str(key_path), CONNECTION, "--name", site, "--format", "json"]
        run_flower_cli(args, flower_env(run_dir / "flower"))
    except ArkfedError as exc:
        raise ArkfedError(f"could not register site {site!r} with the running coordinator of {run_dir} (is it running?): {exc}") from None


def pending_admission(run_dir: Path, claim: dict | None, config, rnd: int, warn) -> tuple[object | None, list[dict]]:
    """(the signed configuration, the chain) when changes admit sites into this round; (None, chain
    so far) otherwise."""
    from arkfed.config import TrainConfig

    if claim is None:
        return None, []
    chain, effective = current_chain(run_dir, claim)
    try:
        signed = TrainConfig.model_validate(effective["config"])
    except ValueError as exc:
        warn(f"{run_dir / CHANGES_FILE}: unusable membership change ({' '.join(str(exc).split())[:200]}); ignored")
        return None, []
    new = {s: signed.admitted.get(s, 0) for s in signed.sites if s not in config.sites}
    if not new or min(new.values()) > rnd:
        return None, []
    late = sorted(s for s, first in new.items() if first < rnd)
    if late:
        warn(f"membership change for {late} was to take effect from a round that has started; not applied (admit again)")
        return None, []
    print(f"sites {sorted(new)} admitted from round {rnd + 1} by a signed membership change: "
          f"{json.dumps([c.get('signature', '')[:16] for c in chain])}", flush=True)
    return signed, chain
