"""The live search: snapshots written into an archive folder while ``follow`` watches it.

The planted problem's archive (tests/analysis/conftest.py) is replayed into a fresh
archive in two steps: the stored events and node hlt-0's flow snapshots first, node
hlt-1's later. Each step must give one scan, the second on flows that saw more events.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from analysis.classifier import ClassifierConfig
from analysis.live import follow, live_scan
from analysis.methods import SearchConfig
from analysis.scan import ScanConfig, sliding_windows
from deploy.cli import main
from models.archive import Archive
from nodes.archive import ArchiveConfig, build
from stream.testing import FakeClock

FAST = SearchConfig(n_samples=4000, classifier=ClassifierConfig(n_models=1, epochs=4))
WINDOWS = ScanConfig(windows_gev=sliding_windows(2900, 4500, 400, 400), efficiencies=(1.0, 0.2))


def _start_archive(planted: dict[str, Path], root: Path) -> tuple[Path, list, list]:
    """A new archive with the planted events; returns it and the two groups of snapshot
    records still to write."""
    source = Archive(planted["archive"])
    out = root / "archive"
    node = build(ArchiveConfig(out_dir=str(out)), name="archive")
    for batch in source.events():
        node.process(batch)
    node.finish()  # indexes the event file
    snaps = sorted(source.snapshots(latest_per_node=False), key=lambda s: s.sequence)
    first = [s.to_record() for s in snaps if s.node_id == "hlt-0"]
    second = [s.to_record() for s in snaps if s.node_id != "hlt-0"]
    assert first and second
    return out, first, second


def _write(out: Path, records: list) -> None:
    node = build(ArchiveConfig(out_dir=str(out), store_events=False), name="archive")
    for record in records:
        node.process(record)
    node.finish()


@pytest.mark.slow
def test_follow_sees_each_new_set_of_snapshots(planted: dict[str, Path], tmp_path: Path) -> None:
    out, first, second = _start_archive(planted, tmp_path)
    clock = FakeClock()
    sleeps = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        clock.advance(seconds)
        if len(sleeps) == 1:
            _write(out, first)  # the first snapshots arrive while follow waits
        if len(sleeps) == 3:
            _write(out, second)

    updates = list(
        follow(
            out,
            live_scan("anode", FAST, WINDOWS),
            poll_s=1.0,
            max_updates=5,
            timeout_s=10.0,
            now=clock,
            sleep=sleep,
        )
    )
    assert len(updates) == 2
    assert updates[0].events_seen == 12_000
    assert updates[1].events_seen == 24_000
    assert updates[0].events_stored == updates[1].events_stored == 24_000
    for update in updates:
        z = update.local_z_by_window()
        assert len(z) == len(WINDOWS.windows_gev)
        assert all(np.isfinite(list(z.values())))
        assert np.isfinite(update.scan.global_pvalue)
    # no snapshots arrive after the second step: follow stops at its timeout
    assert clock() >= 10.0


@pytest.mark.slow
def test_cli_follow_prints_two_updates(planted: dict[str, Path], tmp_path: Path) -> None:
    out, first, second = _start_archive(planted, tmp_path)
    _write(out, first)

    def later() -> None:
        time.sleep(1.0)
        _write(out, second)

    writer = threading.Thread(target=later)
    writer.start()
    result = CliRunner().invoke(
        main,
        [
            "analyze",
            "cwola",
            "--archive",
            str(out),
            "--follow",
            "--poll-s",
            "0.2",
            "--max-updates",
            "2",
            "--timeout-s",
            "120",
            "--windows",
            "2900",
            "4500",
            "400",
            "400",
            "--samples",
            "2000",
            "--ensemble",
            "1",
            "--epochs",
            "2",
            "--out",
            str(tmp_path / "live"),
        ],
    )
    writer.join()
    assert result.exit_code == 0, result.output
    assert "update 1" in result.output and "update 2" in result.output
    assert "global p" in result.output
    assert "spurious-signal fraction after a cut: " in result.output
    history = json.loads((tmp_path / "live" / "live.json").read_text())
    assert [h["events_seen"] for h in history] == [12_000, 24_000]
    assert (tmp_path / "live" / "live_significance.png").stat().st_size > 1000


@pytest.mark.parametrize(
    ("windows", "problem"),
    [
        (["3000", "2000", "400", "200"], "need 0 < width <= stop - start"),
        (["1000", "1800", "400", "200"], "scan: window (1000.0, 1400.0) needs a sideband bin"),
    ],
)
def test_bad_windows_are_a_one_line_error(tmp_path: Path, windows: list[str], problem: str) -> None:
    args = ["analyze", "anode", "--archive", str(tmp_path), "--windows", *windows]
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert f"Invalid value for --windows: {problem}" in result.output, result.output
    assert "validation error" not in result.output
