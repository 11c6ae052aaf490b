"""Study storage: URLs with secrets, opening without races, cross-worker locks, one retry per stale trial.

A storage URL is any Optuna storage URL; ``journal:PATH`` (or a path ending in
``.journal``/``.log``) is a JournalStorage file, which several processes on
one machine share without SQLite's locking trouble. ``${VAR}`` in a URL is
read from the environment when the storage is opened, so a password need not
be written into a config file; no message shows a URL's password.
"""
from __future__ import annotations

import contextlib
import copy
import fcntl
import os
import random
import re
import threading
import time
import warnings
import weakref
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

import optuna
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback, _CachedStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from updp.core.errors import UpdpError

MAX_RETRY = 2  # a trial whose plan kills its worker (OOM, driver crash) is not retried forever
RUN_ATTRS = ("worker", "fail_reason", "duplicate_of", "dropped")  # a trial's own run: not carried to a retry
_CREATE_ATTEMPTS = 5
_PG_LOCK = 0x75647070  # first key of the PostgreSQL advisory lock: "updp"
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_PASSWORD = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*://[^/:@]*:)(.*)@")  # up to the last '@': the safe side
_LOCK_FILES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # journal storage -> its study lock file
_FILE_LOCKS: dict[tuple[int, Path], _FileLock] = {}
_FILE_LOCKS_GUARD = threading.Lock()
_PG_HELD = threading.local()


# --- storage URLs ---------------------------------------------------------------------------

def redact_url(url: str) -> str:
    """``url`` with the password of ``scheme://user:password@host/...`` shown as ``***``.

    A password that is only a ``${VAR}`` reference is no secret and is kept.
    """
    m = _PASSWORD.match(url)
    if not m or _VAR.fullmatch(m.group(2)):
        return url
    return f"{m.group(1)}***@{url[m.end():]}"


def storage_url(configured: str | None) -> str | None:
    """The configured storage URL, else ``$UPDP_STORAGE``, else None (SQLite in the run directory)."""
    return configured or os.environ.get("UPDP_STORAGE")


def _expand(url: str) -> str:
    def value(m: re.Match) -> str:
        if m.group(1) not in os.environ:
            raise UpdpError(f"the storage URL '{redact_url(url)}' uses ${{{m.group(1)}}}, which is not set; "
                            f"export {m.group(1)}=... in every worker's environment")
        return os.environ[m.group(1)]
    return _VAR.sub(value, url)


def _format_safe(url: str) -> str:
    """``url`` with the braces of its password doubled: RDBStorage ``.format()``s the URL."""
    m = _PASSWORD.match(url)
    if not m:
        return url
    return f"{m.group(1)}{m.group(2).replace('{', '{{').replace('}', '}}')}@{url[m.end():]}"


def _is_journal(url: str) -> bool:
    return url.startswith("journal:") or url.endswith((".journal", ".log"))


def _scrub(text: str, url: str) -> str:
    """``text`` without the URL's password (as written, decoded, or formatted), in case a driver quotes it."""
    m = _PASSWORD.match(url)
    password = m.group(2) if m else ""
    for secret in {password, unquote(password), password.replace("{{", "{").replace("}}", "}")} - {""}:
        text = text.replace(secret, "***")
    return text


# --- opening a storage ------------------------------------------------------------------------

def open_storage(url: str | None, run_dir: Path, heartbeat_s: int = 20, grace_s: int = 60):
    """An Optuna storage for ``url`` (default: ``study.db`` SQLite in the run directory).

    RDB storages record a heartbeat every ``heartbeat_s`` while a trial runs; a
    RUNNING trial without one for ``grace_s`` is failed and retried.
    """
    url = _expand(url) if url else f"sqlite:///{(run_dir / 'study.db').resolve()}"
    try:
        if _is_journal(url):
            return _journal(Path(url.removeprefix("journal:")))
        with _creation_lock(url):
            return _rdb(url, heartbeat_s, grace_s)
    except Exception as e:  # noqa: BLE001 - every storage failure is a user-facing error
        detail = _scrub(str(e).splitlines()[0][:200] if str(e) else "", url)
        raise UpdpError(f"cannot open study storage '{redact_url(url)}': {type(e).__name__}: {detail}") from None


def _journal(path: Path) -> JournalStorage:
    path.parent.mkdir(parents=True, exist_ok=True)
    storage = JournalStorage(JournalFileBackend(str(path), lock_obj=_FlockJournalLock(f"{path}.append.lock")))
    _LOCK_FILES[storage] = Path(f"{path}.updp.lock")
    return storage


def _rdb(url: str, heartbeat_s: int, grace_s: int) -> RDBStorage:
    """The storage, retrying the race of workers that create the same new schema at once."""
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    for attempt in range(_CREATE_ATTEMPTS):
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna; they are what we want
                warnings.simplefilter("ignore", ExperimentalWarning)
                return _RDBStorage(_format_safe(url), engine_kwargs=kwargs, heartbeat_interval=heartbeat_s,
                                   grace_period=grace_s, heartbeat_stale_trial_callback=RetryOnce())
        except Exception as e:  # noqa: BLE001 - only the creation race is retried
            if attempt == _CREATE_ATTEMPTS - 1 or not _creation_race(e):
                raise
            time.sleep(0.05 * 2 ** attempt * (1 + random.random()))
    raise AssertionError("unreachable")


def _creation_race(e: Exception) -> bool:
    """Another worker created the tables or the version row between our check and our write."""
    from sqlalchemy import exc

    text = str(e).lower()
    return isinstance(e, exc.IntegrityError) or (
        isinstance(e, (exc.OperationalError, exc.ProgrammingError)) and "already exists" in text)


def _sqlite_file(url: str) -> Path | None:
    if not url.startswith("sqlite"):
        return None
    from sqlalchemy.engine import make_url

    database = make_url(url).database
    return Path(database) if database and database != ":memory:" and not database.startswith("file:") else None


@contextlib.contextmanager
def _creation_lock(url: str) -> Iterator[None]:
    """SQLite: one process at a time creates the schema (Optuna's creation is not atomic there)."""
    path = _sqlite_file(url)
    with locked(Path(f"{path}.lock")) if path else contextlib.nullcontext():
        yield


class _RDBStorage(RDBStorage):
    """RDBStorage with two fixes for workers sharing a study.

    A heartbeat-stale trial says why it failed (Optuna fails it silently). On
    SQLite a state change is atomic across processes: Optuna reads the state,
    then writes it, so two workers could both pop one WAITING trial and run it
    twice (PostgreSQL and MySQL lock the row).
    """

    def __init__(self, url: str, **kwargs):
        path = _sqlite_file(url)
        self.lock_file = Path(f"{path}.lock") if path else None
        super().__init__(url, **kwargs)

    def set_trial_state_values(self, trial_id: int, state: TrialState, values=None) -> bool:
        with locked(self.lock_file) if self.lock_file else contextlib.nullcontext():
            return super().set_trial_state_values(trial_id, state, values)

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        ids = super()._get_stale_trial_ids(study_id)
        for trial_id in ids:
            with contextlib.suppress(UpdateFinishedTrialError):
                self.set_trial_user_attr(trial_id, "fail_reason",
                                         f"no heartbeat for {self.grace_period} s: worker lost")
        return ids


class _FlockJournalLock:
    """Journal append lock with ``flock``: a killed writer releases it at once (Optuna's lock waits 30 s)."""

    def __init__(self, path: str):
        self.path, self.held = Path(path), []

    def acquire(self) -> bool:
        hold = locked(self.path)
        hold.__enter__()
        self.held.append(hold)
        return True

    def release(self) -> None:
        self.held.pop().__exit__(None, None, None)


# --- locks ------------------------------------------------------------------------------------

def open_lock(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)  # never truncated, never a symlink


class _FileLock:
    """An flock for other processes, re-entrant within this one (a thread lock and a depth count)."""

    def __init__(self, path: Path):
        self.path, self.thread_lock, self.depth, self.fd = path, threading.RLock(), 0, -1

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        with self.thread_lock:
            if self.depth == 0:
                self.fd = _flock(open_lock(self.path))
            self.depth += 1
            try:
                yield
            finally:
                self.depth -= 1
                if self.depth == 0:
                    os.close(self.fd)  # closing releases the flock


def _flock(fd: int) -> int:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except BaseException:
        os.close(fd)
        raise
    return fd


def locked(path: Path):
    """Hold the exclusive lock on ``path`` (created if need be) across processes; re-entrant in this one."""
    key = (os.getpid(), Path(path).absolute())  # a forked child has its own
    with _FILE_LOCKS_GUARD:
        lock = _FILE_LOCKS.setdefault(key, _FileLock(key[1]))
    return lock.hold()


def _unwrap(storage):
    return storage._backend if isinstance(storage, _CachedStorage) else storage


def _lock_file(storage) -> Path | None:
    """The file that :func:`study_lock` locks for a file-based storage."""
    if isinstance(storage, RDBStorage):
        path = _sqlite_file(storage.url)
        return Path(f"{path}.lock") if path else None
    return _LOCK_FILES.get(storage)


@contextlib.contextmanager
def study_lock(study: optuna.Study) -> Iterator[None]:
    """Serialize a read-then-write on the study across workers (file lock, or PostgreSQL advisory lock).

    Storages without a lock (other RDBMS, in-memory) run the block unlocked.
    """
    storage = _unwrap(study._storage)
    path = _lock_file(storage)
    if path is not None:
        with locked(path):
            yield
    elif isinstance(storage, RDBStorage) and storage.engine.dialect.name == "postgresql":
        with _pg_lock(storage, study._study_id):
            yield
    else:
        yield


@contextlib.contextmanager
def _pg_lock(storage: RDBStorage, study_id: int) -> Iterator[None]:
    """An advisory lock for the transaction: released at commit, at rollback, or when the worker dies."""
    from sqlalchemy import text

    held = _PG_HELD.__dict__.setdefault("keys", set())
    key = (os.getpid(), id(storage), study_id)
    if key in held:  # re-entered by this thread: it holds the lock already
        yield
        return
    held.add(key)
    try:
        with storage.engine.begin() as conn:
            conn.execute(text("SELECT pg_advisory_xact_lock(:a, :b)"), {"a": _PG_LOCK, "b": study_id})
            yield
    finally:
        held.discard(key)


# --- retries ----------------------------------------------------------------------------------

def retried_trial(trial: optuna.trial.FrozenTrial) -> int | None:
    """The number of the trial that ``trial`` retries (Optuna's ``retry_history``), if any."""
    history = trial.system_attrs.get("retry_history") or [None]
    return history[-1]


class RetryOnce:
    """Optuna's RetryHeartbeatStaleTrialCallback, but at most one retry per failed trial.

    Two workers can both fail one stale trial (SQLite has no row lock); the
    check for an existing retry runs under the study lock.
    """

    def __init__(self, max_retry: int = MAX_RETRY):
        self.max_retry = max_retry

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        clean = copy.deepcopy(trial)  # the callback appends to retry_history in place
        clean.user_attrs = {k: v for k, v in trial.user_attrs.items() if k not in RUN_ATTRS}
        with study_lock(study):
            if any(retried_trial(t) == trial.number for t in study.get_trials(deepcopy=False)):
                return
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)
                RetryHeartbeatStaleTrialCallback(max_retry=self.max_retry)(study, clean)


