"""Signed runs: a site works only for runs its own coordinator started, with the settings it signed.

Flower's Control API (which starts runs) is unauthenticated in open-source Flower; arkfed keeps it
on the coordinator's loopback (:mod:`arkfed.federation.coordinator.gateway`), but a site should not have to
trust that alone. So the coordinator signs each run it submits and every site checks it:

- the **claim** is a small JSON document: the run's ``run_uid``, the federation mode and the
  whole training configuration (``config.yaml`` less local paths), plus when it was signed;
- the coordinator signs the claim's canonical bytes with its TLS key (``coordinator.key``,
  ECDSA-SHA256) and ships claim, signature and ``coordinator.crt`` in the generated app's run
  config (:func:`arkfed.federation.flower_app.write_flower_app`), which Flower hands every site;
- the site (:mod:`arkfed.federation.site.executor`) checks, for every message, that the
  certificate was issued by the federation CA it was given at enrolment (``--root-certificates``
  ca.crt, pinned), is valid now and signed the claim, and that the request is for the signed
  run: same ``run_uid``, and the model and visit settings equal the signed configuration.

A run without a claim, with a claim signed by another key, or whose messages stray from the claim
is refused with a one-line reason (:class:`RunRefused`). The claim's fingerprint
(:func:`claim_fingerprint`) names a run for operators. Replaying a signed claim re-runs that same
signed configuration and nothing else (see SECURITY.md).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Mapping

from arkfed.errors import ArkfedError

CLAIM_KEY = "arkfed-run-claim"
SIGNATURE_KEY = "arkfed-run-signature"
CERT_KEY = "arkfed-coordinator-cert"
CLAIM_FORMAT = 1
RUN_UID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
LOCAL_ONLY_FIELDS = ("site_configs",)
SIGNED_SPEC_FIELDS = ("model", "projector", "projector_dim", "img_size")  # coordinator-local paths: neither sent nor signed


class RunRefused(ArkfedError):
    """A site refuses a run (unsigned, wrongly signed, or a message that strays from the signed run)."""


def check_run_uid(run_uid: object) -> str:
    """A run id is 1-64 letters, digits, '-' or '_' (it names a folder at every site)."""
    if not isinstance(run_uid, str) or not RUN_UID_PATTERN.fullmatch(run_uid):
        shown = repr(run_uid)[:40]
        raise RunRefused(f"invalid run id {shown}: expected 1-64 letters, digits, '-' or '_'")
    return run_uid


def canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def make_claim(config, run_uid: str) -> dict:
    """The claim for a run: its id, mode and training configuration (a TrainConfig)."""
    mode = getattr(config, "mode", "cyclic")
    data = json.loads(config.model_dump_json())
    for key in LOCAL_ONLY_FIELDS:
        data.pop(key, None)
    return {"format": CLAIM_FORMAT, "run_uid": check_run_uid(run_uid), "mode": mode, "config": data,
            "signed_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def claim_fingerprint(claim: Mapping) -> str:
    """A short, stable name for a signed run (what an operator compares or approves)."""
    return "run-" + hashlib.sha256(canonical(dict(claim))).hexdigest()[:16]


def sign_claim(claim: Mapping, key_path: Path, cert_path: Path) -> dict[str, str]:
    """The run-config entries that carry ``claim``, signed with the coordinator's key."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ArkfedError(f"{key_path}: the coordinator key must be an elliptic-curve key (from `arkfed certs init`)")
    body = canonical(dict(claim))
    signature = key.sign(body, ec.ECDSA(hashes.SHA256()))
    return {
        CLAIM_KEY: base64.b64encode(body).decode(),
        SIGNATURE_KEY: base64.b64encode(signature).decode(),
        CERT_KEY: base64.b64encode(Path(cert_path).read_bytes()).decode(),
    }


def verify_run(run_config: Mapping[str, Any], ca_cert: Path, now: dt.datetime | None = None) -> dict:
    """The verified claim of a run, or :class:`RunRefused` saying why not (one line)."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    missing = [k for k in (CLAIM_KEY, SIGNATURE_KEY, CERT_KEY) if not run_config.get(k)]
    if missing:
        raise RunRefused("the run is not signed by a coordinator (no arkfed run signature); only runs "
                         "started by `arkfed coordinator` are accepted")
    try:
        body = base64.b64decode(str(run_config[CLAIM_KEY]), validate=True)
        signature = base64.b64decode(str(run_config[SIGNATURE_KEY]), validate=True)
        cert = x509.load_pem_x509_certificate(base64.b64decode(str(run_config[CERT_KEY]), validate=True))
        ca = x509.load_pem_x509_certificate(Path(ca_cert).read_bytes())
    except (ValueError, TypeError) as exc:
        raise RunRefused(f"the run's signature is malformed ({type(exc).__name__})") from None
    except OSError:
        raise RunRefused("this site cannot read its federation CA certificate (--root-certificates)") from None
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise RunRefused("the run was signed by a certificate not issued by this site's federation CA "
                         "(a different coordinator)") from None
    moment = now or dt.datetime.now(dt.timezone.utc)
    if not cert.not_valid_before_utc <= moment <= cert.not_valid_after_utc:
        raise RunRefused("the coordinator certificate that signed the run is expired or not yet valid")
    public = cert.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise RunRefused("the run's signing certificate does not hold an elliptic-curve key")
    try:
        public.verify(signature, body, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise RunRefused("the run's signature does not match its settings (altered or forged)") from None
    try:
        claim = json.loads(body)
    except ValueError:
        raise RunRefused("the signed run claim is not JSON") from None
    if not isinstance(claim, dict) or claim.get("format") != CLAIM_FORMAT or not isinstance(claim.get("config"), dict):
        raise RunRefused(f"the signed run claim has an unknown format (this site reads format {CLAIM_FORMAT})")
    check_run_uid(claim.get("run_uid"))
    return claim


def _json_field(request: Mapping[str, Any], key: str) -> Any:
    try:
        return json.loads(str(request[key]))
    except (KeyError, ValueError):
        raise RunRefused(f"the request's {key!r} is missing or not JSON") from None


def check_request(claim: Mapping | None, request: Mapping[str, Any]) -> None:
    """The request belongs to the run: a valid run id (the signed one when ``claim`` is given)
    and, when it carries them, the signed model and settings."""
    run_uid = check_run_uid(_json_field(request, "run_uid"))
    if claim is None:
        return
    if run_uid != claim["run_uid"]:
        raise RunRefused(f"the request is for run {run_uid!r}, but the signed run is {claim['run_uid']!r}")
    config = claim["config"]
    if "settings" in request and _json_field(request, "settings") != config.get("settings"):
        raise RunRefused("the request's visit settings differ from the signed run configuration")
    if "spec" in request:
        spec, signed = _json_field(request, "spec"), config.get("model") or {}
        # the architecture as signed; num_features/mean/std are filled in from the built backbone
        changed = [k for k in SIGNED_SPEC_FIELDS if not isinstance(spec, dict) or spec.get(k) != signed.get(k)]
        if changed:
            raise RunRefused(f"the request's model ({', '.join(changed)}) differs from the signed run configuration")
    if "sites" in request and _json_field(request, "sites") != config.get("sites"):
        raise RunRefused("the request's site list differs from the signed run configuration")
    if "plan" in request:
        plan = _json_field(request, "plan")
        if not isinstance(plan, dict) or plan.get("site") not in (config.get("sites") or []):
            raise RunRefused("the request's visit plan names a site outside the signed run")
