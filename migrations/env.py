"""Alembic runs migrations with a plain (sync) psycopg connection."""

from alembic import context
from sqlalchemy import create_engine, pool

from shared.db import application_name
from shared.settings import get_settings

url = context.config.attributes.get("database_url") or get_settings().database_url


def run_migrations() -> None:
    engine = create_engine(
        url,
        poolclass=pool.NullPool,
        connect_args={"application_name": application_name()},
    )
    with engine.connect() as connection:
        context.configure(connection=connection, transaction_per_migration=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    context.configure(url=url, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    run_migrations()
