from functools import lru_cache
from typing import Literal
from urllib.parse import urlsplit

from cryptography.fernet import Fernet
from pydantic import EmailStr, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEVELOPMENT_JWT_SECRET = "helix-development-secret-do-not-use-in-production"
DEVELOPMENT_SUPERUSER_PASSWORD = "changethis"
# A Fernet key, public in this file: it only protects development data.
DEVELOPMENT_PII_MASTER_KEY = "urpMPOkB7WLeT7Vjhjy_3Qe1529AdNNYWcFCk12doH4="
# Passwords that ship in examples and images; production must replace every one.
WELL_KNOWN_PASSWORDS = frozenset(
    {"", "guest", "postgres", "password", "admin", DEVELOPMENT_SUPERUSER_PASSWORD}
)


class Settings(BaseSettings):
    """Every knob of HelixNet Core, read from `HELIX_*` environment variables."""

    # An invalid setting is named, never echoed with the others: they hold the
    # JWT secret, the master keys and passwords.
    model_config = SettingsConfigDict(
        env_prefix="HELIX_", env_file=".env", extra="ignore", hide_input_in_errors=True
    )

    env: Literal["development", "test", "production"] = "development"
    database_url: str = "postgresql+psycopg://postgres@127.0.0.1:5432/helix"
    database_pool_size: int = 20
    database_connect_timeout_s: float = 3.0
    rabbitmq_url: str = "amqp://guest:guest@127.0.0.1:5672//"
    redis_url: str = "redis://127.0.0.1:6379/0"
    events_exchange: str = "helix.events"
    jobs_queue: str = "helix.jobs"
    # Waits between a job's attempts: exponential from the base, with jitter.
    job_retry_base_s: float = 2.0
    job_retry_cap_s: float = 300.0
    # A job left PENDING, STARTED or due for a retry this long, with no worker
    # on it and nothing waiting in the jobs queue, lost its task message (a
    # purged queue, a broker that lost its disk): the dispatcher sends it again.
    job_redispatch_after_s: float = 300.0

    jwt_secret: SecretStr = SecretStr(DEVELOPMENT_JWT_SECRET)
    jwt_algorithm: Literal["HS256", "HS384", "HS512"] = "HS256"
    jwt_issuer: str = "helixnet-core"
    jwt_audience: str = "helixnet-core-api"
    access_token_minutes: int = 30

    # Fernet keys, comma-separated, that wrap each user's personal-data key in
    # `user_keys`: the first wraps new keys, every one unwraps (for rotation).
    pii_master_keys: SecretStr = SecretStr(DEVELOPMENT_PII_MASTER_KEY)

    first_superuser_email: EmailStr = "admin@helix.net"
    first_superuser_password: SecretStr = SecretStr(DEVELOPMENT_SUPERUSER_PASSWORD)

    signin_max_failures: int = 5
    signin_failure_window_s: int = 900

    read_your_writes_timeout_s: float = 5.0
    tail_poll_interval_s: float = 0.2
    health_check_timeout_s: float = 2.0
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: str = "INFO"

    @model_validator(mode="after")
    def check_pii_master_keys(self) -> "Settings":
        keys = self.pii_master_key_list
        if not keys:
            raise ValueError("HELIX_PII_MASTER_KEYS needs at least one key")
        for key in keys:
            try:
                Fernet(key)
            except ValueError:
                raise ValueError(
                    "HELIX_PII_MASTER_KEYS: each key must be a Fernet key"
                    " (32 url-safe base64-encoded bytes)"
                ) from None
        return self

    @model_validator(mode="after")
    def refuse_development_secrets_in_production(self) -> "Settings":
        if self.env != "production":
            return self
        problems = []
        if DEVELOPMENT_PII_MASTER_KEY in self.pii_master_key_list:
            problems.append("HELIX_PII_MASTER_KEYS holds the development key")
        secret = self.jwt_secret.get_secret_value()
        if secret == DEVELOPMENT_JWT_SECRET or len(secret) < 32:
            problems.append("HELIX_JWT_SECRET must be set to 32 or more random chars")
        if self.first_superuser_password.get_secret_value() in WELL_KNOWN_PASSWORDS:
            problems.append("HELIX_FIRST_SUPERUSER_PASSWORD is a default password")
        for name in ("database_url", "rabbitmq_url"):
            password = urlsplit(getattr(self, name)).password or ""
            if password in WELL_KNOWN_PASSWORDS:
                problems.append(f"HELIX_{name.upper()} uses a default password")
        if problems:
            raise ValueError("refusing to start in production: " + "; ".join(problems))
        return self

    @property
    def pii_master_key_list(self) -> list[str]:
        raw = self.pii_master_keys.get_secret_value()
        return [key.strip() for key in raw.split(",") if key.strip()]

    @property
    def psycopg_dsn(self) -> str:
        """The database URL in the form libpq takes, without SQLAlchemy's driver."""
        return self.database_url.replace("postgresql+psycopg://", "postgresql://", 1)


@lru_cache
def get_settings() -> Settings:
    return Settings()
