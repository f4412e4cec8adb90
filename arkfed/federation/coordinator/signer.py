"""The coordinator's signing service: the only holder of ``coordinator.key`` while a federation runs.

``arkfed coordinator`` (:class:`~arkfed.federation.coordinator.launcher.Coordinator`) loads the key
into memory once and serves two kinds of signature over a Unix socket, ``RUN/flower/signer.sock``
(0600, in the run folder, 0700; every connection's peer is checked with ``SO_PEERCRED`` to be
this account):

- at each submission (in process, :meth:`SigningService.submit`): the run's claim, with a fresh
  nonce and an expiry (:func:`arkfed.federation.signing.make_claim`), and a **ticket** (the
  nonce) the ServerApp launcher must present. ``start`` (from the ServerApp task process,
  :mod:`arkfed.federation.coordinator.serverapp_task`) admits one ServerApp per ticket, for the
  current submission only, its run folder and claim unchanged: a bundle someone else submitted,
  or the same one submitted twice, gets no ServerApp;
- ``authorize`` (from arkfed's ServerApp, :class:`RequestAuthorizer`): the signature over one
  visit, evaluation or secure-aggregation (``train``, :mod:`arkfed.federation.secagg`) request
  and the hash of its weights, only for the current, started ticket
  and only for a request of the signed run (:func:`arkfed.federation.signing.check_request`: the
  scheduled visit plan, the signed split).

The ServerApp never sees the key; its task process is also kept from reading the key files
(:mod:`arkfed.federation.sandbox`). It runs as the coordinator's account, like this service, so
it can still ask for signatures, but only for the current run's own requests (see SECURITY.md).
"""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

from arkfed.errors import ArkfedError
from arkfed.federation.membership import check_member_request
from arkfed.federation.signing import (
    CLAIM_KEY,
    TICKET_KEY,
    canonical,
    claim_fingerprint,
    load_signing_key,
    make_claim,
    new_nonce,
    request_body,
    sign_bytes,
    sign_claim,
)

SOCKET_NAME = "signer.sock"
SIGNER_ENV = "ARKFED_SIGNER"  # the service's socket, for the ServerApp process
MAX_MESSAGE = 1 << 20
TIMEOUT = 30.0


class SignerRefused(ArkfedError):
    """The signing service refuses a request."""


@dataclass
class Submission:
    run_dir: str
    ticket: str
    claim: dict | None
    claim_b64: str | None
    started: bool = False


class SigningService:
    """Holds the coordinator's key in memory and answers this account over a Unix socket."""

    def __init__(self, folder: Path, certs=None):
        self.path = Path(folder) / SOCKET_NAME
        self._own_dir: Path | None = None
        if len(str(self.path)) > 100:  # a Unix socket's path holds 107 bytes at most
            import tempfile

            self._own_dir = Path(tempfile.mkdtemp(prefix="arkfed-signer-"))  # 0700, this account's
            self.path = self._own_dir / SOCKET_NAME
        self._key = load_signing_key(certs.coordinator_key) if certs is not None else None
        self._cert = certs.coordinator_cert if certs is not None else None
        self._ca = certs.ca_cert if certs is not None else None  # verifies signed membership changes, as the sites do
        self.current: Submission | None = None
        self.refusals: list[str] = []  # the last reasons it refused a request (for logs and tests)
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    # -- in process -------------------------------------------------------------------------------
    def start(self) -> "SigningService":
        from arkfed.federation.superexec import private_folder

        private_folder(self.path.parent)
        self.path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        sock.listen(16)
        self._sock = sock
        self._thread = threading.Thread(target=self._serve, name="arkfed-signer", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
            self._sock = None
        self.path.unlink(missing_ok=True)
        if self._own_dir is not None:
            self._own_dir.rmdir()
            self._own_dir = None
        if self._thread is not None:
            self._thread.join(timeout=5)

    def submit(self, run_dir: Path, lifetime: float) -> dict[str, str]:
        """A new submission for the run prepared in ``run_dir``: the run-config entries of its app
        (ticket and, with a key, the signed claim). Any earlier submission's ticket stops working."""
        from arkfed.federation.protocol import FederationSettings
        from arkfed.run.folder import RunFolder

        run_dir = Path(run_dir).resolve()
        nonce = new_nonce()
        entries = {TICKET_KEY: nonce}
        claim = None
        if self._key is not None:
            claim = make_claim(RunFolder(run_dir).read_config(), FederationSettings.read(run_dir).run_uid, lifetime, nonce=nonce)
            entries.update(sign_claim(claim, self._key, self._cert))
        with self._lock:
            self.current = Submission(str(run_dir), nonce, claim, entries.get(CLAIM_KEY))
        return entries

    # -- over the socket --------------------------------------------------------------------------
    def _serve(self) -> None:
        while self._sock is not None:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(TIMEOUT)
                try:
                    reply = self._answer(conn)
                except SignerRefused as exc:
                    self._note(str(exc))
                    reply = {"ok": False, "error": str(exc)}
                except Exception as exc:  # a malformed request never stops the service
                    self._note(f"{type(exc).__name__}")
                    reply = {"ok": False, "error": f"bad request ({type(exc).__name__})"}
                try:
                    conn.sendall(canonical(reply) + b"\n")
                except OSError:
                    pass

    def _note(self, reason: str) -> None:
        self.refusals = [*self.refusals[-49:], reason]
        print(f"arkfed signing service: refused: {reason}", flush=True)

    def _answer(self, conn: socket.socket) -> dict:
        uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[1]
        if uid != os.getuid():
            raise SignerRefused(f"a process of account {uid} is not this coordinator's")
        request = json.loads(_read_line(conn))
        op = request.get("op")
        with self._lock:
            if op == "start":
                return self._start(request)
            if op == "authorize":
                return self._authorize(request)
        raise SignerRefused(f"unknown operation {str(op)[:20]!r}")

    def _submission(self, ticket: object) -> Submission:
        current = self.current
        if current is None or not isinstance(ticket, str) or ticket != current.ticket:
            raise SignerRefused("not the run this coordinator submitted last (unknown or outdated ticket)")
        return current

    def _start(self, request: dict) -> dict:
        current = self._submission(request.get("ticket"))
        if current.started:
            raise SignerRefused("this submission already has its ServerApp (a ticket admits one)")
        if str(Path(str(request.get("run_dir"))).resolve()) != current.run_dir:
            raise SignerRefused("the ServerApp's run folder is not the one this coordinator submitted")
        if request.get("claim") != current.claim_b64:
            raise SignerRefused("the run's claim is not the one this coordinator signed for it")
        if current.claim is not None:
            from arkfed.run.folder import RunFolder

            config = json.loads(RunFolder(current.run_dir).read_config().model_dump_json())
            if {k: v for k, v in config.items() if k in current.claim["config"]} != current.claim["config"]:
                raise SignerRefused("the run folder's configuration changed since it was signed")
        current.started = True
        return {"ok": True}

    def _authorize(self, request: dict) -> dict:
        current = self._submission(request.get("ticket"))
        if not current.started:
            raise SignerRefused("this submission's ServerApp has not started")
        if current.claim is None:
            return {"ok": True, "signature": None}  # insecure trial: nothing is signed
        fields, digest, kind = request.get("fields"), request.get("weights"), request.get("message_type")
        if not isinstance(fields, dict) or not isinstance(digest, str) or kind not in ("train.visit", "evaluate.round", "train"):
            raise SignerRefused("an authorization needs a visit, evaluation or secure aggregation request and its weights' hash")
        if (("plan" in fields) != (kind in ("train.visit", "train")) or ("split" in fields) != (kind == "evaluate.round")
                or ("secagg" in fields) != (kind == "train")):
            raise SignerRefused("the request does not match its message type")
        try:
            check_member_request(current.claim, {k: json.dumps(v) for k, v in fields.items()}, self._ca)  # membership changes too
        except ArkfedError as exc:
            raise SignerRefused(f"not a request of the signed run: {exc}") from None
        body = request_body(claim_fingerprint(current.claim), kind, fields, digest)
        return {"ok": True, "signature": sign_bytes(self._key, body)}


def _read_line(conn: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_MESSAGE:
            raise SignerRefused("request too large")
    return data


def call(path: str | Path, op: str, **payload) -> dict:
    """One request to the signing service at ``path``; :class:`SignerRefused` with its reason."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(TIMEOUT)
        try:
            sock.connect(str(path))
            sock.sendall(canonical({"op": op, **payload}) + b"\n")
            reply = json.loads(_read_line(sock))
        except (OSError, ValueError) as exc:
            raise SignerRefused(f"the coordinator's signing service at {path} did not answer ({type(exc).__name__})") from None
    if not reply.get("ok"):
        raise SignerRefused(f"the coordinator's signing service refused: {reply.get('error')}")
    return reply


class RequestAuthorizer:
    """For arkfed's ServerApp: adds the signing service's authorization to a request before it is sent."""

    def __init__(self, path: str | Path, ticket: str):
        self.path, self.ticket = path, ticket

    def authorize(self, message_type: str, content) -> None:
        from arkfed.federation.messages import REQUEST
        from arkfed.federation.signing import AUTH_KEY, request_fields, weights_digest

        request = content.config_records[REQUEST]
        reply = call(self.path, "authorize", ticket=self.ticket, message_type=message_type, fields=request_fields(request),
                     weights=weights_digest(content))
        if reply.get("signature"):
            request[AUTH_KEY] = json.dumps(reply["signature"])
