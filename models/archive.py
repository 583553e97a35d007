"""Reading an archive folder: the index, its queries and verified loading (``Archive``).

An archive is what the archive node (``nodes.archive``) writes under its ``out_dir``:

    index.sqlite                         one row per stored file (``ArchiveEntry``)
    snapshots/<node>/<role>/<seq>_<hash12>.snap   flow snapshots (``models.snapshot``)
    events/run<run>_<seq>.h5             accepted events, chunked HDF5 (``stream.eventfile``)

This module holds the format (the index schema, the checksums) and the reader; the node
imports the format from here, and the offline analysis reads archives through ``Archive``
without loading the node runtime. Every file a reader loads is checked against the SHA-256
in the index: a corrupted, partial or missing file raises ``ArchiveError`` or is listed by
``Archive.verify()``, never loaded silently. A snapshot stored without its parameters
(the archive already held the same flow) is loaded with those of the file it names.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.snapshot import SNAPSHOT_KIND, FlowSnapshot, SnapshotError
from stream.batch import EventBatch
from stream.errors import DataFileError
from stream.eventfile import read_cache

__all__ = [
    "EVENTS_KIND",
    "SNAPSHOT_KIND",
    "Archive",
    "ArchiveEntry",
    "ArchiveError",
    "connect_index",
    "file_sha256",
]

EVENTS_KIND = "events"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    path TEXT NOT NULL UNIQUE,
    node TEXT NOT NULL,
    role TEXT NOT NULL,
    run INTEGER NOT NULL,
    lumi_first INTEGER NOT NULL,
    lumi_last INTEGER NOT NULL,
    sequence INTEGER NOT NULL,
    events INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    created_s REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS by_query ON files (kind, run, node, lumi_first, lumi_last);
CREATE TABLE IF NOT EXISTS thresholds (
    id INTEGER PRIMARY KEY,
    node TEXT NOT NULL,
    path TEXT NOT NULL,
    lumi INTEGER NOT NULL,
    threshold REAL NOT NULL,
    meta TEXT NOT NULL,
    created_s REAL NOT NULL
);
"""


class ArchiveError(ValueError):
    """A stored file that is missing, partial or fails its checksum."""


@dataclass(frozen=True, slots=True)
class ArchiveEntry:
    """One indexed file."""

    kind: str
    path: Path
    node: str
    role: str
    run: int
    lumi_first: int
    lumi_last: int
    sequence: int
    events: int
    bytes: int
    sha256: str


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's content, as recorded in the index."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def connect_index(out_dir: Path) -> sqlite3.Connection:
    """Open (creating if needed) the writable index of the archive in ``out_dir``."""
    db = sqlite3.connect(out_dir / "index.sqlite", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.executescript(_SCHEMA)
    return db


class Archive:
    """Read access to an archive folder: index queries and verified loading.

    Example (``analysis`` does this): the latest all-data snapshot of each node,
    ``Archive(path).snapshots(role="all", latest_per_node=True)``.
    """

    def __init__(self, out_dir: str | Path) -> None:
        self.root = Path(out_dir)
        index = self.root / "index.sqlite"
        if not index.exists():
            msg = f"{self.root} is not an archive (no index.sqlite)"
            raise ArchiveError(msg)
        self._index_path = index

    def entries(
        self,
        *,
        kind: str | None = None,
        run: int | None = None,
        lumi: int | None = None,
        node: str | None = None,
        role: str | None = None,
    ) -> list[ArchiveEntry]:
        """Indexed files matching every given filter (``lumi`` inside the file's range),
        ordered by node, role and the order they were stored (a restarted node numbers
        its snapshots from 1 again: storage order, not sequence, says which is latest)."""
        clauses, values = [], []
        for column, value in (("kind", kind), ("run", run), ("node", node), ("role", role)):
            if value is not None:
                clauses.append(f"{column} = ?")
                values.append(value)
        if lumi is not None:
            clauses.append("lumi_first <= ? AND lumi_last >= ?")
            values += [lumi, lumi]
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        query = (
            "SELECT kind, path, node, role, run, lumi_first, lumi_last, sequence, events, bytes,"
            f" sha256 FROM files {where} ORDER BY node, role, id"
        )
        db = sqlite3.connect(f"file:{self._index_path}?mode=ro", uri=True)
        try:
            rows = db.execute(query, values).fetchall()
        finally:
            db.close()
        return [ArchiveEntry(r[0], self.root / r[1], *r[2:]) for r in rows]

    def load_snapshot(self, entry: ArchiveEntry) -> FlowSnapshot:
        """Read one snapshot, checking the index checksum and the file's own checks."""
        data = self._verified_bytes(entry.path, entry.sha256)
        try:
            return FlowSnapshot.from_bytes(data, source=str(entry.path), shared=self._holder)
        except SnapshotError as exc:
            raise ArchiveError(str(exc)) from exc

    def _holder(self, name: str) -> FlowSnapshot:
        """The indexed snapshot file ``name`` (relative to the root) that another snapshot
        keeps its parameters in, checked as ``load_snapshot`` checks."""
        db = sqlite3.connect(f"file:{self._index_path}?mode=ro", uri=True)
        try:
            row = db.execute(
                "SELECT sha256 FROM files WHERE kind = ? AND path = ?", (SNAPSHOT_KIND, name)
            ).fetchone()
        finally:
            db.close()
        path = self.root / name
        if row is None:
            msg = f"{path}: holds another snapshot's parameters but is not in the index"
            raise ArchiveError(msg)
        return FlowSnapshot.from_bytes(self._verified_bytes(path, row[0]), source=str(path))

    @staticmethod
    def _verified_bytes(path: Path, sha256: str) -> bytes:
        """The file's content, once it matches the SHA-256 the index recorded."""
        try:
            data = path.read_bytes()
        except OSError as exc:
            msg = f"{path}: cannot read ({exc})"
            raise ArchiveError(msg) from exc
        if hashlib.sha256(data).hexdigest() != sha256:
            msg = f"{path}: checksum differs from the index (corrupted or partial)"
            raise ArchiveError(msg)
        return data

    def snapshots(
        self,
        *,
        role: str | None = None,
        run: int | None = None,
        node: str | None = None,
        latest_per_node: bool = True,
    ) -> list[FlowSnapshot]:
        """Verified snapshots; with ``latest_per_node`` only the last of each (node, role)."""
        entries = self.entries(kind=SNAPSHOT_KIND, role=role, run=run, node=node)
        if latest_per_node:  # entries come in storage order: the last of each wins
            entries = list({(e.node, e.role): e for e in entries}.values())
        return [self.load_snapshot(e) for e in entries]

    def events(
        self, *, run: int | None = None, columns: Sequence[str] | None = None
    ) -> Iterator[EventBatch]:
        """Stored events, file by file, after checking each file's checksum."""
        for entry in self.entries(kind=EVENTS_KIND, run=run):
            self._check_file(entry)
            try:
                yield from read_cache(entry.path, columns=columns)
            except DataFileError as exc:
                raise ArchiveError(str(exc)) from exc

    def event_features(self, *, run: int | None = None) -> np.ndarray:
        """The ``features`` column of every stored event (N, 8)."""
        parts = [b["features"] for b in self.events(run=run, columns=("features",))]
        return np.concatenate(parts) if parts else np.zeros((0, 8), np.float32)

    def thresholds(self, *, path: str | None = None) -> list[dict[str, Any]]:
        """Every threshold change a rate controller made, in the order stored: the
        trigger ``path``, the ``lumi`` block measured and the ``threshold`` in force
        after it, with the controller's figures (rate, target, ...)."""
        query = "SELECT meta FROM thresholds" + (" WHERE path = ?" if path else "")
        db = sqlite3.connect(f"file:{self._index_path}?mode=ro", uri=True)
        try:
            rows = db.execute(query + " ORDER BY id", (path,) if path else ()).fetchall()
        except sqlite3.OperationalError:  # an archive written before thresholds were kept
            rows = []
        finally:
            db.close()
        return [json.loads(row[0]) for row in rows]

    def verify(self) -> list[str]:
        """Every problem found: missing or corrupted files, and leftover temporary files."""
        problems = []
        for entry in self.entries():
            try:
                self._check_file(entry)
            except ArchiveError as exc:
                problems.append(str(exc))
        for tmp in sorted(self.root.rglob(".*.tmp")):
            problems.append(f"{tmp}: partial write left behind (temporary file)")
        return problems

    def storage(self) -> dict[str, Any]:
        """Bytes and events by kind; bytes per event seen for the latest flows."""
        out: dict[str, Any] = {}
        for kind in (SNAPSHOT_KIND, EVENTS_KIND):
            entries = self.entries(kind=kind)
            out[kind] = {"files": len(entries), "bytes": sum(e.bytes for e in entries)}
        snaps = self.entries(kind=SNAPSHOT_KIND)
        latest: dict[tuple[str, str], ArchiveEntry] = {}
        for e in snaps:
            if (e.node, e.role) not in latest or e.sequence > latest[(e.node, e.role)].sequence:
                latest[(e.node, e.role)] = e
        seen = sum(e.events for e in latest.values() if e.role == "all")
        stored = sum(e.events for e in self.entries(kind=EVENTS_KIND))
        out["events_seen_by_flows"] = seen
        out["events_stored"] = stored
        out["flow_bytes_per_event_seen_all_snapshots"] = (
            out[SNAPSHOT_KIND]["bytes"] / seen if seen else None
        )
        out["flow_bytes_per_event_seen_latest"] = (
            sum(e.bytes for e in latest.values()) / seen if seen else None
        )
        out["event_bytes_per_event_stored"] = out[EVENTS_KIND]["bytes"] / stored if stored else None
        return out

    def _check_file(self, entry: ArchiveEntry) -> None:
        if not entry.path.exists():
            msg = f"{entry.path}: indexed but missing"
            raise ArchiveError(msg)
        if file_sha256(entry.path) != entry.sha256:
            msg = f"{entry.path}: checksum differs from the index (corrupted or partial)"
            raise ArchiveError(msg)
