"""The one exception that decoding and validation raise."""

from __future__ import annotations


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
