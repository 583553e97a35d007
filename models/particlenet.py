"""ParticleNet: a jet tagger on particle clouds, EdgeConv blocks over a dynamic kNN graph.

A jet is a set of up to ``n_particles`` particles, zero-padded. Each EdgeConv block finds
the k nearest neighbours of every particle (in (Δη, Δφ) for the first block, in the
previous block's features after), builds edge features (x_i, x_j - x_i), runs a shared
MLP on every edge and averages over the neighbours, with a shortcut. Global average
pooling, one fully connected layer with dropout and a linear layer give the class logits.

Masking: padding never becomes a neighbour. A particle's neighbours are chosen among the
real particles of its jet only; when a jet has k or fewer real particles, every other
real particle is a neighbour and the empty slots are left out of the average. Padded
rows are zeroed after every block and left out of the pooling, so the output does not
depend on how much padding a jet carries (up to float rounding).

Implementation notes (ours): tensors are channel-last (N, P, C) so every per-edge layer
is one matrix product; the first edge layer is split as W (x_i, x_j - x_i) =
(W_a - W_b) x_i + W_b x_j, so it runs per particle rather than per edge (k times less
work, the same function); inputs are standardised with per-feature statistics of real
particles fitted on training data (``fit_input_scaling``) and kept in the state dict.

References:
    H. Qu and L. Gouskos, "ParticleNet: Jet Tagging via Particle Clouds",
    Phys. Rev. D 101, 056019 (2020), arXiv:1902.08570.

Example:
    >>> import torch
    >>> net = ParticleNet(PARTICLENET_LITE.with_classes(3)).eval()
    >>> points, features = torch.randn(4, 20, 2), torch.randn(4, 20, 7)
    >>> mask = torch.arange(20).expand(4, 20) < torch.tensor([[5], [20], [1], [12]])
    >>> net(points, features, mask).shape
    torch.Size([4, 3])
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Annotated, Any

import pydantic
import torch
from pydantic import ConfigDict, Field
from torch import Tensor, nn

N_INPUT_FEATURES = 7
N_COORDINATES = 2


_Width = Annotated[int, Field(ge=1)]
_Block = Annotated[tuple[_Width, ...], Field(min_length=1)]


@pydantic.dataclasses.dataclass(frozen=True, slots=True, config=ConfigDict(extra="forbid"))
class ParticleNetConfig:
    """The architecture of one ParticleNet variant.

    Attributes:
        name: variant name recorded in model cards.
        n_classes: output classes.
        n_features: per-particle input features (7 standard ones, ``models.jet_inputs``).
        n_coordinates: coordinates of the first kNN (Δη, Δφ).
        n_particles: particles per jet the inputs are padded or cut to.
        k: neighbours per particle in every EdgeConv block.
        conv_channels: per block, the widths of its three edge-MLP layers.
        fc_channels: width of the fully connected layer (the penultimate features).
        dropout: dropout after the fully connected layer.
    """

    name: str = "particlenet"
    n_classes: Annotated[int, Field(ge=2)] = 2
    n_features: _Width = N_INPUT_FEATURES
    n_coordinates: _Width = N_COORDINATES
    n_particles: _Width = 128
    k: _Width = 16
    conv_channels: Annotated[tuple[_Block, ...], Field(min_length=1)] = (
        (64, 64, 64),
        (128, 128, 128),
        (256, 256, 256),
    )
    fc_channels: _Width = 256
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.1

    def with_classes(self, n_classes: int, **changes: Any) -> ParticleNetConfig:
        """The same variant with another number of classes (and other fields changed)."""
        return dataclasses.replace(self, n_classes=n_classes, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for a model card (``ParticleNetConfig(**d)`` rebuilds it)."""
        body = dataclasses.asdict(self)
        body["conv_channels"] = [list(c) for c in self.conv_channels]
        return body


#: The paper's ParticleNet: k=16, EdgeConv (64,64,64), (128,128,128), (256,256,256), FC 256.
PARTICLENET = ParticleNetConfig()
#: The paper's ParticleNet-Lite: k=7, EdgeConv (32,32,32), (64,64,64), FC 128.
PARTICLENET_LITE = ParticleNetConfig(
    name="particlenet-lite", k=7, conv_channels=((32, 32, 32), (64, 64, 64)), fc_channels=128
)
VARIANTS: dict[str, ParticleNetConfig] = {c.name: c for c in (PARTICLENET, PARTICLENET_LITE)}


def _distances(points: Tensor, mask: Tensor) -> Tensor:
    """(N, P, P) squared distances; +inf towards padding and towards the particle itself."""
    n_points = points.shape[1]
    inner = points @ points.transpose(1, 2)
    square = (points * points).sum(-1)
    distance = square.unsqueeze(2) - 2 * inner + square.unsqueeze(1)
    forbidden = ~mask.unsqueeze(1) | torch.eye(n_points, dtype=torch.bool, device=points.device)
    return distance.masked_fill(forbidden, float("inf"))


def knn(points: Tensor, mask: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k nearest real neighbours of every particle, self excluded.

    Arguments:
        points: (N, P, C) coordinates.
        mask: (N, P) bool, True for real particles.
        k: neighbours wanted.

    Returns:
        ``(index, valid)``, both (N, P, min(k, P)): neighbour indices and whether each slot
        holds a real neighbour (False where the jet has too few real particles, and on
        padded rows' slots pointing at padding).
    """
    distance = _distances(points, mask)
    nearest, index = distance.topk(min(k, points.shape[1]), dim=-1, largest=False, sorted=False)
    return index, torch.isfinite(nearest)


def _fold(norm: nn.BatchNorm1d) -> tuple[Tensor, Tensor]:
    """Eval-mode batch norm as y = scale * x + shift."""
    assert norm.running_var is not None and norm.running_mean is not None
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    return scale, norm.bias - norm.running_mean * scale


class _Affine(nn.Module):
    """Linear + BatchNorm on (rows, C); in eval mode the norm is folded into the weights."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(n_in, n_out, bias=False)
        self.norm = nn.BatchNorm1d(n_out)

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            return self.norm(self.linear(x))
        scale, shift = _fold(self.norm)
        return nn.functional.linear(x, self.linear.weight * scale.unsqueeze(1), shift)


class EdgeConv(nn.Module):
    """One EdgeConv block: kNN graph, a shared edge MLP, mean over real neighbours, shortcut.

    Only real particles' edges are computed (packed rows), so padding costs nothing past
    the kNN and batch-norm statistics see real edges only. The first layer's input is
    (x_i, x_j - x_i); it is computed per particle, then added per edge (module notes).
    Input and output are channel-last, padded rows zero.
    """

    def __init__(self, n_in: int, channels: tuple[int, ...], k: int) -> None:
        super().__init__()
        self.k = k
        first = channels[0]
        self.center = nn.Linear(n_in, first, bias=False)  # (W_a - W_b) x_i
        self.neighbour = nn.Linear(n_in, first, bias=False)  # W_b x_j
        self.first_norm = nn.BatchNorm1d(first)
        self.layers = nn.ModuleList(_Affine(a, b) for a, b in itertools.pairwise(channels))
        self.shortcut = _Affine(n_in, channels[-1])

    def forward(self, points: Tensor, x: Tensor, mask: Tensor) -> Tensor:
        """points (N, P, D) for the kNN, x (N, P, C) features, mask (N, P) -> (N, P, C')."""
        n, p, c = x.shape
        rows = mask.reshape(-1).nonzero().squeeze(1)  # real particles, flat
        distance = _distances(points, mask).view(n * p, p)[rows]  # (R, P), real rows only
        nearest, index = distance.topk(min(self.k, p), dim=-1, largest=False, sorted=False)
        neighbours = index + (rows // p * p).unsqueeze(1)  # (R, K) flat indices
        weight = torch.isfinite(nearest).unsqueeze(-1).to(x.dtype)  # (R, K, 1)
        flat = x.reshape(n * p, c)
        real = flat[rows]
        if self.training:
            edges = self.center(real).unsqueeze(1) + self.neighbour(flat)[neighbours]
            r, kk, width = edges.shape
            edges = torch.relu(self.first_norm(edges.view(-1, width)))
        else:
            scale, shift = _fold(self.first_norm)
            centre = nn.functional.linear(real, self.center.weight * scale.unsqueeze(1), shift)
            other = nn.functional.linear(flat, self.neighbour.weight * scale.unsqueeze(1))
            edges = centre.unsqueeze(1) + other[neighbours]
            r, kk, width = edges.shape
            edges = torch.relu_(edges.view(-1, width))
        for layer in self.layers:
            edges = torch.relu(layer(edges))
        edges = edges.view(r, kk, -1)
        pooled = (edges * weight).sum(1) / weight.sum(1).clamp(min=1.0)
        out_real = torch.relu(pooled + self.shortcut(real))
        out = x.new_zeros(n * p, out_real.shape[-1])
        out[rows] = out_real
        return out.view(n, p, -1)


class ParticleNet(nn.Module):
    """ParticleNet on channel-last inputs; ``forward`` returns class logits.

    Inputs: ``points`` (N, P, 2) (Δη, Δφ), ``features`` (N, P, 7), ``mask`` (N, P) bool.
    P may be anything up to ``config.n_particles``; cutting a batch to its longest jet
    (``models.jet_inputs.JetInputs.trimmed``) saves work and does not change the output.
    """

    feature_mean: Tensor
    feature_std: Tensor

    def __init__(self, config: ParticleNetConfig = PARTICLENET) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("feature_mean", torch.zeros(config.n_features))
        self.register_buffer("feature_std", torch.ones(config.n_features))
        blocks = []
        n_in = config.n_features
        for channels in config.conv_channels:
            blocks.append(EdgeConv(n_in, channels, config.k))
            n_in = channels[-1]
        self.blocks = nn.ModuleList(blocks)
        self.fc = nn.Sequential(
            nn.Linear(n_in, config.fc_channels), nn.ReLU(), nn.Dropout(config.dropout)
        )
        self.head = nn.Linear(config.fc_channels, config.n_classes)

    @torch.no_grad()
    def fit_input_scaling(self, features: Tensor, mask: Tensor) -> None:
        """Set the input standardisation from real particles of training jets."""
        real = features[mask]
        if real.shape[0] < 2:
            msg = f"need at least 2 real particles to fit input scaling, got {real.shape[0]}"
            raise ValueError(msg)
        self.feature_mean.copy_(real.mean(0))
        self.feature_std.copy_(real.std(0).clamp(min=1e-3))

    def embed(self, points: Tensor, features: Tensor, mask: Tensor) -> Tensor:
        """The penultimate features (N, fc_channels): after the FC layer, before the head."""
        weight = mask.unsqueeze(-1).to(features.dtype)
        x = (features - self.feature_mean) / self.feature_std * weight
        coordinates = points
        for block in self.blocks:
            x = block(coordinates, x, mask)
            coordinates = x
        pooled = x.sum(1) / weight.sum(1).clamp(min=1.0)
        return self.fc(pooled)

    def forward(self, points: Tensor, features: Tensor, mask: Tensor) -> Tensor:
        """Class logits (N, n_classes)."""
        return self.head(self.embed(points, features, mask))

    def forward_with_embedding(
        self, points: Tensor, features: Tensor, mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Logits and penultimate features in one pass (for the anomaly scores)."""
        embedding = self.embed(points, features, mask)
        return self.head(embedding), embedding
