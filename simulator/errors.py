"""The error a reader raises for a bad, truncated or foreign data file."""

from __future__ import annotations

from pathlib import Path


class DataFileError(ValueError):
    """A data file that cannot be read as the expected layout; names the file and entry."""

    def __init__(self, path: str | Path, detail: str, *, entry: int | None = None) -> None:
        where = f"{path}" if entry is None else f"{path}, entry {entry}"
        super().__init__(f"{where}: {detail}")
        self.path = Path(path)
        self.entry = entry
