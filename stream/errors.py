"""The errors of the wire and of event files: ``FrameError`` (decoding and validation of a
message) and ``DataFileError`` (a data file that cannot be read as its layout)."""

from __future__ import annotations

from pathlib import Path


class FrameError(ValueError):
    """A message that cannot be accepted as it stands.

    ``reason`` is a short, bounded label (``"decode_error"``, ``"version"``,
    ``"dtype"``, ``"shape"``, ``"length"``, ``"nonfinite"``, ``"missing_column"``, ...)
    that nodes use as the ``reason`` label of ``dropped_total``. ``n_events`` is the
    event count the message declared, once the decoder has checked it against the
    buffers that came with it (0 otherwise), so that the node's books count the events
    it drops without trusting a forged header.
    """

    def __init__(self, reason: str, detail: str, *, n_events: int = 0) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.n_events = n_events


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
