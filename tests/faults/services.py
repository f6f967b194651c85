"""Services a fault test may break: a PostgreSQL cluster of its own, a small tmpfs to fill up.

Neither touches anything the rest of the suite uses: the cluster listens on a free port (never
5432) with its socket in its own directory, and the tmpfs is mounted on a fresh directory.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from conftest import free_port

SHARED_POSTGRES_PORT = 5432


def postgres_tool(name: str) -> str | None:
    """A PostgreSQL binary on PATH, or in Debian's versioned directory (newest first)."""
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=lambda p: int(p.parts[-3]))
    return str(versions[-1]) if versions else None


def _as_postgres(tool: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a PostgreSQL tool as the `postgres` OS user (its tools refuse to run as root)."""
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    command = [*prefix, postgres_tool(tool) or tool, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)


@dataclass
class PostgresCluster:
    """`initdb` + `pg_ctl` on a directory and a port of its own; stopped and started at will."""

    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="pombo-faults-pg-")))
    port: int = field(default_factory=free_port)

    def __post_init__(self) -> None:
        assert self.port != SHARED_POSTGRES_PORT, "never the PostgreSQL the rest of the suite uses"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log_path(self) -> Path:
        return self.root / "postgres.log"

    def url(self, database: str = "postgres") -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/{database}"

    def init(self) -> None:
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        self.root.chmod(0o700)
        done = _as_postgres("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed ({done.returncode}): {done.stderr[-2000:]}")

    def start(self) -> float:
        """Start and wait until it accepts connections; returns the monotonic time it did."""
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        done = _as_postgres(
            "pg_ctl", "-D", str(self.data), "-l", str(self.log_path), "-o", options, "-w", "-t", "30", "start"
        )
        if done.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed: {done.stdout}{done.stderr}{self._log_tail()}")
        return time.monotonic()

    def stop(self) -> float:
        """Fast shutdown (open sessions are cut, as a crash or a failover would); returns when done."""
        done = _as_postgres("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "30", "stop")
        if done.returncode != 0:
            raise RuntimeError(f"pg_ctl stop failed: {done.stdout}{done.stderr}{self._log_tail()}")
        return time.monotonic()

    def freeze(self) -> float:
        """SIGSTOP the server and every backend: connections stay open and nothing answers, as
        when its host hangs or the network drops packets without a reset; returns when done."""
        for pid in self._processes():
            os.kill(pid, signal.SIGSTOP)
        return time.monotonic()

    def thaw(self) -> float:
        for pid in reversed(self._processes()):
            os.kill(pid, signal.SIGCONT)
        return time.monotonic()

    def _processes(self) -> list[int]:
        """The postmaster (first line of postmaster.pid), then its children."""
        postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        children = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, IndexError, ValueError):
                if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == postmaster:
                    children.append(int(stat.parent.name))
        return [postmaster, *children]

    @property
    def running(self) -> bool:
        return _as_postgres("pg_ctl", "-D", str(self.data), "status").returncode == 0

    def create_database(self, name: str) -> str:
        done = _as_postgres(
            "psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", "postgres",
            "-v", "ON_ERROR_STOP=1", "-c", f'CREATE DATABASE "{name}"',
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"CREATE DATABASE failed: {done.stderr}")
        return self.url(name)

    def destroy(self) -> None:
        if self.data.exists() and self.running:
            _as_postgres("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)

    def _log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""


class MountNotPermitted(Exception):
    """This machine (or container) does not let us mount a tmpfs."""


@dataclass
class Tmpfs:
    """A small tmpfs: fill it to the last byte with a filler file, delete the file to give space back."""

    size_mib: int
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="pombo-faults-tmpfs-")))
    mounted: bool = False

    @property
    def filler(self) -> Path:
        return self.root / "filler"

    def mount(self) -> None:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={self.size_mib}m,mode=0755", "tmpfs", str(self.root)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            self.root.rmdir()
            raise MountNotPermitted(done.stderr.strip() or f"mount exited {done.returncode}")
        self.mounted = True

    def free_bytes(self) -> int:
        stats = os.statvfs(self.root)
        return stats.f_bavail * stats.f_frsize

    def fill(self) -> int:
        """Write the filler until the file system says ENOSPC; returns the bytes written."""
        written = 0
        chunk = b"\0" * (1 << 20)
        with self.filler.open("ab", buffering=0) as out:
            while True:
                try:
                    written += out.write(chunk)
                except OSError as error:
                    if error.errno != errno.ENOSPC:
                        raise
                    if len(chunk) == 1:
                        return written
                    chunk = chunk[: len(chunk) // 2]

    def give_back(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.filler.unlink()

    def unmount(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.root)], check=False, capture_output=True)
            self.mounted = False
        with contextlib.suppress(OSError):
            self.root.rmdir()
