import uuid
from datetime import UTC, datetime, timedelta

import jwt
import pytest
from pydantic import SecretStr

from shared.auth import (
    TEST_ARGON2,
    InvalidToken,
    PasswordHasher,
    create_access_token,
    decode_access_token,
)
from shared.settings import Settings

SETTINGS = Settings(env="test", jwt_secret=SecretStr("k" * 64))


def claims(**overrides: object) -> dict[str, object]:
    now = datetime.now(UTC)
    values: dict[str, object] = {
        "sub": str(uuid.uuid4()),
        "iat": now,
        "exp": now + timedelta(minutes=5),
        "jti": str(uuid.uuid4()),
        "iss": SETTINGS.jwt_issuer,
        "aud": SETTINGS.jwt_audience,
    }
    values.update(overrides)
    return {k: v for k, v in values.items() if v is not None}


def sign(payload: dict[str, object], secret: str | None = None) -> str:
    key = secret or SETTINGS.jwt_secret.get_secret_value()
    return jwt.encode(payload, key, algorithm="HS256")


def test_issued_token_decodes_to_its_subject_with_every_claim() -> None:
    user_id = uuid.uuid4()
    issued = create_access_token(SETTINGS, user_id)

    decoded = decode_access_token(SETTINGS, issued.token)

    assert decoded["sub"] == str(user_id)
    assert {"exp", "iat", "jti", "iss", "aud"} <= decoded.keys()
    assert issued.expires_in == SETTINGS.access_token_minutes * 60


def test_two_tokens_for_one_user_have_different_ids() -> None:
    user_id = uuid.uuid4()
    first = decode_access_token(SETTINGS, create_access_token(SETTINGS, user_id).token)
    second = decode_access_token(SETTINGS, create_access_token(SETTINGS, user_id).token)

    assert first["jti"] != second["jti"]


@pytest.mark.parametrize(
    "token",
    [
        pytest.param("", id="empty"),
        pytest.param("not-a-jwt", id="malformed"),
        pytest.param(
            sign(claims(exp=datetime.now(UTC) - timedelta(seconds=1))), id="expired"
        ),
        pytest.param(sign(claims(), secret="x" * 40), id="forged"),
        pytest.param(sign(claims(aud="someone-else")), id="wrong-audience"),
        pytest.param(sign(claims(iss="someone-else")), id="wrong-issuer"),
        pytest.param(sign(claims(jti=None)), id="no-jti"),
        pytest.param(sign(claims(sub="not-a-uuid")), id="subject-not-a-uuid"),
        pytest.param(jwt.encode(claims(), None, algorithm="none"), id="alg-none"),
        pytest.param(
            jwt.encode(
                claims(), SETTINGS.jwt_secret.get_secret_value(), algorithm="HS512"
            ),
            id="other-algorithm",
        ),
    ],
)
def test_flawed_token_is_refused(token: str) -> None:
    with pytest.raises(InvalidToken):
        decode_access_token(SETTINGS, token)


async def test_hash_made_with_older_parameters_comes_back_upgraded() -> None:
    old = PasswordHasher({**TEST_ARGON2, "rounds": 1})
    current = PasswordHasher({**TEST_ARGON2, "rounds": 2})
    stored = await old.hash("correct horse")

    ok, upgraded = await current.verify("correct horse", stored)

    assert ok and upgraded is not None and upgraded != stored
    assert await current.verify("correct horse", upgraded) == (True, None)


async def test_wrong_password_does_not_verify() -> None:
    hasher = PasswordHasher(TEST_ARGON2)
    stored = await hasher.hash("correct horse")

    assert await hasher.verify("wrong horse!", stored) == (False, None)
