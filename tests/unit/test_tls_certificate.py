"""The certificate Traefik serves: the operator's pair, else a kept self-signed one.

compose/tls/ensure_certificate.py runs in the `certificates` one-shot service before
Traefik starts; these tests run it on temporary directories.
"""

import contextlib
import datetime
import importlib.util
import socket
import ssl
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from cryptography import x509

ROOT = Path(__file__).resolve().parents[2]
CERTIFICATE_SCRIPT = ROOT / "compose" / "tls" / "ensure_certificate.py"
HOSTS = {"helix.local", "flower.helix.local", "pgadmin.helix.local"}


def load_certificate_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "ensure_certificate", CERTIFICATE_SCRIPT
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tls() -> ModuleType:
    return load_certificate_script()


def read_certificate(path: Path) -> Any:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_self_signed_certificate_is_made_for_every_host_when_none_is_provided(
    tls: ModuleType, tmp_path: Path
) -> None:
    outcome = tls.ensure_certificate(
        provided=tmp_path / "none", output=tmp_path / "out", hosts=sorted(HOSTS)
    )
    certificate = read_certificate(tmp_path / "out" / tls.CERTIFICATE_NAME)

    assert outcome == "generated"
    assert tls.certificate_hosts(certificate) == HOSTS
    assert ((tmp_path / "out" / tls.KEY_NAME).stat().st_mode & 0o777) == 0o600


def test_self_signed_certificate_is_kept_across_restarts(
    tls: ModuleType, tmp_path: Path
) -> None:
    arguments = {
        "provided": tmp_path / "none",
        "output": tmp_path,
        "hosts": ["helix.local"],
    }
    tls.ensure_certificate(**arguments)
    first = (tmp_path / tls.CERTIFICATE_NAME).read_bytes()

    assert tls.ensure_certificate(**arguments) == "kept"
    assert (tmp_path / tls.CERTIFICATE_NAME).read_bytes() == first


def test_self_signed_certificate_is_remade_for_a_new_host_or_near_expiry(
    tls: ModuleType, tmp_path: Path
) -> None:
    arguments = {"provided": tmp_path / "none", "output": tmp_path}
    now = datetime.datetime.now(datetime.UTC)
    tls.ensure_certificate(**arguments, hosts=["helix.local"], now=now)

    added = tls.ensure_certificate(**arguments, hosts=["helix.local", "x.helix.local"])
    late = now + datetime.timedelta(days=tls.SELF_SIGNED_DAYS - 10)
    expiring = tls.ensure_certificate(**arguments, hosts=["helix.local"], now=late)

    assert (added, expiring) == ("generated", "generated")


def test_operator_certificate_wins_over_the_self_signed_one(
    tls: ModuleType, tmp_path: Path
) -> None:
    now = datetime.datetime.now(datetime.UTC)
    certificate_pem, key_pem = tls.self_signed(["helix.example.org"], now)
    provided = tmp_path / "provided"
    provided.mkdir()
    (provided / tls.CERTIFICATE_NAME).write_bytes(certificate_pem)
    (provided / tls.KEY_NAME).write_bytes(key_pem)
    tls.ensure_certificate(provided=tmp_path / "none", output=tmp_path, hosts=["a.b"])

    outcome = tls.ensure_certificate(provided=provided, output=tmp_path, hosts=["a.b"])

    assert outcome == "provided"
    assert (tmp_path / tls.CERTIFICATE_NAME).read_bytes() == certificate_pem
    assert (tmp_path / tls.KEY_NAME).read_bytes() == key_pem


def test_operator_pair_that_does_not_belong_together_is_refused(
    tls: ModuleType, tmp_path: Path
) -> None:
    now = datetime.datetime.now(datetime.UTC)
    provided = tmp_path / "provided"
    provided.mkdir()
    (provided / tls.CERTIFICATE_NAME).write_bytes(tls.self_signed(["a.b"], now)[0])
    (provided / tls.KEY_NAME).write_bytes(tls.self_signed(["a.b"], now)[1])

    with pytest.raises(tls.CertificateError, match="not the key"):
        tls.ensure_certificate(
            provided=provided, output=tmp_path / "out", hosts=["a.b"]
        )
    assert tls.main(["--provided", str(provided), "--output", str(tmp_path)]) == 1
    assert not (tmp_path / "out").exists()


def test_half_an_operator_pair_is_refused(tls: ModuleType, tmp_path: Path) -> None:
    (tmp_path / tls.CERTIFICATE_NAME).write_bytes(
        tls.self_signed(["a.b"], datetime.datetime.now(datetime.UTC))[0]
    )

    with pytest.raises(tls.CertificateError, match="both"):
        tls.ensure_certificate(
            provided=tmp_path, output=tmp_path / "out", hosts=["a.b"]
        )


def test_client_that_trusts_the_self_signed_certificate_accepts_every_host(
    tls: ModuleType, tmp_path: Path
) -> None:
    tls.ensure_certificate(
        provided=tmp_path / "none", output=tmp_path, hosts=sorted(HOSTS)
    )
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(
        tmp_path / tls.CERTIFICATE_NAME, tmp_path / tls.KEY_NAME
    )
    client_context = ssl.create_default_context(cafile=tmp_path / tls.CERTIFICATE_NAME)
    accepted = []

    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            for _ in HOSTS:
                # A refused handshake ends here; the client side reports it.
                with contextlib.suppress(OSError):
                    connection, _address = listener.accept()
                    server_context.wrap_socket(connection, server_side=True).close()

        server = threading.Thread(target=serve)
        server.start()
        for host in sorted(HOSTS):
            with (
                socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
                client_context.wrap_socket(raw, server_hostname=host) as secured,
            ):
                accepted.append(secured.getpeercert() is not None)
        server.join(10)

    assert accepted == [True] * len(HOSTS)
