"""Files that are never seen half-written."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import BinaryIO


def atomic_write(path: str, write: Callable[[BinaryIO], object]) -> None:
    """``write(file)`` into a unique temporary file next to ``path`` (binary), fsync, rename
    over ``path``: readers and concurrent writers never see a partial file. Unique names,
    not a PID (jobs on two nodes of a shared file system can have the same one). The
    temporary name starts with ``.tmp-``, which every reader skips."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix="-" + os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
