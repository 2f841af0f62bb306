from collections.abc import AsyncIterator, Iterator

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.db import create_engine
from shared.event_store import EventStore
from shared.settings import Settings
from tests import databases
from tests.stack import settings_for


@pytest.fixture(scope="session")
def database_template() -> Iterator[str]:
    name = databases.create_template()
    yield name
    databases.drop(name)


@pytest.fixture
def database_url(database_template: str) -> Iterator[str]:
    """A freshly migrated database of this test's own, dropped afterwards."""
    name = databases.clone(database_template)
    yield databases.database_url(name)
    databases.drop(name)


@pytest.fixture
def settings(database_url: str) -> Settings:
    return settings_for(database_url)


@pytest.fixture
async def engine(settings: Settings) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(settings, pool_size=20)
    yield engine
    await engine.dispose()


@pytest.fixture
def store(engine: AsyncEngine) -> EventStore:
    return EventStore(engine)
