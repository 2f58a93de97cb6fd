"""Certificates for the TLS listener's tests, made with `cryptography` (trustme's own
dependency): trustme makes hostname certificates, these tests also need URI SANs
(SPIFFE IDs), expired certificates and certificates without client-auth usage.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_NOW = datetime.datetime.now(datetime.timezone.utc)
_DAY = datetime.timedelta(days=1)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@dataclass
class Issued:
    """A certificate and its key, as PEM, and where they were written."""

    cert_pem: bytes
    key_pem: bytes
    cert: Path
    key: Path


class Authority:
    """A certificate authority that writes what it issues under `directory`."""

    def __init__(self, directory: Path, name: str = "egress-guard test CA") -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.key = _key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.name = subject
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_NOW - _DAY).not_valid_after(_NOW + 30 * _DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.pem = self.certificate.public_bytes(serialization.Encoding.PEM)
        self.path = directory / f"{name.replace(' ', '-')}.pem"
        self.path.write_bytes(self.pem)

    def issue(self, filename: str, *, cn: str | None = None, dns: tuple[str, ...] = (), uri: tuple[str, ...] = (),
              ips: tuple[str, ...] = (), client: bool = True, server: bool = False, expired: bool = False) -> Issued:
        """A leaf certificate: `client`/`server` choose its extended key usages."""
        key = _key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else [])
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        names += [x509.UniformResourceIdentifier(u) for u in uri]
        names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        usages = ([ExtendedKeyUsageOID.CLIENT_AUTH] if client else []) + ([ExtendedKeyUsageOID.SERVER_AUTH] if server else [])
        start, end = (_NOW - 10 * _DAY, _NOW - _DAY) if expired else (_NOW - _DAY, _NOW + 10 * _DAY)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject).issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=not cn)
        cert = builder.sign(self.key, hashes.SHA256())
        cert_pem, key_pem = cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)
        cert_path, key_path = self.directory / f"{filename}.pem", self.directory / f"{filename}.key"
        cert_path.write_bytes(cert_pem)
        key_path.write_bytes(key_pem)
        return Issued(cert_pem, key_pem, cert_path, key_path)

    def server(self, filename: str = "proxy") -> Issued:
        """The proxy's own certificate: valid for 127.0.0.1, ::1 and localhost."""
        return self.issue(filename, cn="egress-guard", dns=("localhost",), ips=("127.0.0.1", "::1"),
                          client=False, server=True)
