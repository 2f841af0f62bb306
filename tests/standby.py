"""A PostgreSQL primary and a hot standby streaming from it, for one test module.

Both are new clusters of this machine's PostgreSQL, made with `initdb` and
`pg_basebackup` in a temporary directory, on ports of their own, so the server the
other tests share is never touched. PostgreSQL will not run as root: as root, the
clusters belong to the `postgres` user.
"""

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg

from tests.stack import free_port


def _bin_dir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise RuntimeError("no PostgreSQL server binaries under /usr/lib/postgresql")
    return Path(found[-1]).parent


def _as_owner(command: list[str]) -> list[str]:
    return (
        ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command
    )


@dataclass(frozen=True)
class Pair:
    root: Path
    primary_port: int
    standby_port: int

    @property
    def primary_dir(self) -> Path:
        return self.root / "primary"

    @property
    def standby_dir(self) -> Path:
        return self.root / "standby"

    def url(self, port: int, database: str = "helix") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{port}/{database}"

    def dsn(self, port: int, database: str = "helix") -> str:
        return f"host=127.0.0.1 port={port} user=postgres dbname={database}"

    @property
    def primary_url(self) -> str:
        return self.url(self.primary_port)

    @property
    def standby_url(self) -> str:
        return self.url(self.standby_port)

    def standby(self, database: str = "helix") -> psycopg.Connection:
        return psycopg.connect(self.dsn(self.standby_port, database), autocommit=True)

    @contextmanager
    def replay_paused(self) -> Iterator[None]:
        """The standby replays nothing the primary writes meanwhile."""
        with self.standby() as connection:
            connection.execute("SELECT pg_wal_replay_pause()")
            try:
                yield
            finally:
                connection.execute("SELECT pg_wal_replay_resume()")

    @contextmanager
    def primary_stopped(self) -> Iterator[None]:
        """The primary is down (the standby cut off from it), then back."""
        self.stop(self.primary_dir)
        try:
            yield
        finally:
            self.start(self.primary_dir, self.primary_port)

    def run(self, *command: str | Path) -> None:
        subprocess.run(
            _as_owner([str(part) for part in command]),
            check=True,
            capture_output=True,
            timeout=120,
        )

    def start(self, data: Path, port: int) -> None:
        # Throwaway clusters: nothing they hold needs to survive a crash.
        options = f"-p {port} -c listen_addresses=127.0.0.1 -k {self.root} -c fsync=off"
        self.run(
            *(_bin_dir() / "pg_ctl", "-D", data, "-l", f"{data}.log", "-w", "-t", "60"),
            *("-o", options, "start"),
        )

    def stop(self, data: Path) -> None:
        self.run(_bin_dir() / "pg_ctl", "-D", data, "-m", "immediate", "stop")


@contextmanager
def hot_standby_pair(database: str = "helix") -> Iterator[Pair]:
    """Start a primary with `database` and a hot standby of it; stop both after."""
    root = Path(tempfile.mkdtemp(prefix="helix-standby-"))
    if os.geteuid() == 0:
        owner = pwd.getpwnam("postgres")
        os.chown(root, owner.pw_uid, owner.pw_gid)
    pair = Pair(root, free_port(), free_port())
    try:
        pair.run(
            _bin_dir() / "initdb",
            "-A",
            "trust",
            "-U",
            "postgres",
            "-D",
            pair.primary_dir,
        )
        with open(pair.primary_dir / "pg_hba.conf", "a") as hba:
            hba.write("host replication all 127.0.0.1/32 trust\n")
        pair.start(pair.primary_dir, pair.primary_port)
        with psycopg.connect(
            pair.dsn(pair.primary_port, "postgres"), autocommit=True
        ) as admin:
            admin.execute(f'CREATE DATABASE "{database}"')
        pair.run(
            _bin_dir() / "pg_basebackup",
            *("-h", "127.0.0.1", "-p", str(pair.primary_port), "-U", "postgres"),
            *("-D", pair.standby_dir, "-R", "-X", "stream", "--checkpoint", "fast"),
        )
        pair.start(pair.standby_dir, pair.standby_port)
        yield pair
    finally:
        for data in (pair.standby_dir, pair.primary_dir):
            if (data / "postmaster.pid").exists():
                subprocess.run(
                    _as_owner(
                        [
                            str(_bin_dir() / "pg_ctl"),
                            "-D",
                            str(data),
                            "-m",
                            "immediate",
                            "stop",
                        ]
                    ),
                    capture_output=True,
                    timeout=60,
                )
        shutil.rmtree(root, ignore_errors=True)
