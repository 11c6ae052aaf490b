"""A persistent latency cache in one SQLite file, safe for several processes.

Key: (plan key, model, input shape, batch, precision, backend, device,
library versions), hashed. Each entry stores its JSON payload with a SHA-256
checksum; an entry that fails the check (or does not parse) is dropped and
re-measured, and a file that is not a database at all is moved aside.
"""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from updp.latency.result import LatencyResult


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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._init_db()
        except sqlite3.DatabaseError as e:
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            self.path.replace(aside)
            warnings.warn(f"latency cache '{self.path}' was unreadable ({e}); moved to '{aside}', starting afresh")
            self._init_db()

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=60)

    def _init_db(self) -> None:
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("CREATE TABLE IF NOT EXISTS latency (digest TEXT PRIMARY KEY, key TEXT NOT NULL, "
                       "payload TEXT NOT NULL, checksum TEXT NOT NULL, created REAL NOT NULL)")

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
        match = {k: list(v) if isinstance(v, tuple) else v for k, v in match.items()}
        for entry in reversed(self.entries()):
            if all(entry["key"].get(k) == v for k, v in match.items()):
                result = self.get(CacheKey(**{k: _tuple(v) for k, v in entry["key"].items()}))
                if result is not None:
                    return result
        return None

    def entries(self) -> list[dict[str, Any]]:
        with self._connect() as db:
            rows = db.execute("SELECT key, payload FROM latency ORDER BY created").fetchall()
        return [{"key": json.loads(k), "result": json.loads(p)} for k, p in rows]


def _tuple(v: Any) -> Any:
    """JSON lists back to the tuples ``CacheKey`` holds (nested for versions)."""
    return tuple(_tuple(x) for x in v) if isinstance(v, list) else v
