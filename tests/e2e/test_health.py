"""`GET /health/` on the running service follows PostgreSQL going away and back."""

import time

import httpx
from sqlalchemy.engine import make_url

from tests.stack import ServiceStack, settings_for
from tests.tcp_proxy import TcpProxy
from tests.user_api import signed_in


def wait_for_status(client: httpx.Client, status: int, timeout_s: float = 30) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        response = client.get("/health/")
        if response.status_code == status or time.monotonic() > deadline:
            assert response.status_code == status, response.text
            return response.json()
        time.sleep(0.3)


def test_health_is_503_naming_postgres_while_it_is_unreachable(database_url):
    with TcpProxy(5432) as proxy:
        via_proxy = make_url(database_url).set(port=proxy.port)
        settings = settings_for(via_proxy.render_as_string(hide_password=False))
        stack = ServiceStack(settings, processes=["api", "worker"])
        try:
            stack.start()
            with stack.client() as client:
                healthy = wait_for_status(client, 200)
                assert healthy["checks"]["postgres"] == {"ok": True, "detail": "ok"}
                auth = signed_in(client, "health")

                proxy.cut()
                started = time.monotonic()
                down = wait_for_status(client, 503)
                assert down["status"] == "unavailable"
                assert down["checks"]["postgres"]["ok"] is False
                assert down["checks"]["redis"]["ok"] is True
                assert down["checks"]["worker"]["ok"] is True
                assert time.monotonic() - started < 15
                # A command meanwhile is refused cleanly, to be tried again.
                refused = client.post(
                    "/api/v1/jobs/", json={"task": "echo"}, headers=auth, timeout=15
                )
                assert refused.status_code == 503, refused.text
                assert int(refused.headers["Retry-After"]) > 0

                proxy.restore()
                assert wait_for_status(client, 200)["checks"]["postgres"]["ok"]
        finally:
            stack.stop()
