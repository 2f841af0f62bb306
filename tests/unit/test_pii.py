"""Users' personal-data keys, wrapped under the master keys of the settings."""

import pytest
from cryptography.fernet import Fernet

from shared import pii
from shared.settings import Settings


@pytest.fixture(autouse=True)
def restore_master_keys():
    yield
    pii.use_master_keys(Settings(_env_file=None))


def use(*keys: bytes) -> None:
    pii.use_master_keys(
        Settings(_env_file=None, pii_master_keys=",".join(k.decode() for k in keys))
    )


def test_a_wrapped_key_unwraps_to_itself_and_is_no_key_on_its_own():
    use(Fernet.generate_key())
    key = pii.new_key()

    wrapped = pii.wrap(key)

    assert pii.unwrap(wrapped) == key
    assert key not in wrapped
    with pytest.raises(ValueError):
        Fernet(wrapped)


def test_a_key_wrapped_under_the_previous_master_key_unwraps_after_rotation():
    old, new = Fernet.generate_key(), Fernet.generate_key()
    use(old)
    key = pii.new_key()
    wrapped = pii.wrap(key)

    use(new, old)

    assert pii.unwrap(wrapped) == key
    # New keys are wrapped under the first master key only.
    use(new)
    assert pii.unwrap(pii.wrap(key)) == key
    with pytest.raises(pii.KeyUnavailable, match="HELIX_PII_MASTER_KEYS"):
        pii.unwrap(wrapped)


def test_a_key_stored_before_wrapping_is_read_as_it_is():
    key = pii.new_key()
    assert pii.unwrap(key) == key
