"""The lab CA: one CA certificate that signs a certificate per role host.

SafeQ ships pre-installed certificates that customers must replace; the lab's own CA plays
the pre-installed one, and a customer's CA directory can be swapped in (see `load_pki_dir`).
"""
from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import NameOID

from emulator.errors import LabError

LAB_CA_NAME = "safeq-lab pre-installed CA"  # the issuer name that marks a pre-installed lab certificate
LAB_DOMAIN = "lab"  # hosts are named <host>.lab in certificates
VALIDITY = datetime.timedelta(days=30)
EXPIRED_SINCE = datetime.timedelta(days=1)   # an expired certificate ran out this long ago
FACTORY_VALIDITY = datetime.timedelta(days=20 * 365)   # devices ship self-signed certificates for decades
# what a scenario can swap in (emulator.lab.Lab.install_certificate): one from the lab CA that ran out,
# the device's own factory certificate, or a valid one the lab CA issues anew (the repair)
CERTIFICATE_KINDS = ("expired", "pre-installed", "valid")


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

    def issue(self, host: str, address: str, expired: bool = False):
        """A certificate for the host's names and address; `expired`: one that ran out EXPIRED_SINCE ago
        (its only defect: right names, this CA's signature)."""
        now = datetime.datetime.now(datetime.timezone.utc)
        not_before, not_after = now - datetime.timedelta(hours=1), now + VALIDITY
        if expired:
            not_before, not_after = now - EXPIRED_SINCE - VALIDITY, now - EXPIRED_SINCE
        key = _key()
        names = [x509.DNSName(server_name(host)), x509.DNSName(host)]
        if address:
            names.append(x509.IPAddress(ipaddress.ip_address(address)))
        cert = (x509.CertificateBuilder().subject_name(_name(server_name(host))).issuer_name(self.cert.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(not_before).not_valid_after(not_after)
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
            cert_file, key_file = _write_pair(directory, host, *self.issue(host, address))
            material[host] = HostTLS(cert_file, key_file, str(ca_file))
        return material


def _write_pair(directory: Path, stem: str, cert, key) -> tuple[str, str]:
    """directory/<stem>.pem and <stem>.key (readable by its owner only)."""
    cert_file, key_file = directory / f"{stem}.pem", directory / f"{stem}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(_pem_key(key))
    key_file.chmod(0o600)
    return str(cert_file), str(key_file)


def factory_certificate(model: str):
    """The certificate a device ships with: self-signed, its common name the vendor's default (the
    model name), no lab names; what an MFD presents until the site installs one from its CA."""
    now = datetime.datetime.now(datetime.timezone.utc)
    key = _key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, model)])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + FACTORY_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return cert, key


def write_certificate(ca: LabCA, kind: str, directory: Path, host: str, address: str, model: str) -> tuple[str, str]:
    """A new certificate of `kind` (CERTIFICATE_KINDS) for host: (cert_file, key_file) in directory."""
    if kind not in CERTIFICATE_KINDS:
        raise LabError(f"unknown certificate kind {kind!r}; use one of {', '.join(CERTIFICATE_KINDS)}")
    pair = factory_certificate(model) if kind == "pre-installed" else ca.issue(host, address, expired=kind == "expired")
    return _write_pair(directory, f"{host}.{kind}", *pair)


def load_pki_dir(directory: str, hosts: list[str]) -> dict[str, HostTLS]:
    """A customer's certificates: DIR/ca.pem plus DIR/<host>.pem and DIR/<host>.key per host.

    Hosts without their own pair keep the pre-installed lab certificate (the audit says so).
    Checked here, before any lab is built, each failure naming the file and the fix: ca.pem is a
    certificate; a host certificate comes with its key (and the other way round), the key is an
    unencrypted PEM key that matches the certificate, which is valid now and signed by ca.pem.
    """
    root = Path(directory)
    if not root.is_dir():
        raise LabError(f"--certs {root}: not a directory; give the directory holding ca.pem, <host>.pem and <host>.key")
    ca_file = root / "ca.pem"
    if not ca_file.is_file():
        raise LabError(f"certificate directory {root} has no ca.pem (the CA that signed your host certificates)")
    cas = _load_certificates(ca_file, "the CA certificate")
    now = datetime.datetime.now(datetime.timezone.utc)
    found = {}
    for host in hosts:
        cert_file, key_file = root / f"{host}.pem", root / f"{host}.key"
        if not cert_file.is_file() and not key_file.is_file():
            continue
        if not key_file.is_file():
            raise LabError(f"{cert_file} has no key: {key_file} is missing; add the certificate's private key "
                           f"(PEM) or remove {cert_file.name} to keep the pre-installed certificate of {host}")
        if not cert_file.is_file():
            raise LabError(f"{key_file} has no certificate: {cert_file} is missing; add the certificate (PEM) "
                           f"or remove {key_file.name} to keep the pre-installed certificate of {host}")
        cert, *chain = _load_certificates(cert_file, f"the certificate of {host}")
        key = _load_key(key_file)
        if cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) != \
                key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo):
            raise LabError(f"{key_file} does not match {cert_file} (another key pair); give the key the certificate was issued for")
        not_after, not_before = cert.not_valid_after_utc, cert.not_valid_before_utc
        if not_after < now:
            raise LabError(f"{cert_file} expired on {not_after:%Y-%m-%d %H:%M} UTC; issue a new certificate for {host}")
        if not_before > now:
            raise LabError(f"{cert_file} is not valid before {not_before:%Y-%m-%d %H:%M} UTC; "
                           "issue one valid now (or check this machine's clock)")
        if not any(issued_by(cert, issuer) for issuer in [*cas, *chain]):
            raise LabError(f"{cert_file} is not signed by a certificate of {ca_file} (nor by one following it in "
                           f"{cert_file.name}); put the CA that issued it in ca.pem")
        found[host] = HostTLS(str(cert_file), str(key_file), str(ca_file))
    return found


MAX_PEM_BYTES = 1024 * 1024  # a certificate chain or key is a few KiB


def _read_pem(path: Path) -> bytes:
    try:
        if path.stat().st_size > MAX_PEM_BYTES:
            raise LabError(f"{path}: larger than {MAX_PEM_BYTES // 1024} KiB, not a PEM certificate or key; give the PEM file")
        return path.read_bytes()
    except OSError as exc:
        raise LabError(f"{path} cannot be read ({exc.strerror or exc.__class__.__name__}); check its permissions") from None


def issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _load_certificates(path: Path, what: str) -> list[x509.Certificate]:
    """The PEM certificates of a file, first one first (a host file may carry its chain after it)."""
    try:
        return x509.load_pem_x509_certificates(_read_pem(path))
    except ValueError:
        raise LabError(f"{path} is not a PEM certificate ({what}); give one starting with "
                       "-----BEGIN CERTIFICATE-----") from None


def _load_key(path: Path):
    try:
        return serialization.load_pem_private_key(_read_pem(path), password=None)
    except TypeError:  # cryptography's answer to an encrypted key without a password
        raise LabError(f"{path} is an encrypted private key; give it unencrypted "
                       "(`openssl pkey -in KEY -out KEY.plain`)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise LabError(f"{path} is not a PEM private key; give one starting with -----BEGIN PRIVATE KEY-----") from None


def is_pre_installed(cert_file: str) -> bool:
    """True when the certificate was issued by the lab's pre-installed CA."""
    cert = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
    issuer = cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
    return bool(issuer) and issuer[0].value == LAB_CA_NAME


def describe_certificate(cert_file: str) -> str:
    """A certificate in words: whose, issued by whom, until when ('expired on' once past)."""
    cert = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
    subject = common_name(cert.subject)
    issuer = common_name(cert.issuer)
    issuer = ("self-signed" if cert.issuer == cert.subject else
              "issued by the lab CA" if issuer == LAB_CA_NAME else f"issued by {issuer!r}")
    until = cert.not_valid_after_utc
    when = "expired on" if until < datetime.datetime.now(datetime.timezone.utc) else "valid until"
    return f"{subject!r} ({issuer}, {when} {until:%Y-%m-%d %H:%M} UTC)"


def common_name(name: x509.Name) -> str:
    found = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(found[0].value) if found else name.rfc4514_string()


def make_test_pki(directory, host: str = "stub.lab", address: str = "127.0.0.1") -> dict:
    """Persona TLS kwargs for tests: a fresh CA and one certificate for `host` (+ IP SAN `address`)."""
    name = host[:-len(LAB_DOMAIN) - 1] if host.endswith(f".{LAB_DOMAIN}") else host
    return LabCA().write(Path(directory), [(name, address)])[name].to_dict()


# -- SSH keys beside the lab CA -------------------------------------------------------------------
# SSH uses no certificates: the lab's SSH material is a host key per host, derived from the host's TLS
# key (so it is fixed for a run and changes with the next), its public half published next to the CA
# for probes to verify, and one client key pair the stubs authorise and the probes log in with.
SSH_CLIENT_KEY_FILE = "ssh_client_key"  # OpenSSH private key; its public line in ssh_client_key.pub


def ssh_host_key(key_file: str) -> ed25519.Ed25519PrivateKey:
    """The host's Ed25519 SSH host key, derived from its TLS private key file by HKDF: the same key for
    every daemon of a run without a new file, and no key reused across protocols."""
    seed = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=b"safeq-lab ssh host key").derive(_read_pem(Path(key_file)))
    return ed25519.Ed25519PrivateKey.from_private_bytes(seed)


def ssh_public_line(key) -> bytes:
    """`ssh-ed25519 AAAA...`: the OpenSSH public-key line of a private or public key."""
    public = key.public_key() if hasattr(key, "public_key") else key
    return public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)


def ssh_host_key_file(directory, host: str) -> Path:
    """Where the public host key of `host` is published (known_hosts-style: `<key line> <host>`)."""
    return Path(directory) / f"{host}.ssh_host_key.pub"


def publish_ssh_host_key(directory, host: str, key) -> Path:
    """Write the public line of `key` to ssh_host_key_file (atomically: probes may read it meanwhile)."""
    path = ssh_host_key_file(directory, host)
    _write_atomically(path, ssh_public_line(key) + b" " + server_name(host).encode() + b"\n", 0o644)
    return path


def ssh_client_key(directory) -> ed25519.Ed25519PrivateKey:
    """The lab's SSH client key in `directory` (ssh_client_key + .pub), created on first use.

    Stubs (to authorise it) and probes (to log in) of one run call this concurrently; whoever comes
    first creates it, the others read that one (os.link never replaces an existing file)."""
    path = Path(directory) / SSH_CLIENT_KEY_FILE
    if not path.exists():
        pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
        _write_atomically(path, pem, 0o600, replace=False)
    try:
        key = serialization.load_ssh_private_key(_read_pem(path), password=None)
    except (ValueError, UnsupportedAlgorithm):
        key = None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise LabError(f"{path} is not an Ed25519 OpenSSH private key; delete it to get a new one")
    public = path.with_name(path.name + ".pub")
    line = ssh_public_line(key) + b" safeq-lab-probe\n"
    if not public.exists() or public.read_bytes() != line:
        _write_atomically(public, line, 0o644)
    return key


def _write_atomically(path: Path, data: bytes, mode: int, replace: bool = True) -> None:
    """Write `data` to a new file created with `mode`, then move it into place (a reader never sees
    half a file); with replace=False an existing `path` is kept."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(descriptor, "wb") as stream:
            stream.write(data)
        if replace:
            os.replace(temporary, path)
        else:
            try:
                os.link(temporary, path)
            except FileExistsError:
                pass  # another process made it first: theirs stands
    finally:
        temporary.unlink(missing_ok=True)
