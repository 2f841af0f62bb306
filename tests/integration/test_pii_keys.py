"""Rotating the master key that wraps users' personal-data keys."""

import asyncio
import uuid

import pytest
from cryptography.fernet import Fernet
from typer.testing import CliRunner

from projectors import cli
from shared import pii
from shared.db import create_engine, transaction
from shared.settings import Settings
from tests.master_keys import master_keys_restored, use_master_keys
from tests.user_api import bearer, register, sign_in

pytestmark = pytest.mark.usefixtures(master_keys_restored.__name__)


def test_after_a_rewrap_the_old_master_key_can_go(database_url, monkeypatch):
    old, new = Fernet.generate_key(), Fernet.generate_key()
    users = [uuid.uuid4() for _ in range(5)]

    async def store_keys() -> dict[uuid.UUID, bytes]:
        engine = create_engine(Settings(database_url=database_url), pool_size=2)
        async with transaction(engine) as connection:
            keys = {user: await pii.create_key(connection, user) for user in users[:4]}
            # One stored as an older version did: not wrapped at all.
            keys[users[4]] = pii.new_key()
            await connection.exec_driver_sql(
                "INSERT INTO user_keys (user_id, key) VALUES (%s, %s)",
                (users[4], keys[users[4]]),
            )
        await engine.dispose()
        return keys

    async def load_keys() -> dict[uuid.UUID, bytes]:
        engine = create_engine(Settings(database_url=database_url), pool_size=2)
        async with engine.connect() as connection:
            loaded = await pii.load_keys(connection, users)
        await engine.dispose()
        return loaded

    use_master_keys(old)
    keys = asyncio.run(store_keys())
    use_master_keys(new, old)
    monkeypatch.setenv("HELIX_DATABASE_URL", database_url)

    result = CliRunner().invoke(cli.app, ["keys", "rewrap"])

    assert result.exit_code == 0, result.output
    assert "5 keys wrapped" in result.output
    use_master_keys(new)
    assert asyncio.run(load_keys()) == keys


async def test_a_key_no_listed_master_key_opens_is_an_error_not_an_erasure(engine):
    use_master_keys(Fernet.generate_key())
    user = uuid.uuid4()
    async with transaction(engine) as connection:
        await pii.create_key(connection, user)

    use_master_keys(Fernet.generate_key())

    async with engine.connect() as connection:
        with pytest.raises(pii.KeyUnavailable, match="HELIX_PII_MASTER_KEYS"):
            await pii.load_keys(connection, [user])
    with pytest.raises(pii.KeyUnavailable):
        await pii.rewrap_all(engine)


async def test_a_user_read_with_no_master_key_for_it_is_a_logged_500(client, caplog):
    user = await register(client)
    token = await sign_in(client, user["email"])
    use_master_keys(Fernet.generate_key())

    response = await client.get(
        f"/api/v1/users/{user['id']}/history", headers=bearer(token)
    )

    assert response.status_code == 500
    assert response.json() == {"detail": "internal error"}
    assert "HELIX_PII_MASTER_KEYS" in caplog.text
