"""The archive: durable snapshot files, indexed queries, HDF5 events, corruption detected,
and the node over real ZeroMQ with the Node runtime."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from models.archive import Archive, ArchiveError
from models.flows import ConditionalFlow, FlowConfig, Preprocessing
from models.snapshot import FlowSnapshot, SnapshotError
from nodes.archive import ArchiveConfig, build
from nodes.rate_control import ThresholdChange
from stream.batch import EventBatch, Record
from stream.node import Emit, Node, NodeConfig, Outcome, Producer
from stream.receipts import stamped
from stream.testing import stats_of, synthetic_batch
from stream.transport import free_tcp_port

REPO = Path(__file__).resolve().parents[2]

torch.set_num_threads(1)


def snapshot_record(node: str, role: str, sequence: int, lumi: tuple[int, int]) -> Record:
    torch.manual_seed(sequence)
    flow = ConditionalFlow(
        FlowConfig(n_transforms=1, hidden_features=8, n_bins=4),
        Preprocessing.from_bounds([0] * 4, [1] * 4),
    )
    return FlowSnapshot.of(
        flow,
        mjj_hist=np.ones(3),
        mjj_edges=np.arange(4.0),
        node_id=node,
        role=role,
        run=3,
        lumi_first=lumi[0],
        lumi_last=lumi[1],
        events_seen=1000 * sequence,
        mjj_min_gev=2000.0,
        mjj_max_gev=5000.0,
        loss=0.5,
        sequence=sequence,
        signal_region_gev=(3300, 3700),
    ).to_record()


def fill(out_dir: Path) -> None:
    node = build(ArchiveConfig(out_dir=str(out_dir), events_per_file=150), name="archive")
    for seq, lumi in ((1, (1, 1)), (2, (1, 2))):
        for hlt in ("hlt-0", "hlt-1"):
            for role in ("all", "sideband"):
                assert node.process(snapshot_record(hlt, role, seq, lumi)).accounted == 0
    for i in range(4):
        outcome = node.process(synthetic_batch(100, first_event=100 * i, run=3, lumi=1 + i // 2))
        assert outcome.accepted == 100
    node.finish()


def test_snapshots_and_events_are_stored_indexed_and_read_back(tmp_path: Path) -> None:
    fill(tmp_path)
    archive = Archive(tmp_path)
    assert archive.verify() == []
    latest = archive.snapshots(role="all")
    assert sorted((s.node_id, s.sequence) for s in latest) == [("hlt-0", 2), ("hlt-1", 2)]
    assert len(archive.snapshots(latest_per_node=False)) == 8
    assert len(archive.entries(kind="flow_snapshot", node="hlt-1", lumi=2)) == 2
    assert len(archive.entries(kind="flow_snapshot", lumi=1)) == 8
    assert archive.entries(kind="flow_snapshot", run=4) == []
    events = archive.entries(kind="events")
    assert [e.events for e in events] == [200, 200]  # rolled after >= 150 events
    assert events[1].lumi_first == 2
    assert len(archive.event_features()) == 400
    storage = archive.storage()
    assert storage["events_seen_by_flows"] == 4000
    assert storage["flow_bytes_per_event_seen_latest"] > 0
    assert storage["event_bytes_per_event_stored"] > 0
    roundtrip = archive.snapshots(role="all", node="hlt-0")[0]
    original = FlowSnapshot.from_record(snapshot_record("hlt-0", "all", 2, (1, 2)))
    assert roundtrip.content_hash == original.content_hash


def test_a_flow_the_archive_already_holds_is_stored_once(tmp_path: Path) -> None:
    """``fill`` publishes one flow per sequence from both nodes and both roles (as an
    averaging group does): its parameters are stored once, and every snapshot still loads
    bit for bit, with its own provenance."""
    fill(tmp_path)
    archive = Archive(tmp_path)
    entries = archive.entries(kind="flow_snapshot")
    for sequence in (1, 2):
        sizes = sorted(e.bytes for e in entries if e.sequence == sequence)
        assert len(sizes) == 4
        assert sizes[2] < sizes[3] / 2, sizes  # three name the one file holding the flow
    for entry in entries:
        loaded = archive.load_snapshot(entry)
        lumi = (1, entry.sequence)
        original = FlowSnapshot.from_record(
            snapshot_record(entry.node, entry.role, entry.sequence, lumi)
        )
        assert loaded.content_hash == original.content_hash
    thin = next(e for e in entries if e.bytes < max(x.bytes for x in entries) / 2)
    with pytest.raises(SnapshotError, match="read it through its archive"):
        FlowSnapshot.read(thin.path)
    holder = max(entries, key=lambda e: e.bytes)
    holder.path.write_bytes(holder.path.read_bytes()[:-1] + b"\0")
    with pytest.raises(ArchiveError, match="checksum"):
        archive.snapshots(latest_per_node=False)


def test_a_restarted_archive_continues_its_file_sequence(tmp_path: Path) -> None:
    fill(tmp_path)
    leftover = tmp_path / "events" / ".run000003_0003.h5.999.tmp"  # a crashed writer's
    leftover.write_bytes(b"partial")
    half_written = tmp_path / "snapshots" / "hlt-0" / "all" / ".000003_abcdef.snap.999.tmp"
    half_written.write_bytes(b"half a snapshot")
    assert Archive(tmp_path).verify() != []
    again = build(ArchiveConfig(out_dir=str(tmp_path), events_per_file=150), name="archive")
    assert not half_written.exists() and again.snapshot_writes_removed == 1
    assert again.process(synthetic_batch(100, first_event=400, run=3, lumi=3)).accepted == 100
    again.finish()
    archive = Archive(tmp_path)
    events = archive.entries(kind="events")
    assert [e.sequence for e in events] == [1, 2, 4]
    assert [e.events for e in events] == [200, 200, 100]
    assert len(archive.event_features()) == 500
    assert archive.verify() == []


@pytest.mark.slow
def test_a_restarted_archive_keeps_what_a_killed_one_had_flushed(tmp_path: Path) -> None:
    """kill -9 of an archive mid-file: the restarted one indexes the whole chunks the dead
    one flushed as a partial file, removes a leftover with none, sets an unreadable one
    aside, and goes on."""
    code = (
        "from nodes.archive import ArchiveConfig, build\n"
        "from stream.testing import synthetic_batch\n"
        f"a = build(ArchiveConfig(out_dir={str(tmp_path)!r}, chunk_events=64), name='archive')\n"
        "for i in range(10):\n"
        "    a.process(synthetic_batch(50, first_event=i * 50))\n"
        "from stream.eventfile import CacheWriter\n"
        f"w = CacheWriter({str(tmp_path / 'events' / 'run000001_0004.h5')!r})  # no chunk yet\n"
        "print('written', flush=True)\n"
        "import time; time.sleep(120)\n"
    )
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, cwd=REPO) as writer:
        assert writer.stdout is not None and writer.stdout.readline() == b"written\n"
        writer.kill()
    (tmp_path / "events" / ".run000001_0002.h5.999.tmp").write_bytes(b"not hdf5")
    again = build(ArchiveConfig(out_dir=str(tmp_path)), name="archive")
    assert again.events_recovered == 500  # every chunk was flushed: 10 x 50 events
    assert again.process(synthetic_batch(20, first_event=900)).accepted == 20
    again.finish()
    archive = Archive(tmp_path)
    assert archive.verify() == []
    assert [(e.sequence, e.events) for e in archive.entries(kind="events")] == [(1, 500), (5, 20)]
    assert not list((tmp_path / "events").glob("*.tmp"))  # the chunkless leftover is gone
    stored = np.concatenate([b["event"] for b in archive.events()])
    assert stored.tolist() == [*range(500), *range(900, 920)]
    assert (tmp_path / "events" / ".run000001_0002.h5.999.unreadable").is_file()


def test_the_latest_snapshot_of_a_restarted_node_is_the_last_stored(tmp_path: Path) -> None:
    """A restarted HLT node numbers its snapshots from 1 again: the latest is the one
    stored last, not the one with the highest sequence."""
    node = build(ArchiveConfig(out_dir=str(tmp_path)), name="archive")
    for seq in (1, 2, 3):  # the first process, then it dies
        node.process(snapshot_record("hlt-0", "all", seq, (1, 1)))
    node.process(snapshot_record("hlt-0", "all", 1, (2, 2)))  # the restarted one
    node.finish()
    (latest,) = Archive(tmp_path).snapshots(latest_per_node=True)
    assert (latest.sequence, latest.lumi_first) == (1, 2)


def test_a_record_sent_again_is_stored_once(tmp_path: Path) -> None:
    """A producer sends a record again when its receipt was lost (``stream.receipts``):
    a second copy of a snapshot or threshold change is counted, not stored twice, also by
    an archive restarted on the same folder."""
    snapshot = stamped(snapshot_record("hlt-0", "all", 1, (1, 1)), "hlt-0/a/1")
    change = ThresholdChange("l1", "ht", 2, 500.0, 501.0, 1e5, 1e3, 1e5, -2.0, 0.0)
    threshold = stamped(change.as_record(), "hlt-0/a/2")
    for restart in range(2):
        node = build(ArchiveConfig(out_dir=str(tmp_path)), name="archive")
        for _ in range(2 - restart):
            node.process(snapshot)
            node.process(threshold)
        node.finish()
        assert node.records_duplicate == 2
    archive = Archive(tmp_path)
    assert archive.verify() == []
    assert len(archive.entries(kind="flow_snapshot")) == 1
    assert len(archive.thresholds(path="ht")) == 1


def test_threshold_changes_are_indexed_for_the_analysis(tmp_path: Path) -> None:
    """A rate controller's threshold_change records are kept, in order, with the lumi
    block and the threshold in force after it; a malformed one is counted, not kept."""
    node = build(ArchiveConfig(out_dir=str(tmp_path)), name="archive")
    changes = [
        ThresholdChange("l1", "ht", lumi, 500.0 + lumi, 501.0 + lumi, 1e5, 1e3, 1e5, -2.0, 0.0)
        for lumi in (1, 2, 3)
    ]
    for change in changes:
        assert node.process(change.as_record()).accounted == 0
    node.process(Record("threshold_change", {"node": "l1", "path": "ht"}))  # no lumi
    node.finish()
    kept = Archive(tmp_path).thresholds(path="ht")
    assert [(t["lumi"], t["new_threshold"]) for t in kept] == [(1, 502.0), (2, 503.0), (3, 504.0)]
    assert node.thresholds_stored == 3 and node.bad_records == 1
    assert Archive(tmp_path).thresholds(path="single_jet") == []


def test_corrupted_and_partial_files_are_detected_not_loaded(tmp_path: Path) -> None:
    fill(tmp_path)
    archive = Archive(tmp_path)
    entry = archive.entries(kind="flow_snapshot", node="hlt-0", role="all")[-1]
    data = bytearray(entry.path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    entry.path.write_bytes(bytes(data))
    with pytest.raises(ArchiveError, match="checksum"):
        archive.snapshots(role="all", node="hlt-0")
    events = archive.entries(kind="events")[0]
    events.path.write_bytes(events.path.read_bytes()[:-100])
    (tmp_path / "snapshots" / ".partial.snap.tmp").write_bytes(b"half")
    problems = archive.verify()
    assert len(problems) == 3, problems
    with pytest.raises(ArchiveError):
        list(archive.events())


def test_a_bad_snapshot_record_is_counted_and_skipped(tmp_path: Path) -> None:
    node = build(ArchiveConfig(out_dir=str(tmp_path)), name="archive-bad")
    record = snapshot_record("hlt-0", "all", 1, (1, 1))
    broken = Record(record.kind, {**record.meta, "loss": 9.0}, record.arrays)
    node.process(broken)
    node.process(Record("other", {}))
    node.finish()
    assert node.report()["bad_records"] == 1
    assert Archive(tmp_path).entries() == []


class Mixed(Producer):
    """Event batches and snapshot records, interleaved."""

    def __init__(self) -> None:
        self.items: list[EventBatch | Record] = []
        for i in range(5):
            self.items.append(synthetic_batch(50, first_event=50 * i, run=3, lumi=1 + i))
            self.items.append(snapshot_record("hlt-0", "all", i + 1, (1, 1 + i)))

    def produce(self) -> Outcome | None:
        if not self.items:
            return None
        item = self.items.pop(0)
        n = len(item) if isinstance(item, EventBatch) else 0
        return Outcome(emits=(Emit("out", item),), accepted=n)


def test_archive_node_over_zeromq(tmp_path: Path) -> None:
    port = free_tcp_port()
    archive_stats = tmp_path / "archive.json"
    archive = Node(
        NodeConfig(
            "archive",
            "archive",
            inputs=(f"@tcp://127.0.0.1:{port}",),
            drain_idle_s=0.5,
            heartbeat_interval_s=0.1,
            stats_path=str(archive_stats),
        ),
        build(ArchiveConfig(out_dir=str(tmp_path / "arch")), name="archive"),
    )
    source = Node(
        NodeConfig("src", "source", outputs={"out": f">tcp://127.0.0.1:{port}"}),
        Mixed(),
    )
    thread = threading.Thread(target=archive.run)
    thread.start()
    assert archive.wait_started(10)
    source.run()
    archive.request_stop()
    thread.join(30)
    assert not thread.is_alive()
    stats = stats_of(archive_stats)
    assert stats["balanced"] and stats["events_in"] == stats["accepted"] == 250
    assert stats["records_in"] == 5
    assert stats["worker"]["snapshots_stored"] == 5
    stored = Archive(tmp_path / "arch")
    assert stored.verify() == []
    assert [s.sequence for s in stored.snapshots()] == [5]
    assert len(stored.event_features()) == 250


@pytest.mark.parametrize(
    ("key", "value"), [("out_dir", ""), ("events_per_file", 0), ("chunk_events", 0)]
)
def test_bad_config_values_name_the_field(key: str, value: Any) -> None:
    good: dict[str, Any] = {"out_dir": "archive"}
    with pytest.raises(ValueError, match=rf"(?m)^{key}$"):
        ArchiveConfig(**{**good, key: value})
