"""The console's defences: login, sessions, CSRF tokens, allowed hosts and the security headers.

- **Where it listens.** 127.0.0.1 by default; any other address needs TLS and a login
  (:func:`check_binding`). On 127.0.0.1 any account on the machine can open the pages: ``--login``
  asks for the token there too.
- **Login.** A random token printed when the console starts, or a password whose scrypt hash is in
  a file (:func:`hash_password`; ``arkfed console --hash-password``). A login gives the browser a
  new random session cookie (HttpOnly, SameSite=Strict, Secure under TLS); sessions live in the
  console's memory only, so restarting the console logs everyone out.
- **CSRF.** Every POST (approve, refuse, login) carries a hidden token, an HMAC of the browser's
  session under a key made at start; a POST without it, or from another origin, is refused (403).
- **Host header.** Requests must name the address the console serves (or the loopback names), so a
  web page elsewhere cannot reach a console on 127.0.0.1 through DNS rebinding.
- **Headers.** ``Content-Security-Policy: default-src 'self'`` (no inline script, nothing from
  another host), no framing, no referrer sent to another site (a same-origin POST keeps its
  ``Origin``, which the CSRF check reads), no sniffing, no caching of pages.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from arkfed.errors import ArkfedError

SESSION_COOKIE = "arkfed_console"
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
# a run's report.html (written by `arkfed report`) styles itself inline; it still runs no script
REPORT_CSP = CSP.replace("style-src 'self'", "style-src 'self' 'unsafe-inline'")
SCRYPT = {"n": 2**14, "r": 8, "p": 1}


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_binding(host: str, tls: bool, login: bool) -> None:
    """Off the loopback interface the console needs TLS and a login; one clear error otherwise."""
    if is_loopback(host):
        return
    if not tls:
        raise ArkfedError(f"the console on {host} (not 127.0.0.1) needs TLS: pass --certs DIR (the federation's "
                          "certificates) or --tls-cert FILE --tls-key FILE, or serve it on 127.0.0.1")
    if not login:
        raise ArkfedError(f"the console on {host} (not 127.0.0.1) needs a login")


def hash_password(password: str) -> str:
    """``scrypt$N$r$p$SALT$HASH`` (hex): one line for a password file."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, dklen=32, **SCRYPT)
    return f"scrypt${SCRYPT['n']}${SCRYPT['r']}${SCRYPT['p']}${salt.hex()}${digest.hex()}"


def verify_password(line: str, password: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = line.strip().split("$")
        if scheme != "scrypt":
            return False
        computed = hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p), dklen=32,
                                  maxmem=2**26)
    except ValueError:
        return False
    return hmac.compare_digest(computed.hex(), digest)


def read_password_file(path: str | Path) -> str:
    path = Path(path)
    try:
        line = next((s.strip() for s in path.read_text().splitlines() if s.strip() and not s.startswith("#")), "")
    except OSError as exc:
        raise ArkfedError(f"{path}: cannot read the console's password file ({exc.strerror})") from None
    if not line.startswith("scrypt$") or line.count("$") != 5:
        raise ArkfedError(f"{path}: not a console password hash (make one with `arkfed console --hash-password`)")
    return line


@dataclass
class Guard:
    """The login and CSRF state of one console process."""

    login: bool = False
    token: str | None = None
    password_hash: str | None = None
    allowed_hosts: tuple[str, ...] = ("127.0.0.1", "localhost", "::1")
    key: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    sessions: dict[str, bool] = field(default_factory=dict)  # session id -> logged in

    def new_session(self, authenticated: bool = False) -> str:
        session = secrets.token_urlsafe(24)
        self.sessions[session] = authenticated
        return session

    def session(self, cookies: dict) -> str | None:
        value = cookies.get(SESSION_COOKIE)
        return value if value in self.sessions else None

    def authenticated(self, session: str | None) -> bool:
        return not self.login or (session is not None and self.sessions.get(session, False))

    def csrf(self, session: str | None) -> str:
        return hmac.new(self.key, (session or "").encode(), hashlib.sha256).hexdigest()

    def csrf_ok(self, session: str | None, token: object) -> bool:
        return session is not None and isinstance(token, str) and hmac.compare_digest(self.csrf(session), token)

    def credentials_ok(self, secret: str) -> bool:
        if self.token is not None and secret and hmac.compare_digest(secret.encode(), self.token.encode()):
            return True
        return self.password_hash is not None and bool(secret) and verify_password(self.password_hash, secret)

    def host_ok(self, host_header: str | None) -> bool:
        if not host_header:
            return False
        host = host_header.rsplit(":", 1)[0] if not host_header.endswith("]") else host_header
        return host.strip("[]") in {h.strip("[]") for h in self.allowed_hosts}

    def origin_ok(self, origin: str | None, host_header: str | None) -> bool:
        """A browser's POST names its page's origin: it must be this console (absent: a non-browser client)."""
        if origin is None:
            return True
        return origin.split("://", 1)[-1] == host_header


def security_headers(tls: bool, report: bool = False) -> dict[str, str]:
    headers = {"Content-Security-Policy": REPORT_CSP if report else CSP, "X-Content-Type-Options": "nosniff",
               "X-Frame-Options": "DENY", "Referrer-Policy": "same-origin", "Cross-Origin-Opener-Policy": "same-origin",
               "Cross-Origin-Resource-Policy": "same-origin", "Permissions-Policy": "camera=(), microphone=(), geolocation=()"}
    if tls:
        headers["Strict-Transport-Security"] = "max-age=31536000"
    return headers
