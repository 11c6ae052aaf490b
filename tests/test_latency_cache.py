"""The persistent latency cache, its corruption handling, and PlanTimer on top of it."""
from __future__ import annotations

import contextlib
import dataclasses
import sqlite3
import subprocess
import sys
import warnings

import pytest

from updp.core.errors import UpdpError
from updp.core.plan import PruningPlan
from updp.latency.backends.torch import TorchBackend
from updp.latency.base import MeasureConfig
from updp.latency.cache import CacheKey, LatencyCache
from updp.latency.result import failure, summarize
from updp.search.timing import PlanTimer

KEY = CacheKey("plan1", "convnext_atto", (3, 64, 64), 1, "fp32", "onnxruntime", "cpu", (("onnxruntime", "1"),))
FAST = MeasureConfig(warmup_runs=2, warmup_ms=0, min_runs=10, min_time_s=0.05, threads=2)


def _result(median: float = 2.0):
    return summarize([median - 1, median, median + 1], backend="onnxruntime", precision="fp32", batch_size=1,
                     input_shape=(3, 64, 64), context={"device": "cpu"})


def test_round_trip_marks_cached(tmp_path):
    cache = LatencyCache(tmp_path / "c.sqlite")
    assert cache.get(KEY) is None
    cache.put(KEY, _result())
    hit = LatencyCache(tmp_path / "c.sqlite").get(KEY)  # a new process would see the same
    assert hit.cached and hit.median_ms == 2.0 and hit.context == {"device": "cpu"}
    assert len(cache) == 1


@pytest.mark.parametrize("field,value", [("plan_key", "plan2"), ("model", "convnext_tiny"),
                                         ("input_shape", (3, 96, 96)), ("batch_size", 8), ("precision", "fp16"),
                                         ("backend", "torch"), ("device", "gpu"),
                                         ("versions", (("onnxruntime", "2"),))])
def test_every_key_field_matters(tmp_path, field, value):
    cache = LatencyCache(tmp_path / "c.sqlite")
    cache.put(KEY, _result())
    assert cache.get(dataclasses.replace(KEY, **{field: value})) is None


def test_failures_are_not_cached(tmp_path):
    cache = LatencyCache(tmp_path / "c.sqlite")
    cache.put(KEY, failure("engine build failed", backend="x", precision="fp32", batch_size=1, input_shape=(3,)))
    assert len(cache) == 0


def test_corrupted_entry_is_dropped_and_remeasured(tmp_path):
    cache = LatencyCache(tmp_path / "c.sqlite")
    cache.put(KEY, _result())
    with sqlite3.connect(tmp_path / "c.sqlite") as db:
        db.execute("UPDATE latency SET payload = replace(payload, '2.0', '9.0')")
    with pytest.warns(UserWarning, match="corrupted"):
        assert cache.get(KEY) is None
    assert len(cache) == 0
    cache.put(KEY, _result(3.0))
    assert cache.get(KEY).median_ms == 3.0


def test_unparseable_entry_with_valid_checksum_is_dropped(tmp_path):
    import hashlib

    cache = LatencyCache(tmp_path / "c.sqlite")
    cache.put(KEY, _result())
    bad = '{"not": "a record"}'
    with sqlite3.connect(tmp_path / "c.sqlite") as db:
        db.execute("UPDATE latency SET payload = ?, checksum = ?", (bad, hashlib.sha256(bad.encode()).hexdigest()))
    with pytest.warns(UserWarning, match="corrupted"):
        assert cache.get(KEY) is None


def _ours(path, entries: int = 60):
    """A real cache of ours with a few pages of entries, all of it in the main file (no WAL left)."""
    cache = LatencyCache(path)
    for i in range(entries):
        cache.put(dataclasses.replace(KEY, plan_key=f"plan{i}"), _result())
    assert not path.with_name(path.name + "-wal").exists()
    return path.read_bytes()


def _refused(path, fragment):
    before = path.read_bytes() if path.is_file() else None
    siblings = sorted(p.name for p in path.parent.iterdir())
    with pytest.raises(UpdpError) as info:
        LatencyCache(path)
    message = str(info.value)
    assert str(path) in message and fragment in message and "choose another --cache" in message
    assert "\n" not in message
    assert sorted(p.name for p in path.parent.iterdir()) == siblings  # nothing moved aside, no -wal/-shm left
    if before is not None:
        assert path.read_bytes() == before


def test_a_directory_is_refused(tmp_path):
    path = tmp_path / "cachedir"
    path.mkdir()
    (path / "keep.txt").write_text("mine")
    _refused(path, "directory")
    assert (path / "keep.txt").read_text() == "mine"


def test_an_empty_file_is_initialised(tmp_path):
    path = tmp_path / "c.sqlite"
    path.touch()
    cache = LatencyCache(path)
    cache.put(KEY, _result())
    assert cache.get(KEY).median_ms == 2.0
    assert not list(tmp_path.glob("c.sqlite.corrupt-*"))


@pytest.mark.parametrize("content", [
    b"model,median_ms\nresnet18,1.25\n",
    b"this is not sqlite" * 100,
    bytes(range(256)) * 64,
    b"SQLite format 2\x00" + bytes(4080),
    b"SQLite",
], ids=["csv", "text", "binary", "other-header", "short"])
def test_a_file_that_is_not_sqlite_is_refused_untouched(tmp_path, content):
    path = tmp_path / "results.csv"
    path.write_bytes(content)
    _refused(path, "not an SQLite database")


@pytest.mark.parametrize("schema", [
    "CREATE TABLE results (model TEXT, median_ms REAL)",
    "CREATE TABLE latency (model TEXT, median_ms REAL)",  # our table's name, someone else's table
], ids=["other-table", "other-latency-table"])
def test_someone_elses_sqlite_database_is_refused_untouched(tmp_path, schema):
    path = tmp_path / "study.db"
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute(schema)
        db.execute("INSERT INTO " + schema.split()[2] + " VALUES ('resnet18', 1.25)")
    _refused(path, "not an updp latency cache")


def test_someone_elses_wal_database_is_refused_untouched(tmp_path):
    path = tmp_path / "study.db"
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE trials (id INTEGER)")
    _refused(path, "not an updp latency cache")


def test_an_unreadable_sqlite_file_that_is_not_ours_is_refused(tmp_path):
    path = tmp_path / "other.db"
    path.write_bytes(b"SQLite format 3\x00" + bytes(range(256)) * 32)
    _refused(path, "cannot be read")


def _truncate(data: bytes) -> bytes:
    return data[:len(data) // 2]


def _scramble_pages(data: bytes) -> bytes:
    """Page 1 (header and schema) intact, every later page overwritten."""
    return data[:4096] + bytes(range(256)) * ((len(data) - 4096) // 256)


@pytest.mark.parametrize("damage", [_truncate, _scramble_pages])
def test_a_damaged_cache_of_ours_is_moved_aside(tmp_path, damage):
    path = tmp_path / "c.sqlite"
    damaged = damage(_ours(path))
    path.write_bytes(damaged)
    with pytest.warns(UserWarning, match="moved to"):
        cache = LatencyCache(path)
    assert len(cache) == 0
    cache.put(KEY, _result())
    assert cache.get(KEY).median_ms == 2.0
    aside = list(tmp_path.glob("c.sqlite.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == damaged


def test_a_healthy_cache_of_ours_is_kept(tmp_path):
    path = tmp_path / "c.sqlite"
    _ours(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(LatencyCache(path)) == 60
    assert not list(tmp_path.glob("c.sqlite.corrupt-*"))


def test_concurrent_writers_lose_nothing(tmp_path):
    code = ("import sys; from updp.latency.cache import CacheKey, LatencyCache; from updp.latency.result import "
            "summarize\nc = LatencyCache(sys.argv[1])\nfor i in range(25):\n    k = CacheKey(f'{sys.argv[2]}-{i}',"
            " 'm', (3,), 1, 'fp32', 'b', 'd')\n    c.put(k, summarize([1.0], backend='b', precision='fp32', "
            "batch_size=1, input_shape=(3,)))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "c.sqlite"), f"w{w}"]) for w in range(3)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    assert len(LatencyCache(tmp_path / "c.sqlite")) == 75


def test_find_returns_the_matching_record(tmp_path):
    cache = LatencyCache(tmp_path / "c.sqlite")
    cache.put(KEY, _result())
    assert cache.find(plan_key="plan1", model="convnext_atto", input_shape=(3, 64, 64)).median_ms == 2.0
    assert cache.find(plan_key="plan1", backend="tensorrt") is None


class CountingCache(LatencyCache):
    """Counts the records stored: the timer stores each measurement it makes, so no store means no measurement."""

    puts = 0

    def put(self, key, result):
        self.puts += 1
        super().put(key, result)


def test_plan_timer_second_request_is_served_from_the_cache(tmp_path):
    cache = CountingCache(tmp_path / "c.sqlite")
    timer = PlanTimer("test_convnext", "onnxruntime", FAST, cache, img_size=64)
    plan = PruningPlan("test_convnext", {"stages.2.blocks.1"})
    first = timer.measure(plan)
    assert first.ok and not first.cached and cache.puts == 1 and len(cache) == 1
    second = timer.measure(plan)
    assert second.cached and second.median_ms == first.median_ms and second.count == first.count
    assert cache.puts == 1 and len(cache) == 1  # nothing measured, nothing stored
    assert not timer.measure(PruningPlan("test_convnext")).cached  # another plan is another key
    assert cache.puts == 2 and len(cache) == 2


def test_plan_timer_keys_differ_by_plan_threads_and_batch(tmp_path):
    a = PlanTimer("test_convnext", "onnxruntime", FAST, None, img_size=64)
    b = PlanTimer("test_convnext", "onnxruntime", dataclasses.replace(FAST, threads=1), None, img_size=64)
    c = PlanTimer("test_convnext", "onnxruntime", dataclasses.replace(FAST, batch_size=4), None, img_size=64)
    base, one = PruningPlan("test_convnext"), PruningPlan("test_convnext", {"stages.2.blocks.1"})
    keys = {a.key(base).digest, a.key(one).digest, b.key(base).digest, c.key(base).digest}
    assert len(keys) == 4


class ParameterCounting(TorchBackend):
    """The torch backend, noting the parameter count of every model it is given."""

    name = "torch"
    loaded: list[int] = []

    def load(self, target, cfg):
        ParameterCounting.loaded.append(sum(p.numel() for p in target.parameters()))
        super().load(target, cfg)


def test_plan_timer_merged_plan_is_timed_on_the_merged_model():
    # Two figures taken one after the other say nothing reliable about speed; what was timed can be checked.
    ParameterCounting.loaded = []
    timer = PlanTimer("test_convnext", ParameterCounting, FAST, None, img_size=64, device="cpu")
    all_blocks = {"stages.1.blocks.0", "stages.1.blocks.1", "stages.2.blocks.0", "stages.2.blocks.1",
                  "stages.2.blocks.2", "stages.2.blocks.3", "stages.3.blocks.0", "stages.3.blocks.1"}
    base, merged = timer.measure(PruningPlan("test_convnext")), timer.measure(PruningPlan("test_convnext", all_blocks))
    assert base.ok and merged.ok and len(ParameterCounting.loaded) == 2
    unpruned, pruned = ParameterCounting.loaded
    assert pruned < unpruned  # the merged blocks' folded weights, not the full model's
