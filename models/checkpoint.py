"""Tagger checkpoints: a directory holding ``model.pt`` (tensors only) and ``model.json``.

``model.pt`` is ``torch.save`` of a plain dict of state dicts ({"model": ..., "mahalanobis":
...}); it is read back with ``torch.load(weights_only=True)``, which refuses anything but
tensors and plain containers, so loading a checkpoint never runs pickled code. The JSON
model card holds everything else: the architecture (``ParticleNetConfig``), the class
names, the anomaly scores available, how the model was trained (data, seed, command) and
its validation figures.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.anomaly import Mahalanobis, anomaly_score
from models.jet_inputs import JetInputs
from models.particlenet import ParticleNet, ParticleNetConfig

WEIGHTS_FILE = "model.pt"
CARD_FILE = "model.json"
CARD_FORMAT = "trigfarm-tagger"
CARD_VERSION = 1

#: The small committed default model (``models/default/README.md`` says how to remake it).
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "default"
#: The committed taggers by name: the default farm's (QCD at pT-hat > 400 GeV) and the
#: one for fat jets of 1-2 TeV (each folder's README.md says how it was made).
COMMITTED_CHECKPOINTS = {
    "default": DEFAULT_CHECKPOINT,
    "highpt": Path(__file__).resolve().parent / "highpt",
}


@dataclass(frozen=True, slots=True)
class Tagger:
    """A loaded tagger: the network (eval mode), its Mahalanobis scorer and its card."""

    model: ParticleNet
    mahalanobis: Mahalanobis
    classes: tuple[str, ...]
    card: Mapping[str, Any] = field(default_factory=dict)

    def predict(
        self, inputs: JetInputs, *, score: str | None = None, batch_size: int = 512
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Class probabilities (N, C) and, if ``score`` names one, the anomaly score (N,)."""
        logits, embedding = evaluate(self.model, inputs, batch_size)
        logits_t = torch.from_numpy(logits)
        probabilities = torch.softmax(logits_t, dim=-1).numpy()
        if score is None:
            return probabilities, None
        values = anomaly_score(score, logits_t, torch.from_numpy(embedding), self.mahalanobis)
        return probabilities, values.numpy()


def evaluate(
    model: ParticleNet, inputs: JetInputs, batch_size: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """Logits and penultimate features for every jet (eval mode, multiplicity-sorted)."""
    was_training = model.training
    model.eval()
    order = np.argsort(inputs.n_real, kind="stable")
    logits = np.zeros((len(inputs), model.config.n_classes), np.float32)
    embedding = np.zeros((len(inputs), model.config.fc_channels), np.float32)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            out, emb = model.forward_with_embedding(*inputs.select(rows).trimmed().to_torch())
            logits[rows], embedding[rows] = out.numpy(), emb.numpy()
    model.train(was_training)
    return logits, embedding


def save_checkpoint(
    directory: str | Path,
    model: ParticleNet,
    mahalanobis: Mahalanobis,
    classes: Sequence[str],
    card: Mapping[str, Any],
) -> Path:
    """Write ``model.pt`` and ``model.json`` into ``directory`` (created if needed)."""
    if len(classes) != model.config.n_classes:
        msg = f"{len(classes)} class names for a model with {model.config.n_classes} classes"
        raise ValueError(msg)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "mahalanobis": {k: v.detach().cpu() for k, v in mahalanobis.state_dict().items()},
    }
    torch.save(state, out / WEIGHTS_FILE)
    body = {
        "format": CARD_FORMAT,
        "version": CARD_VERSION,
        **card,
        "architecture": model.config.to_dict(),
        "classes": list(classes),
        "mahalanobis_fitted": mahalanobis.fitted,
    }
    (out / CARD_FILE).write_text(json.dumps(body, indent=2, default=float) + "\n")
    return out


def load_checkpoint(directory: str | Path = DEFAULT_CHECKPOINT) -> Tagger:
    """Read a checkpoint directory (weights with ``weights_only=True``), or a committed
    one by its name in ``COMMITTED_CHECKPOINTS`` when no such directory exists.

    Raises:
        FileNotFoundError: a missing ``model.pt`` or ``model.json``.
        ValueError: a card of another format, or weights that do not fit the card.
    """
    path = Path(directory)
    if not path.is_dir() and str(directory) in COMMITTED_CHECKPOINTS:
        path = COMMITTED_CHECKPOINTS[str(directory)]
    card_path, weights_path = path / CARD_FILE, path / WEIGHTS_FILE
    for needed in (card_path, weights_path):
        if not needed.is_file():
            msg = f"checkpoint {path} lacks {needed.name}"
            raise FileNotFoundError(msg)
    try:
        card = json.loads(card_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        msg = f"{card_path} is not a readable model card ({exc})"
        raise ValueError(msg) from None
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
        msg = f"{card_path} is not a {CARD_FORMAT} card (format={card.get('format')!r})"
        raise ValueError(msg)
    config = ParticleNetConfig(**card["architecture"])
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # weights_only refused it: a pickle of arbitrary objects, never loaded here
        msg = f"{weights_path} holds objects other than tensors; refused (not a trigfarm model)"
        raise ValueError(msg) from None
    except (RuntimeError, EOFError, OSError) as exc:
        reason = str(exc).split(". ")[0]
        msg = f"{weights_path} is not a readable torch file (truncated or corrupted: {reason})"
        raise ValueError(msg) from None
    if not isinstance(state, dict):
        msg = f"{weights_path} holds a {type(state).__name__}, not a trigfarm state dict"
        raise ValueError(msg)
    model = ParticleNet(config)
    mahalanobis = Mahalanobis(config.n_classes, config.fc_channels)
    try:
        model.load_state_dict(state["model"])
        mahalanobis.load_state_dict(state["mahalanobis"])
    except (KeyError, RuntimeError) as exc:
        msg = f"weights in {weights_path} do not fit the card's architecture: {exc}"
        raise ValueError(msg) from exc
    model.eval()
    return Tagger(model, mahalanobis, tuple(card["classes"]), card)
