"""Switching the master keys that wrap users' personal-data keys, in tests."""

from collections.abc import Iterator

import pytest

from shared import pii
from shared.settings import Settings


def use_master_keys(*keys: bytes) -> None:
    pii.use_master_keys(
        Settings(_env_file=None, pii_master_keys=",".join(k.decode() for k in keys))
    )


@pytest.fixture
def master_keys_restored() -> Iterator[None]:
    """Puts the default master key back after the test."""
    yield
    pii.use_master_keys(Settings(_env_file=None))
