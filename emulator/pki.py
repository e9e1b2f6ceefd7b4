"""The lab CA: one CA certificate that signs a certificate per role host.

SafeQ ships pre-installed certificates that customers must replace; the lab's own CA plays
the pre-installed one, and a customer's CA directory can be swapped in (see `load_pki_dir`).
"""
from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from emulator.errors import LabError

LAB_CA_NAME = "safeq-lab pre-installed CA"  # the issuer name that marks a pre-installed lab certificate
LAB_DOMAIN = "lab"  # hosts are named <host>.lab in certificates
VALIDITY = datetime.timedelta(days=30)


@dataclass(frozen=True)
class HostTLS:
    cert_file: str
    key_file: str
    ca_file: str

    def to_dict(self) -> dict:
        return {"cert_file": self.cert_file, "key_file": self.key_file, "ca_file": self.ca_file}


def server_name(host: str) -> str:
    return f"{host}.{LAB_DOMAIN}"


def _key():
    # P-256 keys: fast to generate for ~50 hosts on every lab start.
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "safeq-lab"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


class LabCA:
    def __init__(self, ca_name: str = LAB_CA_NAME):
        now = datetime.datetime.now(datetime.timezone.utc)
        self.key = _key()
        self.cert = (x509.CertificateBuilder().subject_name(_name(ca_name)).issuer_name(_name(ca_name))
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + VALIDITY)
                     .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                     .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                  content_commitment=False, key_encipherment=False,
                                                  data_encipherment=False, key_agreement=False,
                                                  encipher_only=False, decipher_only=False), critical=True)
                     .sign(self.key, hashes.SHA256()))

    def issue(self, host: str, address: str):
        now = datetime.datetime.now(datetime.timezone.utc)
        key = _key()
        names = [x509.DNSName(server_name(host)), x509.DNSName(host)]
        if address:
            names.append(x509.IPAddress(ipaddress.ip_address(address)))
        cert = (x509.CertificateBuilder().subject_name(_name(server_name(host))).issuer_name(self.cert.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + VALIDITY)
                .add_extension(x509.SubjectAlternativeName(names), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH,
                                                      x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .sign(self.key, hashes.SHA256()))
        return cert, key

    def write(self, directory: Path, hosts: list[tuple[str, str]]) -> dict[str, HostTLS]:
        """Write ca.pem and <host>.pem/<host>.key for (host, address) pairs; returns paths per host."""
        directory.mkdir(parents=True, exist_ok=True)
        ca_file = directory / "ca.pem"
        ca_file.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        material = {}
        for host, address in hosts:
            cert, key = self.issue(host, address)
            cert_file, key_file = directory / f"{host}.pem", directory / f"{host}.key"
            cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
            key_file.write_bytes(_pem_key(key))
            key_file.chmod(0o600)
            material[host] = HostTLS(str(cert_file), str(key_file), str(ca_file))
        return material


def load_pki_dir(directory: str, hosts: list[str]) -> dict[str, HostTLS]:
    """A customer's certificates: DIR/ca.pem plus DIR/<host>.pem and DIR/<host>.key per host.

    Hosts without their own pair keep the pre-installed lab certificate (the audit says so).
    """
    root = Path(directory)
    if not (root / "ca.pem").is_file():
        raise LabError(f"certificate directory {root} has no ca.pem (the CA that signed your host certificates)")
    found = {}
    for host in hosts:
        cert, key = root / f"{host}.pem", root / f"{host}.key"
        if cert.is_file() and key.is_file():
            found[host] = HostTLS(str(cert), str(key), str(root / "ca.pem"))
    return found


def is_pre_installed(cert_file: str) -> bool:
    """True when the certificate was issued by the lab's pre-installed CA."""
    cert = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
    issuer = cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
    return bool(issuer) and issuer[0].value == LAB_CA_NAME


def make_test_pki(directory, host: str = "stub.lab", address: str = "127.0.0.1") -> dict:
    """Persona TLS kwargs for tests: a fresh CA and one certificate for `host` (+ IP SAN `address`)."""
    name = host[:-len(LAB_DOMAIN) - 1] if host.endswith(f".{LAB_DOMAIN}") else host
    return LabCA().write(Path(directory), [(name, address)])[name].to_dict()
