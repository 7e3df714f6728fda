"""A throwaway PostgreSQL server in a temporary folder of its own: the machine's PostgreSQL
binaries (``initdb``, ``pg_ctl``; Debian's ``postgresql`` package), a loopback port, one
database and one password login (``scram-sha-256`` over TCP). ``raydrat bench tracking``
runs MLflow on it, and the tests do.

PostgreSQL refuses to run as root: as root, the server's files belong to the ``postgres``
user and its commands run as that user (``runuser``). Stopping it (``pg_ctl stop``) removes
the folder; nothing else on the machine is touched.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

from raydrat.bench.loopback import free_port

SERVICE_USER = "postgres"
"""The account the server runs as when raydrat runs as root."""
SEARCH_DIRS = ("/usr/lib/postgresql/*/bin", "/usr/local/pgsql/bin")
INSTALL_HINT = "install PostgreSQL's server (Debian: apt-get install postgresql)"


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server binaries here, or no account to run them as."""


def find_bin_dir() -> Path:
    """The folder holding ``initdb``, ``pg_ctl`` and ``postgres``: ``PATH`` first, then the
    versioned folders distributions install them in (the newest version)."""
    found = shutil.which("initdb")
    candidates = [Path(found).resolve().parent] if found else []
    for pattern in SEARCH_DIRS:
        candidates += sorted((Path(p) for p in glob.glob(pattern)), key=_version, reverse=True)
    for folder in candidates:
        if all((folder / tool).exists() for tool in ("initdb", "pg_ctl", "postgres", "psql")):
            return folder
    raise PostgresUnavailable(
        f"PostgreSQL's initdb, pg_ctl and postgres were not found on PATH or in {SEARCH_DIRS}: {INSTALL_HINT}"
    )


def _version(folder: Path) -> tuple[int, ...]:
    parts = [p for p in folder.parts if p.replace(".", "").isdigit()]
    return tuple(int(x) for x in parts[-1].split(".")) if parts else (0,)


class LocalPostgres:
    """``with LocalPostgres() as pg:`` a running server; ``pg.uri()`` its SQLAlchemy URI."""

    def __init__(self, database: str = "mlflow", user: str = "raydrat", max_connections: int = 200):
        self.database, self.user, self.max_connections = database, user, max_connections
        self.password = secrets.token_urlsafe(12)
        self.host, self.port = "127.0.0.1", 0
        self.bin = find_bin_dir()
        self.root: Path | None = None
        self._as_service = os.geteuid() == 0
        if self._as_service:
            try:
                pwd.getpwnam(SERVICE_USER)
            except KeyError:
                raise PostgresUnavailable(
                    f"running as root, and PostgreSQL refuses root: no {SERVICE_USER!r} account to run it as "
                    f"({INSTALL_HINT}, which creates it)"
                ) from None

    # ------------------------------------------------------------------ life cycle

    def start(self) -> LocalPostgres:
        # its own folder under /tmp (not under a caller's private temp folder: the service
        # account must be able to reach it); short, since its socket lives there
        self.root = Path(tempfile.mkdtemp(prefix="raydrat-pg-"))
        if self._as_service:
            account = pwd.getpwnam(SERVICE_USER)
            os.chown(self.root, account.pw_uid, account.pw_gid)
        self.port = free_port()
        self._run("initdb", "-D", self.data_dir, "-U", "postgres", "-E", "UTF8", "--no-locale", "--no-sync",
                  "--auth-local=trust", "--auth-host=scram-sha-256")  # fmt: skip
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses={self.host} "
            f"-c max_connections={self.max_connections} -c password_encryption=scram-sha-256"
        )
        self._run("pg_ctl", "-D", self.data_dir, "-l", str(self.root / "server.log"), "-w", "-t", "120", "-o", options,
                  "start")  # fmt: skip
        # the login and its database, over the local socket (trust) as the superuser
        self.psql(
            f"CREATE ROLE {self.user} LOGIN PASSWORD '{self.password}';\n"
            f"CREATE DATABASE {self.database} OWNER {self.user};\n"
        )
        return self

    def stop(self) -> None:
        if self.root is None:
            return
        if (Path(self.data_dir) / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", self.data_dir, "-m", "fast", "-w", "-t", "60", "stop", check=False)
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None

    def __enter__(self) -> LocalPostgres:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ use

    @property
    def data_dir(self) -> str:
        return str(self.root / "data")

    def uri(self, password: str | None = None, driver: str = "postgresql+psycopg") -> str:
        """The SQLAlchemy URI of the database, with this login's password (or ``password``)."""
        pw = self.password if password is None else password
        return f"{driver}://{self.user}:{pw}@{self.host}:{self.port}/{self.database}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run ``sql`` (read from stdin, so no statement shows in a process list) as the
        superuser over the local socket; its output, unaligned, tuples only."""
        out = self._run("psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", str(self.root), "-p",
                        str(self.port), "-U", "postgres", "-d", database, stdin=sql)  # fmt: skip
        return out

    def dump(self, database: str | None = None) -> str:
        """Everything the database holds, as SQL text (``pg_dump``)."""
        return self._run("pg_dump", "-h", str(self.root), "-p", str(self.port), "-U", "postgres",
                         database or self.database)  # fmt: skip

    def log_text(self) -> str:
        try:
            return (self.root / "server.log").read_text(errors="replace")
        except (OSError, TypeError):
            return ""

    def _run(self, tool: str, *args: str, stdin: str | None = None, check: bool = True) -> str:
        cmd = [str(self.bin / tool), *args]
        if self._as_service:
            cmd = ["runuser", "-u", SERVICE_USER, "--", *cmd]
        proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=180, cwd=self.root or "/")
        if check and proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise PostgresUnavailable(f"{tool} failed (exit {proc.returncode}): {' | '.join(tail)}")
        return proc.stdout
