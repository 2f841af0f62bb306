"""Users' personal-data keys, wrapped under the master keys of the settings."""

import pytest
from cryptography.fernet import Fernet

from shared import pii
from tests.master_keys import master_keys_restored, use_master_keys

pytestmark = pytest.mark.usefixtures(master_keys_restored.__name__)


def test_a_wrapped_key_unwraps_to_itself_and_is_no_key_on_its_own():
    use_master_keys(Fernet.generate_key())
    key = pii.new_key()

    wrapped = pii.wrap(key)

    assert pii.unwrap(wrapped) == key
    assert key not in wrapped
    with pytest.raises(ValueError):
        Fernet(wrapped)


def test_a_key_wrapped_under_the_previous_master_key_unwraps_after_rotation():
    old, new = Fernet.generate_key(), Fernet.generate_key()
    use_master_keys(old)
    key = pii.new_key()
    wrapped = pii.wrap(key)

    use_master_keys(new, old)

    assert pii.unwrap(wrapped) == key
    # New keys are wrapped under the first master key only.
    use_master_keys(new)
    assert pii.unwrap(pii.wrap(key)) == key
    with pytest.raises(pii.KeyUnavailable, match="HELIX_PII_MASTER_KEYS"):
        pii.unwrap(wrapped)


def test_a_key_stored_before_wrapping_is_read_as_it_is():
    key = pii.new_key()
    assert pii.unwrap(key) == key
