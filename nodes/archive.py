"""The archive node: flow snapshots and accepted events, stored durably and indexed.

Layout under ``out_dir`` (the format, and the reader ``Archive``, live in
``models.archive``):

    index.sqlite                         one row per stored file
    snapshots/<node>/<role>/<seq>_<hash12>.snap   flow snapshots (``models.snapshot``)
    events/run<run>_<seq>.h5             accepted events, chunked HDF5 (``stream.eventfile``)

A snapshot is written to a temporary file, fsynced and renamed, then indexed with its
SHA-256; an events file is renamed into place when it is closed (every
``events_per_file`` events and at the end), fsynced and indexed with its SHA-256. Readers
(``models.archive.Archive``) verify the checksum of every file they load.

Restart: ``trigfarm node archive`` (or the launcher, which restarts a lost archive) on
the same folder continues the events file sequence after the files already there, and
keeps a killed archive's open file as a partial file holding every chunk it flushed
(``events_recovered``); a snapshot it was writing, never indexed, is removed
(``snapshot_writes_removed``). Upstream nodes hold what they cannot deliver meanwhile (their
bounded queues and sockets; back-pressure pauses the stream) and deliver it on return.

A snapshot whose flow the archive already holds (the same ``parameters_hash``: the nodes of
an averaging group publish one flow) is stored without its parameters, naming the file
that has them (``models.snapshot``); a restarted archive shares only among the snapshots
it stored itself.

A snapshot record that fails its own content hash is counted
(``archive_records_total{kind,outcome="bad"}``) and not stored; the node carries on.
``report()`` gives bytes stored per event seen, for flows and for events.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import h5py
import pydantic
from prometheus_client import Counter, Gauge
from pydantic import ConfigDict, Field

from models.archive import EVENTS_KIND, connect_index, file_sha256
from models.snapshot import SNAPSHOT_KIND, FlowSnapshot, SnapshotError
from nodes.rate_control import THRESHOLD_RECORD_KIND
from stream.batch import EventBatch, Message, Record
from stream.durable import write_durably
from stream.errors import DataFileError
from stream.eventfile import CacheWriter, recover_partial
from stream.node import Emit, Outcome, Processor

log = logging.getLogger(__name__)

RECORDS = Counter("archive_records", "Records received by the archive", ["node", "kind", "outcome"])
BYTES = Gauge("archive_bytes_stored", "Bytes stored by the archive", ["node", "kind"])


@pydantic.dataclasses.dataclass(frozen=True, slots=True, config=ConfigDict(extra="forbid"))
class ArchiveConfig:
    """Where and how the archive stores.

    Attributes:
        out_dir: the archive folder (created if needed).
        store_events: keep accepted event batches (the conventional path).
        events_per_file: roll to a new events file after this many events.
        chunk_events: HDF5 chunk length along the event axis.
    """

    out_dir: Annotated[str, Field(min_length=1)]
    store_events: bool = True
    events_per_file: Annotated[int, Field(ge=1)] = 200_000
    chunk_events: Annotated[int, Field(ge=1)] = 1024


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
        connect_index(self.root).close()  # fail early on a bad folder; reopened where used
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
        self.events_recovered = 0
        self.snapshot_writes_removed = 0
        self.thresholds_stored = 0
        self.records_duplicate = 0
        self._events_seen: dict[tuple[str, str], int] = {}
        self._flow_files: dict[str, str] = {}  # parameters_hash -> file holding them
        self._recover_leftovers()

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
            "events_recovered": self.events_recovered,
            "snapshot_writes_removed": self.snapshot_writes_removed,
            "thresholds_stored": self.thresholds_stored,
            "records_duplicate": self.records_duplicate,
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
        if record.kind == THRESHOLD_RECORD_KIND:
            self._store_threshold(record)
            return
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
        if self._indexed("SELECT 1 FROM files WHERE path = ?", str(path.relative_to(self.root))):
            self._count_duplicate(record)
            return
        parameters_hash = snap.parameters_hash
        parameters_in = self._flow_files.get(parameters_hash)
        data = snap.to_bytes(parameters_in=parameters_in)
        write_durably(path, data)
        if parameters_in is None:
            self._flow_files[parameters_hash] = str(path.relative_to(self.root))
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

    def _store_threshold(self, record: Record) -> None:
        """Index a rate controller's threshold change (the threshold in force after
        ``lumi``), so an analysis knows what each path required, block by block."""
        meta = dict(record.meta)
        try:
            row = (str(meta["node"]), str(meta["path"]), int(meta["lumi"]))
            threshold = float(meta["new_threshold"])
            body = json.dumps(meta, allow_nan=False)
        except (KeyError, TypeError, ValueError) as exc:
            self.bad_records += 1
            RECORDS.labels(node=self.name, kind=record.kind, outcome="bad").inc()
            log.warning("archive %s: rejected a threshold record: %s", self.name, exc)
            return
        query = (
            "SELECT 1 FROM thresholds WHERE node = ? AND path = ? AND lumi = ? AND threshold = ?"
        )
        if self._indexed(query, *row, threshold):
            self._count_duplicate(record)
            return
        self._connection().execute(
            "INSERT INTO thresholds (node, path, lumi, threshold, meta, created_s)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (*row, threshold, body, time.time()),
        )
        self.thresholds_stored += 1
        RECORDS.labels(node=self.name, kind=record.kind, outcome="stored").inc()

    def _connection(self) -> sqlite3.Connection:
        """The index, connected on first use: the node runtime may build the worker in one
        thread and run it in another, and sqlite3 connections belong to their thread."""
        if self._db is None:
            self._db = connect_index(self.root)
        return self._db

    def _indexed(self, query: str, *values: object) -> bool:
        """Whether the index holds a row for ``query``: a record sent again because its
        receipt was lost (``stream.receipts``) is stored once."""
        return self._connection().execute(query, values).fetchone() is not None

    def _count_duplicate(self, record: Record) -> None:
        self.records_duplicate += 1
        RECORDS.labels(node=self.name, kind=record.kind, outcome="duplicate").inc()

    # -- events --------------------------------------------------------------------------

    def _recover_leftovers(self) -> None:
        """A killed archive leaves its open events file under a temporary name: keep the
        whole chunks it flushed as a partial file, indexed, so a restart loses no batch
        it had written (one it could not read is set aside as ``*.unreadable``). A snapshot
        it was writing was never indexed (the launcher counts it lost in flight): remove
        it, so that the archive verifies."""
        for tmp in sorted((self.root / "snapshots").rglob(".*.snap.*.tmp")):
            tmp.unlink()
            self.snapshot_writes_removed += 1
            log.warning(
                "archive %s: removed %s, a snapshot a killed archive was writing", self.name, tmp
            )
        for tmp in sorted((self.root / "events").glob(".run*_*.h5.*.tmp")):
            final = tmp.with_name(tmp.name[1:].split(".h5.")[0] + ".h5")
            try:
                info = recover_partial(tmp, final)
            except DataFileError as exc:
                log.error("archive %s: %s; set aside", self.name, exc)
                tmp.replace(tmp.with_suffix(".unreadable"))
                continue
            if info is None:
                log.info("archive %s: %s held no whole chunk; removed", self.name, tmp.name)
                continue
            with h5py.File(info.path, "r") as handle:
                lumi = handle["events/lumi"][:] if "lumi" in handle["events"] else None
            self._index_events(
                info.path,
                run=int(final.stem.split("_")[0].removeprefix("run")),
                lumi=(int(lumi.min()), int(lumi.max()))
                if lumi is not None and len(lumi)
                else (0, 0),
                sequence=int(final.stem.rsplit("_", 1)[-1]),
                n_events=info.n_events,
            )
            self.events_recovered += info.n_events
            log.warning(
                "archive %s: recovered %d events from %s (a killed archive's open file)",
                self.name,
                info.n_events,
                tmp.name,
            )
        if self._db is not None:  # connections belong to a thread: reopen where used
            self._db.close()
            self._db = None

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
        meta = self._writer_meta
        lumi_first = meta["lumi_first"] if meta["lumi_last"] else 0
        size = self._index_events(
            info.path,
            run=meta["run"],
            lumi=(lumi_first, meta["lumi_last"]),
            sequence=self._file_seq,
            n_events=info.n_events,
        )
        self.bytes[EVENTS_KIND] += size
        BYTES.labels(node=self.name, kind=EVENTS_KIND).set(self.bytes[EVENTS_KIND])

    def _index_events(
        self, path: Path, *, run: int, lumi: tuple[int, int], sequence: int, n_events: int
    ) -> int:
        """Index one finished events file with its size and SHA-256; returns its size."""
        size = path.stat().st_size
        self._index(
            EVENTS_KIND,
            path,
            node=self.name,
            role=EVENTS_KIND,
            run=run,
            lumi=lumi,
            sequence=sequence,
            events=n_events,
            size=size,
            sha256=file_sha256(path),
        )
        return size

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
        self._connection().execute(
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


def build(config: ArchiveConfig, *, name: str) -> ArchiveNode:
    """The archive worker for ``config`` (opens the index, creates the folder)."""
    return ArchiveNode(config, name=name)
