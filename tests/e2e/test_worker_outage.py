"""A worker that loses PostgreSQL gives its deliveries back and runs them once it
is back: the job is neither lost nor run twice.

Only the worker reaches PostgreSQL through a proxy that the test cuts; the gateway
and the projectors keep theirs, so submissions are still accepted meanwhile.
"""

import time

from sqlalchemy.engine import make_url

from tests.e2e.test_jobs import submit, types_of, wait_for
from tests.stack import ServiceStack, settings_for
from tests.tcp_proxy import TcpProxy
from tests.user_api import signed_in


def test_a_job_taken_while_the_worker_cannot_reach_postgres_runs_once_it_can(
    database_url,
):
    settings = settings_for(database_url)
    service = ServiceStack(settings, processes=("api", "projectors"))
    with TcpProxy(5432) as proxy:
        via_proxy = make_url(database_url).set(port=proxy.port)
        worker_settings = settings.model_copy(
            update={"database_url": via_proxy.render_as_string(hide_password=False)}
        )
        worker = ServiceStack(worker_settings, processes=("worker",))
        try:
            service.start()
            worker.start()
            with service.client() as client:
                client.headers.update(signed_in(client, "outage"))
                warm = submit(client, "echo", {"warm": True})
                assert wait_for(client, warm["id"])["status"] == "SUCCESS"

                proxy.cut()
                job = submit(client, "echo", {"during": "outage"})
                deadline = time.monotonic() + 30
                while "job store unavailable" not in worker.logs("worker", tail=200):
                    assert time.monotonic() < deadline, worker.logs("worker")
                    time.sleep(0.2)
                pending = client.get(f"/api/v1/jobs/{job['id']}").json()
                assert pending["status"] == "PENDING"

                proxy.restore()
                done = wait_for(client, job["id"])
        finally:
            worker.stop()
            service.stop()

    assert done["status"] == "SUCCESS"
    assert done["result_data"] == {"during": "outage"}
    assert done["attempts"] == 1
    assert types_of(settings, job["id"]) == [
        "JobSubmitted",
        "JobStarted",
        "JobSucceeded",
    ]
