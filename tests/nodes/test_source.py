"""The source node: mixing, signal injection, numbering, looping, bad files, pacing over ZeroMQ."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from nodes.source import SourceConfig, build, lhco_replay, parse_component
from simulator import generate
from stream import EventBatch, Outcome, Producer
from stream.eventfile import CacheWriter
from tests.conftest import Chain, shared_data


def write_cache(path: Path, process: str, n: int, seed: int) -> Path:
    with CacheWriter(path) as writer:
        for batch in generate(process, n, seed=seed, batch_size=n):
            writer.append(batch)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("source")
    return {
        "qcd": write_cache(root / "qcd.h5", "qcd", 40, 1),
        "ttbar": write_cache(root / "ttbar.h5", "ttbar", 40, 2),
        "wprime": write_cache(root / "wprime.h5", "wprime", 30, 3),
    }


def drain(source: Producer, limit: int = 10_000) -> list[Outcome]:
    outcomes: list[Outcome] = []
    for _ in range(limit):
        outcome = source.produce()
        if outcome is None:
            return outcomes
        outcomes.append(outcome)
    raise AssertionError("source never stopped")


def batches_of(outcomes: list[Outcome]) -> EventBatch:
    messages = [e.message for o in outcomes for e in o.emits]
    batches = [m for m in messages if isinstance(m, EventBatch)]
    assert len(batches) == len(messages), "a source emits only event batches"
    return EventBatch.concat(batches)


def test_mixes_by_weight_injects_signal_and_numbers_events(files: dict[str, Path]) -> None:
    config = SourceConfig(
        background=(f"cache:{files['qcd']}", f"cache:{files['ttbar']}"),
        background_weights=(3.0, 1.0),
        signal=(f"cache:{files['wprime']}",),
        signal_fraction=0.1,
        batch_size=37,
        max_events=300,
        loop=True,
        run=7,
        first_event=1,
        events_per_lumi=100,
    )
    source = build(config, name="mix")
    batch = batches_of(drain(source))
    assert len(batch) == 300
    np.testing.assert_array_equal(batch["event"], np.arange(1, 301))
    assert (batch["run"] == 7).all()
    np.testing.assert_array_equal(np.bincount(batch["lumi"])[1:], [100, 100, 100])
    truth = batch.truth
    assert int(truth["is_signal"].sum()) == 30  # floor(0.1 x 300)
    assert (truth["process_id"][truth["is_signal"] == 1] == 1).all()
    background = truth["process_id"][truth["is_signal"] == 0]
    n_qcd, n_top = int((background == 0).sum()), int((background == 3).sum())
    assert n_qcd + n_top == 270 and abs(n_qcd - 3 * n_top) <= 4
    # Signal is spread over the run, not bunched at the end of each batch.
    positions = np.flatnonzero(truth["is_signal"])
    assert positions.min() < 60 and positions.max() > 240
    assert source.report()["components"][f"cache:{files['wprime']}"] == 30


def test_a_file_ends_unless_looped(files: dict[str, Path]) -> None:
    once = build(SourceConfig(background=(f"cache:{files['qcd']}",), batch_size=16), name="once")
    assert len(batches_of(drain(once))) == 40
    looped = build(
        SourceConfig(
            background=(f"cache:{files['qcd']}",), batch_size=16, loop=True, max_events=100
        ),
        name="looped",
    )
    batch = batches_of(drain(looped))
    assert len(batch) == 100
    values, counts = np.unique(batch["features"][:, 0], return_counts=True)
    assert len(values) == 40 and set(counts) == {2, 3}


def test_pacing_follows_the_clock(files: dict[str, Path]) -> None:
    config = SourceConfig(
        background=(f"cache:{files['qcd']}",), loop=True, rate_hz=100.0, batch_size=10
    )
    source = build(config, name="clocked")
    assert source.wait_s(50.0) == 0.0
    assert source.produce() is not None
    assert source.wait_s(50.0) == pytest.approx(0.1)
    assert source.wait_s(50.06) == pytest.approx(0.04)
    source.produce()
    # Far behind (a stall): it owes at most one second, then paces again.
    assert source.wait_s(80.0) == 0.0
    for _ in range(11):
        source.produce()
    assert source.wait_s(80.0) > 0


def test_a_bad_file_is_counted_and_skipped(files: dict[str, Path], tmp_path: Path) -> None:
    broken = tmp_path / "broken.h5"
    broken.write_bytes(files["qcd"].read_bytes()[:5000])
    config = SourceConfig(background=(f"cache:{broken},{files['ttbar']}",), batch_size=25)
    source = build(config, name="bad-file")
    batch = batches_of(drain(source))
    assert len(batch) == 40
    assert source.report()["bad_files"] == 1
    assert source.report()["bad_file_paths"] == [str(broken)]


def test_a_nan_row_is_dropped_and_accounted(tmp_path: Path) -> None:
    import h5py

    original = shared_data("lhco-rnd-100k", "scalars_bkg01.h5")
    path = tmp_path / "nan.h5"
    path.write_bytes(original.read_bytes())
    with h5py.File(path, "r+") as handle:
        items = [x.decode() for x in handle["bkg/block0_items"][:]]
        handle["bkg/block0_values"][3, items.index("mjj")] = np.nan
    source = build(
        SourceConfig(background=(f"lhco-features:{path}",), batch_size=500, max_events=1000),
        name="nan-row",
    )
    outcomes = drain(source)
    assert sum(o.dropped.get("bad_input", 0) for o in outcomes) == 1
    assert sum(o.accepted for o in outcomes) == 1000
    assert source.report()["bad_rows"] == 1


def test_lhco_replay_at_a_signal_fraction() -> None:
    bkg = shared_data("lhco-rnd-100k", "scalars_bkg01.h5")
    sig = shared_data("lhco-rnd-100k", "scalars_sig01.h5")
    source = build(lhco_replay([bkg], [sig], 0.05, batch_size=1000, max_events=4000), name="lhco")
    batch = batches_of(drain(source))
    assert len(batch) == 4000 and int(batch.truth["is_signal"].sum()) == 200
    mjj_sig = batch["features"][batch.truth["is_signal"] == 1, 0]
    assert 3300 < np.median(mjj_sig) < 3700


@pytest.mark.slow
def test_generator_components_in_process_and_in_workers() -> None:
    for workers in (0, 1):
        config = SourceConfig(
            background=("zll",),
            signal=("wprime?m_x_gev=300",),
            signal_fraction=0.25,
            batch_size=16,
            max_events=32,
            generator_workers=workers,
            generator_block=8,
        )
        source = build(config, name=f"gen{workers}")
        deadline = time.monotonic() + 60
        while source.wait_s(time.monotonic()) > 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        batch = batches_of(drain(source))
        source.finish()
        assert len(batch) == 32 and int(batch.truth["is_signal"].sum()) == 8
        signal_mass = batch["features"][batch.truth["is_signal"] == 1, 1]
        assert np.median(signal_mass) < 400  # the re-massed X (300 GeV)


@pytest.mark.parametrize(
    ("key", "value", "where"),
    [
        ("background", (), "background"),
        ("background", ("qcd", "nonsense"), "background.1"),
        ("signal", ("wprime?m_x_gev=x",), "signal.0"),
        ("background_weights", (1.0, -1.0), "background_weights.1"),
        ("signal_fraction", 1.0, "signal_fraction"),
        ("rate_hz", -1.0, "rate_hz"),
        ("batch_size", 0, "batch_size"),
        ("max_events", -1, "max_events"),
        ("run", -1, "run"),
        ("first_event", -1, "first_event"),
        ("events_per_lumi", 0, "events_per_lumi"),
        ("chunk_size", 0, "chunk_size"),
        ("generator_workers", -1, "generator_workers"),
        ("generator_block", 0, "generator_block"),
        ("crossing_rate_hz", 0.0, "crossing_rate_hz"),
        ("pileup_mu", -1.0, "pileup_mu"),
        ("pileup_mu", float("nan"), "pileup_mu"),
        ("pileup_mu_end", 1001.0, "pileup_mu_end"),
        ("pileup_ramp_lumis", 0, "pileup_ramp_lumis"),
        ("pileup_library_events", 0, "pileup_library_events"),
    ],
)
def test_bad_config_values_name_the_field(key: str, value: Any, where: str) -> None:
    with pytest.raises(ValueError, match=rf"(?m)^{where}$"):
        SourceConfig(**{key: value})


def test_bad_configs_name_the_key() -> None:
    with pytest.raises(ValueError, match="signal_fraction > 0 needs signal components"):
        SourceConfig(signal_fraction=0.5)
    with pytest.raises(ValueError, match="background_weights has 1 entries for 2 components"):
        SourceConfig(background=("qcd", "ttbar"), background_weights=(1.0,))
    with pytest.raises(ValueError, match="signal_weights must have a positive sum"):
        SourceConfig(signal=("wprime",), signal_weights=(0.0,))
    with pytest.raises(ValueError, match="neither a process"):
        SourceConfig(background=("nonsense",))
    with pytest.raises(ValueError, match="m_x_gev"):
        parse_component("qcd?m_x_gev=3")
    assert SourceConfig(background=["qcd"]).background == ("qcd",)  # type: ignore[arg-type]


def test_crossing_configs_and_the_mu_profile() -> None:
    with pytest.raises(ValueError, match="pileup_mu > 0"):
        SourceConfig(background=("inclusive",), weighting="crossing")
    with pytest.raises(ValueError, match="pileup needs generator components"):
        SourceConfig(background=("lhco-features:a.h5",), pileup_mu=10.0)
    assert SourceConfig(pileup_mu=40.0).mu_at(7) == 40.0
    ramp = SourceConfig(pileup_mu=40.0, pileup_mu_end=80.0, pileup_ramp_lumis=5)
    assert [ramp.mu_at(lumi) for lumi in (1, 2, 3, 5, 9)] == [40.0, 50.0, 60.0, 80.0, 80.0]


def test_weighted_crossings_with_signal_at_its_cross_section() -> None:
    """The inclusive sample's crossings carry their share of all crossings, a signal its
    chance per crossing L sigma / f; both over their share of the stream."""
    config = SourceConfig(
        background=("inclusive",),
        signal=("zll",),
        signal_fraction=0.25,
        weighting="crossing",
        pileup_mu=4.0,
        pileup_mu_end=8.0,
        pileup_ramp_lumis=2,
        pileup_library_events=40,
        batch_size=16,
        max_events=32,
        generator_block=16,
        events_per_lumi=16,
    )
    source = build(config, name="crossings")
    batch = batches_of(drain(source))
    source.finish()
    report = source.report()
    assert len(batch) == 32 and report["hz_per_weight"] == config.crossing_rate_hz
    w = batch.truth["weight"].astype(np.float64)
    signal = batch.truth["is_signal"] == 1
    assert int(signal.sum()) == 8 and (w > 0).all()
    sigma_mb = report["component_mean_weight"]["zll"]  # Pythia's sigma for Z -> ll
    per_crossing = config.luminosity_cm2s * 1e-27 * sigma_mb / config.crossing_rate_hz
    np.testing.assert_allclose(w[signal], per_crossing / 0.25, rtol=1e-5)
    assert 0.2 < w[~signal].mean() * 0.75 < 3  # crossing shares: mean 1 - e^-mu (noisy)
    # Blocks are made with the mu of the next event to leave: 4, 4 (signal), then 8.
    assert report["pileup"]["mu_mean"] == pytest.approx(16 / 3)


def test_components_as_tables_equal_their_shorthand(tmp_path: Path) -> None:
    """A TOML table and its shorthand name the same component; a table holds paths the
    shorthand cannot (commas, colons), and a bad table names what is wrong."""
    table = parse_component({"process": "wprime", "m_x_gev": 300, "m_y_gev": 80})
    assert table.recipe == parse_component("wprime?m_x_gev=300&m_y_gev=80").recipe
    assert table.text == "wprime?m_x_gev=300&m_y_gev=80"
    odd = tmp_path / "run,2:b.h5"
    replay = parse_component({"layout": "cache", "paths": [str(odd)]})
    assert (replay.layout, replay.paths) == ("cache", (str(odd),))
    assert parse_component(f"cache:{odd}").paths != (str(odd),)  # the shorthand splits it
    with pytest.raises(ValueError, match="nothing else"):
        parse_component({"layout": "cache", "paths": ["a.h5"], "loop": True})
    with pytest.raises(ValueError, match="names no file"):
        parse_component({"layout": "cache", "paths": []})
    with pytest.raises(ValueError, match="m_x_gev"):
        parse_component({"process": "qcd", "m_x_gev": 3})


@pytest.mark.slow
def test_feeds_a_downstream_node_at_the_set_rate(
    files: dict[str, Path], chain: Callable[..., Chain]
) -> None:
    rate_hz, n_events = 400.0, 800
    source = build(
        SourceConfig(
            background=(f"cache:{files['qcd']}",),
            loop=True,
            rate_hz=rate_hz,
            batch_size=20,
            max_events=n_events,
        ),
        name="paced-source",
    )
    t0 = time.monotonic()
    running = chain(
        source,
        names=("paced-source", "", "paced-sink"),
        source_options={"metrics_port": 0, "heartbeat_interval_s": 0.2},
    )
    source_node, sink_node, sink = running.source, running.sink_node, running.sink
    scraped = None
    while running.source_running:
        if scraped is None and time.monotonic() - t0 > 1.2:
            scraped = running.scrape(source_node)
        time.sleep(0.01)
    running.wait_for_source()
    running.stop()
    elapsed = time.monotonic() - t0
    ids = sink.event_ids()
    assert len(ids) == n_events and sink_node.stats.balanced
    np.testing.assert_array_equal(np.sort(ids[:, 1]), np.arange(1, n_events + 1))
    assert 0.8 * n_events / rate_hz < elapsed < 2.0 * n_events / rate_hz
    assert scraped is not None
    line = next(
        x
        for x in scraped.splitlines()
        if x.startswith('source_rate_events_per_second{node="paced-source"}')
    )
    assert 0.6 * rate_hz < float(line.split()[-1]) < 1.4 * rate_hz
