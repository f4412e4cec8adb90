"""Signed runs: a site works only for runs its own coordinator started, exactly as it signed them.

Flower's Control API (which starts runs) is unauthenticated in open-source Flower; arkfed keeps it
to the coordinator's own account (:mod:`arkfed.federation.coordinator.superlink`), but a site should
not have to trust that alone. So the coordinator signs each run it submits and every request that
carries weights, and every site checks both:

- the **claim** is a small JSON document: the run's ``run_uid``, the federation mode, the whole
  resolved training configuration (``config.yaml``: sites, rounds, seed, mode, order, init,
  evaluation split, recipe, model and settings), a random ``nonce`` and when it was signed and
  expires (:func:`make_claim`);
- the coordinator signs the claim's canonical bytes with its TLS key (``coordinator.key``,
  ECDSA-SHA256) and ships claim, signature and ``coordinator.crt`` in the generated app's run
  config (:func:`arkfed.federation.flower_app.write_flower_app`), which Flower hands every site;
- every ``train.visit`` and ``evaluate.round`` request carries an **authorization**: the
  coordinator's signature over the claim's fingerprint, the message type, every request field
  (the visit plan, the evaluated split and round, settings, model, head version, ...) and a hash
  of the weights shipped with it (:func:`request_body`, :func:`weights_digest`). The coordinator's
  signing service makes it (:mod:`arkfed.federation.coordinator.signer`); the ServerApp never
  holds the key;
- the site (:mod:`arkfed.federation.site.executor`) checks, for every message, that the
  certificate was issued by the federation CA it was given at enrolment (``--root-certificates``
  ca.crt, pinned), is valid now and signed the claim, that the claim has not expired, that the
  request is for the signed run (same ``run_uid``, model and settings; the visit plan exactly the
  one the signed configuration schedules for that visit, so rounds, seed, mode and order cannot
  differ; the signed evaluation split), and that the authorization matches the request and its
  weights (:func:`check_request`, :func:`verify_authorization`). It also records the runs and
  visits it served and refuses a replay (:mod:`arkfed.federation.site.served`).

A refusal is :class:`RunRefused` with a one-line reason. The claim's fingerprint
(:func:`claim_fingerprint`) names a run for operators and is what a site's operator approves.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import re
import secrets
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

from arkfed.errors import ArkfedError

CLAIM_KEY = "arkfed-run-claim"
SIGNATURE_KEY = "arkfed-run-signature"
CERT_KEY = "arkfed-coordinator-cert"
TICKET_KEY = "arkfed-run-ticket"  # the submission's nonce: the coordinator runs a ServerApp for it once
CLAIM_FORMAT = 2
CLAIM_LIFETIME = 7 * 24 * 3600.0  # seconds a claim is valid for, by default (FederationSettings.claim_lifetime)
CLOCK_SKEW = 300.0  # seconds a site tolerates a coordinator clock ahead of its own
AUTH_KEY = "authorization"  # request field: the coordinator's signature over the request and its weights
AUTH_TYPE = "arkfed-request/1"
RUN_UID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
NONCE_PATTERN = re.compile(r"[0-9a-f]{32}")
LOCAL_ONLY_FIELDS = ("site_configs",)
SIGNED_SPEC_FIELDS = ("model", "projector", "projector_dim", "img_size")  # coordinator-local paths: neither sent nor signed


class RunRefused(ArkfedError):
    """A site refuses a run (unsigned, wrongly signed, expired, replayed, or a message that strays from the signed run)."""


def check_run_uid(run_uid: object) -> str:
    """A run id is 1-64 letters, digits, '-' or '_' (it names a folder at every site)."""
    if not isinstance(run_uid, str) or not RUN_UID_PATTERN.fullmatch(run_uid):
        shown = repr(run_uid)[:40]
        raise RunRefused(f"invalid run id {shown}: expected 1-64 letters, digits, '-' or '_'")
    return run_uid


def canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _utc(moment: dt.datetime | None = None) -> dt.datetime:
    return moment or dt.datetime.now(dt.timezone.utc)


def _iso(moment: dt.datetime) -> str:
    return moment.isoformat(timespec="seconds")


def new_nonce() -> str:
    return secrets.token_hex(16)


def make_claim(config, run_uid: str, lifetime: float = CLAIM_LIFETIME, nonce: str | None = None,
               now: dt.datetime | None = None) -> dict:
    """The claim for a run: its id, mode, whole training configuration (a TrainConfig), a fresh
    nonce, and when it was signed and expires (``lifetime`` seconds later)."""
    mode = getattr(config, "mode", "cyclic")
    data = json.loads(config.model_dump_json())
    for key in LOCAL_ONLY_FIELDS:
        data.pop(key, None)
    moment = _utc(now)
    return {"format": CLAIM_FORMAT, "run_uid": check_run_uid(run_uid), "mode": mode, "config": data,
            "nonce": nonce or new_nonce(), "signed_at": _iso(moment), "expires_at": _iso(moment + dt.timedelta(seconds=lifetime))}


def claim_fingerprint(claim: Mapping) -> str:
    """A short, stable name for a signed run (what an operator compares or approves): the whole claim."""
    return "run-" + hashlib.sha256(canonical(dict(claim))).hexdigest()[:16]


def load_signing_key(key_path: Path):
    """The coordinator's private key (an elliptic-curve key from ``arkfed certs init``)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ArkfedError(f"{key_path}: the coordinator key must be an elliptic-curve key (from `arkfed certs init`)")
    return key


def sign_bytes(key, body: bytes) -> str:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    return base64.b64encode(key.sign(body, ec.ECDSA(hashes.SHA256()))).decode()


def sign_claim(claim: Mapping, key, cert_path: Path) -> dict[str, str]:
    """The run-config entries that carry ``claim``, signed with the coordinator's key (a loaded key
    or the path of ``coordinator.key``)."""
    if isinstance(key, (str, Path)):
        key = load_signing_key(Path(key))
    body = canonical(dict(claim))
    return {CLAIM_KEY: base64.b64encode(body).decode(), SIGNATURE_KEY: sign_bytes(key, body),
            CERT_KEY: base64.b64encode(Path(cert_path).read_bytes()).decode()}


def _certificate(run_config: Mapping[str, Any], ca_cert: Path):
    """The run's signing certificate, checked against the pinned CA and the clock."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature

    try:
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
    return cert


def _verify(public, signature: bytes, body: bytes, what: str) -> None:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        public.verify(signature, body, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise RunRefused(what) from None


def _check_times(claim: Mapping, moment: dt.datetime) -> None:
    try:
        signed, expires = dt.datetime.fromisoformat(claim["signed_at"]), dt.datetime.fromisoformat(claim["expires_at"])
        if signed.tzinfo is None or expires.tzinfo is None:
            raise ValueError
    except (KeyError, TypeError, ValueError):
        raise RunRefused("the signed run claim has no valid signing and expiry times") from None
    if moment > expires:
        raise RunRefused(f"the signed run expired at {_iso(expires)}")
    if signed > moment + dt.timedelta(seconds=CLOCK_SKEW):
        raise RunRefused(f"the signed run claims to be signed in the future ({_iso(signed)})")


def verify_run(run_config: Mapping[str, Any], ca_cert: Path, now: dt.datetime | None = None) -> dict:
    """The verified claim of a run, or :class:`RunRefused` saying why not (one line)."""
    missing = [k for k in (CLAIM_KEY, SIGNATURE_KEY, CERT_KEY) if not run_config.get(k)]
    if missing:
        raise RunRefused("the run is not signed by a coordinator (no arkfed run signature); only runs "
                         "started by `arkfed coordinator` are accepted")
    try:
        body = base64.b64decode(str(run_config[CLAIM_KEY]), validate=True)
        signature = base64.b64decode(str(run_config[SIGNATURE_KEY]), validate=True)
    except (ValueError, TypeError) as exc:
        raise RunRefused(f"the run's signature is malformed ({type(exc).__name__})") from None
    cert = _certificate(run_config, ca_cert)
    moment = _utc(now)
    if not cert.not_valid_before_utc <= moment <= cert.not_valid_after_utc:
        raise RunRefused("the coordinator certificate that signed the run is expired or not yet valid")
    from cryptography.hazmat.primitives.asymmetric import ec

    public = cert.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise RunRefused("the run's signing certificate does not hold an elliptic-curve key")
    _verify(public, signature, body, "the run's signature does not match its settings (altered or forged)")
    try:
        claim = json.loads(body)
    except ValueError:
        raise RunRefused("the signed run claim is not JSON") from None
    if not isinstance(claim, dict) or claim.get("format") != CLAIM_FORMAT or not isinstance(claim.get("config"), dict):
        raise RunRefused(f"the signed run claim has an unknown format (this site reads format {CLAIM_FORMAT})")
    if not isinstance(claim.get("nonce"), str) or not NONCE_PATTERN.fullmatch(claim["nonce"]):
        raise RunRefused("the signed run claim carries no valid nonce")
    _check_times(claim, moment)
    check_run_uid(claim.get("run_uid"))
    return claim


def claim_of(run_config: Mapping[str, Any]) -> dict | None:
    """The claim carried in a run config, decoded but NOT verified: only for code that runs after
    the site's gate verified it (:class:`arkfed.federation.site.executor.GatedClientApp`)."""
    try:
        claim = json.loads(base64.b64decode(str(run_config[CLAIM_KEY]), validate=True))
    except (KeyError, ValueError, TypeError):
        return None
    return claim if isinstance(claim, dict) else None


# -- the signed configuration, and requests against it --------------------------------------------


@lru_cache(maxsize=8)
def _signed_plans(config_json: str) -> tuple[Any, dict[int, dict]]:
    from arkfed.config import TrainConfig
    from arkfed.run.plan import plan_groups

    config = TrainConfig.model_validate_json(config_json)
    plans = {plan.visit: plan.model_dump(mode="json") for group in plan_groups(config) for plan in group}
    return config, plans


def signed_config(claim: Mapping):
    """The claim's training configuration and its visit plans (visit index -> plan as JSON)."""
    try:
        return _signed_plans(json.dumps(claim["config"], sort_keys=True))
    except Exception as exc:  # pydantic's ValidationError, KeyError, ...
        raise RunRefused(f"the signed run configuration is not one this site can read ({type(exc).__name__})") from None


def check_plan(claim: Mapping, plan: Any) -> None:
    """``plan`` is exactly the visit the signed configuration schedules (rounds, seed, mode, order
    and the schedules all enter it), for a site of the signed run."""
    config, plans = signed_config(claim)
    if not isinstance(plan, dict) or plan.get("site") not in config.sites:
        raise RunRefused("the request's visit plan names a site outside the signed run")
    visit = plan.get("visit")
    if not isinstance(visit, int) or visit not in plans:
        raise RunRefused(f"the request's visit {str(visit)[:12]} is outside the signed run ({len(plans)} visits)")
    expected = plans[visit]
    changed = sorted(k for k in set(expected) | set(plan) if plan.get(k) != expected.get(k))
    if changed:
        raise RunRefused(f"the request's visit plan differs from the signed run configuration ({', '.join(changed)})")


def _json_field(request: Mapping[str, Any], key: str) -> Any:
    try:
        return json.loads(str(request[key]))
    except (KeyError, ValueError):
        raise RunRefused(f"the request's {key!r} is missing or not JSON") from None


def _check_evaluation(claim: Mapping, request: Mapping[str, Any]) -> None:
    config, _ = signed_config(claim)
    if _json_field(request, "split") != config.eval_split:
        raise RunRefused(f"the request's evaluation split differs from the signed run's ({config.eval_split!r})")
    rnd = _json_field(request, "round")
    if not isinstance(rnd, int) or isinstance(rnd, bool) or not 0 <= rnd < config.rounds:
        raise RunRefused(f"the request's evaluation round is outside the signed run ({config.rounds} rounds)")


def check_request(claim: Mapping | None, request: Mapping[str, Any]) -> None:
    """The request belongs to the run: a valid run id (the signed one when ``claim`` is given)
    and, when it carries them, the signed model, settings, site list, visit plan and evaluation."""
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
        check_plan(claim, _json_field(request, "plan"))
        _check_secure(config, request)
    if "split" in request:
        _check_evaluation(claim, request)


def _check_secure(config: Mapping[str, Any], request: Mapping[str, Any]) -> None:
    """A visit of a run signed with ``secure_aggregation`` must ask for it: its update stays masked."""
    from arkfed.federation.secagg import DIGEST_FIELD, SECURE_FIELD

    if config.get("secure_aggregation") and SECURE_FIELD not in request and DIGEST_FIELD not in request:
        raise RunRefused("the signed run aggregates securely, but the visit request does not ask for it (its update would leave unmasked)")


# -- per-request authorization: the coordinator's signature over a request and its weights ------


def weights_digest(content) -> str:
    """SHA-256 over every array a message carries (record and array names, dtype, shape, bytes)."""
    digest = hashlib.sha256()
    for name in sorted(content.array_records):
        for key, array in content.array_records[name].items():
            header = [name, key, str(array.dtype), list(array.shape), str(array.stype), len(array.data)]
            digest.update(canonical(header))
            digest.update(bytes(array.data))
    return digest.hexdigest()


def request_fields(request: Mapping[str, Any]) -> dict:
    """The request's fields as JSON values, less the authorization itself."""
    fields = {}
    for key in request:
        if key != AUTH_KEY:
            fields[key] = _json_field(request, key)
    return fields


def request_body(claim_fp: str, message_type: str, fields: Mapping, digest: str) -> bytes:
    """What the coordinator signs for one request: never a claim (no ``format``), always typed."""
    return canonical({"type": AUTH_TYPE, "claim": claim_fp, "message_type": message_type, "request": dict(fields), "weights": digest})


def verify_authorization(run_config: Mapping[str, Any], ca_cert: Path, claim: Mapping, message_type: str, content) -> None:
    """The request in ``content`` carries the coordinator's signature over itself and its weights."""
    from arkfed.federation.messages import REQUEST

    request = content.config_records[REQUEST]
    if AUTH_KEY not in request:
        raise RunRefused("the request carries no coordinator authorization (an unsigned visit plan or evaluation)")
    try:
        signature = base64.b64decode(str(_json_field(request, AUTH_KEY)), validate=True)
    except (ValueError, TypeError):
        raise RunRefused("the request's authorization is malformed") from None
    body = request_body(claim_fingerprint(claim), message_type, request_fields(request), weights_digest(content))
    public = _certificate(run_config, ca_cert).public_key()
    _verify(public, signature, body, "the request's authorization does not match its plan and weights (altered or forged)")
