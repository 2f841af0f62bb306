"""The Docker Compose stack, Traefik's configuration and the image, read statically.

No Docker engine runs where these tests run, so they read compose/compose.yaml,
traefik/, the Dockerfile and .dockerignore and check what `docker compose up` relies
on: the services and their start order, each request routed to the API that serves
it, HTTPS everywhere, secrets only from the environment, commands that name
modules which exist, the APIs' healthcheck (run against stand-in servers) and stop
timeout, and the PostgreSQL connections the processes open at the README's scale.
compose_spec.json beside this file is the Compose Specification schema (Apache-2.0)
as Docker Compose v2.40.3 embeds it.
"""

import ast
import contextlib
import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
from pydantic import SecretStr, TypeAdapter

from command_api import setup as command_setup
from projectors import cli, dispatcher
from query_api import job_routes
from shared.settings import DEVELOPMENT_JWT_SECRET, WELL_KNOWN_PASSWORDS, Settings
from tests.compose_model import (
    COMPOSE,
    COMPOSE_DIR,
    COMPOSE_FILE,
    DYNAMIC,
    EXPECTED_ROUTES,
    HOSTS,
    OPERATOR_ENV,
    RAW_COMPOSE,
    REQUIRED,
    ROOT,
    ROUTERS,
    SERVICES,
    STATIC,
    MissingVariable,
    command,
    depends_on,
    duration_s,
    environment,
    file_middlewares,
    interpolate,
    label_services,
    option,
    parse_rule,
    raw_environment,
    route,
    rule_hosts,
    volume_target,
)
from workers import runtime

SCHEMA_FILE = Path(__file__).with_name("compose_spec.json")
CERTIFICATE_SCRIPT = COMPOSE_DIR / "tls" / "ensure_certificate.py"

# The processes of DESIGN.md ("Processes"), and the stores and tools beside them.
PROCESSES = {"migrate", "command-api", "query-api", "projectors", "worker", "flower"}
INFRASTRUCTURE = {"traefik", "postgres", "rabbitmq", "redis", "pgadmin"}
APIS = ("command-api", "query-api")
ONE_SHOTS = {"migrate", "certificates"}
IMAGE_SERVICES = PROCESSES | {"certificates"}
SECRET_NAME = re.compile(r"PASSWORD|PASS$|SECRET|TOKEN|_KEY$")
REQUIRED_VARIABLE = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*):\?[^}]*\}$")
DEPENDENCY_CONDITIONS = {
    "service_started",
    "service_healthy",
    "service_completed_successfully",
}


# -- The stack's schema and secrets --------------------------------------------------


def test_compose_file_is_valid_against_the_compose_specification() -> None:
    schema = json.loads(SCHEMA_FILE.read_text())
    validator = jsonschema.Draft7Validator(schema)

    errors = sorted(validator.iter_errors(COMPOSE), key=lambda e: list(e.path))

    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_compose_refuses_to_start_while_any_secret_is_unset() -> None:
    for name in REQUIRED:
        env = {key: value for key, value in OPERATOR_ENV.items() if key != name}
        with pytest.raises(MissingVariable, match=name):
            interpolate(RAW_COMPOSE, env)
        with pytest.raises(MissingVariable, match=name):
            interpolate(RAW_COMPOSE, {**env, name: ""})


def test_every_secret_in_the_stack_comes_from_a_required_variable() -> None:
    for service, definition in RAW_COMPOSE["services"].items():
        for key, value in raw_environment(service).items():
            if SECRET_NAME.search(key):
                assert REQUIRED_VARIABLE.match(value), f"{service} {key}={value}"
            if "://" in value:
                password = urlsplit(value).password
                assert password is None or REQUIRED_VARIABLE.match(password), value
        argv = definition.get("command") or []
        if "--requirepass" in argv:
            assert REQUIRED_VARIABLE.match(option(argv, "--requirepass"))


def test_no_default_password_or_development_secret_is_written_in_the_stack() -> None:
    values = [v for name in SERVICES for v in environment(name).values()]
    passwords = {urlsplit(v).password for v in values if "://" in v} - {None}

    assert not (set(values) | passwords) & (WELL_KNOWN_PASSWORDS - {""})
    assert DEVELOPMENT_JWT_SECRET not in COMPOSE_FILE.read_text()


def test_env_example_names_every_required_variable_and_gives_none_a_value() -> None:
    example = {}
    for line in (COMPOSE_DIR / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, value = line.split("=", 1)
            example[key.strip()] = value.strip()

    assert set(example) == REQUIRED
    assert all(value == "" for value in example.values())


def test_compose_environment_makes_valid_production_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for key in [key for key in os.environ if key.startswith("HELIX_")]:
        monkeypatch.delenv(key)
    for key, value in environment("command-api").items():
        monkeypatch.setenv(key, value)

    settings = Settings(_env_file=None)  # type: ignore[call-arg]

    assert settings.env == "production"
    assert settings.jwt_secret.get_secret_value() == OPERATOR_ENV["HELIX_JWT_SECRET"]


def test_every_secret_setting_is_given_by_the_stack_not_left_at_its_default() -> None:
    secrets = {
        f"HELIX_{name.upper()}"
        for name, field in Settings.model_fields.items()
        if field.annotation is SecretStr
    }

    assert secrets
    for name in PROCESSES:
        assert secrets <= set(environment(name)), name


def test_database_url_reaches_the_postgres_service_with_its_credentials() -> None:
    url = urlsplit(environment("command-api")["HELIX_DATABASE_URL"])
    postgres = environment("postgres")

    assert url.scheme == "postgresql+psycopg"
    assert (url.hostname, url.port) == ("postgres", 5432)
    assert url.username == postgres["POSTGRES_USER"]
    assert url.password == postgres["POSTGRES_PASSWORD"]
    assert url.path == f"/{postgres['POSTGRES_DB']}"


def test_rabbitmq_and_redis_urls_reach_their_services_with_their_credentials() -> None:
    env = environment("command-api")
    rabbitmq = urlsplit(env["HELIX_RABBITMQ_URL"])
    redis = urlsplit(env["HELIX_REDIS_URL"])

    assert (rabbitmq.scheme, rabbitmq.hostname, rabbitmq.port) == (
        "amqp",
        "rabbitmq",
        5672,
    )
    assert rabbitmq.username == environment("rabbitmq")["RABBITMQ_DEFAULT_USER"]
    assert rabbitmq.password == environment("rabbitmq")["RABBITMQ_DEFAULT_PASS"]
    assert (redis.scheme, redis.hostname, redis.port) == ("redis", "redis", 6379)
    assert redis.password == option(command("redis"), "--requirepass")


# -- Services ------------------------------------------------------------------------


def test_every_service_the_design_names_is_in_the_stack() -> None:
    assert set(SERVICES) >= PROCESSES | INFRASTRUCTURE


def test_every_process_runs_the_one_image_built_from_the_dockerfile() -> None:
    images = {SERVICES[name].get("image") for name in IMAGE_SERVICES}
    builds = {
        json.dumps(SERVICES[name].get("build"), sort_keys=True)
        for name in IMAGE_SERVICES
    }
    build = SERVICES["migrate"]["build"]

    assert len(images) == 1 and None not in images
    assert len(builds) == 1
    assert (COMPOSE_DIR / build["context"]).resolve() == ROOT
    assert (
        COMPOSE_DIR / build["context"] / build["dockerfile"]
    ).resolve() == ROOT / "Dockerfile"


def test_every_process_gets_the_same_helix_environment() -> None:
    first = environment("migrate")

    assert all(environment(name) == first for name in PROCESSES)
    assert first["HELIX_ENV"] == "production"
    assert first["HELIX_DATABASE_URL"].startswith("postgresql+psycopg://")


@pytest.mark.parametrize(
    ("service", "expected"),
    [
        ("migrate", ["python", "-m", "command_api.setup"]),
        ("command-api", ["uvicorn", "command_api.app:create_app", "--factory"]),
        ("query-api", ["uvicorn", "query_api.app:create_app", "--factory"]),
        ("projectors", ["python", "-m", "projectors"]),
        ("worker", ["celery", "--app", "workers", "worker"]),
        ("flower", ["celery", "--app", "workers", "flower"]),
    ],
)
def test_each_process_runs_the_command_the_design_gives_it(
    service: str, expected: list[str]
) -> None:
    assert command(service)[: len(expected)] == expected


def module_file(module: str) -> Path | None:
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def top_level_names(path: Path) -> dict[str, ast.AST]:
    names: dict[str, ast.AST] = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names[node.name] = node
        elif isinstance(node, ast.Assign):
            names.update({t.id: node for t in node.targets if isinstance(t, ast.Name)})
        elif isinstance(node, ast.ImportFrom | ast.Import):
            names.update({(a.asname or a.name).split(".")[0]: node for a in node.names})
    return names


def check_entry_point(argv: list[str]) -> None:
    """Fail unless the module (and object) that `argv` starts exists in the repo."""
    if argv[:2] == ["python", "-m"]:
        module = argv[2]
        path = module_file(module)
        assert path, f"{module} is not in the repository"
        if path.name == "__init__.py":
            assert (path.parent / "__main__.py").is_file(), f"{module} has no __main__"
        else:
            assert "__main__" in path.read_text(), f"{module} does not run as a script"
    elif argv[0] == "uvicorn":
        module, attribute = argv[1].split(":")
        path = module_file(module)
        assert path, f"{module} is not in the repository"
        factory = top_level_names(path).get(attribute)
        assert isinstance(factory, ast.FunctionDef), f"{module} defines no {attribute}"
        # --factory calls it with no arguments.
        arguments = factory.args
        assert len(arguments.defaults) == len(arguments.args)
        assert all(default is not None for default in arguments.kw_defaults)
    elif argv[0] == "celery":
        module = option(argv, "--app", "-A")
        path = module_file(module)
        assert path, f"{module} is not in the repository"
        assert top_level_names(path).keys() & {"app", "celery"}, f"{module} has no app"
    else:
        raise AssertionError(f"no check for {argv}")


@pytest.mark.parametrize("service", sorted(PROCESSES))
def test_module_each_process_starts_exists_in_the_repository(service: str) -> None:
    check_entry_point(command(service))


def test_worker_consumes_the_jobs_queue_the_settings_name() -> None:
    queue = option(command("worker"), "--queues", "-Q")

    assert queue == environment("worker")["HELIX_JOBS_QUEUE"]
    assert queue == Settings.model_fields["jobs_queue"].default


def test_apis_are_stateless_and_run_several_replicas() -> None:
    for name in APIS:
        service = SERVICES[name]
        assert "container_name" not in service
        assert "ports" not in service
        assert not service.get("volumes")
        assert service["deploy"]["replicas"] >= 2


def test_only_traefik_publishes_ports_and_only_80_and_443() -> None:
    published = {name for name, service in SERVICES.items() if service.get("ports")}

    assert published == {"traefik"}
    assert {port.split(":")[-1] for port in SERVICES["traefik"]["ports"]} == {
        "80",
        "443",
    }


def test_api_healthchecks_probe_the_health_route_on_the_port_uvicorn_serves() -> None:
    for name in APIS:
        port = option(command(name), "--port")
        probe = " ".join(SERVICES[name]["healthcheck"]["test"])

        assert f"127.0.0.1:{port}/health/" in probe


@contextmanager
def health_route_answering(status: int) -> Iterator[int]:
    """A loopback HTTP server whose every GET answers `status`; yields its port."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b'{"status": "answered"}'
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@contextmanager
def port_closing_every_connection() -> Iterator[int]:
    """A loopback port that accepts connections and closes them unanswered."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    stopping = threading.Event()

    def close_each() -> None:
        while not stopping.is_set():
            with contextlib.suppress(TimeoutError):
                connection, _ = listener.accept()
                connection.close()

    thread = threading.Thread(target=close_each, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stopping.set()
        thread.join()
        listener.close()


def run_api_healthcheck(service: str, port: int) -> int:
    """Run `service`'s healthcheck against 127.0.0.1:`port`; its exit status."""
    test = SERVICES[service]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    served = f"127.0.0.1:{option(command(service), '--port')}"
    script = test[3].replace(served, f"127.0.0.1:{port}")
    assert script != test[3], f"the probe does not name {served}"
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    probe = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, env=env, timeout=30
    )
    return probe.returncode


@pytest.mark.parametrize("service", APIS)
@pytest.mark.parametrize("status", [200, 503])
def test_api_replica_stays_healthy_while_it_answers_health_with_a_dependency_down(
    service: str, status: int
) -> None:
    # 503 is /health/ naming a dependency that is down: the process still serves.
    with health_route_answering(status) as port:
        assert run_api_healthcheck(service, port) == 0


@pytest.mark.parametrize("service", APIS)
@pytest.mark.parametrize("status", [404, 500])
def test_api_replica_is_unhealthy_when_health_answers_an_error_of_its_own(
    service: str, status: int
) -> None:
    with health_route_answering(status) as port:
        assert run_api_healthcheck(service, port) != 0


@pytest.mark.parametrize("service", APIS)
def test_api_replica_is_unhealthy_when_nothing_answers_http(service: str) -> None:
    with port_closing_every_connection() as port:
        assert run_api_healthcheck(service, port) != 0
    # Bound but not listening: the connection is refused.
    with socket.socket() as unbound:
        unbound.bind(("127.0.0.1", 0))
        assert run_api_healthcheck(service, unbound.getsockname()[1]) != 0


def test_api_health_probe_gives_up_before_docker_stops_waiting_for_it() -> None:
    for name in APIS:
        healthcheck = SERVICES[name]["healthcheck"]
        (probe_timeout,) = re.findall(r"timeout=(\d+)", healthcheck["test"][3])

        assert int(probe_timeout) < duration_s(healthcheck["timeout"])


def setting(service: str, name: str) -> Any:
    """The value `service` runs with for the Settings field `name`."""
    field = Settings.model_fields[name]
    value = environment(service).get(f"HELIX_{name.upper()}")
    if value is None:
        return field.default
    return TypeAdapter(field.annotation).validate_python(value)


def longest_request_s(service: str) -> float:
    """How long the longest request `service` serves may take, from the code.

    A job read with `?wait=MAX_WAIT_S` and a Helix-Position first waits for the
    jobs projection (the read-your-writes bound), then for the job, then checks a
    connection out of the pool for its last look (the pool timeout).
    """
    return (
        setting(service, "read_your_writes_timeout_s")
        + job_routes.MAX_WAIT_S
        + 2 * setting(service, "database_connect_timeout_s")
    )


@pytest.mark.parametrize("service", APIS)
def test_api_stop_waits_for_the_longest_request_to_be_answered(service: str) -> None:
    grace_s = duration_s(SERVICES[service].get("stop_grace_period", "10s"))
    argv = command(service)

    assert grace_s > longest_request_s(service)
    # uvicorn waits for open requests unless told to cut them short.
    if "--timeout-graceful-shutdown" in argv:
        cut_s = float(option(argv, "--timeout-graceful-shutdown"))
        assert longest_request_s(service) < cut_s < grace_s
    # Docker's init (tini) passes SIGTERM on to uvicorn rather than ignoring it.
    assert SERVICES[service]["init"] is True


def test_images_of_stores_and_tools_are_the_versions_chosen() -> None:
    assert SERVICES["traefik"]["image"].startswith("traefik:v3")
    assert SERVICES["postgres"]["image"].startswith("postgres:15")
    assert re.fullmatch(r"rabbitmq:3\.1[23]-management", SERVICES["rabbitmq"]["image"])
    assert SERVICES["redis"]["image"].startswith("redis:7")


def test_stores_have_healthchecks_that_probe_them() -> None:
    probes = {
        name: " ".join(SERVICES[name]["healthcheck"]["test"])
        for name in ("postgres", "rabbitmq", "redis")
    }

    assert "pg_isready" in probes["postgres"]
    assert "rabbitmq-diagnostics" in probes["rabbitmq"]
    assert "redis-cli ping" in probes["redis"]
    assert volume_target("postgres", "postgres-data") == "/var/lib/postgresql/data"
    # RabbitMQ keys its data directory by node name, so the host name must not drift.
    assert SERVICES["rabbitmq"]["hostname"] == "rabbitmq"


# -- PostgreSQL connections ----------------------------------------------------------

# Packages whose processes connect to PostgreSQL, and the migrations `migrate` runs.
CONNECTING_CODE = ("shared", "command_api", "query_api", "projectors", "workers")
# pgAdmin's maintenance database, a browsed database and some query tool tabs,
# for a couple of operators at once.
PGADMIN_CONNECTIONS = 10
# PostgreSQL's defaults, unless the postgres service's command sets them.
POSTGRES_DEFAULTS = {"max_connections": 100, "superuser_reserved_connections": 3}


def postgres_setting(name: str) -> int:
    argv = command("postgres") if "command" in SERVICES["postgres"] else []
    for flag, value in zip(argv, argv[1:], strict=False):
        if flag == "-c" and value.startswith(f"{name}="):
            return int(value.split("=", 1)[1])
    return POSTGRES_DEFAULTS[name]


def connections_of_one_container(service: str) -> int:
    """The most PostgreSQL connections one container of `service` holds at once.

    Read from the code; `test_every_place_that_opens_connections_is_counted`
    fails when a place that opens them is added without being counted here.
    """
    pool_size = setting(service, "database_pool_size")
    argv = command(service)
    if service == "command-api":
        # shared.web.service_resources: one engine a process.
        return int(pool_size)
    if service == "query-api":
        # The same engine, and query_api.job_waits.JobWaits: a LISTEN connection of
        # its own from the first `?wait` on.
        return int(pool_size) + 1
    if service == "projectors":
        # projectors.runner: one engine for the relay and every projection; the
        # relay's advisory-lock session and its LogListener, each a connection of
        # its own; projectors.dispatcher: an engine of its own.
        return int(pool_size) + 2 + dispatcher.POOL_SIZE
    if service == "worker":
        # Celery's parent process opens none; workers.runtime gives each pool
        # process (prefork) or thread its own engine of runtime.POOL_SIZE.
        pooled = [a for a in argv if a in ("--pool", "-P") or a.startswith("--pool=")]
        pool = option(argv, "--pool", "-P") if pooled else "prefork"
        assert pool in ("prefork", "threads"), pool
        return int(option(argv, "--concurrency", "-c")) * runtime.POOL_SIZE
    if service == "migrate":
        # shared.database_setup and migrations/env.py use one connection at a
        # time, closed before command_api.setup seeds through its own engine.
        return command_setup.POOL_SIZE
    if service == "flower":
        # Celery's dashboard talks to RabbitMQ only.
        return 0
    raise AssertionError(f"no connection count for {service}")


def readme_scale_example() -> dict[str, int]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Scaling", 1)[1].split("\n#", 1)[0]
    (example,) = [line for line in section.splitlines() if "--scale" in line]

    return {name: int(n) for name, n in re.findall(r"--scale ([\w-]+)=(\d+)", example)}


def test_readme_scale_example_fits_in_postgres_max_connections() -> None:
    scale = readme_scale_example()
    containers = {
        name: scale.get(name, SERVICES[name].get("deploy", {}).get("replicas", 1))
        for name in PROCESSES
    }
    # An operator's `helix` session beside the stack: its engine, and the
    # LogListener of `events tail --follow`.
    helix_cli = cli.POOL_SIZE + 1
    # `migrate` runs again beside the stack after an upgrade.
    opened = helix_cli + sum(
        containers[name] * connections_of_one_container(name) for name in PROCESSES
    )
    spare = PGADMIN_CONNECTIONS + postgres_setting("superuser_reserved_connections")

    assert set(scale) <= PROCESSES and scale["worker"] > 1
    assert opened + spare <= postgres_setting("max_connections"), opened


def connection_openers(path: Path, listeners: set[str]) -> list[str]:
    """The calls in `path` that open PostgreSQL connections of their own."""
    openers = {
        "create_engine",
        "create_async_engine",
        "psycopg.connect",
        "psycopg.AsyncConnection.connect",
        *listeners,
    }
    return [
        ast.unparse(node.func)
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call) and ast.unparse(node.func) in openers
    ]


def notification_listeners(paths: list[Path]) -> set[str]:
    """NotificationListener and every class derived from it: each LISTENs on a
    connection of its own."""
    classes = [
        node
        for path in paths
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ClassDef)
    ]
    found = {"NotificationListener"}
    while True:
        derived = {c.name for c in classes if {ast.unparse(b) for b in c.bases} & found}
        if derived <= found:
            return found
        found |= derived


def test_every_place_that_opens_connections_is_counted() -> None:
    paths = [
        path
        for folder in (*CONNECTING_CODE, "migrations")
        for path in sorted((ROOT / folder).rglob("*.py"))
    ]
    listeners = notification_listeners(paths)
    found = {
        (str(path.relative_to(ROOT)), opener)
        for path in paths
        for opener in connection_openers(path, listeners)
    }

    # Each is counted in connections_of_one_container or beside it.
    assert found == {
        ("shared/db.py", "create_async_engine"),  # what create_engine builds
        ("shared/web.py", "create_engine"),  # the APIs
        ("query_api/app.py", "JobWaits"),
        ("shared/log_listener.py", "psycopg.AsyncConnection.connect"),  # listeners
        ("projectors/runner.py", "create_engine"),
        ("projectors/relay.py", "psycopg.AsyncConnection.connect"),  # its lock
        ("projectors/relay.py", "LogListener"),
        ("projectors/dispatcher.py", "create_engine"),
        ("workers/runtime.py", "create_engine"),
        ("shared/database_setup.py", "psycopg.connect"),  # migrate
        ("migrations/env.py", "create_engine"),  # migrate
        ("command_api/setup.py", "create_engine"),  # migrate
        ("projectors/cli.py", "create_engine"),  # helix
        ("projectors/cli.py", "LogListener"),  # helix events tail --follow
    }


# -- Start order ---------------------------------------------------------------------


def test_every_dependency_names_a_service_with_a_valid_condition() -> None:
    for name in SERVICES:
        for target, condition in depends_on(name).items():
            assert target in SERVICES, f"{name} depends on unknown {target}"
            assert condition in DEPENDENCY_CONDITIONS, f"{name}: {condition}"
            if condition == "service_healthy":
                assert "healthcheck" in SERVICES[target], f"{target} has no healthcheck"
            if condition == "service_completed_successfully":
                assert target in ONE_SHOTS
                assert SERVICES[target].get("restart", "no") == "no"


def test_every_process_waits_for_migrations_and_healthy_stores() -> None:
    for name in PROCESSES - {"migrate"}:
        assert depends_on(name)["migrate"] == "service_completed_successfully"
        for store in ("postgres", "rabbitmq", "redis"):
            assert depends_on(name)[store] == "service_healthy", f"{name} on {store}"


def test_migrations_wait_for_a_healthy_postgres_and_run_once() -> None:
    assert depends_on("migrate") == {"postgres": "service_healthy"}
    assert SERVICES["migrate"].get("restart") == "no"


def test_start_order_has_no_cycle() -> None:
    done: set[str] = set()
    pending = set(SERVICES)
    while pending:
        ready = {name for name in pending if set(depends_on(name)) <= done}
        assert ready, f"dependency cycle among {sorted(pending)}"
        done |= ready
        pending -= ready


def test_long_running_services_restart_and_one_shots_do_not() -> None:
    for name, service in SERVICES.items():
        expected = "no" if name in ONE_SHOTS else "unless-stopped"
        assert service.get("restart") == expected, name


def test_every_volume_network_and_secret_a_service_uses_is_declared() -> None:
    for name, service in SERVICES.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/", "$")):
                assert source in COMPOSE["volumes"], f"{name}: volume {source}"
            elif source.startswith("."):
                path = (COMPOSE_DIR / source).resolve()
                assert path.exists() or path.name == "certs", f"{name}: {source}"
        for network in service.get("networks", []):
            assert network in COMPOSE["networks"], f"{name}: network {network}"
        for secret in service.get("secrets", []):
            assert secret in COMPOSE["secrets"], f"{name}: secret {secret}"


def test_postgres_and_redis_are_not_on_the_network_traefik_can_reach() -> None:
    for name in ("postgres", "redis"):
        assert "edge" not in SERVICES[name]["networks"]
    assert SERVICES["traefik"]["networks"] == ["edge"]


# -- Traefik -------------------------------------------------------------------------


def test_http_is_redirected_to_the_https_entrypoint() -> None:
    web = STATIC["entryPoints"]["web"]
    websecure = STATIC["entryPoints"]["websecure"]

    assert web["address"] == ":80"
    assert web["http"]["redirections"]["entryPoint"] == {
        "to": "websecure",
        "scheme": "https",
        "permanent": True,
    }
    assert websecure["address"] == ":443"
    assert "tls" in websecure["http"]


def test_traefik_reads_the_files_and_network_that_compose_gives_it() -> None:
    providers = STATIC["providers"]

    assert (
        volume_target("traefik", "../traefik/traefik.yml") == "/etc/traefik/traefik.yml"
    )
    assert (
        volume_target("traefik", "../traefik/dynamic") == providers["file"]["directory"]
    )
    assert providers["docker"]["exposedByDefault"] is False
    assert providers["docker"]["network"] == COMPOSE["networks"]["edge"]["name"]
    socket = providers["docker"]["endpoint"].removeprefix("unix://")
    assert volume_target("traefik", "/var/run/docker.sock") == socket


def test_traefik_dashboard_is_served_only_behind_basic_auth() -> None:
    dashboards = [r for r in ROUTERS if r.service == "api@internal"]
    middlewares = file_middlewares()

    assert STATIC["api"].get("insecure", False) is False
    assert dashboards
    for router in dashboards:
        assert any(
            "basicAuth" in middlewares[m.split("@")[0]] for m in router.middlewares
        )
    ping = STATIC["entryPoints"][STATIC["ping"]["entryPoint"]]["address"]
    assert ping.lstrip(":") not in {
        p.split(":")[0] for p in SERVICES["traefik"]["ports"]
    }


def test_every_router_serves_https_only() -> None:
    assert ROUTERS
    for router in ROUTERS:
        assert router.entrypoints == ("websecure",), router.name
        assert router.tls, router.name


def test_every_router_names_a_service_and_middlewares_that_exist() -> None:
    services = label_services()
    middlewares = file_middlewares()

    for router in ROUTERS:
        assert router.service in services or router.service == "api@internal"
        if router.owner != "file":
            assert services[router.service][0] == router.owner, router.name
        for middleware in router.middlewares:
            name, _, provider = middleware.partition("@")
            assert provider in ("file", "") and name in middlewares, middleware
    entry_middlewares = STATIC["entryPoints"]["websecure"]["http"]["middlewares"]
    assert all(m.split("@")[0] in middlewares for m in entry_middlewares)


def test_routers_sharing_a_host_have_explicit_priorities() -> None:
    for host in HOSTS:
        sharing = [r for r in ROUTERS if host in rule_hosts(r.rule)]
        if len(sharing) > 1:
            assert all(r.priority is not None for r in sharing), host


@pytest.mark.parametrize(
    ("method", "host", "path", "service"),
    EXPECTED_ROUTES,
)
def test_request_reaches_the_service_that_answers_it(
    method: str, host: str, path: str, service: str
) -> None:
    assert route(method, host, path) == service


def test_request_for_an_unknown_host_reaches_no_service() -> None:
    assert route("GET", "example.com", "/") is None
    assert route("POST", "helix.example", "/api/v1/token") is None


def test_rabbitmq_host_reaches_the_management_ui_port() -> None:
    assert label_services()["rabbitmq"] == ("rabbitmq", 15672)
    assert label_services()["flower"][1] == int(option(command("flower"), "--port"))
    for api in APIS:
        assert label_services()[api][1] == int(option(command(api), "--port"))


def test_operator_tools_and_metrics_ask_for_the_operators_password() -> None:
    middleware = file_middlewares()["operators-auth"]["basicAuth"]
    secret = SERVICES["traefik"]["secrets"][0]

    for host, path in [("flower.helix.local", "/"), ("helix.local", "/metrics")]:
        request = ("GET", host, path)
        router = max(
            (r for r in ROUTERS if parse_rule(r.rule)(request)),
            key=lambda r: r.effective_priority,
        )
        assert any(m.startswith("operators-auth") for m in router.middlewares), host
    assert middleware["usersFile"] == f"/run/secrets/{secret}"


def test_traefik_serves_the_certificate_the_certificates_service_installs() -> None:
    script = load_certificate_script()
    default = DYNAMIC["tls.yml"]["tls"]["stores"]["default"]["defaultCertificate"]
    mounted = volume_target("traefik", "certificates")
    written = volume_target("certificates", "certificates")

    assert default["certFile"] == f"{mounted}/{script.CERTIFICATE_NAME}"
    assert default["keyFile"] == f"{mounted}/{script.KEY_NAME}"
    assert option(command("certificates"), "--output") == written
    provided = option(command("certificates"), "--provided")
    assert provided == volume_target("certificates", "./certs")
    assert depends_on("traefik") == {"certificates": "service_completed_successfully"}
    assert (
        DYNAMIC["tls.yml"]["tls"]["options"]["default"]["minVersion"] == "VersionTLS12"
    )


def test_certificate_covers_every_host_traefik_routes() -> None:
    routed = set().union(*(rule_hosts(r.rule) for r in ROUTERS))
    covered = set(environment("certificates")["HELIX_TLS_HOSTS"].split(","))

    assert routed == HOSTS
    assert routed <= covered


def test_pgadmin_knows_the_stack_database() -> None:
    servers = json.loads((COMPOSE_DIR / "pgadmin" / "servers.json").read_text())
    (server,) = servers["Servers"].values()
    postgres = environment("postgres")

    assert (server["Host"], server["Port"]) == ("postgres", 5432)
    assert server["Username"] == postgres["POSTGRES_USER"]
    assert server["MaintenanceDB"] == postgres["POSTGRES_DB"]
    assert (
        volume_target("pgadmin", "./pgadmin/servers.json") == "/pgadmin4/servers.json"
    )


def load_certificate_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "ensure_certificate", CERTIFICATE_SCRIPT
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- The image -----------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str


def dockerfile() -> list[Instruction]:
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    found = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            keyword, _, arguments = line.strip().partition(" ")
            found.append(Instruction(keyword.upper(), arguments.strip()))
    return found


def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def installed_packages() -> list[str]:
    include = pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    return [pattern.rstrip("*") for pattern in include]


def test_image_is_python_311_slim() -> None:
    (base,) = [i.arguments for i in dockerfile() if i.keyword == "FROM"]

    assert base == "python:3.11-slim"


def test_image_installs_the_project_from_pyproject_then_drops_root() -> None:
    instructions = dockerfile()
    runs = [i.arguments for i in instructions if i.keyword == "RUN"]
    users = [index for index, i in enumerate(instructions) if i.keyword == "USER"]
    last_run = max(index for index, i in enumerate(instructions) if i.keyword == "RUN")

    assert any("pyproject.toml" in run and "pip install" in run for run in runs)
    assert any(re.search(r"pip install .*--editable \.$", run) for run in runs)
    assert users and users[-1] > last_run
    user = instructions[users[-1]].arguments.split(":")[0]
    assert user not in {"root", "0"}
    assert any(re.search(rf"useradd .*\b{user}$", run) for run in runs)


def test_image_default_command_serves_an_installed_package() -> None:
    (cmd,) = [i.arguments for i in dockerfile() if i.keyword == "CMD"]
    argv = json.loads(cmd)

    assert argv[0] == "uvicorn" and "--factory" in argv
    assert argv[1].split(".")[0] in installed_packages()
    check_entry_point(argv)
    assert not [i for i in dockerfile() if i.keyword in ("ENTRYPOINT", "HEALTHCHECK")]


def dockerignore_excludes(path: str) -> bool:
    """Whether the build context leaves `path` out, by Docker's last-match-wins rule."""
    excluded = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negated = pattern.startswith("!")
        regex = _glob_regex(pattern.lstrip("!").strip("/"))
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            excluded = not negated
    return excluded


def _glob_regex(pattern: str) -> re.Pattern[str]:
    out, index = "", 0
    while index < len(pattern):
        if pattern.startswith("**/", index):
            out, index = out + "(?:.*/)?", index + 3
        elif pattern.startswith("**", index):
            out, index = out + ".*", index + 2
        elif pattern[index] == "*":
            out, index = out + "[^/]*", index + 1
        elif pattern[index] == "?":
            out, index = out + "[^/]", index + 1
        elif pattern[index] == "[":
            end = pattern.index("]", index)
            out, index = out + pattern[index : end + 1], end + 1
        else:
            out, index = out + re.escape(pattern[index]), index + 1
    return re.compile(out)


def test_build_context_holds_everything_the_image_installs_and_migrates() -> None:
    needed = ["pyproject.toml", "README.md", "alembic.ini", "migrations/env.py"]
    needed += [f"{package}/__init__.py" for package in installed_packages()]

    assert [path for path in needed if dockerignore_excludes(path)] == []
    assert (ROOT / "alembic.ini").is_file() and (
        ROOT / "migrations" / "env.py"
    ).is_file()


def test_build_context_leaves_out_secrets_history_and_tests() -> None:
    kept_out = [
        ".env",
        "compose/.env",
        "compose/secrets/operators.htpasswd",
        "compose/certs/tls.key",
        ".git/config",
        ".venv/bin/python",
        "tests/conftest.py",
        "shared/__pycache__/settings.cpython-311.pyc",
        "shared/.env",
    ]

    assert [path for path in kept_out if not dockerignore_excludes(path)] == []


def test_readme_explains_the_stack_and_every_host() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Docker Compose stack", 1)[1].split("\n## ", 1)[0]

    for host in HOSTS:
        assert f"127.0.0.1  {host}" in section or f"127.0.0.1 {host}" in section, host
    assert "compose/.env" in section
