"""Both emulator kernels against hls4ml's own predict() and QKeras: bit for bit; the cache."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from firmware import emulate
from firmware.config import ENCODER_LAYERS
from firmware.emulate import Emulator, build_project, cache_key, load_emulator
from firmware.inputs import round_to_fixed
from firmware.model import L1Model
from tests.firmware.conftest import l1_like_objects

pytestmark = pytest.mark.slow  # hls4ml compiles the model

N_EVENTS = 10_000  # the bit-exactness check: 10k events


@pytest.fixture(scope="module")
def hls_model(default_model: L1Model, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """hls4ml's own compiled model (its per-event predict() is the reference)."""
    return build_project(default_model, tmp_path_factory.mktemp("hls") / "prj")


@pytest.fixture(scope="module")
def inputs(default_model: L1Model) -> np.ndarray:
    """The default model's own (standardised) inputs, saturating values included."""
    return default_model.inputs(l1_like_objects(N_EVENTS, seed=11))


@pytest.mark.parametrize("kernel", ["hls", "integer"])
def test_both_kernels_are_bit_identical_to_hls4ml_predict(
    session_emulator: Emulator,
    hls_model: Any,
    inputs: np.ndarray,
    kernel: str,
) -> None:
    emulator = Emulator(
        session_emulator.library, input_type=session_emulator.input_type, latent=3, kernel=kernel
    )
    rounded = emulator.round_inputs(inputs)
    ours = emulator.predict(rounded)
    theirs = np.asarray(hls_model.predict(rounded), np.float32).reshape(ours.shape)
    assert ours.shape == (N_EVENTS, 6)
    np.testing.assert_array_equal(ours, theirs)
    assert np.unique(ours).size > 100  # a real model, not constants
    # Unrounded inputs: the kernel's own input conversion equals the firmware's.
    np.testing.assert_array_equal(emulator.predict(inputs), ours)
    # Batch boundaries do not matter.
    parts = np.concatenate([emulator.predict(rounded[i : i + 7]) for i in range(0, 700, 7)])
    np.testing.assert_array_equal(parts, ours[:700])
    # Threads split the batch, not the bits.
    threaded = Emulator(
        emulator.library, input_type=emulator.input_type, latent=3, threads=2, kernel=kernel
    )
    np.testing.assert_array_equal(threaded.predict(rounded), ours)
    assert emulator.predict(rounded[:0]).shape == (0, 6)


def test_unknown_kernel_is_refused(session_emulator: Emulator) -> None:
    with pytest.raises(ValueError, match="unknown emulator kernel"):
        Emulator(
            session_emulator.library, input_type=session_emulator.input_type, latent=3, kernel="x"
        )


def test_host_rounding_equals_the_firmware_input_conversion(
    session_emulator: Emulator,
    hls_model: Any,
    inputs: np.ndarray,
) -> None:
    """hls4ml's C++ converts unrounded floats to the input ap_fixed itself; our host
    rounding must give the same outputs (ties, saturation of the 3-6 TeV jets included)."""
    fixed = session_emulator.input_type
    raw = inputs.copy()
    raw[:50] += np.float32(fixed.lsb / 2)  # put some values exactly on ties
    from_raw = np.asarray(hls_model.predict(raw), np.float32).reshape(len(raw), -1)
    from_rounded = np.asarray(hls_model.predict(round_to_fixed(raw, fixed)), np.float32).reshape(
        len(raw), -1
    )
    np.testing.assert_array_equal(from_raw, from_rounded)
    assert (np.abs(raw) > fixed.max).any()  # saturation was exercised


def test_emulator_equals_qkeras_exactly(
    session_emulator: Emulator, default_model: L1Model, inputs: np.ndarray
) -> None:
    from firmware.vae import encoder_from_model

    rounded = session_emulator.round_inputs(inputs)
    reference = encoder_from_model(default_model).predict(rounded, verbose=0, batch_size=1024)
    np.testing.assert_array_equal(session_emulator.predict(rounded), reference)


def test_every_layer_has_explicit_precision(default_model: L1Model) -> None:
    from firmware.convert import hls_config
    from firmware.vae import encoder_from_model

    quant = default_model.quantization
    config = hls_config(encoder_from_model(default_model), quant)
    layers = config["LayerName"]
    assert layers["l1_inputs"]["Precision"]["result"] == quant.input_type
    for name in ENCODER_LAYERS:
        q = quant.layer(name)
        assert layers[name]["Precision"]["weight"] == "ap_fixed<8,4>"
        assert layers[name]["Precision"]["accum"] == q.accum
    assert layers["mu_logvar"]["Precision"]["result"] == quant.output


def test_cache_hit_needs_no_rebuild_and_key_follows_the_model(
    session_emulator: Emulator,
    default_model: L1Model,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key = cache_key(default_model)
    entry = tmp_path / key
    entry.mkdir()
    shutil.copy(session_emulator.library, entry / emulate.LIBRARY_NAME)
    shutil.copytree(session_emulator.library.parent / emulate.HLS_DIR, entry / emulate.HLS_DIR)

    def no_build(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cache was missed")

    monkeypatch.setattr(emulate, "build_project", no_build)
    hit = load_emulator(default_model, cache_dir=tmp_path)
    assert hit.library == entry / emulate.LIBRARY_NAME
    assert hit.kernel == "integer"
    # Other weights -> another key (and here: a rebuild, which the patch refuses).
    weights = dict(default_model.weights)
    weights["z_mean/bias"] = weights["z_mean/bias"] + 1.0
    changed = L1Model(default_model.path, default_model.card, weights)
    assert cache_key(changed) != key
    with pytest.raises(AssertionError, match="cache was missed"):
        load_emulator(changed, cache_dir=tmp_path)
