"""Atomic file writes: a crash or Ctrl-C never leaves a half-written file.

The data is written to ``.NAME.PID.XXXX.tmp`` beside the target, flushed to
disk (file and directory fsync) and renamed over the target. A process
killed mid-write leaves its temporary file behind; ``remove_stale_tmp``
removes those whose process is gone at the next start.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from updp.core.errors import UpdpError


class WriteError(UpdpError):
    """A file that could not be written (disk full, read-only folder, ...); the message names it."""


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` on success."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise WriteError(f"cannot write '{path}': {e.strerror or e}; check the folder and its permissions") from e
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual mode
    try:
        yield Path(tmp)
        _fsync(tmp, os.O_RDONLY)
        os.replace(tmp, path)
        _fsync(path.parent, os.O_RDONLY | os.O_DIRECTORY)  # the rename itself survives a power loss
    except OSError as e:
        raise WriteError(f"cannot write '{path}': {e.strerror or e}; check free space and permissions") from e
    except RuntimeError as e:  # torch.save reports a failed write (disk full, file too large) this way
        if "write" not in str(e).lower() and "inline_container" not in str(e):
            raise
        raise WriteError(f"cannot write '{path}': {str(e).splitlines()[0][:160]}; check free space "
                         "and permissions") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _fsync(path: str | os.PathLike, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_TMP = re.compile(r"^\..+\.(\d+)\.[^.]+\.tmp$")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` on this host still runs (a zombie its parent has not reaped is dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def remove_stale_tmp(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of ``atomic_path`` in ``folder`` whose writing process is gone."""
    removed = []
    for entry in Path(folder).iterdir():
        m = _TMP.match(entry.name)
        if m and entry.is_file() and not entry.is_symlink() and not pid_alive(int(m.group(1))):
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def read_json_as(cls: type, path: str | os.PathLike, what: str) -> Any:
    """``cls(**the JSON object in path)``: a dataclass saved with :func:`write_json` and ``asdict``.

    Raises:
        UpdpError: the file cannot be read, is not JSON, or does not fit ``cls`` (one line naming ``what``).
    """
    try:
        with open(path) as f:
            return cls(**json.load(f))
    except (OSError, ValueError, TypeError) as e:
        raise UpdpError(f"cannot read {what} '{path}': {e}") from None


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")
