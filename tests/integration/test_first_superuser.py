import asyncio

from sqlalchemy.ext.asyncio import AsyncEngine

from command_api.setup import seed_first_superuser
from shared.settings import Settings
from tests.user_api import gateway_client, settings_with_own_superuser, sign_in


async def test_seeding_twice_and_at_once_creates_one_superuser(
    settings: Settings, engine: AsyncEngine
) -> None:
    app_settings = settings_with_own_superuser(settings)

    created = await asyncio.gather(
        *(seed_first_superuser(app_settings) for _ in range(3))
    )
    again = await seed_first_superuser(app_settings)

    assert sum(user_id is not None for user_id in created) == 1
    assert again is None
    async with engine.connect() as connection:
        result = await connection.exec_driver_sql(
            "SELECT count(*) FROM user_credentials WHERE is_superuser"
        )
        assert result.scalar_one() == 1


async def test_the_seeded_superuser_signs_in_with_the_configured_password(
    settings: Settings,
) -> None:
    app_settings = settings_with_own_superuser(settings)
    await seed_first_superuser(app_settings)

    async with gateway_client(app_settings) as client:
        token = await sign_in(
            client,
            app_settings.first_superuser_email,
            app_settings.first_superuser_password.get_secret_value(),
        )
        listing = await client.get(
            "/api/v1/audit", headers={"Authorization": f"Bearer {token}"}
        )

    assert listing.status_code == 200
