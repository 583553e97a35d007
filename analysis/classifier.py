"""The weakly supervised classifier: an ensemble of MLPs with three hidden layers of 64.

Each member is trained with a different seed on a different 80/20 split, keeps the
weights of its best validation epoch, and the ensemble score is the mean of the members'
probabilities (as in CATHODE's ensembling of the best epochs).
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
import pydantic
import torch
from pydantic import ConfigDict, Field

_Count = Annotated[int, Field(ge=1)]


@pydantic.dataclasses.dataclass(frozen=True, slots=True, config=ConfigDict(extra="forbid"))
class ClassifierConfig:
    """Ensemble size and training settings."""

    n_models: _Count = 3
    hidden: _Count = 64
    n_layers: _Count = 3
    epochs: _Count = 20
    batch_size: _Count = 256
    learning_rate: float = 1e-3
    seed: int = 0


def _mlp(n_in: int, config: ClassifierConfig) -> torch.nn.Sequential:
    layers: list[torch.nn.Module] = []
    width = n_in
    for _ in range(config.n_layers):
        layers += [torch.nn.Linear(width, config.hidden), torch.nn.ReLU()]
        width = config.hidden
    layers.append(torch.nn.Linear(width, 1))
    return torch.nn.Sequential(*layers)


class Ensemble:
    """Trained members plus the standardisation of their inputs."""

    def __init__(self, members: list[torch.nn.Sequential], mean: np.ndarray, std: np.ndarray):
        self.members = members
        self.mean = mean
        self.std = std

    @torch.no_grad()
    def predict(self, x: np.ndarray) -> np.ndarray:
        """Mean member probability of class 1 for each row."""
        z = torch.from_numpy(((np.asarray(x, np.float64) - self.mean) / self.std).astype("f4"))
        probs = [torch.sigmoid(m(z)).squeeze(1).numpy() for m in self.members]
        return np.mean(probs, axis=0).astype(np.float64)


def train_ensemble(x: np.ndarray, y: np.ndarray, config: ClassifierConfig) -> Ensemble:
    """Train the ensemble to tell y = 1 from y = 0 (classes balanced by weights)."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float32)
    finite = np.isfinite(x).all(axis=1)
    x, y = x[finite], y[finite]
    if len(np.unique(y)) != 2:
        raise ValueError("the classifier needs examples of both classes")
    mean, std = x.mean(axis=0), np.maximum(x.std(axis=0), 1e-9)
    z = ((x - mean) / std).astype("f4")
    members = []
    for k in range(config.n_models):
        rng = np.random.default_rng([config.seed, k])
        torch.manual_seed(config.seed * 1000 + k)
        order = rng.permutation(len(z))
        n_val = max(1, len(z) // 5)
        val, train = order[:n_val], order[n_val:]
        pos = y[train].mean()
        weight = np.where(y == 1, 0.5 / pos, 0.5 / (1 - pos)).astype("f4")
        model = _mlp(z.shape[1], config)
        optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
        xt, yt, wt = (torch.from_numpy(a[train]) for a in (z, y, weight))
        xv, yv, wv = (torch.from_numpy(a[val]) for a in (z, y, weight))
        best, best_state = np.inf, None
        for _ in range(config.epochs):
            model.train()
            perm = torch.from_numpy(rng.permutation(len(train)))
            for start in range(0, len(train), config.batch_size):
                idx = perm[start : start + config.batch_size]
                logits = model(xt[idx]).squeeze(1)
                loss = torch.nn.functional.binary_cross_entropy_with_logits(
                    logits, yt[idx], weight=wt[idx]
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            model.eval()
            with torch.no_grad():
                val_loss = float(
                    torch.nn.functional.binary_cross_entropy_with_logits(
                        model(xv).squeeze(1), yv, weight=wv
                    )
                )
            if val_loss < best:
                best = val_loss
                best_state = {k: v.clone() for k, v in model.state_dict().items()}
        assert best_state is not None
        model.load_state_dict(best_state)
        model.eval()
        members.append(model)
    return Ensemble(members, mean, std)
