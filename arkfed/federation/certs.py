"""Certificates and keys for a secure federation (``arkfed certs init``), made with ``cryptography``.

One folder holds everything; each party takes only its part::

    DIR/ca.crt                  the federation's root certificate: every site needs it (--root-certificates)
    DIR/ca.key                  the CA's private key: stays with whoever runs ``certs init``
    DIR/coordinator.crt, .key   the coordinator's TLS certificate (host names/IPs as SANs) and key
    DIR/sites/<name>.key        a site's private key (OpenSSH EC P-384): give it to that site only (--key)
    DIR/sites/<name>.pub        its public key: the coordinator registers it under the site's name

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
                f"`arkfed certs init {self.root} --coordinator-host HOST --sites A,B` (or pass --insecure to run "
                "without encryption and site authentication)"
            )


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret readable by its owner only (umask-proof)."""
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _name(common_name: str):
    from cryptography.x509.oid import NameOID
    from cryptography import x509

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


def write_site_key_pair(folder: CertificateFolder, site: str) -> tuple[Path, Path]:
    """A site's authentication key pair (EC P-384, OpenSSH format, as Flower's SuperNode reads it)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write_private(folder.site_key(site), private)
    folder.site_public_key(site).write_bytes(public + f" arkfed-site-{site}\n".encode())
    return folder.site_key(site), folder.site_public_key(site)


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
    sites: Iterable[str],
    days: int = 825,
    overwrite: bool = False,
    include_loopback: bool = True,
) -> CertificateFolder:
    """Create a CA, the coordinator's certificate and one key pair per site in ``out``.

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
    folder.root.mkdir(parents=True, exist_ok=True)

    if folder.ca_cert.is_file() and folder.ca_key.is_file() and not overwrite:
        ca_cert = x509.load_pem_x509_certificate(folder.ca_cert.read_bytes())
        ca_key = serialization.load_pem_private_key(folder.ca_key.read_bytes(), password=None)
    else:
        ca_key, ca_cert = _make_ca(days)
        _write_private(folder.ca_key, _pem_key(ca_key))
        folder.ca_cert.write_bytes(_pem_cert(ca_cert))

    server_key, server_cert = _make_server_cert(ca_key, ca_cert, hosts, days)
    _write_private(folder.coordinator_key, _pem_key(server_key))
    folder.coordinator_cert.write_bytes(_pem_cert(server_cert))

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
        raise ArkfedError(f"{key_path}: not an OpenSSH private key ({exc}); create site keys with `arkfed certs init`") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ArkfedError(f"{key_path}: site keys must be elliptic-curve (NIST) keys; create them with `arkfed certs init`")
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
