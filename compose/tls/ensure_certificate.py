"""Put a TLS certificate and key where Traefik reads them, before Traefik starts.

The operator's pair (`tls.crt`, `tls.key` in the provided directory) wins. Without
one, a self-signed certificate for every routed host is made once and kept across
restarts (so a browser exception stays valid) until it nears expiry or the hosts
change. Runs in the `certificates` one-shot service of compose/compose.yaml.
"""

import argparse
import datetime
import ipaddress
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger("ensure_certificate")

CERTIFICATE_NAME = "tls.crt"
KEY_NAME = "tls.key"
SELF_SIGNED_DAYS = 365
RENEW_BEFORE = datetime.timedelta(days=30)
ISSUER_NAME = "HelixNet Core self-signed"


class CertificateError(Exception):
    """The provided certificate and key cannot be served."""


def ensure_certificate(
    *,
    provided: Path,
    output: Path,
    hosts: Sequence[str],
    now: datetime.datetime | None = None,
) -> str:
    """Install a usable pair in `output`; return "provided", "kept" or "generated"."""
    now = now or datetime.datetime.now(datetime.UTC)
    provided_certificate = provided / CERTIFICATE_NAME
    provided_key = provided / KEY_NAME
    if provided_certificate.exists() or provided_key.exists():
        if not (provided_certificate.exists() and provided_key.exists()):
            raise CertificateError(
                f"{provided} needs both {CERTIFICATE_NAME} and {KEY_NAME}, or neither"
            )
        try:
            certificate = x509.load_pem_x509_certificate(
                provided_certificate.read_bytes()
            )
            key = serialization.load_pem_private_key(provided_key.read_bytes(), None)
        except (TypeError, ValueError) as exc:
            # TypeError: the key is encrypted, and Traefik cannot ask for a password.
            raise CertificateError(
                f"{provided} holds no usable PEM pair: {exc}"
            ) from exc
        if certificate.public_key() != key.public_key():
            raise CertificateError(f"{provided_key} is not the key of the certificate")
        _install(output, provided_certificate.read_bytes(), provided_key.read_bytes())
        return "provided"

    if _self_signed_still_good(output / CERTIFICATE_NAME, hosts, now):
        return "kept"
    _install(output, *self_signed(hosts, now))
    return "generated"


def self_signed(hosts: Sequence[str], now: datetime.datetime) -> tuple[bytes, bytes]:
    """A PEM certificate and key for `hosts`, the first one as its common name."""
    key = ec.generate_private_key(ec.SECP256R1())
    # Issuer and subject are one name, or no client could take it as its own anchor.
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ISSUER_NAME),
            x509.NameAttribute(NameOID.COMMON_NAME, hosts[0]),
        ]
    )
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=SELF_SIGNED_DAYS))
        .add_extension(x509.SubjectAlternativeName(_names(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem


def certificate_hosts(certificate: x509.Certificate) -> set[str]:
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    dns = names.value.get_values_for_type(x509.DNSName)
    ips = names.value.get_values_for_type(x509.IPAddress)
    return set(dns) | {str(ip) for ip in ips}


def _self_signed_still_good(
    path: Path, hosts: Sequence[str], now: datetime.datetime
) -> bool:
    if not path.exists():
        return False
    try:
        certificate = x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError:
        return False
    issuer = certificate.issuer.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    # An operator's certificate installed earlier and since withdrawn is replaced.
    if not issuer or issuer[0].value != ISSUER_NAME:
        return False
    expiring = certificate.not_valid_after_utc - RENEW_BEFORE <= now
    return not expiring and certificate_hosts(certificate) >= set(hosts)


def _names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _install(output: Path, certificate_pem: bytes, key_pem: bytes) -> None:
    # Written beside the target and renamed, so Traefik never reads half a file.
    output.mkdir(parents=True, exist_ok=True)
    for name, content, mode in (
        (KEY_NAME, key_pem, 0o600),
        (CERTIFICATE_NAME, certificate_pem, 0o644),
    ):
        partial = output / f".{name}.partial"
        descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with open(descriptor, "wb") as file:
            file.write(content)
        os.chmod(partial, mode)
        os.replace(partial, output / name)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--provided", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument(
        "--hosts",
        default=os.environ.get("HELIX_TLS_HOSTS", "helix.local"),
        help="comma-separated host names (default: $HELIX_TLS_HOSTS)",
    )
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    hosts = [host.strip() for host in arguments.hosts.split(",") if host.strip()]
    try:
        outcome = ensure_certificate(
            provided=arguments.provided, output=arguments.output, hosts=hosts
        )
    except CertificateError as exc:
        log.error("no certificate installed: %s", exc)
        return 1
    log.info("TLS certificate %s for %s", outcome, ", ".join(hosts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
