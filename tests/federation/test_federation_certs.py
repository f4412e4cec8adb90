"""`arkfed certs init`: a CA, the coordinator's certificate with SANs, and site key pairs Flower accepts."""

from __future__ import annotations

import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from arkfed.errors import ArkfedError
from arkfed.federation.certs import CertificateFolder, certificate_hosts, init_certificates, site_public_key_from_private


def test_coordinator_certificate_is_signed_by_the_ca_and_names_its_hosts(tmp_path):
    folder = init_certificates(tmp_path / "certs", ["fed.example.org", "10.0.0.5"], ["nih", "chexpert"])
    ca = x509.load_pem_x509_certificate(folder.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(folder.coordinator_cert.read_bytes())
    ca.public_key().verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
    assert cert.issuer == ca.subject
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("10.0.0.5") in san.get_values_for_type(x509.IPAddress)
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)  # Flower's own local hops
    assert {"fed.example.org", "localhost"} <= set(san.get_values_for_type(x509.DNSName))
    assert set(certificate_hosts(folder.coordinator_cert)) >= {"fed.example.org", "10.0.0.5", "127.0.0.1"}
    key = serialization.load_pem_private_key(folder.coordinator_key.read_bytes(), None)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()


def test_site_keys_are_openssh_nist_ec_pairs_readable_only_by_their_owner(tmp_path):
    folder = init_certificates(tmp_path / "certs", ["127.0.0.1"], ["nih", "chexpert"])
    assert set(folder.registered_sites()) == {"nih", "chexpert"}
    for site in ("nih", "chexpert"):
        private = serialization.load_ssh_private_key(folder.site_key(site).read_bytes(), None)
        assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
        public = serialization.load_ssh_public_key(folder.site_public_key(site).read_bytes())
        assert public.public_numbers() == private.public_key().public_numbers()
        assert site_public_key_from_private(folder.site_key(site)).split()[1] == folder.site_public_key(site).read_bytes().split()[1]
        assert stat.S_IMODE(folder.site_key(site).stat().st_mode) == 0o600
    assert stat.S_IMODE(folder.ca_key.stat().st_mode) == 0o600


def test_adding_a_site_keeps_the_ca_and_existing_keys(tmp_path):
    first = init_certificates(tmp_path / "certs", ["127.0.0.1"], ["nih"])
    ca, nih_key = first.ca_cert.read_bytes(), first.site_key("nih").read_bytes()
    second = init_certificates(tmp_path / "certs", ["127.0.0.1"], ["nih", "shenzhen"])
    assert second.ca_cert.read_bytes() == ca and second.site_key("nih").read_bytes() == nih_key
    assert second.site_key("shenzhen").is_file()
    cert = x509.load_pem_x509_certificate(second.coordinator_cert.read_bytes())
    assert cert.signature_hash_algorithm.name == hashes.SHA256().name


def test_bad_inputs_are_one_line_errors(tmp_path):
    with pytest.raises(ArkfedError, match="invalid site name"):
        init_certificates(tmp_path / "c", ["127.0.0.1"], ["nih/../x"])
    with pytest.raises(ArkfedError, match="at least one --coordinator-host"):
        init_certificates(tmp_path / "c", [" "], ["nih"])
    with pytest.raises(ArkfedError, match=r"lacks ca.crt, coordinator.crt, coordinator.key; create it with `arkfed certs init"):
        CertificateFolder(tmp_path / "empty").check_coordinator()
    bad = tmp_path / "bad.key"
    bad.write_text("not a key")
    with pytest.raises(ArkfedError, match="not an OpenSSH private key"):
        site_public_key_from_private(bad)


def test_a_private_key_other_accounts_can_read_is_refused_with_the_chmod_to_run(tmp_path):
    from arkfed.federation.certs import make_site_key

    folder = init_certificates(tmp_path / "certs", ["127.0.0.1"])
    key, _ = make_site_key("nih", tmp_path / "keys")
    site_public_key_from_private(key)  # 0600: fine
    for mode in (0o644, 0o640, 0o604, 0o660):
        key.chmod(mode)
        with pytest.raises(ArkfedError) as refused:
            site_public_key_from_private(key)
        text = str(refused.value)
        assert "\n" not in text and str(key) in text and f"chmod 600 {key}" in text and f"mode {mode:04o}" in text
    folder.coordinator_key.chmod(0o644)
    with pytest.raises(ArkfedError, match=rf"private key {folder.coordinator_key} is accessible by other accounts .*chmod 600"):
        folder.check_coordinator()
    folder.coordinator_key.chmod(0o600)
    folder.check_coordinator()
    folder.ca_key.chmod(0o640)  # adding a site later loads the CA's key
    with pytest.raises(ArkfedError, match=r"ca.key is accessible by other accounts"):
        init_certificates(tmp_path / "certs", ["127.0.0.1"], ["nih"])
