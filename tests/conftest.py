import asyncio
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from projectors.framework import ensure_created
from projectors.projections.users import projection as users_projection
from shared.database_setup import migrate
from shared.db import create_engine
from shared.event_store import EventStore
from shared.settings import Settings
from tests import databases
from tests.broker import delete_test_objects
from tests.stack import SUFFIXES, settings_for
from tests.standby import Pair, hot_standby_pair
from tests.user_api import gateway_client, settings_with_own_superuser


@pytest.fixture(scope="session", autouse=True)
def broker_left_clean() -> Iterator[None]:
    """Delete, at the end of the run, what the run's tests made on RabbitMQ."""
    yield
    asyncio.run(delete_test_objects(Settings().rabbitmq_url, SUFFIXES))


@pytest.fixture(scope="session")
def database_template() -> Iterator[str]:
    name = databases.create_template()
    yield name
    databases.drop(name)


@pytest.fixture(scope="module")
def standby_pair() -> Iterator[Pair]:
    """A migrated primary and a hot standby of it, for the tests of one module."""
    with hot_standby_pair() as pair:
        migrate(pair.primary_url)
        yield pair


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


@pytest.fixture
def app_settings(settings: Settings) -> Settings:
    """The test's settings, with a first superuser of its own."""
    return settings_with_own_superuser(settings)


@pytest.fixture
async def users_table(engine: AsyncEngine) -> None:
    """The users read table, for tests that read users with no projector running."""
    await ensure_created(engine, [users_projection])


@pytest.fixture
async def client(app_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """Both APIs in this process, behind the gateway, on the test's database."""
    async with gateway_client(app_settings) as client:
        yield client
