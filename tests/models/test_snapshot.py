"""Flow snapshots: bit-exact round trips through records, the wire codec and files;
corruption and truncation rejected."""

from __future__ import annotations

import dataclasses
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch

from models.flows import ConditionalFlow, FlowConfig, Preprocessing
from models.snapshot import FlowSnapshot, SnapshotError
from stream import Record
from stream.codec import decode, encode
from stream.version import version

DATA = Path(__file__).resolve().parents[1] / "data"

torch.set_num_threads(1)


@pytest.fixture
def snapshot() -> FlowSnapshot:
    torch.manual_seed(0)
    pre = Preprocessing.calibrate(np.random.default_rng(0).normal(size=(100, 4)))
    flow = ConditionalFlow(FlowConfig(n_transforms=2, hidden_features=16), pre)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return FlowSnapshot.of(
        flow,
        mjj_hist=np.arange(4.0),
        mjj_edges=np.linspace(0, 4, 5),
        node_id="hlt-0",
        role="all",
        run=7,
        lumi_first=1,
        lumi_last=3,
        events_seen=12345,
        mjj_min_gev=1600.0,
        mjj_max_gev=7000.5,
        loss=1.25,
        sequence=2,
        signal_region_gev=(3300.0, 3700.0),
    )


def same(a: FlowSnapshot, b: FlowSnapshot) -> None:
    assert a.meta() == b.meta()
    assert set(a.arrays) == set(b.arrays)
    for name in a.arrays:
        assert a.arrays[name].dtype == b.arrays[name].dtype
        assert a.arrays[name].tobytes() == b.arrays[name].tobytes(), name


def test_record_and_wire_round_trip_is_bit_exact(snapshot: FlowSnapshot) -> None:
    record = decode([bytes(f) for f in encode(snapshot.to_record())])
    assert isinstance(record, Record)
    again = FlowSnapshot.from_record(record)
    same(snapshot, again)
    flow = snapshot.flow()
    rebuilt = again.flow()
    for (name, p), (_, q) in zip(flow.named_parameters(), rebuilt.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    x = np.random.default_rng(1).normal(size=(10, 4))
    m = np.full(10, 3500.0)
    np.testing.assert_array_equal(flow.log_prob(x, m), rebuilt.log_prob(x, m))


def test_file_round_trip_is_bit_exact(snapshot: FlowSnapshot, tmp_path: Path) -> None:
    path = tmp_path / "s.snap"
    size = snapshot.write(path)
    assert size == path.stat().st_size
    same(snapshot, FlowSnapshot.read(path))
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_stored_snapshot_rebuilt_into_a_flow_and_snapshotted_again_is_the_same() -> None:
    """The flow holds the preprocessing as buffers: the ``pre/`` float64 arrays and the
    parameters of a snapshot written before come back byte for byte (same content hash)."""
    old = FlowSnapshot.from_bytes((DATA / "flow_snapshot_nflows_v0.1.tfsnap").read_bytes())
    meta = {k: v for k, v in old.meta().items() if k not in ("flow_config", "content_hash")}
    again = FlowSnapshot.of(
        old.flow(), mjj_hist=old.arrays["mjj_hist"], mjj_edges=old.arrays["mjj_edges"], **meta
    )
    assert {k for k in again.arrays if k.startswith("pre/")} == {
        f"pre/{name}" for name in ("lower", "upper", "mean", "std", "mjj")
    }
    same(old, again)
    assert again.content_hash == old.content_hash


def test_a_file_that_names_where_its_parameters_are_loads_only_with_them(
    snapshot: FlowSnapshot,
) -> None:
    """Another node's snapshot of the same flow: same ``parameters_hash``, its own content
    hash; stored thin, it comes back whole from the file that holds the parameters."""
    other = dataclasses.replace(snapshot, node_id="hlt-1", events_seen=999, content_hash="")
    assert other.parameters_hash == snapshot.parameters_hash
    assert other.content_hash != snapshot.content_hash
    thin = other.to_bytes(parameters_in="hlt-0/all.snap")
    assert len(thin) < len(snapshot.to_bytes()) / 2
    names: list[str] = []

    def holder(name: str) -> FlowSnapshot:
        names.append(name)
        return snapshot

    same(other, FlowSnapshot.from_bytes(thin, shared=holder))
    assert names == ["hlt-0/all.snap"]
    with pytest.raises(SnapshotError, match="read it through its archive"):
        FlowSnapshot.from_bytes(thin)
    arrays = dict(snapshot.arrays)
    name = next(k for k in arrays if k.startswith("param/"))
    arrays[name] = arrays[name] + 1
    impostor = dataclasses.replace(snapshot, arrays=arrays, content_hash="")
    with pytest.raises(SnapshotError, match="does not hold its parameters"):
        FlowSnapshot.from_bytes(thin, shared=lambda _: impostor)


@pytest.mark.parametrize("where", [0, 100, 5000, -10])
def test_a_flipped_byte_is_rejected(snapshot: FlowSnapshot, where: int) -> None:
    data = bytearray(snapshot.to_bytes())
    data[where] ^= 0x01
    with pytest.raises(SnapshotError):
        FlowSnapshot.from_bytes(bytes(data))


def test_a_truncated_file_is_rejected(snapshot: FlowSnapshot, tmp_path: Path) -> None:
    path = tmp_path / "s.snap"
    snapshot.write(path)
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(SnapshotError, match=r"checksum|truncated"):
        FlowSnapshot.read(path)


def test_a_tampered_record_fails_its_content_hash(snapshot: FlowSnapshot) -> None:
    record = snapshot.to_record()
    arrays = dict(record.arrays)
    name = next(k for k in arrays if k.startswith("param/"))
    arrays[name] = arrays[name] + np.float32(1e-3)
    tampered = type(record)(record.kind, record.meta, arrays)
    with pytest.raises(SnapshotError, match="hash"):
        FlowSnapshot.from_record(tampered)
    wrong_meta = type(record)(record.kind, {**record.meta, "events_seen": 1}, record.arrays)
    with pytest.raises(SnapshotError, match="hash"):
        FlowSnapshot.from_record(wrong_meta)


def test_snapshots_are_stamped_with_the_installed_version(snapshot: FlowSnapshot) -> None:
    assert snapshot.code_version == f"trigfarm-{metadata.version('trigfarm')}"
    assert snapshot.code_version == f"trigfarm-{version()}"
    # A stored snapshot keeps the version that wrote it: its content hash covers it.
    old = FlowSnapshot.from_bytes((DATA / "flow_snapshot_nflows_v0.1.tfsnap").read_bytes())
    assert old.code_version == "trigfarm-0.1.0"
    with pytest.raises(SnapshotError, match="content hash"):
        dataclasses.replace(old, code_version=snapshot.code_version)
