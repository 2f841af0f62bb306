"""Input that cannot be stored or sent back, and other edges of the HTTP surface.

Each case here once answered 500, lost a value without a word, or echoed a
secret; each must be a 4xx that names the field and echoes nothing.
"""

import asyncio
import json
import unicodedata
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from projectors.projections.users import projection as users_projection
from shared.db import connect
from shared.settings import Settings
from tests.horizon import project_everything
from tests.user_api import (
    PASSWORD,
    bearer,
    gateway_client,
    register,
    settings_with_own_superuser,
    sign_in,
    superuser_token,
    unique_email,
)

JSON = {"Content-Type": "application/json"}


pytestmark = pytest.mark.usefixtures("users_table")


async def job_events(engine: AsyncEngine) -> int:
    async with connect(engine) as connection:
        result = await connection.exec_driver_sql(
            "SELECT count(*) FROM events WHERE category = 'job'"
        )
        return int(result.scalar_one())


async def new_user(client: httpx.AsyncClient) -> dict[str, str]:
    email = unique_email()
    await register(client, email)
    return bearer(await sign_in(client, email))


def assert_422_echoing_nothing(response: httpx.Response, *hidden: str) -> None:
    assert response.status_code == 422, response.text
    errors = response.json()["detail"]
    assert isinstance(errors, list) and errors
    assert all("input" not in error for error in errors)
    for text in hidden:
        assert text not in response.text


@pytest.mark.parametrize(
    "body",
    [
        '{"task": "echo", "payload": {"a": "x\\u0000y"}}',
        '{"task": "echo", "payload": {"x\\u0000": 1}}',
        '{"task": "checksum", "payload": {"data": "\\ud800"}}',
        '{"task": "echo", "payload": {"a": NaN}}',
        '{"task": "echo", "payload": {"a": [1, -Infinity]}}',
        '{"task": "echo", "payload": {"a": 1e400}}',
        '{"task": "echo", "timeout_s": NaN}',
    ],
    ids=[
        "nul",
        "nul-in-key",
        "lone-surrogate",
        "nan",
        "infinity",
        "overflow",
        "nan-timeout",
    ],
)
async def test_a_job_whose_input_cannot_be_stored_is_422_and_stores_nothing(
    client: httpx.AsyncClient, engine: AsyncEngine, body: str
) -> None:
    auth = await new_user(client)
    before = await job_events(engine)

    response = await client.post(
        "/api/v1/jobs/", content=body, headers={**auth, **JSON}
    )

    assert_422_echoing_nothing(response)
    assert await job_events(engine) == before


def nested(levels: int) -> str:
    """A JSON array `levels` deep."""
    return "[" * levels + "]" * levels


def echo_body(payload: str) -> str:
    return f'{{"task": "echo", "payload": {payload}}}'


@pytest.mark.parametrize(
    ("body", "loc", "says"),
    [
        (
            echo_body(f'{{"secret": "s3cret", "a": {nested(63)}}}'),
            ["body"],
            "payload: nests objects and arrays deeper than 64 levels",
        ),
        (echo_body(f'{{"a": {nested(2000)}}}'), ["body"], "deeper"),
        (echo_body(f'{{"n": 1{"0" * 4300}}}'), ["body"], "digits"),
        (b'{"task": "echo", "payload": {"a": "\xff"}}', ["body"], "UTF-8"),
    ],
    ids=["deep", "deeper-than-the-parser-goes", "4301-digits", "not-utf-8"],
)
async def test_a_body_too_deep_or_too_long_to_read_is_422_and_stores_nothing(
    client: httpx.AsyncClient,
    engine: AsyncEngine,
    body: str | bytes,
    loc: list[str],
    says: str,
) -> None:
    auth = await new_user(client)
    before = await job_events(engine)

    response = await client.post(
        "/api/v1/jobs/", content=body, headers={**auth, **JSON}
    )

    assert_422_echoing_nothing(response, "s3cret", "pydantic", "JobSubmitted")
    (error,) = response.json()["detail"]
    assert error["loc"] == loc
    assert says in error["msg"]
    assert await job_events(engine) == before


async def test_a_payload_as_deep_as_the_limit_is_taken_and_echoed(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    auth = await new_user(client)
    # The body, the payload and 62 arrays in "a": 64 levels.
    payload = {"a": json.loads(nested(62))}

    response = await client.post(
        "/api/v1/jobs/", json={"task": "echo", "payload": payload}, headers=auth
    )

    assert response.status_code == 202, response.text


async def test_one_bad_submission_does_not_fail_the_others_sent_with_it(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    auth = await new_user(client)
    good = [
        client.post(
            "/api/v1/jobs/", json={"task": "echo", "payload": {"i": i}}, headers=auth
        )
        for i in range(20)
    ]
    bad = client.post(
        "/api/v1/jobs/",
        content='{"task": "checksum", "payload": {"data": "x\\u0000"}}',
        headers={**auth, **JSON},
    )

    *answers, refused = await asyncio.gather(*good, bad)

    assert [a.status_code for a in answers] == [202] * 20
    assert refused.status_code == 422


LONG_PASSWORD = "p" * 129


@pytest.mark.parametrize(
    ("body", "secret"),
    [
        ('{"email": "EMAIL", "password": "abcdefgh\\ud800"}', "abcdefgh"),
        (f'{{"email": "EMAIL", "password": "{LONG_PASSWORD}"}}', LONG_PASSWORD),
        (
            '{"email": "EMAIL", "password": "long enough", "full_name": "a\\u0000b"}',
            None,
        ),
    ],
    ids=["surrogate-password", "long-password", "nul-name"],
)
async def test_a_registration_that_cannot_be_stored_is_422_and_echoes_no_password(
    client: httpx.AsyncClient,
    body: str,
    secret: str | None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    content = body.replace("EMAIL", unique_email())

    response = await client.post("/api/v1/users/", content=content, headers=JSON)

    assert_422_echoing_nothing(response, *([secret] if secret else []))
    if secret:
        assert secret not in caplog.text


async def test_a_password_keeps_its_spaces(client: httpx.AsyncClient) -> None:
    email = unique_email()
    password = "  spaced password  "
    await register(client, email, password)

    exact = await client.post(
        "/api/v1/token", data={"username": email, "password": password}
    )
    trimmed = await client.post(
        "/api/v1/token", data={"username": email, "password": password.strip()}
    )

    assert exact.status_code == 200
    assert trimmed.status_code == 401


async def test_every_spelling_registration_counts_as_one_address_signs_in(
    client: httpx.AsyncClient,
) -> None:
    local = f"é{uuid.uuid4().hex[:8]}"
    await register(client, f"{local}@exämple.com")

    spellings = [
        unicodedata.normalize("NFD", f"{local}@exämple.com"),
        f"{local}@xn--exmple-cua.com",
        f"  {local.upper()}@EXÄMPLE.COM ",
    ]
    for spelling in spellings:
        token = await client.post(
            "/api/v1/token", data={"username": spelling, "password": PASSWORD}
        )
        assert token.status_code == 200, spelling


async def test_a_sign_in_name_with_a_nul_is_422(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/api/v1/token", data={"username": "a\x00b@example.com", "password": "x" * 10}
    )

    assert_422_echoing_nothing(response)


async def test_an_over_long_sign_in_password_is_not_echoed(
    client: httpx.AsyncClient,
) -> None:
    secret = "s" * 5000

    response = await client.post(
        "/api/v1/token", data={"username": unique_email(), "password": secret}
    )

    assert_422_echoing_nothing(response, secret)


@pytest.mark.parametrize(
    "url",
    [
        "/api/v1/users/?offset=9223372036854775808",
        "/api/v1/jobs/?offset=99999999999999999999",
        "/api/v1/audit?after=9223372036854775808",
        "/api/v1/audit?stream=a%00b",
        "/api/v1/audit?type=a%00b",
        "/api/v1/audit?correlation_id=%00",
    ],
)
async def test_a_query_parameter_the_database_cannot_take_is_422(
    client: httpx.AsyncClient, app_settings, url: str
) -> None:
    admin = bearer(await superuser_token(client, app_settings))

    response = await client.get(url, headers=admin)

    assert_422_echoing_nothing(response)


@pytest.mark.parametrize(
    "position", ["²", "9999999999999999999", "12345678901234567890123", "0", "-1"]
)
async def test_a_position_header_that_is_no_position_is_422(
    client: httpx.AsyncClient, position: str
) -> None:
    auth = await new_user(client)

    response = await client.get(
        "/api/v1/users/me",
        headers={**auth, "Helix-Position": position.encode()},
    )

    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == ["header", "Helix-Position"]


async def test_a_position_the_log_never_handed_out_is_422_not_a_retry(
    settings: Settings,
) -> None:
    quick = settings_with_own_superuser(settings, read_your_writes_timeout_s=0.2)
    async with gateway_client(quick) as client:
        email = unique_email()
        registered = await client.post(
            "/api/v1/users/", json={"email": email, "password": PASSWORD}
        )
        auth = bearer(await sign_in(client, email))
        ahead = int(registered.headers["Helix-Position"]) + 1_000_000

        response = await client.get(
            "/api/v1/users/me", headers={**auth, "Helix-Position": str(ahead)}
        )

    assert response.status_code == 422
    assert "past the end of the log" in response.json()["detail"][0]["msg"]


async def test_head_answers_as_get_without_a_body(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    auth = await new_user(client)
    await project_everything(engine, users_projection)

    got = await client.get("/api/v1/users/me", headers=auth)
    head = await client.head("/api/v1/users/me", headers=auth)

    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["content-length"] == str(len(got.content))
    assert head.headers["etag"] == got.headers["etag"]


async def test_a_weak_if_none_match_still_matches(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    auth = await new_user(client)
    await project_everything(engine, users_projection)
    tag = (await client.get("/api/v1/users/me", headers=auth)).headers["etag"]

    response = await client.get(
        "/api/v1/users/me", headers={**auth, "If-None-Match": f"W/{tag}"}
    )

    assert response.status_code == 304


async def test_a_method_a_path_does_not_take_is_405_naming_those_it_does(
    client: httpx.AsyncClient,
) -> None:
    token = await client.get("/api/v1/token", headers={"X-Request-ID": "req-405"})
    options = await client.options("/api/v1/users/")

    assert token.status_code == 405
    assert token.headers["allow"] == "OPTIONS, POST"
    assert token.headers["x-request-id"] == "req-405"
    assert options.status_code == 204
    assert options.headers["allow"] == "GET, HEAD, OPTIONS, POST"


@pytest.mark.parametrize(
    ("method", "path", "status", "allow"),
    [
        ("PUT", "/openapi.json", 405, "GET, HEAD, OPTIONS"),
        ("TRACE", "/openapi.json", 405, "GET, HEAD, OPTIONS"),
        ("OPTIONS", "/openapi.json", 204, "GET, HEAD, OPTIONS"),
        ("OPTIONS", "/metrics", 204, "GET, HEAD, OPTIONS"),
        ("POST", "/docs", 405, "GET, HEAD, OPTIONS"),
        ("OPTIONS", "/api/v1/token", 204, "OPTIONS, POST"),
    ],
)
async def test_every_page_of_the_gateway_names_its_methods(
    client: httpx.AsyncClient, method: str, path: str, status: int, allow: str
) -> None:
    response = await client.request(method, path, headers={"X-Request-ID": "req-m"})

    assert response.status_code == status, response.text
    assert response.headers["allow"] == allow
    assert response.headers["x-request-id"] == "req-m"


async def test_the_gateway_schema_has_both_apis_and_a_request_id(
    client: httpx.AsyncClient,
) -> None:
    schema = await client.get("/openapi.json", headers={"X-Request-ID": "req-s"})

    assert schema.status_code == 200
    assert schema.headers["x-request-id"] == "req-s"
    paths = schema.json()["paths"]
    assert "post" in paths["/api/v1/token"] and "get" in paths["/api/v1/jobs/"]


async def test_the_command_api_docs_are_served_behind_the_gateway(
    client: httpx.AsyncClient,
) -> None:
    docs = await client.get("/commands/docs")
    schema = await client.get("/commands/openapi.json")

    assert docs.status_code == 200
    assert "/api/v1/token" in schema.json()["paths"]


async def test_a_streamed_body_over_the_limit_is_413(client: httpx.AsyncClient) -> None:
    auth = await new_user(client)
    chunk = b" " * 65536

    async def streamed() -> AsyncIterator[bytes]:
        yield b'{"task": "checksum", "payload": {"data": "'
        for _ in range(32):
            yield chunk
        yield b'"}}'

    response = await client.post(
        "/api/v1/jobs/", content=streamed(), headers={**auth, **JSON}
    )

    assert response.status_code == 413
    assert "content-length" not in {k.lower() for k in response.request.headers}


async def test_a_streamed_body_under_the_limit_is_read_whole(
    client: httpx.AsyncClient,
) -> None:
    auth = await new_user(client)
    payload = {"data": "x" * 200_000}

    async def streamed() -> AsyncIterator[bytes]:
        text = json.dumps({"task": "checksum", "payload": payload}).encode()
        for start in range(0, len(text), 65536):
            yield text[start : start + 65536]

    response = await client.post(
        "/api/v1/jobs/", content=streamed(), headers={**auth, **JSON}
    )

    assert response.status_code == 202, response.text


@pytest.mark.parametrize("content_type", ["text/plain", "text/json", None])
async def test_a_json_body_sent_as_another_media_type_is_415(
    client: httpx.AsyncClient, engine: AsyncEngine, content_type: str | None
) -> None:
    auth = await new_user(client)
    before = await job_events(engine)
    headers = {**auth, **({"Content-Type": content_type} if content_type else {})}

    response = await client.post(
        "/api/v1/jobs/", content=b'{"task": "echo", "payload": {}}', headers=headers
    )

    assert response.status_code == 415, response.text
    assert "application/json" in response.json()["detail"]
    assert await job_events(engine) == before


async def test_a_json_body_with_a_charset_is_taken(client: httpx.AsyncClient) -> None:
    auth = await new_user(client)
    response = await client.post(
        "/api/v1/jobs/",
        content=b'{"task": "echo", "payload": {}}',
        headers={**auth, "Content-Type": "application/json; charset=utf-8"},
    )
    assert response.status_code == 202, response.text


@pytest.mark.parametrize(
    ("sent", "kept"),
    [(b"req-42", True), ("h\u00e9llo".encode(), False), (b"a\tb", False)],
    ids=["ascii", "utf-8", "control"],
)
async def test_a_request_id_is_kept_only_if_it_can_go_back_unchanged(
    client: httpx.AsyncClient, sent: bytes, kept: bool
) -> None:
    response = await client.get("/health/", headers={"X-Request-ID": sent})

    answered = response.headers.raw
    (request_id,) = [v for k, v in answered if k.lower() == b"x-request-id"]
    assert (request_id == sent) is kept
    if not kept:
        assert uuid.UUID(request_id.decode())
