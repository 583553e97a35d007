"""A trained L1 model directory: the model card (JSON) and the weights (``.npz``), numpy only.

Layout of a model directory::

    model_card.json   architecture, quantization, input scaling (per-input mean and std),
                      data, training, metrics, calibration (threshold), reproduce command,
                      package versions
    weights.npz       float weights by "<layer>/kernel" and "<layer>/bias" (the encoder's
                      are the unquantized QKeras weights; the quantizers apply at use)
    loss.png          the training and validation loss curves

Loading needs no TensorFlow: the node reads the card and hands the weights to the
emulator cache; ``decode`` runs the float decoder in numpy for the reconstruction score.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from firmware.config import QuantizationConfig, VAEConfig
from firmware.inputs import InputScaling
from stream.durable import write_durably

CARD_NAME = "model_card.json"
WEIGHTS_NAME = "weights.npz"
LOSS_PNG = "loss.png"
CARD_FORMAT = "trigfarm-l1-vae/1"
DECODER_LAYERS = ("dec_dense1", "dec_dense2", "dec_out")

#: The committed default model shipped in the package.
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model"


@dataclass(frozen=True, slots=True)
class L1Model:
    """A loaded model directory: its card, configs and weights."""

    path: Path
    card: dict[str, Any]
    weights: dict[str, np.ndarray]

    @property
    def vae(self) -> VAEConfig:
        return VAEConfig(**self.card["architecture"])

    @property
    def quantization(self) -> QuantizationConfig:
        return QuantizationConfig(**self.card["quantization"])

    @property
    def input_scaling(self) -> InputScaling:
        """The card's input scaling (fixed pT / 32 GeV for cards without fitted statistics)."""
        return InputScaling.from_card(self.card.get("input_scaling"))

    def inputs(self, l1_objects: np.ndarray) -> np.ndarray:
        """(N, 19, 3) L1 objects -> (N, 57) scaled float32 inputs of this model."""
        return self.input_scaling.apply(l1_objects)

    @property
    def threshold(self) -> float | None:
        """The calibrated R_z threshold recorded in the card, if any."""
        calibration = self.card.get("calibration")
        return None if not calibration else float(calibration["threshold"])

    def digest(self) -> str:
        """SHA-256 over the weights and the quantization config: what the firmware depends on."""
        h = hashlib.sha256()
        for name in sorted(self.weights):
            array = np.ascontiguousarray(self.weights[name], np.float32)
            h.update(name.encode())
            h.update(str(array.shape).encode())
            h.update(array.tobytes())
        h.update(json.dumps(self.card["quantization"], sort_keys=True).encode())
        h.update(json.dumps(self.card["architecture"], sort_keys=True).encode())
        return h.hexdigest()

    def decode(self, z: np.ndarray) -> np.ndarray:
        """The float decoder on latent points (N, latent) -> (N, 57) reconstructed inputs."""
        x = np.asarray(z, np.float32)
        for i, name in enumerate(DECODER_LAYERS):
            x = x @ self.weights[f"{name}/kernel"] + self.weights[f"{name}/bias"]
            if i < len(DECODER_LAYERS) - 1:
                x = np.maximum(x, 0.0)
        return x


def load_model(path: str | Path | None = None) -> L1Model:
    """Load a model directory (default: the committed default model).

    Raises:
        FileNotFoundError: the directory lacks the card or the weights (names the path).
        ValueError: the card is not an L1 VAE card.
    """
    root = Path(path) if path is not None else DEFAULT_MODEL_DIR
    card_path, weights_path = root / CARD_NAME, root / WEIGHTS_NAME
    for needed in (card_path, weights_path):
        if not needed.is_file():
            msg = f"{needed} is missing: {root} is not an L1 model directory"
            raise FileNotFoundError(msg)
    card = json.loads(card_path.read_text())
    if card.get("format") != CARD_FORMAT:
        msg = f"{card_path} has format {card.get('format')!r}, expected {CARD_FORMAT!r}"
        raise ValueError(msg)
    with np.load(weights_path) as data:
        weights = {k: data[k] for k in data.files}
    return L1Model(root, card, weights)


def write_card(path: str | Path, card: dict[str, Any]) -> Path:
    """Write (atomically) the model card of the directory ``path``."""
    target = Path(path) / CARD_NAME
    write_durably(target, (json.dumps(card, indent=2, default=_plain) + "\n").encode())
    return target


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    msg = f"cannot write {type(value).__name__} to a model card"
    raise TypeError(msg)
