"""`make run`'s API process, started exactly as the Procfile says."""

import os
import re
import shlex
import sys
from pathlib import Path

from tests.stack import PROJECT_ROOT, ServiceStack, settings_for
from tests.user_api import PASSWORD, unique_email


def procfile_command(name: str, env: dict[str, str]) -> list[str]:
    """The Procfile's command for process `name`, its ${VAR:-default}s filled in."""
    for line in (PROJECT_ROOT / "Procfile").read_text().splitlines():
        process, _, command = line.partition(":")
        if process.strip() == name:
            filled = re.sub(
                r"\$\{(\w+):-([^}]*)\}",
                lambda m: env.get(m.group(1), m.group(2)),
                command,
            )
            return shlex.split(filled)
    raise LookupError(f"no {name} in the Procfile")


class ProcfileStack(ServiceStack):
    def command(self, name: str) -> list[str]:
        env = {**os.environ, "HELIX_PORT": str(self.port)}
        command = procfile_command(name, env)
        # The Procfile runs with the virtualenv's bin first on PATH.
        return [str(Path(sys.executable).parent / command[0]), *command[1:]]


def test_a_client_cannot_choose_the_address_its_sign_ins_are_throttled_by(
    database_url,
):
    settings = settings_for(database_url, signin_max_failures=3)
    stack = ProcfileStack(settings, processes=("api",))
    try:
        stack.start()
        with stack.client() as client:
            email = unique_email("procfile")
            registered = client.post(
                "/api/v1/users/", json={"email": email, "password": PASSWORD}
            )
            assert registered.status_code == 201, registered.text
            wrong = {"username": email, "password": "not the password"}
            statuses = [
                client.post("/api/v1/token", data=wrong).status_code for _ in range(3)
            ]
            assert statuses == [401] * 3
            # Another X-Forwarded-For on each guess is still the same client.
            spoofed = [
                client.post(
                    "/api/v1/token",
                    data={"username": email, "password": PASSWORD},
                    headers={"X-Forwarded-For": f"10.9.9.{i}"},
                )
                for i in range(3)
            ]
            assert [r.status_code for r in spoofed] == [429] * 3
    finally:
        stack.stop()
