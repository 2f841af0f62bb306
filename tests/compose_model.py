"""The Compose stack and Traefik's configuration as data, for the tests that check them.

Reads compose/compose.yaml the way `docker compose` does (YAML anchors and merge keys,
then `${VAR}` interpolation from the environment) and collects Traefik's routers from
the Docker labels and from traefik/dynamic/, with a reader for the v3 rule syntax.
"""

import re
import shlex
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_DIR = ROOT / "compose"
COMPOSE_FILE = COMPOSE_DIR / "compose.yaml"
TRAEFIK_DIR = ROOT / "traefik"
HOSTS = {
    "helix.local",
    "flower.helix.local",
    "pgadmin.helix.local",
    "rabbitmq.helix.local",
    "traefik.helix.local",
}

# Who answers what: (method, host, path) -> compose service, or Traefik's own.
EXPECTED_ROUTES: list[tuple[str, str, str, str]] = [
    ("GET", "helix.local", "/api/v1/jobs/", "query-api"),
    ("GET", "helix.local", "/api/v1/users/me", "query-api"),
    ("HEAD", "helix.local", "/api/v1/jobs/42", "query-api"),
    ("GET", "helix.local", "/api/v1/audit", "query-api"),
    ("GET", "helix.local", "/docs", "query-api"),
    ("GET", "helix.local", "/openapi.json", "query-api"),
    ("GET", "helix.local", "/health/", "query-api"),
    ("GET", "helix.local", "/metrics", "query-api"),
    ("POST", "helix.local", "/api/v1/token", "command-api"),
    ("POST", "helix.local", "/api/v1/users/", "command-api"),
    ("POST", "helix.local", "/api/v1/jobs/", "command-api"),
    ("POST", "helix.local", "/api/v1/jobs/42/cancel", "command-api"),
    ("PATCH", "helix.local", "/api/v1/users/42", "command-api"),
    ("DELETE", "helix.local", "/api/v1/users/42", "command-api"),
    ("GET", "helix.local", "/commands/docs", "command-api"),
    ("GET", "helix.local", "/commands/openapi.json", "command-api"),
    ("GET", "flower.helix.local", "/", "flower"),
    ("POST", "flower.helix.local", "/api/task/revoke/1", "flower"),
    ("GET", "pgadmin.helix.local", "/", "pgadmin"),
    ("POST", "pgadmin.helix.local", "/authenticate/login", "pgadmin"),
    ("GET", "rabbitmq.helix.local", "/", "rabbitmq"),
    ("GET", "traefik.helix.local", "/dashboard/", "api@internal"),
]


# -- Compose interpolation, as `docker compose` does it -----------------------------


class MissingVariable(Exception):
    pass


_REFERENCE = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^}]*)\}|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)
_BRACED = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])(.*))?", re.DOTALL)


def interpolate_text(text: str, env: Mapping[str, str]) -> str:
    def substitute(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        if match["named"]:
            return env.get(match["named"], "")
        parsed = _BRACED.fullmatch(match["braced"])
        assert parsed, f"unsupported interpolation ${{{match['braced']}}}"
        name, operator, argument = parsed.groups()
        value = env.get(name)
        if operator in (":?", "?") and (
            value is None or (operator == ":?" and not value)
        ):
            raise MissingVariable(f"{name}: {argument}")
        if operator == ":-":
            return value or argument
        if operator == "-":
            return argument if value is None else value
        if operator == ":+":
            return argument if value else ""
        if operator == "+":
            return "" if value is None else argument
        return value or ""

    return _REFERENCE.sub(substitute, text)


def interpolate(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate_text(node, env)
    if isinstance(node, list):
        return [interpolate(item, env) for item in node]
    if isinstance(node, dict):
        return {key: interpolate(value, env) for key, value in node.items()}
    return node


def required_variables(text: str) -> set[str]:
    return set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*):?\?", text))


def filled_in(names: set[str]) -> dict[str, str]:
    """A value for each variable, as an operator following .env.example would set."""
    return {name: _operator_value(name) for name in names}


def _operator_value(name: str) -> str:
    if name.endswith("EMAIL"):
        return "ops@helix.net"
    if name.endswith("MASTER_KEYS"):
        # A Fernet key: 32 bytes, url-safe base64.
        return "N2YzYTljN2YzYTljN2YzYTljN2YzYTljN2YzYTljN2Y="
    return f"{name.lower()}-{'7f3a9c' * 6}"


# -- Loading -------------------------------------------------------------------------


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


RAW_COMPOSE: dict[str, Any] = load_yaml(COMPOSE_FILE)
REQUIRED = required_variables(COMPOSE_FILE.read_text())
OPERATOR_ENV = filled_in(REQUIRED)
COMPOSE: dict[str, Any] = interpolate(RAW_COMPOSE, OPERATOR_ENV)
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
STATIC = load_yaml(TRAEFIK_DIR / "traefik.yml")
DYNAMIC = {
    path.name: load_yaml(path)
    for path in sorted((TRAEFIK_DIR / "dynamic").glob("*.y*ml"))
}


def environment(service: str) -> dict[str, str]:
    env = SERVICES[service].get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def raw_environment(service: str) -> dict[str, str]:
    env = RAW_COMPOSE["services"][service].get("environment") or {}
    return {key: str(value) for key, value in env.items()}


def command(service: str) -> list[str]:
    value = SERVICES[service]["command"]
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def option(argv: list[str], *names: str) -> str:
    for index, argument in enumerate(argv):
        for name in names:
            if argument == name:
                return argv[index + 1]
            if argument.startswith(f"{name}="):
                return argument.split("=", 1)[1]
    raise AssertionError(f"{argv} has none of {names}")


def depends_on(service: str) -> dict[str, str]:
    value = SERVICES[service].get("depends_on") or {}
    if isinstance(value, list):
        return {name: "service_started" for name in value}
    return {
        name: spec.get("condition", "service_started") for name, spec in value.items()
    }


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(h|ms|us|m|s)")
_DURATION_UNITS_S = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}


def duration_s(value: str) -> float:
    """Seconds in a Compose duration, such as `10s` or `1m30s`."""
    parts = _DURATION_PART.findall(value)
    assert parts and "".join(f"{n}{u}" for n, u in parts) == value, value
    return sum(float(number) * _DURATION_UNITS_S[unit] for number, unit in parts)


def volume_target(service: str, source: str) -> str:
    """Where `service` mounts `source` (a named volume or a path from compose/)."""
    for volume in SERVICES[service].get("volumes", []):
        mount_source, target = volume.split(":")[:2]
        if mount_source == source or (
            source.startswith(".")
            and (COMPOSE_DIR / mount_source).resolve()
            == (COMPOSE_DIR / source).resolve()
        ):
            return target
    raise AssertionError(f"{service} does not mount {source}")


# -- Traefik routers, from Docker labels and the file provider -----------------------


@dataclass(frozen=True)
class Router:
    name: str
    rule: str
    priority: int | None
    entrypoints: tuple[str, ...]
    tls: bool
    middlewares: tuple[str, ...]
    service: str
    owner: str  # the compose service carrying the labels, or "file"

    @property
    def effective_priority(self) -> int:
        # Traefik's default priority is the length of the rule.
        return self.priority if self.priority is not None else len(self.rule)


def labels(service: str) -> dict[str, str]:
    value = SERVICES[service].get("labels") or {}
    if isinstance(value, list):
        value = dict(item.split("=", 1) for item in value)
    return {key: str(item) for key, item in value.items()}


def label_routers() -> Iterator[Router]:
    for owner in SERVICES:
        found = labels(owner)
        if found.get("traefik.enable") != "true":
            continue
        names = {
            key.split(".")[3]
            for key in found
            if key.startswith("traefik.http.routers.")
        }
        for name in sorted(names):
            prefix = f"traefik.http.routers.{name}."
            attributes = {
                k[len(prefix) :]: v for k, v in found.items() if k.startswith(prefix)
            }
            yield Router(
                name=f"{name}@docker",
                rule=attributes["rule"],
                priority=int(attributes["priority"])
                if "priority" in attributes
                else None,
                entrypoints=tuple(_split(attributes.get("entrypoints", ""))),
                tls=attributes.get("tls") == "true",
                middlewares=tuple(_split(attributes.get("middlewares", ""))),
                service=attributes.get("service", ""),
                owner=owner,
            )


def file_routers() -> Iterator[Router]:
    for document in DYNAMIC.values():
        for name, router in (
            (document or {}).get("http", {}).get("routers") or {}
        ).items():
            yield Router(
                name=f"{name}@file",
                rule=router["rule"],
                priority=router.get("priority"),
                entrypoints=tuple(router.get("entryPoints", ())),
                tls=router.get("tls") is not None,
                middlewares=tuple(router.get("middlewares", ())),
                service=router["service"],
                owner="file",
            )


def _split(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


ROUTERS = [*label_routers(), *file_routers()]


def file_middlewares() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for document in DYNAMIC.values():
        found.update((document or {}).get("http", {}).get("middlewares") or {})
    return found


def label_services() -> dict[str, tuple[str, int]]:
    """Traefik service name -> (compose service, port), from the labels."""
    found: dict[str, tuple[str, int]] = {}
    pattern = re.compile(
        r"traefik\.http\.services\.([^.]+)\.loadbalancer\.server\.port"
    )
    for owner in SERVICES:
        for key, value in labels(owner).items():
            if match := pattern.fullmatch(key):
                assert match[1] not in found, f"{match[1]} is defined twice"
                found[match[1]] = (owner, int(value))
    return found


Request = tuple[str, str, str]  # method, host, path
Matcher = Callable[[Request], bool]
_TOKEN = re.compile(r"\s*(?:(&&|\|\||!|\(|\))|([A-Za-z]+)\(((?:\s*`[^`]*`\s*,?)*)\))")
_MATCHERS: dict[str, Callable[[str], Matcher]] = {
    "Host": lambda value: lambda request: request[1].lower() == value.lower(),
    "Method": lambda value: lambda request: request[0] == value.upper(),
    "Path": lambda value: lambda request: request[2] == value,
    "PathPrefix": lambda value: lambda request: request[2].startswith(value),
}


def parse_rule(rule: str) -> Matcher:
    """Traefik v3 rule syntax: one value per matcher, &&, ||, ! and parentheses."""
    tokens: list[tuple[str, str, list[str]]] = []
    position = 0
    while position < len(rule.rstrip()):
        match = _TOKEN.match(rule, position)
        assert match, f"cannot read the rule at {rule[position:]!r}"
        operator, matcher, arguments = match.groups()
        if operator:
            tokens.append(("op", operator, []))
        else:
            values = re.findall(r"`([^`]*)`", arguments)
            assert matcher in _MATCHERS, f"{matcher} is not a matcher this test knows"
            assert len(values) == 1, f"Traefik v3 takes one value in {match[0]}"
            tokens.append(("matcher", matcher, values))
        position = match.end()

    def expression(index: int) -> tuple[Matcher, int]:
        left, index = conjunction(index)
        while index < len(tokens) and tokens[index][1] == "||":
            right, index = conjunction(index + 1)
            left = (lambda a, b: lambda r: a(r) or b(r))(left, right)
        return left, index

    def conjunction(index: int) -> tuple[Matcher, int]:
        left, index = factor(index)
        while index < len(tokens) and tokens[index][1] == "&&":
            right, index = factor(index + 1)
            left = (lambda a, b: lambda r: a(r) and b(r))(left, right)
        return left, index

    def factor(index: int) -> tuple[Matcher, int]:
        kind, value, values = tokens[index]
        if kind == "matcher":
            return _MATCHERS[value](values[0]), index + 1
        if value == "!":
            inner, index = factor(index + 1)
            return (lambda a: lambda r: not a(r))(inner), index
        assert value == "(", f"unexpected {value} in {rule}"
        inner, index = expression(index + 1)
        assert tokens[index][1] == ")", f"unbalanced parentheses in {rule}"
        return inner, index + 1

    matcher, end = expression(0)
    assert end == len(tokens), f"trailing tokens in {rule}"
    return matcher


def route(method: str, host: str, path: str) -> str | None:
    """The compose service (or Traefik internal service) that answers the request."""
    request = (method, host, path)
    matching = [r for r in ROUTERS if parse_rule(r.rule)(request)]
    if not matching:
        return None
    best = max(r.effective_priority for r in matching)
    winners = [r for r in matching if r.effective_priority == best]
    assert len(winners) == 1, f"{request} ties between {[r.name for r in winners]}"
    service = winners[0].service
    return service if service.endswith("@internal") else label_services()[service][0]


def rule_hosts(rule: str) -> set[str]:
    return set(re.findall(r"Host\(`([^`]*)`\)", rule))
