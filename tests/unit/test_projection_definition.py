"""A projection's definition is checked when it is made, not when it first runs."""

import pytest

from projectors.framework import Projection, ProjectionTx
from shared.event_store import RecordedEvent


def things(**changes: object) -> Projection:
    definition: dict[str, object] = {
        "name": "things",
        "tables": {"things": "id text PRIMARY KEY"},
    }
    definition.update(changes)
    return Projection(**definition)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["Things", "1things", "things;drop", "relay", ""])
def test_a_name_that_is_not_a_plain_identifier_is_refused(name):
    with pytest.raises(ValueError):
        things(name=name)


def test_a_table_name_that_is_not_a_plain_identifier_is_refused():
    with pytest.raises(ValueError):
        things(tables={"things x": "id text"})


def test_an_index_on_a_table_the_projection_does_not_have_is_refused():
    with pytest.raises(ValueError):
        things(indexes={"others": ["id"]})


def test_two_handlers_for_one_event_type_are_refused():
    projection = things()

    @projection.handles("ThingHappened")
    async def first(tx: ProjectionTx, event: RecordedEvent) -> None: ...

    with pytest.raises(ValueError):

        @projection.handles_sql("ThingHappened")
        def second(tx: ProjectionTx) -> str:
            return ""


def test_the_schema_hash_follows_the_table_definitions_only():
    assert things().schema_hash == things().schema_hash
    assert things().schema_hash != things(tables={"things": "id uuid"}).schema_hash
    assert things().schema_hash != things(indexes={"things": ["id"]}).schema_hash


def test_a_projection_is_set_based_only_when_every_handler_is_sql():
    projection = things()

    @projection.handles_sql("ThingHappened")
    def add(tx: ProjectionTx) -> str:
        return ""

    assert projection.set_based

    @projection.handles("ThingRenamed")
    async def rename(tx: ProjectionTx, event: RecordedEvent) -> None: ...

    assert not projection.set_based
    assert projection.event_types == ["ThingHappened", "ThingRenamed"]
    assert projection.generation_tables(3) == {"things": "things_g3"}
