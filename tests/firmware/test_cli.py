"""``trigfarm firmware train | calibrate | deploy`` end to end on small inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from deploy.cli import main
from firmware.calibrate import calibrate
from firmware.emulate import Emulator
from firmware.inputs import InputScaling, read_l1_objects
from firmware.model import L1Model, load_model
from firmware.scores import r_z
from stream import EventBatch
from stream.eventfile import CacheWriter
from tests.firmware.conftest import l1_like_objects

pytestmark = pytest.mark.slow  # trains, calibrates and builds with hls4ml


def write_l1_cache(path: Path, n: int, seed: int) -> Path:
    batch = EventBatch(
        {
            "run": np.ones(n, "<u4"),
            "lumi": np.ones(n, "<u4"),
            "event": np.arange(n, dtype="<u8"),
            "l1_objects": l1_like_objects(n, seed),
        },
        truth={"process_id": np.full(n, 11, "<i2"), "is_signal": np.zeros(n, "u1")},
    )
    with CacheWriter(path) as writer:
        writer.append(batch)
    return path


@pytest.fixture(scope="module")
def cache_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_l1_cache(tmp_path_factory.mktemp("l1cli") / "bkg.h5", 3000, seed=21)


def run(*args: str) -> str:
    result = CliRunner().invoke(main, ["firmware", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_train_writes_model_card_weights_and_loss_curve(cache_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "model"
    text = run(
        "train",
        "--data",
        str(cache_file),
        "--out",
        str(out),
        "--epochs",
        "2",
        "--max-events",
        "1500",
        "--weight-bits",
        "6",
        "--weight-integer",
        "2",
    )
    assert "epoch   2/2" in text
    model = load_model(out)
    card = model.card
    assert card["data"]["n_events"] == 1500 and card["training"]["epochs"] == 2
    assert len(card["training"]["history"]["loss"]) == 2
    assert card["quantization"]["enc_dense1"]["weight_bits"] == 6
    assert card["quantization"]["z_mean"]["weight_integer"] == 2
    # Standardisation fitted on exactly the training events, recorded in the card.
    objects, _ = read_l1_objects(cache_file, max_events=1500)
    assert model.input_scaling == InputScaling.fit(objects, min_std=0.01)
    assert card["input_scaling"]["method"].startswith("standardised on background")
    assert "trigfarm firmware train" in card["reproduce"]
    assert (out / "loss.png").stat().st_size > 1000
    assert model.weights["enc_dense1/kernel"].shape == (57, 32)
    assert model.decode(np.zeros((2, 3))).shape == (2, 57)


def test_calibrate_records_threshold_with_uncertainty(
    cache_file: Path,
    tmp_path: Path,
    session_emulator: Emulator,
    default_model: L1Model,
    emulator_cache: Path,
) -> None:
    model_dir = tmp_path / "m"
    shutil.copytree(default_model.path, model_dir)
    text = run(
        "calibrate",
        "--model",
        str(model_dir),
        "--data",
        str(cache_file),
        "--rate-hz",
        "4e5",
        "--input-rate-hz",
        "4e7",
        "--cache-dir",
        str(emulator_cache),
    )
    objects, _ = read_l1_objects(cache_file)
    mu, log_var = session_emulator.encode(load_model(model_dir).inputs(objects))
    want = calibrate(r_z(mu, log_var), rate_hz=4e5, input_rate_hz=4e7)
    recorded = json.loads((model_dir / "model_card.json").read_text())["calibration"]
    assert recorded["threshold"] == pytest.approx(want.threshold)
    assert recorded["threshold_low"] < recorded["threshold"] < recorded["threshold_high"]
    assert recorded["n_above"] == 30 and recorded["reliable"]
    assert load_model(model_dir).threshold == pytest.approx(want.threshold)
    assert "threshold" in text and "68% interval" in text
    # 1 kHz of 40 MHz on 3000 events cannot be measured: said so, not hidden.
    text = run(
        "calibrate",
        "--model",
        str(model_dir),
        "--data",
        str(cache_file),
        "--no-write",
        "--cache-dir",
        str(emulator_cache),
    )
    assert "NOT RELIABLE" in text and "extrapolated" in text


def test_deploy_writes_project_passes_csim_and_build_names_missing_vivado(
    cache_file: Path, tmp_path: Path, emulator_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "pynq"
    text = run(
        "deploy",
        "--board",
        "pynq-z2",
        "--out",
        str(out),
        "--data",
        str(cache_file),
        "--test-events",
        "40",
        "--cache-dir",
        str(emulator_cache),
    )
    assert "outputs identical to the emulator" in text
    hls = out / "hls4ml_prj"
    for name in ("build_prj.tcl", "design.tcl", "firmware/l1vae.cpp", "firmware/l1vae_axi.cpp"):
        assert (hls / name).is_file(), name
    inputs = np.loadtxt(hls / "tb_data" / "tb_input_features.dat", ndmin=2)
    outputs = np.loadtxt(hls / "tb_data" / "tb_output_predictions.dat", ndmin=2)
    assert inputs.shape == (40, 57) and outputs.shape == (40, 6)
    assert (out / "driver" / "trigfarm_l1_driver.py").is_file()
    readme = (out / "README.md").read_text()
    assert (
        "vivado_hls -f build_prj.tcl" in readme
        and "vivado -mode batch -source design.tcl" in readme
    )
    assert json.loads((out / "deploy.json").read_text())["board"] == "pynq-z2"
    # --build without Vivado: a clear error naming the tool.
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", f"{empty}:{Path(shutil.which('g++') or '/usr/bin/g++').parent}")
    if shutil.which("vivado") is not None:
        pytest.skip("vivado is installed here")
    result = CliRunner().invoke(
        main,
        [
            "firmware",
            "deploy",
            "--board",
            "alveo-u50",
            "--out",
            str(tmp_path / "u50"),
            "--data",
            str(cache_file),
            "--test-events",
            "5",
            "--no-csim",
            "--build",
            "--cache-dir",
            str(emulator_cache),
        ],
    )
    assert result.exit_code != 0
    assert "'vivado' is not on PATH" in result.output
    assert (tmp_path / "u50" / "README.md").is_file()
    assert "v++ -t hw --platform" in (tmp_path / "u50" / "README.md").read_text()
