"""A persistent latency cache in one SQLite file, safe for several processes.

What is cached: one record per single measurement of one plan, on its own:
a ``LatencyBackend.measure`` result (in process or ``measure_isolated``),
stored by ``PlanTimer.measure``, and trtexec figures stored by ``updp latency
import`` (backend ``trtexec``). Its figures are absolute milliseconds, valid
for the whole key below.

What is not cached:

- failure records (``put`` drops them): the cause may be transient (out of
  memory, a busy GPU), so the next request measures again;
- interleaved passes (``measure_interleaved``, ``PlanTimer.measure_many``):
  their figures are ratios to the other variants of the same pass, valid
  within that pass only, so a record of one must not answer a later single
  request. What those passes produce persists elsewhere: the per-block
  ``latency_table.json`` (``LatencyTable``), the latency attributes of each
  search trial, and ``final.json``.

Key: (plan key, model, input shape, batch, precision, backend, device,
library versions), hashed. Each entry stores its JSON payload with a SHA-256
checksum; an entry that fails the check (or does not parse) is dropped and
re-measured. A cache file of ours that SQLite cannot read is moved aside; any other file at the path
(a directory, a CSV, someone else's database) is refused and left untouched.
"""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
import warnings
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from updp.core.errors import UpdpError
from updp.latency.result import LatencyResult

_SQLITE_HEADER = b"SQLite format 3\x00"
_COLUMNS = ("digest TEXT PRIMARY KEY, key TEXT NOT NULL, payload TEXT NOT NULL, checksum TEXT NOT NULL, "
            "created REAL NOT NULL")
# SQLite keeps each table's CREATE statement as text on the first page(s): our mark even when it cannot parse them.
_SCHEMA_MARK = f"latency ({_COLUMNS})".encode()


@dataclass(frozen=True)
class CacheKey:
    plan_key: str
    model: str
    input_shape: tuple[int, ...]
    batch_size: int
    precision: str
    backend: str
    device: str
    versions: tuple[tuple[str, str], ...] = ()

    @property
    def digest(self) -> str:
        body = json.dumps(asdict(self), sort_keys=True, default=list)
        return hashlib.sha256(body.encode()).hexdigest()


def default_cache_path() -> Path:
    root = os.environ.get("UPDP_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "updp")
    return Path(root) / "latency.sqlite"


def _checksum(payload: str) -> str:
    return hashlib.sha256(payload.encode()).hexdigest()


class LatencyCache:
    """``get``/``put`` of ``LatencyResult`` records by ``CacheKey``."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path else default_cache_path()
        _make_parent(self.path)
        damage = _damage(self.path)
        if damage:
            aside = _move_aside(self.path)
            warnings.warn(f"latency cache '{self.path}' was unreadable ({damage}); moved to '{aside}', "
                          "starting afresh")
        self._init_db()

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """A transaction on a connection that is closed afterwards, so no WAL outlives the call."""
        with closing(sqlite3.connect(self.path, timeout=60)) as db, db:
            yield db

    def _init_db(self) -> None:
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"CREATE TABLE IF NOT EXISTS latency ({_COLUMNS})")

    def get(self, key: CacheKey) -> LatencyResult | None:
        """The cached record (``cached=True``), or None if absent or corrupted."""
        with self._connect() as db:
            row = db.execute("SELECT payload, checksum FROM latency WHERE digest = ?", (key.digest,)).fetchone()
        if row is None:
            return None
        payload, checksum = row
        try:
            if _checksum(payload) != checksum:
                raise ValueError("checksum mismatch")
            return LatencyResult.from_dict(json.loads(payload)).with_cached(True)
        except (ValueError, TypeError, KeyError) as e:
            warnings.warn(f"latency cache entry for plan {key.plan_key} is corrupted ({e}); re-measuring")
            self.delete(key)
            return None

    def put(self, key: CacheKey, result: LatencyResult) -> None:
        """Store a successful record; failures are not cached (they may be transient)."""
        if not result.ok:
            return
        payload = json.dumps(result.with_cached(False).as_dict(), sort_keys=True)
        with self._connect() as db:
            db.execute("INSERT OR REPLACE INTO latency VALUES (?, ?, ?, ?, ?)",
                       (key.digest, json.dumps(asdict(key), default=list), payload, _checksum(payload), time.time()))

    def delete(self, key: CacheKey) -> None:
        with self._connect() as db:
            db.execute("DELETE FROM latency WHERE digest = ?", (key.digest,))

    def __len__(self) -> int:
        with self._connect() as db:
            return db.execute("SELECT COUNT(*) FROM latency").fetchone()[0]

    def find(self, **match: Any) -> LatencyResult | None:
        """The newest intact record whose key fields equal ``match`` (e.g. imported trtexec runs)."""
        found = self.find_all(**match)
        return found[-1][1] if found else None

    def find_all(self, **match: Any) -> list[tuple[CacheKey, LatencyResult]]:
        """Every intact record whose key fields equal ``match``, oldest first."""
        match = {k: list(v) if isinstance(v, tuple) else v for k, v in match.items()}
        out = []
        for entry in self.entries():
            if all(entry["key"].get(k) == v for k, v in match.items()):
                key = CacheKey(**{k: _tuple(v) for k, v in entry["key"].items()})
                if (result := self.get(key)) is not None:
                    out.append((key, result))
        return out

    def entries(self) -> list[dict[str, Any]]:
        with self._connect() as db:
            rows = db.execute("SELECT key, payload FROM latency ORDER BY created").fetchall()
        return [{"key": json.loads(k), "result": json.loads(p)} for k, p in rows]


def _tuple(v: Any) -> Any:
    """JSON lists back to the tuples ``CacheKey`` holds (nested for versions)."""
    return tuple(_tuple(x) for x in v) if isinstance(v, list) else v


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UpdpError(f"cannot create the folder of latency cache '{path}' ({e.strerror or e}); "
                        "choose another --cache") from None


def _refuse(path: Path, what: str) -> UpdpError:
    return UpdpError(f"latency cache '{path}' {what}, not an updp latency cache; left it untouched: "
                     "choose another --cache (a new file name)")


def _damage(path: Path) -> str | None:
    """Why ``path`` is a damaged cache of ours; None if absent, empty, an empty database or a healthy cache.

    Raises:
        UpdpError: ``path`` is something else (a directory, not SQLite, another program's database).
    """
    if path.is_dir():
        raise _refuse(path, "is a directory")
    if path.exists() and not path.is_file():
        raise _refuse(path, "is not a regular file")
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)  # the largest SQLite page: the schema of a small database is on page 1
    except FileNotFoundError:
        return None
    except OSError as e:
        raise UpdpError(f"cannot read latency cache '{path}' ({e.strerror or e}); choose another --cache") from None
    if not head:
        return None
    if not head.startswith(_SQLITE_HEADER):
        raise _refuse(path, "is not an SQLite database")
    tables = _tables(path)
    if tables is None and _SCHEMA_MARK not in head:
        raise UpdpError(f"latency cache '{path}' is an SQLite database that cannot be read and holds no updp "
                        "latency table; left it untouched: choose another --cache, or delete the file if it "
                        "was an updp cache")
    if tables and not any(name == "latency" and _COLUMNS in (sql or "") for name, sql in tables):
        names = ", ".join(sorted(name for name, _ in tables))
        raise _refuse(path, f"is another program's SQLite database (tables: {names})")
    return _integrity(path)


def _tables(path: Path) -> list[tuple[str, str | None]] | None:
    """The tables and their CREATE statements, read without creating any file; None if SQLite cannot read them."""
    uri = f"{path.resolve().as_uri()}?mode=ro&immutable=1"
    try:
        with closing(sqlite3.connect(uri, uri=True)) as db:
            return db.execute("SELECT name, sql FROM sqlite_master WHERE type = 'table'").fetchall()
    except sqlite3.DatabaseError:
        return None


def _integrity(path: Path) -> str | None:
    """SQLite's quick check of a cache of ours, under its locks (another process may be writing it)."""
    try:
        with closing(sqlite3.connect(path, timeout=60)) as db:
            problems = [row[0] for row in db.execute("PRAGMA quick_check(3)")]
    except sqlite3.DatabaseError as e:
        return str(e)
    return None if problems == ["ok"] else "; ".join(" ".join(p.split()) for p in problems)


def _move_aside(path: Path) -> Path:
    """Rename the file and its WAL and shared-memory files: a stale WAL must not replay into the new database."""
    aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
    for suffix in ("", "-wal", "-shm"):
        side = path.with_name(path.name + suffix)
        if side.exists():
            side.replace(aside.with_name(aside.name + suffix))
    return aside
