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


def exception_summary(exc: BaseException) -> str:
    """A one-line reason from a library exception (HDF5 errors carry a long back trace).

    Prefers a line that says the file is truncated, else the last line.
    """
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    truncated = [line for line in lines if "truncated" in line.lower()]
    return (truncated or lines)[-1]
