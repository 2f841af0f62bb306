"""The name a process gives its PostgreSQL sessions comes from its component."""

import pytest

from shared import db


@pytest.fixture(autouse=True)
def unnamed(monkeypatch: pytest.MonkeyPatch) -> None:
    # Put back, after the test, whatever name the test process had.
    monkeypatch.setattr(db, "_component", None)


def test_a_process_not_named_uses_the_service_name():
    assert db.connect_options(5)["application_name"] == "helixnet-core"


def test_a_named_process_names_every_connection_after_its_component():
    db.name_sessions("projectors")

    assert db.connect_options(5)["application_name"] == "helixnet-core/projectors"
    assert db.connect_options(5, durable=False)["application_name"] == (
        "helixnet-core/projectors"
    )
    assert db.application_name() == "helixnet-core/projectors"
