"""Real HelixNet Core processes for end-to-end tests.

`ServiceStack` starts the processes of `make run` (the gateway under uvicorn,
`python -m projectors`, a Celery worker) as subprocesses, configured through
HELIX_* variables from a Settings, and stops them when the test is done.
"""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx
from pydantic import SecretStr

from shared.settings import Settings

PROJECT_ROOT = Path(__file__).resolve().parent.parent


# The suffixes settings_for() handed out in this process, so that what they named
# on the broker can be deleted at the end (tests.broker.delete_test_objects).
SUFFIXES: set[str] = set()


def settings_for(database_url: str, **overrides: object) -> Settings:
    """Settings for a test: its own database, exchange and job queue."""
    suffix = uuid.uuid4().hex[:8]
    SUFFIXES.add(suffix)
    values: dict[str, object] = {
        "env": "test",
        "database_url": database_url,
        "database_pool_size": 10,
        "events_exchange": f"helix.events.test.{suffix}",
        "jobs_queue": f"helix.jobs.test.{suffix}",
        "redis_url": "redis://127.0.0.1:6379/15",
        "log_format": "console",
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


def environment(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HELIX_")}
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        env[f"HELIX_{name.upper()}"] = str(value)
    env["PYTHONPATH"] = str(PROJECT_ROOT)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServiceStack:
    def __init__(
        self, settings: Settings, processes: Sequence[str] = ("api", "projectors")
    ) -> None:
        self.settings = settings
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.names = list(processes)
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.log_dir = Path(tempfile.mkdtemp(prefix="helix-stack-"))

    def command(self, name: str) -> list[str]:
        python = sys.executable
        if name == "api":
            return [
                python,
                "-m",
                "uvicorn",
                "gateway.app:create_app",
                "--factory",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--no-access-log",
            ]
        if name == "projectors":
            return [python, "-m", "projectors"]
        if name == "worker":
            return [
                python,
                "-m",
                "celery",
                "-A",
                "workers",
                "worker",
                "--queues",
                self.settings.jobs_queue,
                "--concurrency",
                "2",
                "--loglevel",
                "INFO",
                "--without-gossip",
                "--without-mingle",
                "--hostname",
                f"worker-{uuid.uuid4().hex[:6]}@%h",
            ]
        raise ValueError(f"unknown process {name}")

    def start(self, name: str | None = None) -> None:
        for process in [name] if name else self.names:
            with open(self.log_dir / f"{process}.log", "ab") as log:
                self.processes[process] = subprocess.Popen(
                    self.command(process),
                    cwd=PROJECT_ROOT,
                    env=environment(self.settings),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
        if "api" in self.processes and (name is None or name == "api"):
            self.wait_until_serving()

    def wait_until_serving(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                httpx.get(f"{self.base_url}/health/", timeout=5)
                return
            except httpx.TransportError:
                time.sleep(0.2)
        raise RuntimeError(f"the API did not start:\n{self.logs('api')}")

    def check_alive(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited early:\n{self.logs(name)}")

    def signal(self, name: str, sig: int = signal.SIGKILL) -> None:
        process = self.processes[name]
        os.killpg(process.pid, sig)
        process.wait(timeout=30)

    def stop(self, name: str | None = None) -> None:
        names = [name] if name else list(self.processes)
        for process_name in names:
            process = self.processes.pop(process_name, None)
            if process is None or process.poll() is not None:
                continue
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=15)

    def logs(self, name: str, tail: int = 60) -> str:
        path = self.log_dir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-tail:])

    def client(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=30, **kwargs)  # type: ignore[arg-type]


@contextmanager
def running_stack(
    settings: Settings, processes: Sequence[str] = ("api", "projectors")
) -> Iterator[ServiceStack]:
    stack = ServiceStack(settings, processes)
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()
