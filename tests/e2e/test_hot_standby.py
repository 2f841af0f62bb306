"""A query API that reads a hot standby, beside the service on its primary.

DESIGN.md: "the query API can read from a PostgreSQL replica: projection
checkpoints replicate with the read tables, so Helix-Position still gives
read-your-writes". Here the command API, projectors and a worker run on the
primary, and a second query API process on the standby.
"""

from tests.stack import ServiceStack, settings_for
from tests.standby import Pair
from tests.user_api import signed_in


class QueryStack(ServiceStack):
    """The query API alone, as Compose runs it, in place of the gateway."""

    def command(self, name: str) -> list[str]:
        command = super().command(name)
        if name == "api":
            command[command.index("gateway.app:create_app")] = (
                "query_api.app:create_app"
            )
        return command


def test_the_query_api_serves_from_a_hot_standby(standby_pair: Pair):
    settings = settings_for(standby_pair.primary_url)
    service = ServiceStack(settings, processes=("api", "projectors", "worker"))
    on_standby = settings.model_copy(
        update={
            "database_url": standby_pair.standby_url,
            "read_your_writes_timeout_s": 1.0,
        }
    )
    reads = QueryStack(on_standby, processes=("api",))
    try:
        service.start()
        reads.start()
        with service.client() as commands, reads.client() as queries:
            auth = signed_in(commands, "standby")
            payload = {"on": "the standby", "n": [1, 2.5]}
            submitted = commands.post(
                "/api/v1/jobs/", json={"task": "echo", "payload": payload}, headers=auth
            )
            assert submitted.status_code == 202, submitted.text
            job_id = submitted.json()["id"]
            position = {"Helix-Position": submitted.headers["Helix-Position"]}

            # Read-your-writes through the replica, then a wait that ends on SUCCESS.
            seen = queries.get(f"/api/v1/jobs/{job_id}", headers={**auth, **position})
            assert seen.status_code == 200, seen.text
            done = queries.get(
                f"/api/v1/jobs/{job_id}", params={"wait": 20}, headers=auth
            )
            assert done.status_code == 200, done.text
            assert done.json()["status"] == "SUCCESS"
            assert done.json()["result_data"] == payload

            # A write the standby has yet to replay: a bounded wait and a 503 to
            # retry, never a 422 as if the position were made up.
            with standby_pair.replay_paused():
                later = commands.post(
                    "/api/v1/jobs/", json={"task": "echo"}, headers=auth
                )
                assert later.status_code == 202, later.text
                behind = {"Helix-Position": later.headers["Helix-Position"]}
                stale = queries.get("/api/v1/jobs/", headers={**auth, **behind})
                assert stale.status_code == 503, stale.text
                assert int(stale.headers["Retry-After"]) > 0
            fresh = queries.get("/api/v1/jobs/", headers={**auth, **behind})
            assert fresh.status_code == 200, fresh.text
            ids = [job["id"] for job in fresh.json()["items"]]
            assert ids == [later.json()["id"], job_id]

            health = queries.get("/health/")
            assert health.status_code == 200, health.text
            assert "helix_standby_replay_lag_seconds" in queries.get("/metrics").text
        log = reads.logs("api", tail=500)
        assert "hot standby" in log
        assert "listener disconnected" not in log
    finally:
        reads.stop()
        service.stop()
