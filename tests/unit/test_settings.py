import pytest
from cryptography.fernet import Fernet
from pydantic import ValidationError

from shared.settings import DEVELOPMENT_PII_MASTER_KEY, Settings

STRONG_SECRET = "x" * 48
MASTER_KEY = Fernet.generate_key().decode()


def production(**overrides: str) -> Settings:
    values = {
        "env": "production",
        "jwt_secret": STRONG_SECRET,
        "first_superuser_password": "a-real-password-1",
        "database_url": "postgresql+psycopg://helix:s3cret-pw@db:5432/helix",
        "rabbitmq_url": "amqp://helix:s3cret-pw@mq:5672//",
        "pii_master_keys": MASTER_KEY,
    }
    return Settings(**{**values, **overrides})


def test_defaults_point_at_the_local_services(monkeypatch):
    for name in ("DATABASE_URL", "RABBITMQ_URL", "REDIS_URL", "ENV"):
        monkeypatch.delenv(f"HELIX_{name}", raising=False)
    settings = Settings(_env_file=None)
    assert settings.database_url.endswith("@127.0.0.1:5432/helix")
    assert settings.rabbitmq_url == "amqp://guest:guest@127.0.0.1:5672//"
    assert settings.redis_url == "redis://127.0.0.1:6379/0"


def test_environment_variables_with_the_helix_prefix_override(monkeypatch):
    monkeypatch.setenv("HELIX_REDIS_URL", "redis://cache:6379/3")
    assert Settings(_env_file=None).redis_url == "redis://cache:6379/3"


def test_production_starts_with_real_secrets():
    assert production().env == "production"


@pytest.mark.parametrize(
    ("override", "complaint"),
    [
        ({"jwt_secret": Settings().jwt_secret.get_secret_value()}, "JWT_SECRET"),
        ({"first_superuser_password": "changethis"}, "FIRST_SUPERUSER_PASSWORD"),
        ({"rabbitmq_url": "amqp://guest:guest@mq:5672//"}, "RABBITMQ_URL"),
        ({"database_url": "postgresql+psycopg://postgres@db/helix"}, "DATABASE_URL"),
        (
            {"pii_master_keys": f"{MASTER_KEY},{DEVELOPMENT_PII_MASTER_KEY}"},
            "PII_MASTER_KEYS",
        ),
    ],
)
def test_production_refuses_development_secrets(override, complaint):
    with pytest.raises(ValidationError, match=complaint):
        production(**override)


@pytest.mark.parametrize("keys", ["", " , ", "not-a-fernet-key", f"{MASTER_KEY},short"])
def test_pii_master_keys_must_be_fernet_keys(keys):
    with pytest.raises(ValidationError, match="PII_MASTER_KEYS"):
        Settings(_env_file=None, pii_master_keys=keys)


def test_pii_master_keys_are_listed_newest_first():
    older = Fernet.generate_key().decode()
    settings = Settings(_env_file=None, pii_master_keys=f" {MASTER_KEY} ,{older}")
    assert settings.pii_master_key_list == [MASTER_KEY, older]


def test_an_invalid_setting_is_named_without_showing_any_value():
    with pytest.raises(ValidationError) as caught:
        Settings(pii_master_keys="not a key", first_superuser_password="Sup3rSecretPw")

    assert "HELIX_PII_MASTER_KEYS" in str(caught.value)
    assert "Sup3rSecretPw" not in str(caught.value)
    assert "not a key" not in str(caught.value)
