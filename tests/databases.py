"""Throwaway databases for tests: one migrated template, one clone per test."""

import uuid

import psycopg
from psycopg import sql
from sqlalchemy.engine import make_url

from shared.database_setup import migrate

SERVER_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def _admin() -> psycopg.Connection:
    dsn = make_url(SERVER_URL).set(drivername="postgresql")
    return psycopg.connect(dsn.render_as_string(hide_password=False), autocommit=True)


def database_url(name: str) -> str:
    return make_url(SERVER_URL).set(database=name).render_as_string(hide_password=False)


def create_template(prefix: str = "helix_test_template") -> str:
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with _admin() as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    migrate(database_url(name))
    return name


def clone(template: str) -> str:
    name = f"helix_test_{uuid.uuid4().hex[:12]}"
    with _admin() as admin:
        admin.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(template)
            )
        )
    return name


def drop(name: str) -> None:
    with _admin() as admin:
        admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)
            )
        )
