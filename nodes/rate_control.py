"""Trigger rates per lumi block and thresholds that hold their rate (a PI controller).

Rates: a node turns its weighted counts into Hz with the factor the source writes into
every batch's metadata (``hz_per_weight``; see ``nodes.source``): the rate of a path in a
lumi block is ``hz_per_weight * sum(w of events firing) / events_per_lumi``, with the
error ``hz_per_weight * sqrt(sum(w^2)) / events_per_lumi``. ``LumiRates`` keeps these sums
per lumi block; a block is closed when a batch of a later block arrives (the source emits
blocks in order) or at ``close_all()``.

Control: ``RateController`` moves one path's threshold once per lumi block to hold its
rate at ``target_hz`` as the pileup changes. It acts on the log of both, because a rate
falls by decades over a factor of a few in threshold:

    e_k = ln(R_k / target)                               (clipped to +-max_error)
    ln t_{k+1} = ln t_k + (kp * (e_k - e_{k-1}) + ki * e_k + kf * d_k) / s_k

the velocity form of a PI controller (no integral to wind up at the threshold bounds),
with its gain scheduled by the local slope s_k = -d ln R / d ln t, which the controller
measures on the block's own events (the rate at t e^{+-delta}); with kp = 0, ki = 1 a
step is one Newton step. A PI loop lags a ramp (a steady ln(R / target) = r / ki when the
pileup raises ln R by r per block), so ``kf`` feeds the drift forward: d_k is an average
(weight ``drift_smoothing`` on the newest) of ln R_k(t_k) - ln R_{k-1}(t_k), the change of
the rate at one threshold between consecutive blocks, i.e. what the pileup did. The
measured rate R_k is that of the threshold in force during block k, so a change acts
from the next block on. Thresholds must be positive.

Every change is logged, exported (``trigger_threshold{node, path}``,
``trigger_path_rate_hz{node, path}``, ``trigger_threshold_changes_total{node, path}``) and
returned as a ``ThresholdChange``, which ``as_record()`` turns into a
``"threshold_change"`` record for the archive.

Example:
    >>> import numpy as np
    >>> config = RateControlConfig(path="ht", target_hz=100.0, initial_threshold=10.0)
    >>> controller = config.build()
    >>> values = np.random.default_rng(1).exponential(5.0, 100_000)   # one block's events
    >>> for lumi in range(1, 11):
    ...     change = controller.update(lumi, values, np.ones(values.size), hz_per_event=1.0)
    >>> exact = 5.0 * np.log(100_000 / 100)     # the threshold with 100 of 100k events above
    >>> round(float(exact), 1), abs(controller.threshold / exact - 1) < 0.03
    (34.5, True)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Annotated

import numpy as np
import pydantic
from prometheus_client import Counter, Gauge
from pydantic import ConfigDict, Field, model_validator

from stream.batch import EventBatch, Record

log = logging.getLogger(__name__)

TRIGGER_PATH_RATE = Gauge(
    "trigger_path_rate_hz",
    "Rate of a trigger path (or a stage's output: path='all') in the last closed lumi block",
    ["node", "path"],
)
TRIGGER_PATH_RATE_ERROR = Gauge(
    "trigger_path_rate_error_hz",
    "Statistical error (sqrt(sum w^2)) of trigger_path_rate_hz",
    ["node", "path"],
)
TRIGGER_THRESHOLD = Gauge("trigger_threshold", "Threshold in force on a path", ["node", "path"])
TRIGGER_THRESHOLD_CHANGES = Counter(
    "trigger_threshold_changes", "Threshold changes by a rate controller", ["node", "path"]
)

THRESHOLD_RECORD_KIND = "threshold_change"


def batch_weights(batch: EventBatch) -> np.ndarray:
    """The events' truth weights as float64 (1 where the batch has none)."""
    weight = batch.truth.get("weight")
    if weight is None:
        return np.ones(len(batch))
    return np.asarray(weight, np.float64)


def rate_factor(batch: EventBatch) -> float | None:
    """Hz per (weight / event) of the source that made ``batch``: ``hz_per_weight /
    events_per_lumi``, or ``None`` when its metadata lacks them (an old source)."""
    hz = batch.meta.get("hz_per_weight")
    per_lumi = batch.meta.get("events_per_lumi")
    if not isinstance(hz, int | float) or not isinstance(per_lumi, int) or per_lumi < 1:
        return None
    return float(hz) / per_lumi


@dataclass(frozen=True, slots=True)
class BlockRate:
    """A path's rate in one closed lumi block."""

    lumi: int
    path: str
    rate_hz: float
    error_hz: float
    events: int


@dataclass(slots=True)
class _Sums:
    weight: float = 0.0
    weight2: float = 0.0
    events: int = 0


class LumiRates:
    """Weighted counts per lumi block and path; rates of closed blocks (see module doc).

    ``add(batch, fired)`` takes a batch and a boolean mask per path; ``"all"`` (every event
    of the batch) is always counted. Publishes ``trigger_path_rate_hz`` for each block it
    closes. Not thread-safe.
    """

    def __init__(self, node: str) -> None:
        self.node = node
        self._open: dict[int, dict[str, _Sums]] = {}
        self._factor: float | None = None
        self.closed: list[BlockRate] = []

    def add(self, batch: EventBatch, fired: Mapping[str, np.ndarray]) -> list[BlockRate]:
        """Count a batch; return the rates of the blocks this batch closed."""
        factor = rate_factor(batch)
        if factor is not None:
            self._factor = factor
        if not len(batch) or "lumi" not in batch:
            return []
        lumi = np.asarray(batch["lumi"], np.int64)
        weight = np.nan_to_num(batch_weights(batch), nan=0.0, posinf=0.0, neginf=0.0)
        masks = {"all": np.ones(len(batch), bool), **fired}
        for block in np.unique(lumi).tolist():
            in_block = lumi == block
            sums = self._open.setdefault(block, {})
            for path, mask in masks.items():
                pick = in_block & mask
                w = weight[pick]
                s = sums.setdefault(path, _Sums())
                s.weight += float(w.sum())
                s.weight2 += float(np.square(w).sum())
                s.events += int(pick.sum())
        return self._close(lambda block: block < int(lumi.max()))

    def close_all(self) -> list[BlockRate]:
        """Close every open block (at the end of a run; the last one may be partial)."""
        return self._close(lambda block: True)

    def _close(self, done: object) -> list[BlockRate]:
        assert callable(done)
        out: list[BlockRate] = []
        for block in sorted(self._open):
            if not done(block):
                continue
            sums = self._open.pop(block)
            if self._factor is None:
                continue
            for path, s in sums.items():
                rate = BlockRate(
                    block,
                    path,
                    self._factor * s.weight,
                    self._factor * math.sqrt(s.weight2),
                    s.events,
                )
                out.append(rate)
                TRIGGER_PATH_RATE.labels(node=self.node, path=path).set(rate.rate_hz)
                TRIGGER_PATH_RATE_ERROR.labels(node=self.node, path=path).set(rate.error_hz)
        self.closed.extend(out)
        return out


_Gain = Annotated[float, Field(ge=0)]
_Positive = Annotated[float, Field(gt=0)]


@pydantic.dataclasses.dataclass(frozen=True, slots=True, config=ConfigDict(extra="forbid"))
class RateControlConfig:
    """One controlled path.

    Attributes:
        path: the path's name (an L1 seed, say ``"ht"``).
        target_hz: the rate to hold.
        initial_threshold: the threshold before the first update (> 0).
        kp, ki: proportional and integral gains (per unit slope, see module doc).
        kf, drift_smoothing: drift feed-forward gain and its averaging weight (0 < w <= 1).
        min_threshold, max_threshold: bounds on the threshold.
        max_step: the largest change of ln(threshold) in one block.
        max_error: |ln(R / target)| is clipped to this (a block with no event: -max_error).
        delta: half-width in ln(threshold) of the slope measurement.
        min_slope, max_slope: bounds on the measured slope s.
    """

    path: Annotated[str, Field(min_length=1)]
    target_hz: _Positive
    initial_threshold: float
    kp: _Gain = 0.1
    ki: _Gain = 0.4
    min_threshold: _Positive = 1e-6
    max_threshold: float = 1e9
    max_step: _Positive = 0.5
    max_error: _Positive = 2.0
    delta: _Positive = 0.05
    min_slope: _Positive = 0.5
    max_slope: float = 200.0
    kf: _Gain = 1.0
    drift_smoothing: Annotated[float, Field(gt=0, le=1)] = 0.2

    @model_validator(mode="after")
    def _ordered(self) -> RateControlConfig:
        if not self.min_threshold <= self.initial_threshold <= self.max_threshold:
            msg = (
                f"need min_threshold <= initial_threshold <= max_threshold, got "
                f"{self.min_threshold}, {self.initial_threshold}, {self.max_threshold}"
            )
            raise ValueError(msg)
        if self.max_slope < self.min_slope:
            msg = f"max_slope ({self.max_slope}) must be >= min_slope ({self.min_slope})"
            raise ValueError(msg)
        return self

    def build(self, *, node: str = "") -> RateController:
        """A controller at ``initial_threshold``."""
        return RateController(self, node=node)


@dataclass(frozen=True, slots=True)
class ThresholdChange:
    """One controller update: the rate measured in ``lumi`` and the threshold for the
    blocks after it."""

    node: str
    path: str
    lumi: int
    old_threshold: float
    new_threshold: float
    rate_hz: float
    error_hz: float
    target_hz: float
    slope: float
    drift: float

    def as_record(self) -> Record:
        """A ``"threshold_change"`` record (meta only) for the archive."""
        return Record(THRESHOLD_RECORD_KIND, asdict(self))


@dataclass(slots=True)
class RateController:
    """The state of one controlled path; see the module doc. ``history`` holds every
    update."""

    config: RateControlConfig
    node: str = ""
    threshold: float = field(init=False)
    history: list[ThresholdChange] = field(default_factory=list)
    _last_error: float = 0.0
    _drift: float = 0.0
    _previous: tuple[np.ndarray, np.ndarray, float] | None = None

    def __post_init__(self) -> None:
        self.threshold = self.config.initial_threshold
        TRIGGER_THRESHOLD.labels(node=self.node, path=self.config.path).set(self.threshold)

    def rate_at(
        self, threshold: float, values: np.ndarray, weights: np.ndarray, hz_per_event: float
    ) -> tuple[float, float]:
        """Rate and error of ``values > threshold`` in a block (Hz per unit weight per event
        ``hz_per_event``, see ``rate_factor``)."""
        w = weights[values > threshold]
        return hz_per_event * float(w.sum()), hz_per_event * math.sqrt(float(np.square(w).sum()))

    def update(
        self, lumi: int, values: np.ndarray, weights: np.ndarray, *, hz_per_event: float
    ) -> ThresholdChange:
        """Take block ``lumi``'s events (the path's observable and the weights of every
        event of the block) and set the threshold for the next blocks."""
        cfg = self.config
        values = np.asarray(values, np.float64)
        weights = np.asarray(weights, np.float64)
        old = self.threshold
        rate, error = self.rate_at(old, values, weights, hz_per_event)
        if rate > 0:
            e = min(max(math.log(rate / cfg.target_hz), -cfg.max_error), cfg.max_error)
        else:
            e = -cfg.max_error
        up, _ = self.rate_at(old * math.exp(cfg.delta), values, weights, hz_per_event)
        down, _ = self.rate_at(old * math.exp(-cfg.delta), values, weights, hz_per_event)
        slope = cfg.min_slope
        if up > 0 and down > 0:
            slope = math.log(down / up) / (2 * cfg.delta)
        slope = min(max(slope, cfg.min_slope), cfg.max_slope)
        if self._previous is not None and rate > 0:
            before, _ = self.rate_at(old, *self._previous)
            if before > 0:
                growth = math.log(rate / before)
                self._drift += cfg.drift_smoothing * (growth - self._drift)
        self._previous = (values, weights, hz_per_event)
        step = (cfg.kp * (e - self._last_error) + cfg.ki * e + cfg.kf * self._drift) / slope
        step = min(max(step, -cfg.max_step), cfg.max_step)
        self._last_error = e
        new = min(max(old * math.exp(step), cfg.min_threshold), cfg.max_threshold)
        self.threshold = new
        change = ThresholdChange(
            self.node, cfg.path, int(lumi), old, new, rate, error, cfg.target_hz, slope, self._drift
        )
        self.history.append(change)
        TRIGGER_THRESHOLD.labels(node=self.node, path=cfg.path).set(new)
        TRIGGER_THRESHOLD_CHANGES.labels(node=self.node, path=cfg.path).inc()
        log.info(
            "%s: path %s lumi %d: rate %.4g +- %.2g Hz (target %.4g), threshold %.5g -> %.5g",
            self.node,
            cfg.path,
            lumi,
            rate,
            error,
            cfg.target_hz,
            old,
            new,
        )
        return change
