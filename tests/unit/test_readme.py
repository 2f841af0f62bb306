"""The README against what it documents: settings, Procfile, Compose, tests."""

import re
from pathlib import Path

from pydantic import SecretStr

from shared.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
# `${HELIX_NAME}`, `${HELIX_NAME:-default}`, `${HELIX_NAME:?message}`, as the
# Procfile and Compose write them.
REFERENCE = re.compile(r"\$\{(HELIX_[A-Z0-9_]+)(?::?([-?+])([^}]*))?\}")


def section(heading: str) -> str:
    """The text under `heading`, up to the next heading of the same level."""
    level = heading.split(" ", 1)[0]
    after = README.split(f"\n{heading}\n", 1)[1]
    return re.split(rf"\n{level} ", after, maxsplit=1)[0]


def documented_defaults() -> dict[str, str]:
    """Variable -> default, from the tables of the Configuration section."""
    rows = {}
    for line in section("## Configuration").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and re.fullmatch(r"`HELIX_[A-Z0-9_]+`", cells[0]):
            rows[cells[0].strip("`")] = cells[1]
    return rows


def test_configuration_lists_every_setting_with_its_default() -> None:
    documented = documented_defaults()

    for name, field in Settings.model_fields.items():
        variable = f"HELIX_{name.upper()}"
        assert variable in documented, f"{variable} is not in the README"
        if field.annotation is not SecretStr:
            assert documented[variable] == f"`{field.default}`", variable


def test_configuration_lists_every_variable_the_procfile_reads() -> None:
    documented = documented_defaults()
    procfile = (ROOT / "Procfile").read_text()
    read = {
        variable: default if operator == "-" else ""
        for variable, operator, default in REFERENCE.findall(procfile)
    }

    assert {"HELIX_HOST", "HELIX_PORT", "HELIX_FLOWER_PORT"} <= set(read)
    for variable, default in read.items():
        assert variable in documented, f"{variable} is not in the README"
        assert documented[variable] == f"`{default}`", variable


def test_configuration_names_every_variable_compose_reads() -> None:
    configuration = section("## Configuration")
    compose = (ROOT / "compose" / "compose.yaml").read_text()

    for variable, _, _ in REFERENCE.findall(compose):
        assert f"`{variable}`" in configuration, f"{variable} is not in the README"


def test_make_test_prerequisites_say_which_tests_stop_the_local_rabbitmq() -> None:
    prerequisites = section("## Two commands")
    stopping = [
        path.relative_to(ROOT).as_posix()
        for path in sorted((ROOT / "tests").rglob("*.py"))
        if path != Path(__file__).resolve()
        and re.search(r"\bstop_app\b|\brabbitmq_stopped\(", path.read_text())
    ]

    assert "tests/broker.py" in stopping
    assert "rabbitmqctl stop_app" in prerequisites
    assert "rabbitmqctl start_app" in prerequisites
    for path in stopping:
        assert f"`{path}`" in prerequisites, f"{path} is not named"
