"""The archive node: flow snapshots and accepted events, stored durably and indexed.

Layout under ``out_dir``:

    index.sqlite                         one row per stored file (see ``Archive``)
    snapshots/<node>/<role>/<seq>_<hash12>.snap   flow snapshots (``models.snapshot``)
    events/run<run>_<seq>.h5             accepted events, chunked HDF5 (``simulator.cache``)

A snapshot is written to a temporary file, fsynced and renamed, then indexed with its
SHA-256; an events file is renamed into place when it is closed (every
``events_per_file`` events and at the end), fsynced and indexed with its SHA-256. Readers
(``Archive``) verify the checksum of every file they load: a corrupted, partial or missing
file raises ``ArchiveError`` or is listed by ``Archive.verify()``, never loaded silently.

A snapshot record that fails its own content hash is counted
(``archive_records_total{kind,outcome="bad"}``) and not stored; the node carries on.
``report()`` gives bytes stored per event seen, for flows and for events.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import Counter, Gauge

from models.snapshot import SNAPSHOT_KIND, FlowSnapshot, SnapshotError, write_durably
from simulator.cache import CacheWriter, read_cache
from simulator.errors import DataFileError
from stream.batch import EventBatch, Message, Record
from stream.node import Emit, Outcome, Processor

log = logging.getLogger(__name__)

EVENTS_KIND = "events"
RECORDS = Counter("archive_records", "Records received by the archive", ["node", "kind", "outcome"])
BYTES = Gauge("archive_bytes_stored", "Bytes stored by the archive", ["node", "kind"])

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
"""


class ArchiveError(ValueError):
    """A stored file that is missing, partial or fails its checksum."""


@dataclass(frozen=True, slots=True)
class ArchiveConfig:
    """Where and how the archive stores.

    Attributes:
        out_dir: the archive folder (created if needed).
        store_events: keep accepted event batches (the conventional path).
        events_per_file: roll to a new events file after this many events.
        chunk_events: HDF5 chunk length along the event axis.
    """

    out_dir: str
    store_events: bool = True
    events_per_file: int = 200_000
    chunk_events: int = 1024

    def __post_init__(self) -> None:
        if not self.out_dir:
            raise ValueError("out_dir must be set")
        if self.events_per_file < 1 or self.chunk_events < 1:
            msg = "events_per_file and chunk_events must be >= 1"
            raise ValueError(msg)


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
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _connect(out_dir: Path) -> sqlite3.Connection:
    db = sqlite3.connect(out_dir / "index.sqlite", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.executescript(_SCHEMA)
    return db


def _last_event_file_sequence(folder: Path) -> int:
    """The highest sequence number among ``run<run>_<seq>.h5`` files in ``folder``, their
    temporary ``.run<run>_<seq>.h5.<pid>.tmp`` included (0: none)."""
    numbers = [
        int(tail)
        for path in folder.glob("*run*_*.h5*")
        if (tail := path.name.lstrip(".").split(".")[0].rsplit("_", 1)[-1]).isdigit()
    ]
    return max(numbers, default=0)


class ArchiveNode(Processor):
    """Stores what arrives; see the module doc."""

    def __init__(self, config: ArchiveConfig, *, name: str) -> None:
        self.config = config
        self.name = name
        self.root = Path(config.out_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        _connect(self.root).close()  # fail early on a bad folder; reopened where used
        self._db: sqlite3.Connection | None = None
        self._writer: CacheWriter | None = None
        self._writer_meta: dict[str, int] = {}
        # A restarted archive on the same folder continues after the files already there
        # (complete or not), so it never collides with them.
        self._file_seq = _last_event_file_sequence(self.root / "events")
        self.bytes = {SNAPSHOT_KIND: 0, EVENTS_KIND: 0}
        self.events_stored = 0
        self.snapshots_stored = 0
        self.bad_records = 0
        self._events_seen: dict[tuple[str, str], int] = {}

    # -- Processor -----------------------------------------------------------------------

    def process(self, message: Message) -> Outcome:
        if isinstance(message, Record):
            self._store_record(message)
            return Outcome()
        n = len(message)
        if not self.config.store_events:
            return Outcome(rejected=n)
        self._append(message)
        return Outcome(accepted=n)

    def finish(self) -> Sequence[Emit]:
        self._close_events()
        log.info("archive %s: %s", self.name, self.report())
        if self._db is not None:
            self._db.close()
            self._db = None
        return ()

    def report(self) -> dict[str, Any]:
        seen = sum(v for (_, role), v in self._events_seen.items() if role == "all")
        return {
            "snapshots_stored": self.snapshots_stored,
            "events_stored": self.events_stored,
            "bad_records": self.bad_records,
            "flow_bytes": self.bytes[SNAPSHOT_KIND],
            "event_bytes": self.bytes[EVENTS_KIND],
            "events_seen_by_flows": seen,
            "flow_bytes_per_event_seen": self.bytes[SNAPSHOT_KIND] / seen if seen else None,
            "event_bytes_per_event_stored": (
                self.bytes[EVENTS_KIND] / self.events_stored if self.events_stored else None
            ),
        }

    # -- snapshots -----------------------------------------------------------------------

    def _store_record(self, record: Record) -> None:
        if record.kind != SNAPSHOT_KIND:
            RECORDS.labels(node=self.name, kind=record.kind, outcome="ignored").inc()
            return
        try:
            snap = FlowSnapshot.from_record(record)
        except SnapshotError as exc:
            self.bad_records += 1
            RECORDS.labels(node=self.name, kind=record.kind, outcome="bad").inc()
            log.warning("archive %s: rejected a snapshot record: %s", self.name, exc)
            return
        folder = self.root / "snapshots" / _safe(snap.node_id) / _safe(snap.role)
        path = folder / f"{snap.sequence:06d}_{snap.content_hash[:12]}.snap"
        data = snap.to_bytes()
        write_durably(path, data)
        self._index(
            SNAPSHOT_KIND,
            path,
            node=snap.node_id,
            role=snap.role,
            run=snap.run,
            lumi=(snap.lumi_first, snap.lumi_last),
            sequence=snap.sequence,
            events=snap.events_seen,
            size=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
        )
        self.snapshots_stored += 1
        self.bytes[SNAPSHOT_KIND] += len(data)
        self._events_seen[(snap.node_id, snap.role)] = snap.events_seen
        RECORDS.labels(node=self.name, kind=record.kind, outcome="stored").inc()
        BYTES.labels(node=self.name, kind=SNAPSHOT_KIND).set(self.bytes[SNAPSHOT_KIND])

    # -- events --------------------------------------------------------------------------

    def _append(self, batch: EventBatch) -> None:
        if self._writer is None:
            run = int(batch["run"][0]) if "run" in batch else 0
            self._file_seq += 1
            path = self.root / "events" / f"run{run:06d}_{self._file_seq:04d}.h5"
            self._writer = CacheWriter(
                path, {"archive": self.name}, chunk_events=self.config.chunk_events
            )
            self._writer_meta = {"run": run, "lumi_first": 2**31, "lumi_last": 0}
        if "lumi" in batch and len(batch):
            meta = self._writer_meta
            meta["lumi_first"] = min(meta["lumi_first"], int(batch["lumi"].min()))
            meta["lumi_last"] = max(meta["lumi_last"], int(batch["lumi"].max()))
        self._writer.append(batch)
        self.events_stored += len(batch)
        if self._writer.n_events >= self.config.events_per_file:
            self._close_events()

    def _close_events(self) -> None:
        writer, self._writer = self._writer, None
        if writer is None:
            return
        info = writer.close()
        if info is None:
            return
        with open(info.path, "rb") as handle:
            os.fsync(handle.fileno())
        size = info.path.stat().st_size
        meta = self._writer_meta
        lumi_first = meta["lumi_first"] if meta["lumi_last"] else 0
        self._index(
            EVENTS_KIND,
            info.path,
            node=self.name,
            role=EVENTS_KIND,
            run=meta["run"],
            lumi=(lumi_first, meta["lumi_last"]),
            sequence=self._file_seq,
            events=info.n_events,
            size=size,
            sha256=file_sha256(info.path),
        )
        self.bytes[EVENTS_KIND] += size
        BYTES.labels(node=self.name, kind=EVENTS_KIND).set(self.bytes[EVENTS_KIND])

    def _index(
        self,
        kind: str,
        path: Path,
        *,
        node: str,
        role: str,
        run: int,
        lumi: tuple[int, int],
        sequence: int,
        events: int,
        size: int,
        sha256: str,
    ) -> None:
        # The node runtime may build the worker in one thread and run it in another, and
        # sqlite3 connections belong to their thread: connect on first use.
        if self._db is None:
            self._db = _connect(self.root)
        self._db.execute(
            "INSERT OR REPLACE INTO files (kind, path, node, role, run, lumi_first, lumi_last,"
            " sequence, events, bytes, sha256, created_s) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                kind,
                str(path.relative_to(self.root)),
                node,
                role,
                run,
                lumi[0],
                lumi[1],
                sequence,
                events,
                size,
                sha256,
                time.time(),
            ),
        )


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text) or "_"


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
        ordered by node, role and sequence."""
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
            f" sha256 FROM files {where} ORDER BY node, role, sequence"
        )
        db = sqlite3.connect(f"file:{self._index_path}?mode=ro", uri=True)
        try:
            rows = db.execute(query, values).fetchall()
        finally:
            db.close()
        return [ArchiveEntry(r[0], self.root / r[1], *r[2:]) for r in rows]

    def load_snapshot(self, entry: ArchiveEntry) -> FlowSnapshot:
        """Read one snapshot, checking the index checksum and the file's own checks."""
        try:
            data = entry.path.read_bytes()
        except OSError as exc:
            msg = f"{entry.path}: cannot read ({exc})"
            raise ArchiveError(msg) from exc
        if hashlib.sha256(data).hexdigest() != entry.sha256:
            msg = f"{entry.path}: checksum differs from the index (corrupted or partial)"
            raise ArchiveError(msg)
        try:
            return FlowSnapshot.from_bytes(data, source=str(entry.path))
        except SnapshotError as exc:
            raise ArchiveError(str(exc)) from exc

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
        if latest_per_node:
            latest: dict[tuple[str, str], ArchiveEntry] = {}
            for entry in entries:
                key = (entry.node, entry.role)
                if key not in latest or entry.sequence > latest[key].sequence:
                    latest[key] = entry
            entries = list(latest.values())
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


def build(config: ArchiveConfig, *, name: str) -> ArchiveNode:
    """The archive worker for ``config`` (opens the index, creates the folder)."""
    return ArchiveNode(config, name=name)
