"""`make setup`: create and migrate the database, then seed the first superuser."""

import logging

from shared.database_setup import create_database_if_missing, migrate
from shared.logging import configure_logging
from shared.settings import get_settings

log = logging.getLogger(__name__)


def main() -> None:
    settings = get_settings()
    configure_logging(settings)
    create_database_if_missing(settings.database_url)
    migrate(settings.database_url)
    log.info("database is at the newest schema")


if __name__ == "__main__":
    main()
