"""Flow snapshots: everything needed to use a flow later, bit for bit, with a content hash.

A ``FlowSnapshot`` holds the flow's parameters and preprocessing, the events it saw, the
mjj range and histogram of those events, the training loss, who made it (node id, role,
run and lumi range) and the code version. ``content_hash`` (SHA-256) covers all of it;
``parameters_hash`` covers only what defines the density (flow config, parameters,
preprocessing), so the identical flows of an averaging group's nodes share one.

It travels as a stream ``Record`` of kind ``"flow_snapshot"`` and is stored as a file
holding that record's wire frames (``stream.codec``): magic, the frame count, each frame
with its length, and a SHA-256 trailer over everything before it. Reading checks the
magic, the lengths and the trailer, decodes the frames with the codec (its dtype, shape
and size checks), then checks the content hash; anything wrong raises ``SnapshotError``
(a ``FrameError``): a corrupted or partial snapshot is never loaded silently. Files of
the first format (one msgpack header, then the arrays back to back) still load.

A file may leave its parameters and preprocessing in another snapshot file
(``to_bytes(parameters_in=...)``; the archive does this for a flow it already holds). It
names that file and its ``parameters_hash``; reading it takes a ``shared`` loader for the
named file and checks that hash before the content hash of the whole.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from types import MappingProxyType
from typing import Any

import msgpack
import numpy as np

from models.flows import ConditionalFlow, FlowConfig, Preprocessing
from stream.batch import Record
from stream.codec import decode, encode
from stream.durable import write_durably
from stream.errors import FrameError
from stream.schema import SCHEMA_VERSION
from stream.version import version

SNAPSHOT_KIND = "flow_snapshot"
_MAGIC = b"TFSNAP2\n"  # the record's wire frames
_MAGIC_V1 = b"TFSNAP1\n"  # one header and the arrays back to back (read only)
_PARAM = "param/"
_PRE = "pre/"
_DENSITY = (_PARAM, _PRE)  # the arrays that define the density (``parameters_hash``)


def code_version() -> str:
    """``trigfarm-<version>``, recorded in every snapshot (``stream.version``: from git when
    installed). A loaded snapshot keeps the version that wrote it."""
    return f"trigfarm-{version()}"


class SnapshotError(FrameError):
    """A snapshot that is corrupted, partial or inconsistent."""


@dataclass(frozen=True, slots=True)
class FlowSnapshot:
    """One flow's state at one moment, with provenance.

    ``role`` is ``"all"`` (trained on every event), ``"sideband"`` (never saw a
    signal-region event) or ``"signal_region_<k>"`` (saw only those of fold k, see
    ``models.online.fold``). ``training`` (JSON) says
    how it was trained: minibatch, replay factor, learning rate, averaging nodes.
    ``arrays`` holds ``param/<name>`` (float32), ``pre/<name>`` (float64) and
    ``mjj_hist``/``mjj_edges`` (the mjj spectrum of the events seen).
    """

    node_id: str
    role: str
    run: int
    lumi_first: int
    lumi_last: int
    events_seen: int
    mjj_min_gev: float
    mjj_max_gev: float
    loss: float
    sequence: int
    flow_config: str
    signal_region_gev: tuple[float, float]
    arrays: Mapping[str, np.ndarray] = field(default_factory=dict)
    training: str = ""
    code_version: str = field(default_factory=code_version)
    content_hash: str = ""

    def __post_init__(self) -> None:
        frozen = {}
        for name, array in self.arrays.items():
            copy = np.array(array, copy=True)
            copy.setflags(write=False)
            frozen[name] = copy
        object.__setattr__(self, "arrays", MappingProxyType(frozen))
        object.__setattr__(self, "signal_region_gev", tuple(map(float, self.signal_region_gev)))
        expected = self.compute_hash()
        if not self.content_hash:
            object.__setattr__(self, "content_hash", expected)
        elif self.content_hash != expected:
            msg = f"content hash {self.content_hash[:12]} != computed {expected[:12]}"
            raise SnapshotError("checksum", msg)

    # -- construction --------------------------------------------------------------------

    @staticmethod
    def of(
        flow: ConditionalFlow, *, mjj_hist: np.ndarray, mjj_edges: np.ndarray, **meta: Any
    ) -> FlowSnapshot:
        """A snapshot of ``flow`` now; ``meta`` fills the provenance fields."""
        arrays = {f"{_PARAM}{k}": v for k, v in flow.parameter_arrays().items()}
        arrays |= {f"{_PRE}{k}": v.astype("<f8") for k, v in flow.preprocessing.arrays().items()}
        arrays["mjj_hist"] = np.asarray(mjj_hist, dtype="<f8")
        arrays["mjj_edges"] = np.asarray(mjj_edges, dtype="<f8")
        return FlowSnapshot(flow_config=flow.config.to_json(), arrays=arrays, **meta)

    def meta(self) -> dict[str, Any]:
        """Scalar provenance, as stored in the record header and the archive index."""
        out = {
            "node_id": self.node_id,
            "role": self.role,
            "run": self.run,
            "lumi_first": self.lumi_first,
            "lumi_last": self.lumi_last,
            "events_seen": self.events_seen,
            "mjj_min_gev": self.mjj_min_gev,
            "mjj_max_gev": self.mjj_max_gev,
            "loss": self.loss,
            "sequence": self.sequence,
            "flow_config": self.flow_config,
            "signal_region_gev": list(self.signal_region_gev),
            "code_version": self.code_version,
            "content_hash": self.content_hash,
        }
        if self.training:  # absent from snapshots written before it existed (same hash)
            out["training"] = self.training
        return out

    def compute_hash(self) -> str:
        """SHA-256 over the canonical metadata (hash excluded) and every array."""
        meta = {k: v for k, v in self.meta().items() if k != "content_hash"}
        return _digest(json.dumps(meta, sort_keys=True), self.arrays)

    @property
    def parameters_hash(self) -> str:
        """SHA-256 over the flow config, parameters and preprocessing, not the provenance:
        two nodes that averaged to the same flow publish snapshots with equal ones."""
        density = {k: v for k, v in self.arrays.items() if k.startswith(_DENSITY)}
        return _digest(self.flow_config, density)

    def flow(self) -> ConditionalFlow:
        """The flow rebuilt from the snapshot (parameters bit for bit)."""
        pre = Preprocessing.from_arrays(
            {k[len(_PRE) :]: v for k, v in self.arrays.items() if k.startswith(_PRE)}
        )
        flow = ConditionalFlow(FlowConfig.from_json(self.flow_config), pre)
        flow.load_parameter_arrays(
            {k[len(_PARAM) :]: v for k, v in self.arrays.items() if k.startswith(_PARAM)}
        )
        flow.eval()
        return flow

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())

    # -- stream records ------------------------------------------------------------------

    def to_record(self) -> Record:
        return Record(SNAPSHOT_KIND, self.meta(), dict(self.arrays))

    @staticmethod
    def from_record(record: Record) -> FlowSnapshot:
        """The snapshot in a record; ``SnapshotError`` if it is not one or fails its hash."""
        if record.kind != SNAPSHOT_KIND:
            raise SnapshotError("kind", f"record kind {record.kind!r} is not {SNAPSHOT_KIND!r}")
        return _from_parts(dict(record.meta), dict(record.arrays))

    # -- files ---------------------------------------------------------------------------

    def to_bytes(self, *, parameters_in: str | None = None) -> bytes:
        """The file format: magic, frame count, the record's frames (each with its length),
        SHA-256 of everything before. With ``parameters_in`` the parameters and
        preprocessing are left out and the file names where they are instead."""
        record = self.to_record()
        if parameters_in is not None:
            meta = dict(record.meta)
            meta |= {"parameters_in": parameters_in, "parameters_hash": self.parameters_hash}
            arrays = {k: v for k, v in record.arrays.items() if not k.startswith(_DENSITY)}
            record = Record(SNAPSHOT_KIND, meta, arrays)
        frames = [memoryview(f).cast("B") for f in encode(record)]
        parts: list[bytes | memoryview] = [_MAGIC, struct.pack("<I", len(frames))]
        for frame in frames:
            parts += [struct.pack("<Q", frame.nbytes), frame]
        body = b"".join(parts)
        return body + hashlib.sha256(body).digest()

    @staticmethod
    def from_bytes(
        data: bytes,
        *,
        source: str = "<bytes>",
        shared: Callable[[str], FlowSnapshot] | None = None,
    ) -> FlowSnapshot:
        """Parse ``to_bytes`` output (or the first format), checking magic, lengths,
        checksum, the codec's array checks and the content hash. ``shared`` loads the
        snapshot named by a file that keeps its parameters there."""
        magic = data[: len(_MAGIC)]
        if len(data) < len(_MAGIC) + 4 + 32 or magic not in (_MAGIC, _MAGIC_V1):
            raise SnapshotError("truncated", f"{source}: not a snapshot file or truncated")
        body, trailer = memoryview(data)[:-32], data[-32:]
        if hashlib.sha256(body).digest() != trailer:
            raise SnapshotError("checksum", f"{source}: checksum mismatch (corrupted or partial)")
        try:
            frames = _frames(body) if magic == _MAGIC else _frames_v1(body)
            record = decode(frames)
        except SnapshotError as exc:
            raise SnapshotError(exc.reason, f"{source}: {exc.detail}") from None
        except FrameError as exc:
            raise SnapshotError(exc.reason, f"{source}: {exc.detail}") from exc
        if not isinstance(record, Record):
            raise SnapshotError("kind", f"{source}: holds an event batch, not a snapshot")
        if "parameters_in" in record.meta:
            record = _with_shared_parameters(record, source, shared)
        return FlowSnapshot.from_record(record)

    def write(self, path: str | Path) -> int:
        """Write durably (temporary file, fsync, rename, fsync of the folder); returns bytes."""
        data = self.to_bytes()
        write_durably(Path(path), data)
        return len(data)

    @staticmethod
    def read(
        path: str | Path, *, shared: Callable[[str], FlowSnapshot] | None = None
    ) -> FlowSnapshot:
        """Read and verify a snapshot file (``shared``: as ``from_bytes``)."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise SnapshotError("unreadable", f"{path}: {exc}") from exc
        return FlowSnapshot.from_bytes(data, source=str(path), shared=shared)


def _digest(header: str, arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over a header string and the named arrays (name, dtype, shape, bytes)."""
    digest = hashlib.sha256(header.encode())
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}|{array.dtype.str}|{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _with_shared_parameters(
    record: Record, source: str, shared: Callable[[str], FlowSnapshot] | None
) -> Record:
    """The record with the parameters and preprocessing of the snapshot it names put back,
    after checking that snapshot's ``parameters_hash`` against the one it recorded."""
    meta = dict(record.meta)
    holder_name, expected = str(meta.pop("parameters_in")), meta.pop("parameters_hash", None)
    if shared is None:
        detail = f"{source}: its parameters are in {holder_name}; read it through its archive"
        raise SnapshotError("reference", detail)
    holder = shared(holder_name)
    if holder.parameters_hash != expected:
        detail = f"{source}: {holder_name} does not hold its parameters (hash differs)"
        raise SnapshotError("checksum", detail)
    density = {k: v for k, v in holder.arrays.items() if k.startswith(_DENSITY)}
    return Record(SNAPSHOT_KIND, meta, {**record.arrays, **density})


def _frames(body: memoryview) -> list[memoryview]:
    """Split a file body into the frames it holds (each preceded by its length)."""
    offset = len(_MAGIC) + 4
    (count,) = struct.unpack_from("<I", body, len(_MAGIC))
    frames = []
    for _ in range(count):
        if offset + 8 > len(body):
            raise SnapshotError("truncated", "frame lengths run past the end")
        (size,) = struct.unpack_from("<Q", body, offset)
        offset += 8
        if offset + size > len(body):
            raise SnapshotError("truncated", "a frame runs past the end")
        frames.append(body[offset : offset + size])
        offset += size
    if offset != len(body):
        raise SnapshotError("decode_error", f"{len(body) - offset} trailing bytes")
    return frames


def _frames_v1(body: memoryview) -> list[Any]:
    """The first format's header and arrays as the frames of the record they stand for."""
    (n_header,) = struct.unpack_from("<Q", body, len(_MAGIC_V1))
    start = len(_MAGIC_V1) + 8
    try:
        header = msgpack.unpackb(body[start : start + n_header], raw=False)
        specs, meta = header["arrays"], header["meta"]
        sizes = [np.dtype(dtype).itemsize * prod(shape) for _, dtype, shape in specs]
    except (ValueError, TypeError, KeyError, msgpack.UnpackException) as exc:
        raise SnapshotError("decode_error", f"bad header ({exc})") from exc
    offsets = np.cumsum([start + n_header, *sizes])
    if offsets[-1] != len(body):
        raise SnapshotError("truncated", "arrays do not fill the file")
    record = {"v": SCHEMA_VERSION, "kind": "record", "type": SNAPSHOT_KIND}
    frames: list[Any] = [msgpack.packb({**record, "arrays": specs, "meta": meta})]
    return frames + [body[a:b] for a, b in itertools.pairwise(offsets)]


def _from_parts(meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> FlowSnapshot:
    try:
        return FlowSnapshot(
            node_id=str(meta["node_id"]),
            role=str(meta["role"]),
            run=int(meta["run"]),
            lumi_first=int(meta["lumi_first"]),
            lumi_last=int(meta["lumi_last"]),
            events_seen=int(meta["events_seen"]),
            mjj_min_gev=float(meta["mjj_min_gev"]),
            mjj_max_gev=float(meta["mjj_max_gev"]),
            loss=float(meta["loss"]),
            sequence=int(meta["sequence"]),
            flow_config=str(meta["flow_config"]),
            signal_region_gev=tuple(meta["signal_region_gev"]),
            arrays=dict(arrays),
            training=str(meta.get("training", "")),
            code_version=str(meta["code_version"]),
            content_hash=str(meta["content_hash"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, SnapshotError):
            raise
        raise SnapshotError("decode_error", f"snapshot metadata incomplete ({exc})") from exc
