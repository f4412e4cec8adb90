"""Certificates and keys for a secure federation, made with ``cryptography``.

Keys are made where they are used. Across institutions:

- the coordinator runs ``arkfed certs init DIR --coordinator-host HOST``: a CA and its own TLS
  certificate; it sends ``DIR/ca.crt`` (never a key) to every site;
- each site runs ``arkfed certs site-key SITE --out KEYS``: its private key never leaves it; it
  sends ``KEYS/SITE.pub`` to the coordinator;
- the coordinator runs ``arkfed certs add-site SITE SITE.pub --certs DIR`` to register it; both
  sides compare the printed fingerprint over another channel (a phone call).

``certs init DIR ... --sites A,B`` also makes the sites' keys at the coordinator: for trials on one
machine only (whoever holds a site's key can act as that site). The folder::

    DIR/ca.crt                  the federation's root certificate: every site needs it (--root-certificates)
    DIR/ca.key                  the CA's private key: stays with the coordinator
    DIR/coordinator.crt, .key   the coordinator's TLS certificate (host names/IPs as SANs) and key; the
                                key also signs each run (:mod:`arkfed.federation.signing`)
    DIR/sites/<name>.pub        a registered site's public key (OpenSSH EC)
    DIR/sites/<name>.key        a site's private key, only where ``certs init --sites`` made it (trials)

Secrets are written 0600 through a new temporary file opened with ``O_EXCL | O_NOFOLLOW`` and
renamed into place, so an existing file's mode never survives and a symlink planted at the path
is refused, never followed (:func:`write_file`). A private key that other accounts can read or
write (group or others bits set) is refused where arkfed loads it (:func:`check_private_key`), as
``ssh`` refuses one, with the ``chmod`` that fixes it.

TLS authenticates the coordinator to the sites; Flower's SuperNode authentication (each site
signs its requests with its key, the SuperLink admits only registered public keys) authenticates
the sites to the coordinator.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from arkfed.errors import ArkfedError

LOOPBACK_HOSTS = ("127.0.0.1", "localhost")
SITE_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


@dataclass(frozen=True)
class CertificateFolder:
    """The paths of a certificate folder (whether or not they exist yet)."""

    root: Path

    ca_cert = property(lambda self: self.root / "ca.crt")
    ca_key = property(lambda self: self.root / "ca.key")
    coordinator_cert = property(lambda self: self.root / "coordinator.crt")
    coordinator_key = property(lambda self: self.root / "coordinator.key")
    sites_dir = property(lambda self: self.root / "sites")

    def site_key(self, site: str) -> Path:
        return self.sites_dir / f"{site}.key"

    def site_public_key(self, site: str) -> Path:
        return self.sites_dir / f"{site}.pub"

    def registered_sites(self) -> dict[str, Path]:
        """Site name -> public key file, for every ``sites/<name>.pub``."""
        return {p.stem: p for p in sorted(self.sites_dir.glob("*.pub"))}

    def check_coordinator(self) -> None:
        """Everything the coordinator needs to start with TLS; otherwise one clear error."""
        missing = [p for p in (self.ca_cert, self.coordinator_cert, self.coordinator_key) if not p.is_file()]
        if missing:
            raise ArkfedError(
                f"certificate folder {self.root} lacks {', '.join(p.name for p in missing)}; create it with "
                f"`arkfed certs init {self.root} --coordinator-host HOST` (or pass --insecure to run "
                "without encryption and site authentication)"
            )
        check_private_key(self.coordinator_key)


def check_private_key(path: str | Path) -> Path:
    """``path``, refused with a one-line error when another account may read or write it."""
    import stat

    path = Path(path)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise ArkfedError(f"private key {path} is accessible by other accounts (mode {mode:04o}); "
                          f"run `chmod 600 {path}` (and keep it in a folder only its owner can enter)")
    return path


def read_private_key(path: str | Path) -> bytes:
    """The bytes of a private key file, after :func:`check_private_key`."""
    return check_private_key(path).read_bytes()


def write_file(path: Path, data: bytes, mode: int = 0o600, overwrite: bool = True) -> Path:
    """Write ``data`` to ``path`` with exactly ``mode`` (umask-proof), atomically and durably.

    Through :func:`arkfed.io.atomic_write`: a new owner-only temporary file (``O_EXCL``, no symlink
    followed) chmod-ed to ``mode``, written, fsynced and renamed over ``path``, so an old file's
    permissions never carry over; a symlink at ``path`` is refused outright.
    """
    from arkfed.io import atomic_write

    path = Path(path)
    if path.is_symlink():
        raise ArkfedError(f"{path} is a symbolic link; refusing to write a key or certificate through it")
    if path.exists() and not overwrite:
        raise ArkfedError(f"{path} already exists; pass --overwrite to replace it")
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o700)
    atomic_write(path, lambda tmp: tmp.write_bytes(data), mode=mode)
    return path


def _write_private(path: Path, data: bytes) -> None:
    """A secret readable by its owner only."""
    write_file(path, data, 0o600)


def _write_public(path: Path, data: bytes) -> None:
    write_file(path, data, 0o644)


def _name(common_name: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "arkfed federation"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def _san_entries(hosts: Iterable[str]):
    from cryptography import x509

    entries, seen = [], set()
    for host in hosts:
        host = host.strip()
        if not host or host in seen:
            continue
        seen.add(host)
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            entries.append(x509.DNSName(host))
    return entries


def _make_ca(days: int):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.timezone.utc)
    name = _name("arkfed federation CA")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _make_server_cert(ca_key, ca_cert, hosts: list[str], days: int):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0])).issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(_san_entries(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _pem_key(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _pem_cert(cert) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def _site_key_bytes(site: str) -> tuple[bytes, bytes]:
    """A site's authentication key pair (EC P-384, OpenSSH format, as Flower's SuperNode reads it)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + f" arkfed-site-{site}\n".encode()


def write_site_key_pair(folder: CertificateFolder, site: str) -> tuple[Path, Path]:
    """A site's key pair inside a certificate folder (``certs init --sites``: one-machine trials)."""
    private, public = _site_key_bytes(site)
    _write_private(folder.site_key(site), private)
    _write_public(folder.site_public_key(site), public)
    return folder.site_key(site), folder.site_public_key(site)


def make_site_key(site: str, out: str | Path, overwrite: bool = False) -> tuple[Path, Path]:
    """``arkfed certs site-key``: at the site, ``OUT/SITE.key`` (0600) and ``OUT/SITE.pub`` to send
    to the coordinator. An existing key is kept unless ``overwrite`` (the old one stops working)."""
    (site,) = check_site_names([site])
    out = Path(out)
    key_path, pub_path = out / f"{site}.key", out / f"{site}.pub"
    for path in (key_path, pub_path):
        if path.is_symlink():
            raise ArkfedError(f"{path} is a symbolic link; refusing to write a key through it")
        if path.exists() and not overwrite:
            raise ArkfedError(f"{path} already exists; pass --overwrite to make a new key (the coordinator must then "
                              "register the new .pub)")
    private, public = _site_key_bytes(site)
    _write_private(key_path, private)
    _write_public(pub_path, public)
    return key_path, pub_path


def read_site_public_key(path: str | Path) -> bytes:
    """An OpenSSH EC public key file (one line), checked to be a key Flower's SuperNode auth accepts."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ArkfedError(f"cannot read public key {path}: {exc.strerror}") from None
    try:
        key = serialization.load_ssh_public_key(data.strip())
    except (ValueError, TypeError, IndexError, UnsupportedAlgorithm):
        hint = " (this is a private key: send the .pub file, keep the .key)" if b"PRIVATE KEY" in data else ""
        raise ArkfedError(f"{path}: not an OpenSSH public key{hint}; make it at the site with `arkfed certs site-key`") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ArkfedError(f"{path}: site keys must be elliptic-curve (NIST) keys; make them with `arkfed certs site-key`")
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)


def add_site(folder: CertificateFolder, site: str, public_key: str | Path, overwrite: bool = False) -> Path:
    """``arkfed certs add-site``: register a site's public key under its name in the coordinator's folder."""
    (site,) = check_site_names([site])
    key = read_site_public_key(public_key)
    for other, path in folder.registered_sites().items():
        existing = Path(path).read_bytes().split()[:2]
        if other != site and existing == key.split()[:2]:
            raise ArkfedError(f"{public_key}: this key is already registered for site {other!r}; each site needs its own key")
    target = folder.site_public_key(site)
    if target.exists() and not target.is_symlink() and target.read_bytes().split()[:2] != key.split()[:2] and not overwrite:
        raise ArkfedError(f"site {site!r} already has a different key in {target}; pass --overwrite to replace it")
    return write_file(target, key + f" arkfed-site-{site}\n".encode(), 0o644)


def check_site_names(sites: Iterable[str]) -> list[str]:
    names = [s.strip() for s in sites if s.strip()]
    bad = [s for s in names if not set(s) <= SITE_NAME_CHARS or s.startswith(".")]
    if bad:
        raise ArkfedError(f"invalid site name(s) {bad}: use letters, digits, '_', '.', '-' (as in the site YAML's name)")
    if len(set(names)) != len(names):
        raise ArkfedError(f"site names must be unique, got {names}")
    return names


def init_certificates(
    out: str | Path,
    coordinator_hosts: Iterable[str],
    sites: Iterable[str] = (),
    days: int = 825,
    overwrite: bool = False,
    include_loopback: bool = True,
) -> CertificateFolder:
    """Create a CA, the coordinator's certificate and (for one-machine trials) one key pair per
    site in ``out``; across institutions give no sites: they make their own keys (:func:`make_site_key`).

    ``coordinator_hosts`` are the names/IPs sites use to reach the coordinator (all become SANs);
    loopback names are added unless ``include_loopback`` is False, because Flower's own processes
    at the coordinator reach the SuperLink through 127.0.0.1. An existing CA is reused (new sites
    can be added later); existing site keys are never replaced unless ``overwrite``.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    folder = CertificateFolder(Path(out))
    hosts = [h.strip() for h in coordinator_hosts if h.strip()]
    if not hosts:
        raise ArkfedError("give at least one --coordinator-host (the name or IP address sites connect to)")
    names = check_site_names(sites)
    if include_loopback:
        hosts += [h for h in LOOPBACK_HOSTS if h not in hosts]
    folder.root.mkdir(parents=True, exist_ok=True, mode=0o700)

    if folder.ca_cert.is_file() and folder.ca_key.is_file() and not overwrite:
        ca_cert = x509.load_pem_x509_certificate(folder.ca_cert.read_bytes())
        ca_key = serialization.load_pem_private_key(read_private_key(folder.ca_key), password=None)
    else:
        ca_key, ca_cert = _make_ca(days)
        _write_private(folder.ca_key, _pem_key(ca_key))
        _write_public(folder.ca_cert, _pem_cert(ca_cert))

    server_key, server_cert = _make_server_cert(ca_key, ca_cert, hosts, days)
    _write_private(folder.coordinator_key, _pem_key(server_key))
    _write_public(folder.coordinator_cert, _pem_cert(server_cert))

    for site in names:
        if folder.site_key(site).is_file() and not overwrite:
            continue
        write_site_key_pair(folder, site)
    return folder


def certificate_hosts(cert_path: Path) -> list[str]:
    """The subject alternative names of a certificate (to explain a host-name mismatch)."""
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(v) for v in san.get_values_for_type(x509.IPAddress)] + list(san.get_values_for_type(x509.DNSName))


def public_key_fingerprint(public_key_path: Path) -> str:
    """SHA-256 fingerprint of an OpenSSH public key, as ``ssh-keygen -l`` prints it."""
    import base64
    import hashlib

    parts = Path(public_key_path).read_text().split()
    if len(parts) < 2:
        raise ArkfedError(f"{public_key_path}: not an OpenSSH public key")
    digest = hashlib.sha256(base64.b64decode(parts[1])).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def site_public_key_from_private(key_path: Path) -> bytes:
    """The OpenSSH public key of a site's private key file (checked to be one Flower accepts)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        key = serialization.load_ssh_private_key(Path(key_path).read_bytes(), password=None)
    except FileNotFoundError:
        raise ArkfedError(f"site key not found: {key_path}") from None
    except (ValueError, TypeError) as exc:
        raise ArkfedError(f"{key_path}: not an OpenSSH private key ({exc}); make site keys with `arkfed certs site-key`") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ArkfedError(f"{key_path}: site keys must be elliptic-curve (NIST) keys; make them with `arkfed certs site-key`")
    check_private_key(key_path)  # a key, so a secret: only its owner may read it
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
