"""A throwaway PostgreSQL server for tests and benchmarks: initdb + pg_ctl in a temporary directory.

The server listens on 127.0.0.1 at a free port, with its socket in the
temporary directory, trusts local connections, and is stopped and removed on
exit. initdb refuses to run as root, so as root the server runs as the
``postgres`` system user (created by the Debian package), else ``nobody``.
"""
from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote


def find_bindir() -> Path | None:
    """The directory of ``initdb`` and ``pg_ctl``: $PG_BINDIR, PATH, or the newest /usr/lib/postgresql/*/bin."""
    candidates = [os.environ.get("PG_BINDIR", "")]
    candidates.append(str(Path(shutil.which("initdb") or "/nonexistent").parent))
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version, reverse=True)
    return next((Path(c) for c in candidates if c and (Path(c) / "initdb").is_file()
                 and (Path(c) / "pg_ctl").is_file()), None)


def _version(path: str) -> tuple[int, ...]:
    v = Path(path).parent.name
    return tuple(int(x) for x in v.split(".") if x.isdigit())


def _run_as() -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise RuntimeError("running as root and there is no 'postgres' or 'nobody' user to run initdb as; "
                       "create one (useradd postgres) or run the tests as another user")


def _command(user: pwd.struct_passwd | None, argv: list[str]) -> list[str]:
    if user is None:
        return argv
    if shutil.which("runuser"):
        return ["runuser", "-u", user.pw_name, "--", *argv]
    return ["su", user.pw_name, "-s", "/bin/sh", "-c", " ".join(f"'{a}'" for a in argv)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check(argv: list[str]) -> None:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if r.returncode:
        raise RuntimeError(f"{' '.join(argv)} failed ({r.returncode}): {(r.stderr or r.stdout)[-2000:]}")


@contextlib.contextmanager
def pg_server(bindir: Path | None = None, password: str | None = None) -> Iterator[str]:
    """Start a server; yield the SQLAlchemy URL of its ``postgres`` database (user ``updp``).

    With ``password``, TCP connections must give it (scram-sha-256); the URL does.
    """
    bindir = bindir or find_bindir()
    if bindir is None:
        raise RuntimeError("no PostgreSQL server binaries (initdb, pg_ctl) found; set PG_BINDIR")
    user = _run_as()
    tmp = Path(tempfile.mkdtemp(prefix="updp-pg-"))
    data = tmp / "data"
    try:
        if user is not None:
            os.chown(tmp, user.pw_uid, user.pw_gid)
        _check(_command(user, [str(bindir / "initdb"), "-D", str(data), "-U", "updp", "--no-sync", "-E", "UTF8",
                               *_auth(tmp, user, password)]))
        port = _start(bindir, user, tmp, data)
        secret = f":{quote(password, safe='')}" if password else ""
        yield f"postgresql+psycopg2://updp{secret}@127.0.0.1:{port}/postgres"
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run(_command(user, [str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w",
                                           "stop"]), capture_output=True, timeout=120)
        shutil.rmtree(tmp, ignore_errors=True)


def _auth(tmp: Path, user, password: str | None) -> list[str]:
    if not password:
        return ["-A", "trust"]
    pwfile = tmp / "pwfile"
    pwfile.write_text(password + "\n")
    if user is not None:
        os.chown(pwfile, user.pw_uid, user.pw_gid)
    return ["--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}"]


def _start(bindir: Path, user, tmp: Path, data: Path) -> int:
    """pg_ctl start on a free port (a few tries: another process may take the port first)."""
    for attempt in range(3):
        port = _free_port()
        opts = (f"-p {port} -k {tmp} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off "
                "-c full_page_writes=off -c max_connections=200")
        try:
            _check(_command(user, [str(bindir / "pg_ctl"), "-D", str(data), "-l", str(tmp / "server.log"),
                                   "-o", opts, "-w", "-t", "120", "start"]))
            return port
        except RuntimeError:
            if attempt == 2:
                log = (tmp / "server.log").read_text()[-2000:] if (tmp / "server.log").exists() else ""
                raise RuntimeError(f"PostgreSQL did not start; server log:\n{log}") from None
    raise AssertionError("unreachable")


def create_database(url: str, name: str) -> str:
    """Create database ``name`` on the server of ``url``; its URL."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    finally:
        engine.dispose()
    return url.rsplit("/", 1)[0] + f"/{name}"
