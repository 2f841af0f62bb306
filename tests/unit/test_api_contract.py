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
