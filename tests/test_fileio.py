"""Atomic writes: temporary files of killed writers are cleaned, failed writes are one clear line."""
from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from updp.core.fileio import WriteError, atomic_path, remove_stale_tmp, write_json

ROOT = Path(__file__).resolve().parents[1]


def test_temporary_file_of_a_killed_writer_is_removed_at_the_next_start(tmp_path):
    script = textwrap.dedent(f"""
        import os, time
        from updp.core.fileio import atomic_path
        with atomic_path({str(tmp_path / 'supernet.pt')!r}) as tmp:
            with open(tmp, 'wb') as f:
                f.write(b'x' * 1000); f.flush()
                print('writing', flush=True)
                time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(left) == 1 and not (tmp_path / "supernet.pt").exists()
    with atomic_path(tmp_path / "other.json") as tmp:  # a live writer's file is kept
        tmp.write_text("{}")
        assert remove_stale_tmp(tmp_path) == left
        assert tmp.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.json"]


def test_updp_run_cleans_stale_tmp_files_of_the_run_directory(tmp_path):
    from updp.pipeline.search import prepare_run_dir

    (tmp_path / ".baseline.pt.999999999.abcd.tmp").write_bytes(b"half")
    (tmp_path / "user.tmp").write_text("not ours")
    prepare_run_dir(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["user.tmp"]


def test_atomic_write_fsyncs_file_and_folder(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd)))
    write_json(tmp_path / "a.json", {"x": 1})
    assert synced[-1] == str(tmp_path) and synced[0].startswith(str(tmp_path / ".a.json."))


def test_a_path_under_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(WriteError, match="cannot write '.*file/sub/a.json'"):
        write_json(tmp_path / "file" / "sub" / "a.json", {})


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a signal, like a full disk's ENOSPC
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))


def test_disk_full_during_merge_names_the_file_and_exits_2(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "updp", "merge", "convnext_atto", "--plan", "stages.2.blocks.0",
                           "--out", str(out), "--img-size", "64"], capture_output=True, text=True,
                          preexec_fn=_limit_file_size, timeout=600)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "cannot write" in lines[0] and str(out) in lines[0], lines[0]
