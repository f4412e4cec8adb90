"""Signed membership changes: a site admitted into a running federation, between rounds.

A run's first claim (:mod:`arkfed.federation.signing`) fixes its sites. Admitting one more
(``arkfed coordinator admit RUN SITE KEY.pub``) produces a **membership change**: a new signed
claim that names the claim it extends (``parent``: the fingerprint of the run's effective claim so
far), the admitted site and the SHA-256 of its public key, the round from which it is visited,
and the whole new training configuration: the old one with the site appended to ``sites`` and
recorded in ``admitted`` (site -> first round; :func:`arkfed.run.plan.visit_order` leaves it out of
earlier rounds, so every visit already made keeps its index). It is signed, like the first claim,
with the coordinator's key (ECDSA-SHA256) and carries the coordinator's certificate.

From the round it takes effect, every request the coordinator sends carries the chain of changes
(request field ``membership``), and the coordinator's per-request authorization covers it.
Every site verifies the chain as it verifies the first claim (:func:`effective_claim`): each
certificate issued by the federation CA it pinned at enrolment and valid now, each signature, each
change extending the claim before it, for the same run, changing nothing but the membership, and
unexpired. A change that fails any of these is refused with one line (:class:`RunRefused`), and
the site serves nothing of the run. The coordinator's signing service checks the same before it
authorizes a request (:mod:`arkfed.federation.coordinator.signer`).

``RUN/membership.jsonl`` holds the signed changes in order; the coordinator's ServerApp re-reads it
between rounds (:func:`read_changes`).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

from arkfed.errors import ArkfedError
from arkfed.federation.signing import (
    CERT_KEY,
    CLAIM_LIFETIME,
    RunRefused,
    _certificate,
    _check_times,
    _iso,
    _utc,
    _verify,
    canonical,
    check_request,
    check_run_uid,
    claim_fingerprint,
    load_signing_key,
    new_nonce,
    sign_bytes,
)

MEMBERSHIP_FIELD = "membership"
CHANGE_TYPE = "arkfed-membership/1"
CHANGES_FILE = "membership.jsonl"


def admitted_config(config, site: str, from_round: int):
    """``config`` (a TrainConfig) with ``site`` admitted from round ``from_round``."""
    if site in config.sites:
        raise ArkfedError(f"site {site!r} is already a member of this run")
    if not 0 <= from_round < config.rounds:
        raise ArkfedError(f"round {from_round + 1} is outside the run's {config.rounds} rounds: nothing left to admit {site!r} into")
    return config.model_copy(update={"sites": [*config.sites, site], "admitted": {**config.admitted, site: from_round}})


def key_sha256(public_key: bytes) -> str:
    """The SHA-256 of an OpenSSH public key's type and base64 body (the comment left out)."""
    return hashlib.sha256(b" ".join(public_key.split()[:2])).hexdigest()


def make_change(claim: Mapping, site: str, public_key: bytes, from_round: int, lifetime: float = CLAIM_LIFETIME,
                now: dt.datetime | None = None) -> dict:
    """The membership change admitting ``site`` into the run whose effective claim is ``claim``."""
    from arkfed.config import TrainConfig

    config = admitted_config(TrainConfig.model_validate(claim["config"]), site, from_round)
    moment = _utc(now)
    return {"type": CHANGE_TYPE, "run_uid": claim["run_uid"], "parent": claim_fingerprint(claim), "site": site,
            "site_key_sha256": key_sha256(public_key), "from_round": from_round, "config": json.loads(config.model_dump_json()),
            "nonce": new_nonce(), "signed_at": _iso(moment), "expires_at": _iso(moment + dt.timedelta(seconds=lifetime))}


def sign_change(change: Mapping, key, cert_path: Path) -> dict[str, str]:
    """The signed change as it travels: its canonical bytes, the signature and the certificate (base64)."""
    if isinstance(key, (str, Path)):
        key = load_signing_key(Path(key))
    body = canonical(dict(change))
    return {"change": base64.b64encode(body).decode(), "signature": sign_bytes(key, body),
            "cert": base64.b64encode(Path(cert_path).read_bytes()).decode()}


def _verified_change(entry: Any, ca_cert: Path, moment: dt.datetime) -> dict:
    if not isinstance(entry, Mapping) or not all(isinstance(entry.get(k), str) for k in ("change", "signature", "cert")):
        raise RunRefused("the membership change is malformed")
    try:
        body = base64.b64decode(entry["change"], validate=True)
        signature = base64.b64decode(entry["signature"], validate=True)
    except ValueError:
        raise RunRefused("the membership change is malformed") from None
    try:
        cert = _certificate({CERT_KEY: entry["cert"]}, ca_cert)
    except RunRefused as exc:
        raise RunRefused(f"membership change refused: {exc}") from None
    if not cert.not_valid_before_utc <= moment <= cert.not_valid_after_utc:
        raise RunRefused("membership change refused: the certificate that signed it is expired or not yet valid")
    _verify(cert.public_key(), signature, body, "membership change refused: its signature does not match it (altered or forged)")
    try:
        change = json.loads(body)
    except ValueError:
        raise RunRefused("membership change refused: it is not JSON") from None
    if not isinstance(change, dict) or change.get("type") != CHANGE_TYPE or not isinstance(change.get("config"), dict):
        raise RunRefused(f"membership change refused: unknown format (this site reads {CHANGE_TYPE})")
    _check_times(change, moment)
    return change


def _extends(effective: Mapping, change: Mapping) -> None:
    """``change`` admits one site into ``effective`` and changes nothing else."""
    from arkfed.config import TrainConfig

    if check_run_uid(change.get("run_uid")) != effective["run_uid"]:
        raise RunRefused(f"membership change refused: it is for run {change.get('run_uid')!r}, not {effective['run_uid']!r}")
    if change.get("parent") != claim_fingerprint(effective):
        raise RunRefused("membership change refused: it does not extend this run's signed claim (another or an older one)")
    try:
        expected = admitted_config(TrainConfig.model_validate(effective["config"]), str(change.get("site")), int(change.get("from_round")))
    except (ArkfedError, ValueError, TypeError) as exc:
        raise RunRefused(f"membership change refused: {exc}") from None
    if json.loads(expected.model_dump_json()) != change["config"]:
        raise RunRefused("membership change refused: it changes more than the run's membership")


def effective_claim(claim: Mapping, chain: Any, ca_cert: Path, now: dt.datetime | None = None) -> dict:
    """The run's claim after the signed membership changes ``chain`` (verified one by one against
    the pinned ``ca_cert``), or :class:`RunRefused`. The nonce stays the run's: a change is not a new run."""
    if not isinstance(chain, list) or not chain:
        raise RunRefused("the request's membership changes are malformed")
    moment = _utc(now)
    effective = dict(claim)
    for entry in chain:
        change = _verified_change(entry, ca_cert, moment)
        _extends(effective, change)
        effective = _applied(effective, change)
    return effective


def _applied(effective: Mapping, change: Mapping) -> dict:
    return {**effective, "config": change["config"], "membership": [*effective.get("membership", []), change["nonce"]]}


def current_chain(run_dir: Path, claim: Mapping) -> tuple[list[dict], dict]:
    """The signed changes of ``RUN/membership.jsonl`` that extend ``claim`` one after the other
    (changes made for an earlier submission of the run are left out: a resumed run's claim already
    holds their sites), and the claim they make. Not verified: the signing service and the sites do."""
    chain, effective = [], dict(claim)
    for entry in read_changes(run_dir):
        try:
            change = decoded(entry)
        except (KeyError, TypeError, ValueError):
            continue
        if isinstance(change, dict) and change.get("parent") == claim_fingerprint(effective) and isinstance(change.get("config"), dict):
            chain.append(entry)
            effective = _applied(effective, change)
    return chain, effective


def request_chain(request: Mapping[str, Any]) -> list | None:
    """The membership chain a request carries (JSON), or None."""
    if MEMBERSHIP_FIELD not in request:
        return None
    try:
        return json.loads(str(request[MEMBERSHIP_FIELD]))
    except ValueError:
        raise RunRefused("the request's membership changes are not JSON") from None


def check_member_request(claim: Mapping | None, request: Mapping[str, Any], ca_cert: Path | None) -> None:
    """:func:`arkfed.federation.signing.check_request` against the claim after the request's
    membership changes (verified against ``ca_cert``)."""
    chain = request_chain(request) if claim is not None else None
    if chain is not None:
        if ca_cert is None:
            raise RunRefused("a membership change cannot be verified without the federation CA")
        claim = effective_claim(claim, chain, ca_cert)
    check_request(claim, request)


def read_changes(run_dir: Path) -> list[dict]:
    """The signed changes in ``RUN/membership.jsonl``, in order."""
    from arkfed.io import read_jsonl

    path = Path(run_dir) / CHANGES_FILE
    return read_jsonl(path)[0] if path.is_file() else []


def decoded(entry: Mapping) -> dict:
    """A signed change's content, NOT verified (the coordinator's own file; sites verify it)."""
    return json.loads(base64.b64decode(entry["change"]))
