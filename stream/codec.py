"""Bytes <-> messages: a msgpack header frame followed by one raw buffer frame per array.

No pickle, ever. Arrays travel as (dtype, shape, raw bytes); decoding wraps the received
buffers with ``np.frombuffer`` without copying, so decoded arrays are read-only.
``decode`` validates everything it is given and raises only ``FrameError``.

A batch's declared event count ``n`` decides how many events a node books for it, so it is
never taken on trust: it must be a plain integer (not a bool) of at most
``MAX_BATCH_EVENTS``, every array must hold exactly ``n`` rows, and the buffers must hold at
least one byte per event. A ``FrameError`` carries ``n_events`` only once the count has
passed those checks (for a message of another schema version, which cannot be parsed,
only the bound and the byte count); otherwise it carries 0 and the node books one bad frame.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from math import prod
from typing import Any, TypeGuard

import msgpack
import numpy as np

from stream.batch import EventBatch, Message, Record
from stream.errors import FrameError
from stream.schema import MAX_BATCH_EVENTS, SCHEMA_VERSION, WIRE_DTYPES

# Anything with the buffer protocol: bytes, memoryview, zmq.Frame.
Buffer = Any
_MAX_DIMS = 8
_MAX_HEADER_BYTES = 1 << 20


def _describe(arrays: Mapping[str, np.ndarray]) -> tuple[list[list[Any]], list[memoryview]]:
    specs, buffers = [], []
    for name, array in arrays.items():
        contiguous = array if array.flags.c_contiguous else array.copy(order="C")
        if contiguous.dtype.str not in WIRE_DTYPES:
            msg = f"array {name!r} has dtype {contiguous.dtype.str}, not a wire dtype"
            raise FrameError("dtype", msg)
        specs.append([name, contiguous.dtype.str, list(contiguous.shape)])
        buffers.append(contiguous.reshape(-1).view(np.uint8).data)
    return specs, buffers


def _is_int(value: object) -> TypeGuard[int]:
    """Whether a header value is an integer; ``True`` is an int to Python, not to the wire."""
    return isinstance(value, int) and not isinstance(value, bool)


def _count_problem(n: int, nbytes: int) -> str | None:
    """Why ``n`` events cannot travel in ``nbytes`` bytes of buffers, or ``None``."""
    if n > MAX_BATCH_EVENTS:
        return f"{n} events exceed the limit of {MAX_BATCH_EVENTS}"
    if n > nbytes:
        return f"{n} events in {nbytes} bytes of buffers; every event needs at least one byte"
    return None


def _buffer_bytes(frames: Sequence[Buffer]) -> int:
    return sum(memoryview(frame).nbytes for frame in frames)


def encode(message: Message) -> list[Buffer]:
    """Frames for one message: the header, then each array's raw bytes in header order.

    Raises:
        FrameError: an array of a dtype that cannot travel, or an event batch that
            ``decode`` would refuse for its size (more than ``MAX_BATCH_EVENTS`` events, or
            events that occupy no bytes, as with only zero-width columns).
    """
    if isinstance(message, EventBatch):
        problem = _count_problem(len(message), message.nbytes)
        if problem is not None:
            raise FrameError("length", problem)
        cols, col_buffers = _describe(message.columns)
        truth, truth_buffers = _describe(message.truth)
        header = {
            "v": SCHEMA_VERSION,
            "kind": "events",
            "n": len(message),
            "cols": cols,
            "truth": truth,
            "meta": dict(message.meta),
        }
        return [msgpack.packb(header), *col_buffers, *truth_buffers]
    if isinstance(message, Record):
        arrays, buffers = _describe(message.arrays)
        header = {
            "v": SCHEMA_VERSION,
            "kind": "record",
            "type": message.kind,
            "arrays": arrays,
            "meta": dict(message.meta),
        }
        return [msgpack.packb(header), *buffers]
    msg = f"cannot encode a {type(message).__name__}"
    raise TypeError(msg)


def _header(frame: Buffer) -> dict[str, Any]:
    view = memoryview(frame)
    if view.nbytes > _MAX_HEADER_BYTES:
        raise FrameError("decode_error", f"header frame of {view.nbytes} bytes is too large")
    try:
        header = msgpack.unpackb(view, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise FrameError("decode_error", f"header is not valid msgpack ({exc})") from exc
    if not isinstance(header, dict):
        raise FrameError("decode_error", f"header is a {type(header).__name__}, not a map")
    return header


def _check_version(header: dict[str, Any], buffers: Sequence[Buffer]) -> None:
    """Refuse a message of another schema version (``v: true`` and ``v: 1.0`` included).

    Its layout is unknown, so the declared event count is reported (for the node's books)
    only within the bound and the byte count of the buffers that came with it.
    """
    version = header.get("v")
    if _is_int(version) and version == SCHEMA_VERSION:
        return
    n = header.get("n")
    declared = 0
    if _is_int(n) and n > 0 and _count_problem(n, _buffer_bytes(buffers)) is None:
        declared = n
    msg = f"schema version {version!r}, this build reads {SCHEMA_VERSION}"
    raise FrameError("version", msg, n_events=declared)


def _array_specs(raw: object, what: str) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
    if not isinstance(raw, list):
        raise FrameError("decode_error", f"header field {what!r} is not a list")
    specs = []
    names: set[str] = set()
    for entry in raw:
        if not (isinstance(entry, list) and len(entry) == 3):
            raise FrameError("decode_error", f"bad array description {entry!r} in {what!r}")
        name, dtype, shape = entry
        if not isinstance(name, str) or not isinstance(dtype, str):
            raise FrameError("decode_error", f"bad array description {entry!r} in {what!r}")
        if name in names:
            # A repeated name would keep one buffer and hide the other from every check.
            raise FrameError("decode_error", f"array {name!r} appears twice in {what!r}")
        names.add(name)
        if dtype not in WIRE_DTYPES:
            raise FrameError("dtype", f"array {name!r} has dtype {dtype!r}, not a wire dtype")
        if (
            not isinstance(shape, list)
            or len(shape) > _MAX_DIMS
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        ):
            raise FrameError("shape", f"array {name!r} has a bad shape {shape!r}")
        specs.append((name, np.dtype(dtype), tuple(shape)))
    return specs


def _arrays(
    specs: list[tuple[str, np.dtype, tuple[int, ...]]], frames: Sequence[Buffer]
) -> dict[str, np.ndarray]:
    arrays = {}
    for (name, dtype, shape), frame in zip(specs, frames, strict=True):
        view = memoryview(frame)
        expected = prod(shape) * dtype.itemsize
        if view.nbytes != expected:
            msg = f"array {name!r} has {view.nbytes} bytes, {shape} x {dtype} needs {expected}"
            raise FrameError("truncated", msg)
        array = np.frombuffer(view, dtype=dtype).reshape(shape)
        array.flags.writeable = False
        arrays[name] = array
    return arrays


def _check_rows(arrays: Mapping[str, np.ndarray], n: int) -> None:
    for name, array in arrays.items():
        if array.ndim == 0:
            raise FrameError("shape", f"array {name!r} is a scalar, not a column")
        if array.shape[0] != n:
            msg = f"array {name!r} has {array.shape[0]} rows, header says {n}"
            raise FrameError("length", msg)


def decode(frames: Sequence[Buffer], *, check_finite: bool = True) -> Message:
    """Parse and validate one message's frames (bytes, memoryviews or ``zmq.Frame``).

    ``check_finite=False`` leaves NaN/inf in the batch, for a caller that drops the bad
    events one by one (``EventBatch.finite_rows``) instead of the whole batch.

    Raises:
        FrameError: for anything malformed: bad msgpack, wrong schema version, an event
            count that is not an integer, exceeds ``MAX_BATCH_EVENTS`` or is not what the
            buffers hold, a dtype or shape the schema forbids, missing or truncated
            buffers, unequal column lengths, or NaN/inf in a column the schema marks
            finite. ``n_events`` is nonzero only when the count has been checked (see the
            module doc).
    """
    if not frames:
        raise FrameError("decode_error", "empty message")
    header = _header(frames[0])
    _check_version(header, frames[1:])
    kind = header.get("kind")
    meta = header.get("meta", {})
    if not isinstance(meta, dict):
        raise FrameError("decode_error", "header field 'meta' is not a map")
    if kind == "events":
        n = header.get("n")
        if not _is_int(n) or n < 0:
            raise FrameError("decode_error", f"bad event count {n!r}")
        if n > MAX_BATCH_EVENTS:
            raise FrameError("length", f"{n} events exceed the limit of {MAX_BATCH_EVENTS}")
        cols = _array_specs(header.get("cols"), "cols")
        truth = _array_specs(header.get("truth", []), "truth")
        if len(frames) != 1 + len(cols) + len(truth):
            msg = f"{len(frames)} frames, header announces {1 + len(cols) + len(truth)}"
            raise FrameError("truncated", msg)
        columns = _arrays(cols, frames[1 : 1 + len(cols)])
        truth_arrays = _arrays(truth, frames[1 + len(cols) :])
        _check_rows(columns, n)
        _check_rows(truth_arrays, n)
        problem = _count_problem(n, _buffer_bytes(frames[1:]))
        if problem is not None:
            raise FrameError("length", problem)
        # From here on the buffers hold the declared n events: errors report them.
        try:
            batch = EventBatch(columns, truth_arrays, meta)
            if check_finite:
                batch.check_finite()
        except FrameError as exc:
            raise FrameError(exc.reason, exc.detail, n_events=n) from None
        return batch
    if kind == "record":
        record_kind = header.get("type")
        if not isinstance(record_kind, str):
            raise FrameError("decode_error", f"bad record type {record_kind!r}")
        specs = _array_specs(header.get("arrays"), "arrays")
        if len(frames) != 1 + len(specs):
            msg = f"{len(frames)} frames, header announces {1 + len(specs)}"
            raise FrameError("truncated", msg)
        return Record(record_kind, meta, _arrays(specs, frames[1:]))
    raise FrameError("decode_error", f"unknown message kind {kind!r}")
