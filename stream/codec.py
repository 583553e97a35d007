"""Bytes <-> messages: a msgpack header frame followed by one raw buffer frame per array.

No pickle, ever. Arrays travel as (dtype, shape, raw bytes); decoding wraps the received
buffers with ``np.frombuffer`` without copying, so decoded arrays are read-only.
``decode`` validates everything it is given and raises only ``FrameError``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from math import prod
from typing import Any

import msgpack
import numpy as np

from stream.batch import EventBatch, Message, Record
from stream.errors import FrameError
from stream.schema import SCHEMA_VERSION, WIRE_DTYPES

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


def encode(message: Message) -> list[Buffer]:
    """Frames for one message: the header, then each array's raw bytes in header order."""
    if isinstance(message, EventBatch):
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
    version = header.get("v")
    if version != SCHEMA_VERSION:
        # Report the declared event count even so, so that the drop is counted in events.
        n = header.get("n")
        declared = n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 0
        msg = f"schema version {version!r}, this build reads {SCHEMA_VERSION}"
        raise FrameError("version", msg, n_events=declared)
    return header


def _array_specs(raw: object, what: str) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
    if not isinstance(raw, list):
        raise FrameError("decode_error", f"header field {what!r} is not a list")
    specs = []
    for entry in raw:
        if not (isinstance(entry, list) and len(entry) == 3):
            raise FrameError("decode_error", f"bad array description {entry!r} in {what!r}")
        name, dtype, shape = entry
        if not isinstance(name, str) or not isinstance(dtype, str):
            raise FrameError("decode_error", f"bad array description {entry!r} in {what!r}")
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


def decode(frames: Sequence[Buffer], *, check_finite: bool = True) -> Message:
    """Parse and validate one message's frames (bytes, memoryviews or ``zmq.Frame``).

    Raises:
        FrameError: for anything malformed: bad msgpack, wrong schema version, a dtype
            or shape the schema forbids, missing or truncated buffers, unequal column
            lengths, or NaN/inf in a column the schema marks finite.
    """
    if not frames:
        raise FrameError("decode_error", "empty message")
    header = _header(frames[0])
    kind = header.get("kind")
    meta = header.get("meta", {})
    if not isinstance(meta, dict):
        raise FrameError("decode_error", "header field 'meta' is not a map")
    if kind == "events":
        n = header.get("n")
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise FrameError("decode_error", f"bad event count {n!r}")
        try:
            cols = _array_specs(header.get("cols"), "cols")
            truth = _array_specs(header.get("truth", []), "truth")
            if len(frames) != 1 + len(cols) + len(truth):
                msg = f"{len(frames)} frames, header announces {1 + len(cols) + len(truth)}"
                raise FrameError("truncated", msg)
            batch = EventBatch(
                _arrays(cols, frames[1 : 1 + len(cols)]),
                _arrays(truth, frames[1 + len(cols) :]),
                meta,
            )
            if len(batch) != n:
                raise FrameError("length", f"columns have {len(batch)} rows, header says {n}")
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
