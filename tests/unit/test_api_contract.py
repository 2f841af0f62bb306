"""Every route of DESIGN.md's HTTP contract is served, at its method and path."""

import httpx
from fastapi import FastAPI

from command_api.app import create_app as create_command_app
from gateway.app import Gateway
from query_api.app import create_app as create_query_app
from shared.settings import Settings

CONTRACT = {
    ("POST", "/api/v1/token"),
    ("POST", "/api/v1/users/"),
    ("GET", "/api/v1/users/"),
    ("GET", "/api/v1/users/me"),
    ("GET", "/api/v1/users/{user_id}"),
    ("PATCH", "/api/v1/users/{user_id}"),
    ("DELETE", "/api/v1/users/{user_id}"),
    ("POST", "/api/v1/jobs/"),
    ("GET", "/api/v1/jobs/"),
    ("GET", "/api/v1/jobs/{job_id}"),
    ("POST", "/api/v1/jobs/{job_id}/cancel"),
    ("GET", "/api/v1/users/{user_id}/history"),
    ("GET", "/api/v1/jobs/{job_id}/history"),
    ("GET", "/api/v1/audit"),
    ("GET", "/health/"),
}


def gateway() -> Gateway:
    settings = Settings()
    return Gateway(create_command_app(settings), create_query_app(settings))


def test_the_merged_schema_lists_every_route_of_the_contract():
    schema = gateway().openapi()
    served = {
        (method.upper(), path)
        for path, operations in schema["paths"].items()
        for method in operations
    }
    assert served == CONTRACT


def routes(app: FastAPI) -> set[tuple[str, str]]:
    return {
        (method.upper(), path)
        for path, operations in app.openapi()["paths"].items()
        for method in operations
    }


def test_reads_go_to_the_query_api_and_writes_to_the_command_api():
    app = gateway()
    query_routes, command_routes = routes(app.query_app), routes(app.command_app)
    for method, path in CONTRACT:
        target = query_routes if method == "GET" else command_routes
        assert (method, path) in target, (method, path)


async def test_the_gateway_serves_the_merged_schema():
    transport = httpx.ASGITransport(app=gateway())
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.get("/openapi.json")
    assert response.status_code == 200
    assert "/api/v1/jobs/{job_id}/cancel" in response.json()["paths"]


def test_the_schema_names_the_errors_and_headers_of_every_route():
    paths = gateway().openapi()["paths"]

    def answers(method: str, path: str) -> dict:
        return paths[path][method]["responses"]

    for path, operations in paths.items():
        for method, operation in operations.items():
            assert "503" in operation["responses"], (method, path)
    submit = answers("post", "/api/v1/jobs/")
    assert {"202", "401", "409", "413", "422", "503"} <= set(submit)
    assert {"Location", "Helix-Position"} <= set(submit["202"]["headers"])
    assert "Retry-After" in submit["503"]["headers"]
    assert "WWW-Authenticate" in submit["401"]["headers"]
    assert {"304", "404"} <= set(answers("get", "/api/v1/users/{user_id}"))
    assert "ETag" in answers("get", "/api/v1/users/{user_id}")["200"]["headers"]
    assert {"403", "404", "409", "412"} <= set(
        answers("patch", "/api/v1/users/{user_id}")
    )
    assert "429" in answers("post", "/api/v1/token")
    assert "403" in answers("get", "/api/v1/audit")
