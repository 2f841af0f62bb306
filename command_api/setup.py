"""`make setup`: create and migrate the database, then seed the first superuser."""

import asyncio
import logging
from uuid import UUID

from command_api.user_commands import CommandContext, register_user
from shared.auth import PasswordHasher
from shared.database_setup import create_database_if_missing, migrate
from shared.db import connect, create_engine, name_sessions
from shared.errors import Conflict
from shared.event_store import EventStore
from shared.logging import configure_logging
from shared.settings import Settings, get_settings
from shared.users import normalise_email

log = logging.getLogger(__name__)

POOL_SIZE = 2


async def seed_first_superuser(settings: Settings) -> UUID | None:
    """Register the settings' first superuser unless an active superuser exists.

    So an operator who renamed, re-passworded or retired the seeded account does
    not find it back after the next setup, and one locked out of every superuser
    account gets one. Safe to run any number of times, also at once: the email
    reservation lets exactly one registration through. The new user's id, or None.
    """
    email = normalise_email(settings.first_superuser_email)
    engine = create_engine(settings, pool_size=POOL_SIZE)
    try:
        async with connect(engine) as connection:
            active = await connection.exec_driver_sql(
                "SELECT 1 FROM user_credentials WHERE is_superuser AND is_active"
                " LIMIT 1"
            )
            if active.first() is not None:
                log.info("an active superuser exists; none seeded")
                return None
            taken = await connection.exec_driver_sql(
                "SELECT 1 FROM user_email_reservations WHERE email = %(email)s",
                {"email": email},
            )
            if taken.first() is not None:
                log.warning(
                    "no active superuser, and the first superuser's email is"
                    " taken: set HELIX_FIRST_SUPERUSER_EMAIL to a free address"
                )
                return None
        try:
            result = await register_user(
                store=EventStore(engine),
                hasher=PasswordHasher.for_settings(settings),
                email=email,
                password=settings.first_superuser_password.get_secret_value(),
                full_name=None,
                is_superuser=True,
                context=CommandContext(correlation_id=None, source="setup"),
            )
        except Conflict:
            log.info("first superuser was created concurrently")
            return None
    finally:
        await engine.dispose()
    log.info("first superuser created", extra={"user_id": str(result.user.id)})
    return result.user.id


def main() -> None:
    settings = get_settings()
    configure_logging(settings)
    name_sessions("setup")
    create_database_if_missing(settings.database_url)
    migrate(settings.database_url)
    log.info("database is at the newest schema")
    asyncio.run(seed_first_superuser(settings))


if __name__ == "__main__":
    main()
