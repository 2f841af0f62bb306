"""`make bench-jobs`: job latency and throughput, beside a bare Celery round trip.

Starts the service (gateway, `python -m projectors`, a Celery worker) and, on the
same RabbitMQ, a bare Celery worker with a no-op task and an rpc:// result backend.
Then, in the same run:

- latency: one client sends an `echo` job and waits for SUCCESS through the query
  API (`GET /api/v1/jobs/{id}?wait=30`, which also waits for a job the read model
  does not show yet, so no `Helix-Position` is needed), one
  job after another; beside it, the bare round trip (send the no-op, wait for its
  result) one after another. p50 and p99 of each.
- throughput: 16 concurrent clients submit 2,000 `echo` jobs between them; the
  clock stops when the jobs projection shows all of them SUCCESS.

Targets on a 2-core machine: p50 at most twice the bare round trip; 300 jobs/s or
more, every job SUCCESS.
"""

import asyncio
import os
import statistics
import sys
import time
import uuid
from dataclasses import dataclass

import aiohttp
import httpx
import psycopg
from rich.console import Console
from rich.table import Table

from shared.jobs.messaging import celery_config
from shared.settings import Settings
from tests import databases
from tests.benchmarks.bare_celery import BARE_TASK, bare_queue
from tests.broker import delete_test_objects
from tests.stack import SUFFIXES, ServiceStack, settings_for
from tests.user_api import signed_in

LATENCY_SAMPLES = 300
WARM_UP = 30
THROUGHPUT_JOBS = 2000
CLIENTS = 16
# Both workers run as `make run` starts the job worker: one process per core.
WORKER_CONCURRENCY = 2


class BenchStack(ServiceStack):
    """The service, plus the bare Celery worker of the baseline."""

    def command(self, name: str) -> list[str]:
        if name == "bare":
            return [
                sys.executable,
                *("-m", "celery", "-A", "tests.benchmarks.bare_celery", "worker"),
                *("--queues", bare_queue(self.settings.jobs_queue)),
                *("--concurrency", str(WORKER_CONCURRENCY), "--loglevel", "WARNING"),
                "--without-gossip",
                "--without-mingle",
                *("--hostname", f"bare-{uuid.uuid4().hex[:6]}@%h"),
            ]
        command = super().command(name)
        if name == "worker":
            command[command.index("--loglevel") + 1] = "WARNING"
            command[command.index("--concurrency") + 1] = str(WORKER_CONCURRENCY)
        return command


def cpu_seconds(stack: ServiceStack) -> dict[str, float]:
    """CPU time used so far by each process of the stack (with its children),
    and by PostgreSQL and RabbitMQ, from /proc (Linux only; empty elsewhere)."""
    if not os.path.isdir("/proc"):
        return {}
    tick = os.sysconf("SC_CLK_TCK")
    processes: dict[int, tuple[str, int, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                raw = stat.read()
        except OSError:
            continue
        name = raw[raw.index("(") + 1 : raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2 :].split()
        used = (int(fields[11]) + int(fields[12])) / tick
        processes[int(entry)] = (name, int(fields[1]), used)

    def tree(pid: int) -> float:
        own = processes.get(pid, ("", 0, 0.0))[2]
        return own + sum(tree(c) for c, (_, p, _) in processes.items() if p == pid)

    used = {name: tree(process.pid) for name, process in stack.processes.items()}
    used["postgres"] = sum(t for n, _, t in processes.values() if n == "postgres")
    used["rabbitmq"] = sum(t for n, _, t in processes.values() if "beam" in n)
    return used


def own_cpu_seconds() -> float:
    """CPU time of this process: the benchmark's clients share the machine too."""
    times = os.times()
    return times.user + times.system


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def bare_round_trips(stack: ServiceStack) -> list[float]:
    from celery import Celery

    app = Celery("bench-client", set_as_current=False)
    config = celery_config(stack.settings)
    config.pop("task_queues")
    config.update(result_backend="rpc://", task_ignore_result=False)
    app.conf.update(config)
    queue = bare_queue(stack.settings.jobs_queue)
    samples = []
    for i in range(WARM_UP + LATENCY_SAMPLES):
        started = time.perf_counter()
        app.send_task(BARE_TASK, queue=queue).get(timeout=30)
        if i >= WARM_UP:
            samples.append(time.perf_counter() - started)
    return samples


@dataclass
class RoundTrip:
    """One job's round trip, on the wall clock PostgreSQL's now() shares."""

    job_id: str
    posted: float
    answered: float
    read: float


def job_round_trips(client: httpx.Client, auth: dict[str, str]) -> list[RoundTrip]:
    trips = []
    for i in range(WARM_UP + LATENCY_SAMPLES):
        posted = time.time()
        submitted = client.post(
            "/api/v1/jobs/", json={"task": "echo", "payload": {"i": i}}, headers=auth
        )
        submitted.raise_for_status()
        answered = time.time()
        job_id = submitted.json()["id"]
        answer = client.get(f"/api/v1/jobs/{job_id}", params={"wait": 30}, headers=auth)
        read = time.time()
        if answer.status_code != 200 or answer.json()["status"] != "SUCCESS":
            raise RuntimeError(f"job read {answer.status_code}: {answer.text}")
        if i >= WARM_UP:
            trips.append(RoundTrip(job_id, posted, answered, read))
    return trips


def stages(settings: Settings, trips: list[RoundTrip]) -> dict[str, list[float]]:
    """Where each round trip went: the POST; from JobSubmitted to the worker's
    append (relay, dispatcher, Celery, worker); from there to the client reading
    SUCCESS (relay, jobs projection, the waiting GET). Events are stamped with the
    start of their transaction."""
    with psycopg.connect(settings.psycopg_dsn) as connection:
        rows = connection.execute(
            "SELECT stream_id, type, extract(epoch FROM recorded_at)::float8"
            " FROM events WHERE stream_id = ANY(%s)"
            " AND type IN ('JobSubmitted', 'JobSucceeded')",
            ([f"job-{trip.job_id}" for trip in trips],),
        ).fetchall()
    recorded = {(stream, kind): at for stream, kind, at in rows}
    found: dict[str, list[float]] = {
        "POST answered": [],
        "submitted -> worker appended": [],
        "worker appended -> client read": [],
    }
    for trip in trips:
        stream = f"job-{trip.job_id}"
        submitted = recorded[(stream, "JobSubmitted")]
        succeeded = recorded[(stream, "JobSucceeded")]
        found["POST answered"].append(trip.answered - trip.posted)
        found["submitted -> worker appended"].append(succeeded - submitted)
        found["worker appended -> client read"].append(trip.read - succeeded)
    return found


async def throughput(base_url: str, auth: dict[str, str]) -> tuple[float, int, int]:
    """Seconds from the first POST until all jobs show SUCCESS, and the counts.

    The clients are aiohttp's, which spends a fraction of httpx's CPU per request:
    the machine's two cores are shared with the service under test.
    """
    per_client = THROUGHPUT_JOBS // CLIENTS
    connector = aiohttp.TCPConnector(limit=CLIENTS + 2)
    async with aiohttp.ClientSession(
        base_url, headers=auth, connector=connector, timeout=aiohttp.ClientTimeout(60)
    ) as client:
        baseline = await _count(client, "SUCCESS")

        async def submit_share(n: int) -> None:
            for i in range(per_client):
                body = {"task": "echo", "payload": {"c": n, "i": i}}
                async with client.post("/api/v1/jobs/", json=body) as response:
                    response.raise_for_status()
                    await response.read()

        started = time.perf_counter()
        await asyncio.gather(*(submit_share(n) for n in range(CLIENTS)))
        submitted_s = time.perf_counter() - started
        total = per_client * CLIENTS
        while True:
            done = await _count(client, "SUCCESS") - baseline
            if done >= total or time.perf_counter() - started > 600:
                break
            await asyncio.sleep(0.05)
        elapsed = time.perf_counter() - started
        failed = await _count(client, "FAILURE")
    Console().print(f"  all {total} submitted after {submitted_s:.2f} s")
    return elapsed, done, failed


async def _count(client: aiohttp.ClientSession, status: str) -> int:
    params = {"status": status, "limit": 1}
    async with client.get("/api/v1/jobs/", params=params) as response:
        response.raise_for_status()
        total: int = (await response.json())["total"]
    return total


def main() -> None:
    console = Console()
    template = databases.create_template("helix_bench_template")
    name = databases.clone(template)
    settings = settings_for(databases.database_url(name), log_level="WARNING")
    stack = BenchStack(settings, processes=("api", "projectors", "worker", "bare"))
    try:
        stack.start()
        with stack.client() as client:
            auth = signed_in(client, "bench")
            console.print("measuring the bare Celery round trip ...")
            bare_before = cpu_seconds(stack)
            bare = bare_round_trips(stack)
            bare_after = cpu_seconds(stack)
            console.print("measuring the job round trip ...")
            trips = job_round_trips(client, auth)
            jobs = [trip.read - trip.posted for trip in trips]
            parts = stages(settings, trips)
        console.print(f"submitting {THROUGHPUT_JOBS} jobs from {CLIENTS} clients ...")
        cpu_before = cpu_seconds(stack)
        cpu_before.pop("bare", None)
        client_before = own_cpu_seconds()
        elapsed, done, failed = asyncio.run(throughput(stack.base_url, auth))
        cpu_after = cpu_seconds(stack)
        client_s = own_cpu_seconds() - client_before
    finally:
        stack.stop()
        databases.drop(name)
        databases.drop(template)
        asyncio.run(delete_test_objects(settings.rabbitmq_url, SUFFIXES))

    table = Table(title=f"Job latency, {LATENCY_SAMPLES} sequential round trips")
    for column in ("", "p50 ms", "p99 ms", "mean ms"):
        table.add_column(column, justify="right")
    rows = [("bare Celery no-op", bare), ("echo job via API", jobs)]
    rows += [(f"  {label}", samples) for label, samples in parts.items()]
    for label, samples in rows:
        table.add_row(
            label,
            f"{percentile(samples, 50) * 1000:.1f}",
            f"{percentile(samples, 99) * 1000:.1f}",
            f"{statistics.fmean(samples) * 1000:.1f}",
        )
    console.print(table)
    ratio = percentile(jobs, 50) / percentile(bare, 50)
    if bare_before:
        tasks = WARM_UP + len(bare)
        bare_ms = (bare_after["bare"] - bare_before["bare"]) / tasks * 1000
        console.print(f"CPU of the bare Celery worker per no-op task: {bare_ms:.1f} ms")
    rate = done / elapsed
    if cpu_before and done:
        per_job = {
            name: (cpu_after[name] - cpu_before[name]) / done * 1000
            for name in cpu_before
        }
        console.print(
            "CPU per job during the throughput run (ms; PostgreSQL and RabbitMQ"
            " include any other load on this machine): "
            + ", ".join(f"{name} {ms:.1f}" for name, ms in per_job.items())
            + f"; total {sum(per_job.values()):.1f} on {os.cpu_count()} cores,"
            f" besides {client_s / done * 1000:.1f} for the benchmark's own clients"
        )
    console.print(
        f"p50 ratio job/bare: {ratio:.1f}x (target <= 2x)\n"
        f"throughput: {done} SUCCESS of {THROUGHPUT_JOBS} ({failed} FAILURE)"
        f" in {elapsed:.2f} s = {rate:.0f} jobs/s (target >= 300, all SUCCESS)"
    )


if __name__ == "__main__":
    main()
