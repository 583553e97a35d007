"""Durable file writes: a crash leaves either the old file or the whole new one.

The data goes to a temporary file in the same folder (named for the writing process, so
two writers never share one), is fsynced, renamed over the target, and the folder is
fsynced so that the rename itself survives a power cut.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_durably(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably (see the module doc)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
