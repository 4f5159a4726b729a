"""A throw-away PostgreSQL server for the tests: `initdb` and `pg_ctl` on a free loopback port.

    server = PgServer.create()         # initdb into a new temporary directory, then start
    url = server.new_database()        # postgresql://tickguard@127.0.0.1:PORT/test_1
    server.stop(); server.start()      # a server that goes away and comes back (failover)
    server.destroy()                   # stop -m immediate, remove the directory

The binaries come from Debian's packages (/usr/lib/postgresql/<major>/bin, the
highest major) or from PATH; scripts/install-postgresql.sh installs them.
initdb refuses to run as root, so as root every server command runs as the
`postgres` system user (or `nobody`) through runuser, and the directory is
handed to that user; otherwise they run as the caller.

The server listens on 127.0.0.1 only, on a port picked here (never 5432), with
its Unix socket inside its own directory; it trusts every local connection
(user `tickguard`, no password) and runs with fsync off. Nothing here touches
another PostgreSQL on the machine: no pg_ctlcluster, no systemd.

Stdlib plus psycopg (for CREATE DATABASE): the integration conftest loads it by
path for the `pg_server` and `pg_url` fixtures, and a scenario script run as a
subprocess can load it the same way.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import psycopg
from psycopg import sql

LOOPBACK = "127.0.0.1"
SUPERUSER = "tickguard"  # initdb --username: the role every test connects as
START_TIMEOUT = 30  # seconds pg_ctl waits for the server to accept connections
STOP_TIMEOUT = 30  # seconds pg_ctl waits for the server to exit
PORT_ATTEMPTS = 3  # a picked port can be taken before the server binds it
UNPRIVILEGED_USERS = ("postgres", "nobody")  # who runs the server when we are root
BINARIES = ("initdb", "pg_ctl", "postgres")
_BIND_FAILED = re.compile(r"could not bind|could not create listen socket|Address already in use")


class PgUnavailable(Exception):
    """This machine cannot run a throw-away server: binaries or an unprivileged user missing."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


def _major(bin_dir: str) -> tuple[int, ...]:
    """(15,) for /usr/lib/postgresql/15/bin; (9, 6) for .../9.6/bin; () when not a version."""
    name = Path(bin_dir).parent.name
    return (
        tuple(int(part) for part in name.split(".")) if re.fullmatch(r"\d+(\.\d+)*", name) else ()
    )


def find_bin_dir() -> Path:
    """The directory with initdb, pg_ctl and postgres: Debian's highest major, else PATH."""
    debian = [os.path.dirname(p) for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")]
    candidates = sorted(debian, key=_major, reverse=True)
    on_path = shutil.which("initdb")
    if on_path is not None:
        candidates.append(os.path.dirname(os.path.realpath(on_path)))
    for directory in candidates:
        if all(os.access(os.path.join(directory, b), os.X_OK) for b in BINARIES):
            return Path(directory)
    raise PgUnavailable(
        "PostgreSQL server binaries not found (scripts/install-postgresql.sh installs them)"
    )


def run_as_user() -> pwd.struct_passwd | None:
    """The unprivileged account the server runs as when we are root; None when we are not."""
    if os.geteuid() != 0:
        return None
    for name in UNPRIVILEGED_USERS:
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise PgUnavailable(
        f"running as root and none of the users {', '.join(UNPRIVILEGED_USERS)} exists:"
        " initdb refuses to run as root"
    )


def free_port() -> int:
    """A loopback port nothing listens on right now (bound, then released)."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
    return port


class PgServer:
    """One initdb'd data directory and the server on it; see the module docstring."""

    def __init__(self, bin_dir: Path, root: Path, user: pwd.struct_passwd | None) -> None:
        self.bin_dir = bin_dir
        self.root = root  # everything lives here: data/, sock/, server.log
        self.user = user  # who runs initdb/pg_ctl (None: the caller)
        self.port = 0
        self._names = itertools.count(1)

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "sock"

    @property
    def log_path(self) -> Path:
        return self.root / "server.log"

    @property
    def url(self) -> str:
        """The `postgres` maintenance database, as the superuser."""
        return self.database_url("postgres")

    def database_url(self, name: str) -> str:
        return f"postgresql://{SUPERUSER}@{LOOPBACK}:{self.port}/{name}"

    @classmethod
    def create(cls, bin_dir: Path | None = None) -> PgServer:
        """initdb into a new temporary directory and start the server on a free port.

        Raises PgUnavailable when the binaries or an unprivileged user are missing,
        RuntimeError (with the log) when initdb or the server fails.
        """
        bin_dir = find_bin_dir() if bin_dir is None else bin_dir
        user = run_as_user()
        root = Path(tempfile.mkdtemp(prefix="tickguard-pg-"))
        server = cls(bin_dir, root, user)
        try:
            server.socket_dir.mkdir()
            if user is not None:
                for path in (root, server.socket_dir):
                    os.chown(path, user.pw_uid, user.pw_gid)
            server._run(
                "initdb",
                "--auth=trust",
                f"--username={SUPERUSER}",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",  # thrown away at the end: no need to survive a power cut
                "-D",
                str(server.data_dir),
            )
            server._start_on_free_port()
        except BaseException:
            server.destroy()
            raise
        return server

    def _command(self, binary: str, *args: str) -> list[str]:
        command = [str(self.bin_dir / binary), *args]
        if self.user is not None:
            command = ["runuser", "-u", self.user.pw_name, "--", *command]
        return command

    def _run(self, binary: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            self._command(binary, *args),
            cwd=self.root,  # the server's user may not be allowed into the caller's directory
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT + STOP_TIMEOUT,
            check=False,
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"{binary} {' '.join(args)} exited with {result.returncode}:\n"
                f"{result.stdout}{result.stderr}{self._log_tail()}"
            )
        return result

    def _log_tail(self, chars: int = 2000) -> str:
        try:
            return "\n--- server.log ---\n" + self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def _start_on_free_port(self) -> None:
        for attempt in range(PORT_ATTEMPTS):
            self.port = free_port()
            logged = self.log_path.stat().st_size if self.log_path.exists() else 0
            try:
                self.start()
                return
            except RuntimeError:
                with self.log_path.open(errors="replace") as log:
                    log.seek(logged)
                    clash = _BIND_FAILED.search(log.read())
                if clash is None or attempt == PORT_ATTEMPTS - 1:
                    raise

    def start(self) -> None:
        """Start the server on `self.port` and wait until it accepts connections."""
        options = (
            f"-c listen_addresses={LOOPBACK} -p {self.port}"
            f" -k {shlex.quote(str(self.socket_dir))} -c fsync=off"  # pg_ctl runs them through sh
        )
        self._run(
            "pg_ctl",
            "start",
            "-w",
            "-t",
            str(START_TIMEOUT),
            "-D",
            str(self.data_dir),
            "-l",  # also keeps the server from holding our stdout/stderr pipes open
            str(self.log_path),
            "-o",
            options,
        )

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: `fast` ends every session (a clean shutdown), `immediate` is a crash."""
        self._run(
            "pg_ctl", "stop", "-w", "-t", str(STOP_TIMEOUT), "-m", mode, "-D", str(self.data_dir)
        )

    def running(self) -> bool:
        return self._run("pg_ctl", "status", "-D", str(self.data_dir), check=False).returncode == 0

    def new_database(self) -> str:
        """CREATE DATABASE with a name unique to this server; its URL."""
        name = f"test_{next(self._names)}"
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.database_url(name)

    def terminate(self, pid: int) -> bool:
        """pg_terminate_backend(pid): end one session as if its client had vanished."""
        with psycopg.connect(self.url, autocommit=True) as conn:
            row = conn.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()
        return bool(row and row[0])

    def destroy(self) -> None:
        """Stop the server at once (if it runs) and remove its directory. Idempotent."""
        if (self.data_dir / "postmaster.pid").exists():
            self._run(
                "pg_ctl", "stop", "-w", "-m", "immediate", "-D", str(self.data_dir), check=False
            )
        shutil.rmtree(self.root, ignore_errors=True)
