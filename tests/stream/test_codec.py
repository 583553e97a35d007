"""Codec round trips (property-based) and every way a frame can be wrong."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from stream import EventBatch, FrameError, Record, decode, encode
from stream.schema import COLUMNS, MAX_BATCH_EVENTS, SCHEMA_VERSION, WIRE_DTYPES
from stream.testing import synthetic_batch

WIRE = sorted(WIRE_DTYPES)


def assert_batches_equal(a: EventBatch, b: EventBatch) -> None:
    assert list(a.columns) == list(b.columns)
    assert list(a.truth) == list(b.truth)
    for table_a, table_b in ((a.columns, b.columns), (a.truth, b.truth)):
        for name in table_a:
            assert table_a[name].dtype == table_b[name].dtype
            np.testing.assert_array_equal(table_a[name], table_b[name])
    assert dict(a.meta) == dict(b.meta)


@st.composite
def event_batches(draw: st.DrawFn) -> EventBatch:
    n = draw(st.integers(0, 6))
    names = draw(st.lists(st.sampled_from(sorted(COLUMNS)), min_size=1, unique=True))
    columns = {}
    for name in names:
        spec = COLUMNS[name]
        shape = tuple(draw(st.integers(0, 5)) if dim is None else dim for dim in spec.shape)
        elements = st.floats(-1e6, 1e6, width=32) if spec.finite else None
        columns[name] = draw(hnp.arrays(np.dtype(spec.dtype), (n, *shape), elements=elements))
    truth = {}
    if draw(st.booleans()):
        truth["is_signal"] = draw(hnp.arrays(np.dtype("u1"), (n,)))
    meta = draw(st.dictionaries(st.text(max_size=5), st.integers(-10, 10) | st.text(max_size=5)))
    return EventBatch(columns, truth, meta)


@given(event_batches())
@settings(max_examples=200, deadline=None)
def test_event_batch_round_trip(batch: EventBatch) -> None:
    if len(batch) > batch.nbytes:
        # Events that occupy no bytes (only zero-width columns) cannot vouch for their count.
        with pytest.raises(FrameError, match="at least one byte") as info:
            encode(batch)
        assert info.value.reason == "length"
        return
    back = decode(encode(batch))
    assert isinstance(back, EventBatch)
    assert_batches_equal(back, batch)


@given(
    st.dictionaries(
        st.text(min_size=1, max_size=8),
        hnp.arrays(
            st.sampled_from(WIRE).map(np.dtype),
            hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4),
        ),
        max_size=4,
    )
)
@settings(max_examples=200, deadline=None)
def test_record_round_trip_over_dtypes_and_shapes(arrays: dict[str, np.ndarray]) -> None:
    record = Record("flow_snapshot", {"events_seen": 3, "loss": 1.5}, arrays)
    back = decode(encode(record))
    assert isinstance(back, Record)
    assert back.kind == "flow_snapshot" and dict(back.meta) == dict(record.meta)
    assert list(back.arrays) == list(arrays)
    for name, array in arrays.items():
        assert back.arrays[name].dtype == array.dtype and back.arrays[name].shape == array.shape
        np.testing.assert_array_equal(back.arrays[name], array)


def test_decode_is_zero_copy() -> None:
    frames = encode(synthetic_batch(16))
    batch = decode(frames)
    assert isinstance(batch, EventBatch)
    assert np.shares_memory(batch["constituents"], np.frombuffer(frames[6], "u1"))
    assert not batch["constituents"].flags.writeable


@given(st.lists(st.binary(max_size=64), min_size=0, max_size=4))
@settings(max_examples=500, deadline=None)
def test_random_bytes_give_a_message_or_a_frame_error(frames: list[bytes]) -> None:
    try:
        decode(frames)
    except FrameError:
        pass


def _header(frames: list) -> dict:
    return msgpack.unpackb(frames[0])


def _with_header(frames: list, **changes: object) -> list:
    header = _header(frames) | changes
    return [msgpack.packb(header), *frames[1:]]


@pytest.mark.parametrize(
    ("mutate", "reason", "words"),
    [
        (lambda f: [b"\xc1garbage", *f[1:]], "decode_error", "msgpack"),
        (lambda f: [msgpack.packb([1, 2]), *f[1:]], "decode_error", "not a map"),
        (lambda f: _with_header(f, v=SCHEMA_VERSION + 1), "version", "schema version"),
        (lambda f: _with_header(f, kind="pickle"), "decode_error", "unknown message kind"),
        (lambda f: f[:-1], "truncated", "frames"),
        (lambda f: [*f[:-1], bytes(memoryview(f[-1]))[:-3]], "truncated", "bytes"),
        (lambda f: _with_header(f, n=7), "length", "header says 7"),
        (lambda f: _with_header(f, n=-1), "decode_error", "event count"),
        (lambda f: _with_header(f, n=True), "decode_error", "event count"),
        (lambda f: _with_header(f, n=2**63), "length", "exceed the limit"),
        (lambda f: _with_header(f, v=True), "version", "schema version True"),
        (lambda f: _with_header(f, v=1.0), "version", "schema version 1.0"),
        (lambda f: _with_header(f, v=None), "version", "schema version None"),
        (lambda f: [], "decode_error", "empty"),
    ],
)
def test_malformed_frames_raise_a_clear_frame_error(mutate, reason: str, words: str) -> None:
    frames = encode(synthetic_batch(4))
    with pytest.raises(FrameError) as info:
        decode(mutate(list(frames)))
    assert info.value.reason == reason
    assert words in str(info.value)


def test_object_dtype_is_refused_on_the_wire() -> None:
    frames = list(encode(synthetic_batch(2)))
    header = _header(frames)
    header["cols"][0][1] = "|O"
    with pytest.raises(FrameError, match="not a wire dtype") as info:
        decode([msgpack.packb(header), *frames[1:]])
    assert info.value.reason == "dtype"


def test_wrong_schema_dtype_and_shape_are_refused() -> None:
    frames = list(encode(synthetic_batch(2)))
    header = _header(frames)
    names = [c[0] for c in header["cols"]]
    i = names.index("features")
    header["cols"][i] = ["features", "<f8", [2, 4]]
    frames[1 + i] = np.zeros((2, 4)).tobytes()
    with pytest.raises(FrameError, match="features") as info:
        decode([msgpack.packb(header), *frames[1:]])
    assert info.value.reason == "dtype"
    header["cols"][i] = ["features", "<f4", [2, 5]]
    frames[1 + i] = np.zeros((2, 5), "f4").tobytes()
    with pytest.raises(FrameError, match="features") as info:
        decode([msgpack.packb(header), *frames[1:]])
    assert info.value.reason == "shape"


def test_nan_in_a_validated_column_names_the_column_and_row() -> None:
    batch = synthetic_batch(5)
    features = batch["features"].copy()
    features[3, 1] = np.nan
    frames = encode(batch.with_columns(features=features))
    with pytest.raises(FrameError, match=r"'features'.*first row 3") as info:
        decode(frames)
    assert info.value.reason == "nonfinite"
    assert info.value.n_events == 5
    lenient = decode(frames, check_finite=False)
    assert isinstance(lenient, EventBatch) and len(lenient) == 5
    np.testing.assert_array_equal(lenient.finite_rows(), [True, True, True, False, True])


def test_finite_rows_cover_truth_and_keep_it_aligned() -> None:
    batch = synthetic_batch(4)
    weight = np.ones(4, "<f4")
    weight[2] = np.inf
    batch = EventBatch(
        batch.columns, {**batch.truth, "process_id": np.arange(4, dtype="<i2"), "weight": weight}
    )
    constituents = batch["constituents"].copy()
    constituents[0, 1, 127, 3] = -np.inf
    hlt_score = np.full(4, np.nan, "<f4")  # not a schema-finite column: NaN is a value
    batch = batch.with_columns(constituents=constituents, hlt_score=hlt_score)
    kept = batch.select(batch.finite_rows())
    assert kept["event"].tolist() == [1, 3]
    assert kept.truth["process_id"].tolist() == [1, 3]
    assert EventBatch({"constituents": np.zeros((0, 2, 0, 4), "<f4")}).finite_rows().shape == (0,)


def _declared_frame(n: object, *, version: object = SCHEMA_VERSION) -> list[bytes]:
    header = {"v": version, "kind": "events", "n": n, "cols": [], "truth": [], "meta": {}}
    return [msgpack.packb(header)]


@pytest.mark.parametrize("version", [SCHEMA_VERSION, SCHEMA_VERSION + 1, True])
@pytest.mark.parametrize("n", [2**63 - 1, 2**64 - 1, MAX_BATCH_EVENTS, 5])
def test_a_small_frame_cannot_declare_events_it_does_not_carry(version: object, n: int) -> None:
    frames = _declared_frame(n, version=version)
    assert len(frames[0]) <= 64
    with pytest.raises(FrameError) as info:
        decode(frames)
    assert info.value.n_events == 0
    assert info.value.reason == ("length" if version is SCHEMA_VERSION else "version")


def test_the_event_count_is_bounded_even_with_the_bytes_to_match() -> None:
    n = MAX_BATCH_EVENTS + 1
    header = {"v": SCHEMA_VERSION, "kind": "events", "n": n, "cols": [["l1_bits", "<u2", [n]]]}
    frames = [msgpack.packb(header), bytes(2 * n)]
    with pytest.raises(FrameError, match="exceed the limit") as info:
        decode(frames)
    assert info.value.n_events == 0
    with pytest.raises(FrameError, match="exceed the limit"):
        encode(EventBatch({"l1_bits": np.zeros(n, "<u2")}))


def test_repeated_array_names_are_refused() -> None:
    frames = list(encode(synthetic_batch(3)))
    header = _header(frames)
    header["cols"].append(header["cols"][0])
    with pytest.raises(FrameError, match="appears twice") as info:
        decode([msgpack.packb(header), *frames[1:], frames[1]])
    assert info.value.n_events == 0


def test_a_checked_count_is_reported_with_a_schema_error() -> None:
    frames = list(encode(synthetic_batch(6)))
    header = _header(frames)
    i = [c[0] for c in header["cols"]].index("features")
    header["cols"][i] = ["features", "<f8", [6, 8]]  # a wire dtype, not the schema's
    frames[1 + i] = np.zeros((6, 8)).tobytes()
    with pytest.raises(FrameError) as info:
        decode([msgpack.packb(header), *frames[1:]])
    assert info.value.reason == "dtype" and info.value.n_events == 6


# Header values a sender might put where an integer belongs.
_INTS = st.integers(-2, 2**64 - 1) | st.booleans() | st.floats(allow_nan=True) | st.none()


@given(
    n=st.integers(0, 8) | _INTS,
    version=st.sampled_from([SCHEMA_VERSION]) | _INTS,
    keep=st.lists(st.booleans(), min_size=12, max_size=12),
    cut=st.integers(0, 5),
)
@settings(max_examples=400, deadline=None)
def test_a_refused_frame_never_reports_more_events_than_it_carries(
    n: object, version: object, keep: list[bool], cut: int
) -> None:
    frames = list(encode(synthetic_batch(4)))
    header = _header(frames) | {"n": n, "v": version}
    buffers = [bytes(memoryview(f))[cut:] for f, k in zip(frames[1:], keep, strict=False) if k]
    carried = sum(len(b) for b in buffers)
    try:
        message = decode([msgpack.packb(header), *buffers])
    except FrameError as exc:
        assert 0 <= exc.n_events <= min(carried, MAX_BATCH_EVENTS)
        if exc.n_events:
            assert exc.n_events == n
        if type(version) is not int or version != SCHEMA_VERSION:
            assert exc.reason == "version"
    else:
        assert type(version) is int and version == SCHEMA_VERSION
        assert isinstance(message, EventBatch) and len(message) == n == 4


def test_unknown_column_is_refused() -> None:
    with pytest.raises(FrameError, match="not in the schema"):
        EventBatch({"secret": np.zeros(2, "f4")})


def test_truth_is_kept_apart_from_columns() -> None:
    batch = synthetic_batch(3)
    assert "is_signal" not in batch and "is_signal" in batch.truth
    assert batch.without_truth().truth == {}
    back = decode(encode(batch.without_truth()))
    assert isinstance(back, EventBatch) and dict(back.truth) == {}


def test_select_and_concat_keep_truth_aligned() -> None:
    batch = synthetic_batch(6)
    truth = batch.truth["is_signal"].copy()
    truth[::2] = 1
    batch = EventBatch(batch.columns, {"is_signal": truth}, batch.meta)
    picked = batch.select(truth == 1)
    assert len(picked) == 3 and picked.truth["is_signal"].all()
    joined = EventBatch.concat([picked, batch.select(truth == 0)])
    assert len(joined) == 6 and joined.truth["is_signal"][:3].all()
