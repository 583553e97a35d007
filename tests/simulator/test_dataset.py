"""Chunked datasets: resumable after an interrupt, bit for bit, checksums that catch damage."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import TypedDict

import numpy as np
import pytest

from simulator import PROCESSES
from simulator.dataset import (
    DATASET_RECIPES,
    Component,
    DatasetRecipe,
    dataset_files,
    lhco_like,
    produce_dataset,
    verify_dataset,
)
from stream.errors import DataFileError
from stream.eventfile import read_cache


class Settings(TypedDict):
    """The keyword arguments of ``produce_dataset`` that every test here passes."""

    seed: int
    block_size: int
    chunk_events: int
    progress: bool


SMALL: Settings = {"seed": 5, "block_size": 20, "chunk_events": 40, "progress": False}


def tiny() -> DatasetRecipe:
    return lhco_like(80, 20)


def files(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*.h5"))}


def checksums(path: Path) -> list[tuple[str, str]]:
    manifest = json.loads((path / "manifest.json").read_text())
    return [(c["path"], c["sha256"]) for c in manifest["chunks"]]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    result = produce_dataset(lhco_like(80, 20), out, **SMALL)
    assert result.complete and not result.interrupted
    assert result.n_events == {"background": 80, "signal": 20}
    return out


def test_chunks_hold_selected_events_readable_as_a_cache(reference: Path) -> None:
    assert sorted(files(reference)) == [
        "background/chunk-00000.h5",
        "background/chunk-00001.h5",
        "signal/chunk-00000.h5",
    ]
    background = list(read_cache(dataset_files(reference, "background"), require_complete=True))
    events = np.concatenate([b["event"] for b in background])
    np.testing.assert_array_equal(events, np.arange(80))
    for batch in background:
        assert set(batch.columns) == {"run", "lumi", "event", "fatjets", "features"}
        assert (batch["fatjets"][:, :, 0].max(axis=1) > 1200).all(), "the LHCO selection"
        assert (batch.truth["is_signal"] == 0).all()
    (signal,) = read_cache(dataset_files(reference, "signal"))
    assert len(signal) == 20 and (signal.truth["is_signal"] == 1).all()
    manifest = json.loads((reference / "manifest.json").read_text())
    assert manifest["complete"] and manifest["identity"]["seed"] == 5
    seeds = [c["seed"] for c in manifest["identity"]["components"]]
    assert len(set(seeds)) == 2


@pytest.mark.slow
def test_interrupted_run_continues_to_identical_files(reference: Path, tmp_path: Path) -> None:
    blocks = 0

    def stop_after_three_blocks() -> bool:
        nonlocal blocks
        blocks += 1
        return blocks > 3

    first = produce_dataset(tiny(), tmp_path, **SMALL, stop=stop_after_three_blocks)
    assert first.interrupted and not first.complete
    assert first.n_events == {"background": 40, "signal": 0}, "only whole chunks are kept"
    assert sorted(files(tmp_path)) == ["background/chunk-00000.h5"]
    second = produce_dataset(tiny(), tmp_path, **SMALL)
    assert second.complete and second.made_events == 60
    assert files(tmp_path) == files(reference)
    assert checksums(tmp_path) == checksums(reference)


def test_manifest_detects_a_corrupted_chunk(reference: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    for name, content in files(reference).items():
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        (copy / name).write_bytes(content)
    (copy / "manifest.json").write_bytes((reference / "manifest.json").read_bytes())
    assert verify_dataset(copy).ok
    damaged = copy / "background" / "chunk-00001.h5"
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    (copy / "signal" / "chunk-00000.h5").unlink()
    check = verify_dataset(copy)
    assert check.corrupted == ("background/chunk-00001.h5",)
    assert check.missing == ("signal/chunk-00000.h5",)
    with pytest.raises(DataFileError, match="--repair"):
        produce_dataset(tiny(), copy, **SMALL)
    repaired = produce_dataset(tiny(), copy, **SMALL, repair=True)
    assert repaired.complete and repaired.made_events == 60
    assert files(copy) == files(reference)


def test_other_settings_are_refused(reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "d"
    produce_dataset(tiny(), out, **(SMALL | {"chunk_events": 80}), stop=lambda: True)
    with pytest.raises(ValueError, match="chunk_events"):
        produce_dataset(tiny(), out, **SMALL)
    with pytest.raises(ValueError, match="multiple of block_size"):
        produce_dataset(tiny(), tmp_path / "e", **(SMALL | {"chunk_events": 50}))


def test_recipe_registry() -> None:
    recipe = DATASET_RECIPES["lhco-like"](1_000_000)
    assert [(c.name, c.n_events) for c in recipe.components] == [
        ("background", 1_000_000),
        ("signal", 100_000),
    ]
    assert all(c.process.event_filter.fatjet_pt_gev == 1200 for c in recipe.components)
    assert recipe.layout == "features"


@pytest.mark.slow
def test_cli_survives_sigint_and_two_workers_give_the_same_bytes(
    reference: Path, tmp_path: Path
) -> None:
    """The real command: SIGINT mid-run keeps whole chunks; rerunning completes it."""
    import signal
    import time

    out = tmp_path / "cli"
    command = [
        sys.executable, "-m", "deploy", "simulate", "--recipe", "lhco-like", "--events", "80",
        "--signal-events", "20", "--seed", "5", "--block-size", "20", "--chunk-events", "40",
        "--workers", "2", "--quiet", "--out", str(out),
    ]  # fmt: skip
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(out.glob("background/chunk-*.h5")) and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode in (0, 130), err
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "complete" in done.stdout
    assert files(out) == files(reference)
    verify = subprocess.run([*command, "--verify"], capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0 and "checksums ok" in verify.stdout


def test_bad_components_and_recipes_name_the_field() -> None:
    qcd = PROCESSES["qcd"]
    with pytest.raises(ValueError, match=r"(?m)^n_events$"):
        Component(name="background", process=qcd, n_events=0)
    with pytest.raises(ValueError, match=r"(?m)^name\n.*must be a plain identifier, got 'a b'"):
        Component(name="a b", process=qcd, n_events=1)
    with pytest.raises(ValueError, match=r"(?m)^components$"):
        DatasetRecipe(name="empty", components=())
    with pytest.raises(ValueError, match=r"(?m)^layout$"):
        dataclasses.replace(tiny(), layout="raw")  # type: ignore[arg-type]
    twice = tuple(Component(name="a", process=qcd, n_events=n) for n in (1, 2))
    with pytest.raises(ValueError, match=r"distinct names, got \['a', 'a'\]"):
        DatasetRecipe(name="twice", components=twice)
