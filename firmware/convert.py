"""hls4ml conversion of the VAE encoder with explicit per-layer precision (needs TensorFlow).

The encoder becomes one HLS function (io_parallel, latency strategy, reuse 1) with one
input, the 57 rounded L1 inputs, and one output, concat(mu, log sigma^2). Every layer's
types come from ``QuantizationConfig``; none is left "auto".
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from firmware.config import ENCODER_LAYERS, QuantizationConfig
from firmware.model import L1Model

PROJECT = "l1vae"
DEFAULT_PART = "xcvu13p-flga2577-2-e"
CLOCK_PERIOD_NS = 5.0

#: Boards of hls4ml's VivadoAccelerator backend that ``trigfarm firmware deploy`` offers.
BOARDS = ("pynq-z2", "zcu102", "alveo-u50")


def hls_config(encoder: Any, quant: QuantizationConfig) -> dict[str, Any]:
    """The hls4ml config of ``encoder`` with every layer's precision set explicitly."""
    import hls4ml

    from firmware.vae import INPUT_NAME, OUTPUT_NAME

    with quantizer_serialisation_warnings_ignored():
        config: dict[str, Any] = hls4ml.utils.config_from_keras_model(
            encoder, granularity="name", backend="Vivado", default_precision=quant.output
        )
    config["Model"].update({"Strategy": "Latency", "ReuseFactor": 1})
    layers = config["LayerName"]
    layers[INPUT_NAME]["Precision"] = {"result": quant.input_type}
    for name in ENCODER_LAYERS:
        q = quant.layer(name)
        weight = str(q.weight_type)
        layers[name]["Precision"] = {
            "weight": weight,
            "bias": weight,
            "accum": q.accum,
            "result": q.result,
        }
        if f"{name}_linear" in layers:
            layers[f"{name}_linear"]["Precision"] = {"result": q.result}
        activation = q.activation_type
        if activation is not None:
            layers[f"{name}_relu"]["Precision"] = {"result": str(activation)}
    layers[OUTPUT_NAME]["Precision"] = {"result": quant.output}
    unset = [
        f"{layer}.{key}"
        for layer, spec in layers.items()
        for key, value in spec.get("Precision", {}).items()
        if value == "auto"
    ]
    if unset:
        msg = f"precision left 'auto' for {unset}"
        raise RuntimeError(msg)
    return config


def convert(
    model: L1Model,
    output_dir: str | Path,
    *,
    board: str | None = None,
    part: str = DEFAULT_PART,
) -> Any:
    """Convert the encoder of ``model`` into an hls4ml project in ``output_dir`` (not written).

    Without ``board`` the plain Vivado backend is used (emulation, HLS IP); with a board
    the VivadoAccelerator backend wraps it in an AXI-stream design for that board.
    """
    from firmware.vae import encoder_from_model

    encoder = encoder_from_model(model)
    config = hls_config(encoder, model.quantization)
    with quantizer_serialisation_warnings_ignored():
        return _convert(encoder, config, output_dir, board=board, part=part)


@contextmanager
def quantizer_serialisation_warnings_ignored() -> Iterator[None]:
    """hls4ml serialises the model, and Keras warns that QKeras quantizers are not
    ``Constraint``s; hls4ml reads them correctly, so this one warning is noise."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"The `keras\.constraints\.serialize\(\)` API", category=UserWarning
        )
        yield


def _convert(
    encoder: Any, config: dict[str, Any], output_dir: str | Path, *, board: str | None, part: str
) -> Any:
    import hls4ml

    common: dict[str, Any] = {
        "hls_config": config,
        "output_dir": str(output_dir),
        "project_name": PROJECT,
        "io_type": "io_parallel",
        "clock_period": CLOCK_PERIOD_NS,
    }
    if board is None:
        # Weights compiled in from headers, not read from text files at run time: the
        # emulator cache moves the project after building it.
        return hls4ml.converters.convert_from_keras_model(
            encoder, backend="Vivado", part=part, write_weights_txt=False, **common
        )
    if board not in BOARDS:
        msg = f"unknown board {board!r}; choose one of {BOARDS}"
        raise ValueError(msg)
    return hls4ml.converters.convert_from_keras_model(
        encoder,
        backend="VivadoAccelerator",
        board=board,
        interface="axi_stream",
        driver="python",
        input_type="float",
        output_type="float",
        **common,
    )
