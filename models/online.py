"""Single-pass training of conditional flows on a stream: the OnlineFlow.

``StreamTrainer`` trains one ``ConditionalFlow`` from events offered once each. Events wait
in a fixed-size buffer (preallocated, so memory does not grow with the stream); each
optimizer step draws a random minibatch from the buffer, trains on it and removes those
rows, so every event is trained on exactly once and then dropped. With ``replay = k`` an
event stays in the buffer for k draws (k optimizer steps, in different minibatches)
before it is dropped: still bounded memory, and no event outlives the buffer.

If events arrive faster than the trainer can train (the buffer is full and the time
budget for this call is spent), the excess is subsampled uniformly at random and counted
as ``not_learned``: never lost silently. The learning rate warms up linearly, then decays
as 1/√step (no fixed end, as a stream has none); the Adam state is kept for the trainer's
whole life, so snapshots never reset it.

What a trainer publishes (``estimate``) is the Polyak average of its weights, a moving
average whose horizon grows with the step count up to ``1 / (1 - average_decay)`` steps:
with one pass and no epochs to anneal over, the last iterate is noisy (on the LHCO stream
averaging lowers the flows' test NLL by 0.04-0.07; benchmarks/RESULTS.md).

``OnlineFlow`` runs its trainers side by side on one stream: the all-data flow, the
sideband flow, which is never offered an event whose mjj lies in the signal region, and
``signal_region_folds`` (K) signal-region flows, offered only those events, each event
serving ``signal_region_replay`` steps (they are 14% of the LHCO-like stream, so two
flows cost about half the all-data flow's time). Signal-region events are dealt to K
folds by ``fold``, a hash of the event's features, and flow k learns every fold but
``held_out_fold(k, K)``, so that an analysis can score every event with the flow that
never trained on it (``scoring_flow``): a flow scoring its own training events favours
them, and a cut on that score makes a bump where there is none. With K = 2 each flow
learns half of the signal region; with K = 3 (the default), two thirds, at twice the
cost, which raised ANODE's max SIC on the million-event stream at S/B 1% from 3.33 to
3.69 on its validation half (benchmarks/RESULTS.md). The signal region is
configured before data taking, as the sideband flow already needs it. Preprocessing is
fixed before training: from configured bounds, or from the first
``calibration_events`` of the stream (kept in a bounded list, then trained on as usual).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

import numpy as np
import pydantic
import torch
from pydantic import ConfigDict, Field, model_validator
from torch.optim.swa_utils import AveragedModel

from models.flows import (
    FEATURE_INDICES,
    MJJ_INDEX,
    ConditionalFlow,
    Count,
    FlowConfig,
    Positive,
    Preprocessing,
)

# mjj histogram kept with each flow (for sampling at the mjj of the events seen);
# outside 1-9 TeV events count in the end bins.
MJJ_EDGES_GEV = np.linspace(1000.0, 9000.0, 161)
#: The role of signal-region flow k is ``f"{FOLD_ROLE_PREFIX}{k}"``.
FOLD_ROLE_PREFIX = "signal_region_"


def fold_roles(n_folds: int) -> tuple[str, ...]:
    """The roles of the K signal-region flows."""
    return tuple(f"{FOLD_ROLE_PREFIX}{k}" for k in range(n_folds))


def held_out_fold(flow: int, n_folds: int) -> int:
    """The fold signal-region flow ``flow`` never trains on (with K = 2, flow k learns
    fold k alone)."""
    return (flow + 1) % n_folds


def scoring_flow(folds: np.ndarray, n_folds: int) -> np.ndarray:
    """Per event of fold j, the flow that never trained on it."""
    return (folds - 1) % n_folds


def fold(features: np.ndarray, n_folds: int = 2) -> np.ndarray:
    """0 to K - 1 per event (rows of the schema's 8 ``features``), from a hash of their
    float32 bits: the learner and an analysis of the archived events compute the same split.

    The hash is splitmix64's finaliser applied feature by feature, so one changed bit of any
    feature changes the fold of about (K - 1) / K of the events; its top 32 bits are mapped
    to [0, K) by a multiply and shift (with K = 2: the top bit).
    """
    bits = np.ascontiguousarray(np.asarray(features, dtype=np.float32)).view(np.uint32)
    h = np.zeros(len(bits), np.uint64)
    for column in bits.T.astype(np.uint64):
        h ^= column
        h ^= h >> np.uint64(30)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(27)
        h *= np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(31)
    return (((h >> np.uint64(32)) * np.uint64(n_folds)) >> np.uint64(32)).astype(np.int64)


@pydantic.dataclasses.dataclass(frozen=True, slots=True, config=ConfigDict(extra="forbid"))
class OnlineConfig:
    """How the OnlineFlow learns (plain values, so a TOML table can fill it).

    Attributes:
        n_transforms, hidden_features, n_blocks, n_bins, tail_bound: the MAF (FlowConfig).
        n_members: MAFs per flow, trained on the same minibatches from different initial
            weights; the flow's density is their average.
        buffer_size: events held at most while waiting for training (per flow).
        batch_size: events per optimizer step.
        replay: optimizer steps each event serves before it is dropped (1: single pass).
        learning_rate: peak Adam learning rate.
        warmup_steps: linear warm-up steps; then lr ∝ 1/√(step / decay_start_steps).
        decay_start_steps: steps at the peak before the 1/√step decay starts.
        grad_clip: maximum gradient norm (per member).
        average_decay: the largest decay of the Polyak average that is published.
        budget_s_per_event: training time allowed per arriving event; 0 trains on every
            event, however long it takes (the caller blocks).
        calibration_events: events that fix the preprocessing when no bounds are given.
        bounds_lower, bounds_upper: fixed preprocessing bounds (both or neither).
        signal_region_gev: the mjj window the sideband flow never sees and the
            signal-region flows learn.
        signal_region_replay: optimizer steps each event serves in its signal-region flows
            (their ``replay``); 0 trains no signal-region flows.
        signal_region_folds: K, the signal-region flows; each learns all folds but one.
        mjj_shift_gev, mjj_scale_gev: context = (mjj - shift) / scale.
        seed: seeds the flows' initial weights and the minibatch draws.

    The defaults were chosen on the LHCO stream (benchmarks/online_flow_ablation.py): with
    minibatches of 256 at learning rate 1e-2 the flows reach the test NLL of minibatches
    of 16 at 2e-3 (the previous default) in a sixth of the training time.
    """

    n_transforms: Count = 4
    hidden_features: Count = 16
    n_blocks: Count = 2
    n_bins: Count = 8
    tail_bound: Positive = 4.0
    n_members: Count = 5
    buffer_size: Count = 2048
    batch_size: Count = 256
    replay: Count = 1
    learning_rate: Positive = 1e-2
    warmup_steps: int = 20
    decay_start_steps: int = 75
    grad_clip: Positive = 5.0
    average_decay: Annotated[float, Field(ge=0, lt=1)] = 0.98
    budget_s_per_event: Annotated[float, Field(ge=0)] = 0.0
    calibration_events: Count = 2048
    bounds_lower: tuple[float, ...] = ()
    bounds_upper: tuple[float, ...] = ()
    signal_region_gev: tuple[float, float] = (3300.0, 3700.0)
    signal_region_replay: Annotated[int, Field(ge=0)] = 4
    signal_region_folds: Annotated[int, Field(ge=2)] = 3
    mjj_shift_gev: float = 3500.0
    mjj_scale_gev: float = 1000.0
    seed: int = 1

    @model_validator(mode="after")
    def _consistent(self) -> OnlineConfig:
        if self.batch_size > self.buffer_size:
            msg = f"batch_size {self.batch_size} exceeds buffer_size {self.buffer_size}"
            raise ValueError(msg)
        if len(self.bounds_lower) != len(self.bounds_upper) or len(self.bounds_lower) not in (
            0,
            len(FEATURE_INDICES),
        ):
            msg = f"bounds_lower/upper need {len(FEATURE_INDICES)} values each, or none"
            raise ValueError(msg)
        low, high = self.signal_region_gev
        if not low < high:
            msg = f"signal_region_gev must be (low, high), low < high: {self.signal_region_gev}"
            raise ValueError(msg)
        return self

    def flow_config(self) -> FlowConfig:
        return FlowConfig(
            n_features=len(FEATURE_INDICES),
            n_transforms=self.n_transforms,
            hidden_features=self.hidden_features,
            n_blocks=self.n_blocks,
            n_bins=self.n_bins,
            tail_bound=self.tail_bound,
            n_members=self.n_members,
        )

    def learning_rate_at(self, step: int) -> float:
        """Linear warm-up, a plateau, then 1/√step decay."""
        warm = min(1.0, (step + 1) / max(self.warmup_steps, 1))
        decay = min(1.0, math.sqrt(self.decay_start_steps / max(step, 1)))
        return self.learning_rate * warm * decay


@dataclass(slots=True)
class TrainerStats:
    """What one trainer did with the events offered to it."""

    offered: int = 0
    learned: int = 0
    not_learned: int = 0
    steps: int = 0
    loss_ema: float = float("nan")
    train_s: float = 0.0
    mjj_min_gev: float = float("inf")
    mjj_max_gev: float = float("-inf")
    mjj_hist: np.ndarray = field(default_factory=lambda: np.zeros(MJJ_EDGES_GEV.size - 1))


class StreamTrainer:
    """Single-pass trainer of one conditional flow; see the module doc.

    ``on_step`` (optional) receives the stream indices of the events in each minibatch,
    for instrumentation; indices count offered events from 0.
    """

    def __init__(
        self,
        config: OnlineConfig,
        preprocessing: Preprocessing,
        *,
        seed: int,
        clock: Callable[[], float] = time.perf_counter,
        on_step: Callable[[np.ndarray], None] | None = None,
    ) -> None:
        self.config = config
        torch.manual_seed(seed)
        self.flow = ConditionalFlow(config.flow_config(), preprocessing)
        # fused: one kernel for the whole update (about half the time of foreach=True here)
        self.optimizer = torch.optim.Adam(
            self.flow.parameters(), lr=config.learning_rate, fused=True
        )
        self._average = AveragedModel(self.flow, avg_fn=self._polyak)
        self._parameters: list[torch.Tensor] = list(self.flow.parameters())
        self._averaged_parameters: list[torch.Tensor] = list(self._average.module.parameters())
        self.stats = TrainerStats()
        self._clock = clock
        self._on_step = on_step
        self._rng = np.random.default_rng(seed)
        n, f = config.buffer_size, len(FEATURE_INDICES)
        self._x = np.zeros((n, f), np.float32)
        self._mjj = np.zeros(n, np.float32)
        self._index = np.zeros(n, np.int64)
        self._uses_left = np.zeros(n, np.int64)
        self._fill = 0

    @property
    def estimate(self) -> ConditionalFlow:
        """The Polyak-averaged flow: what snapshots publish and analyses use."""
        module = self._average.module
        assert isinstance(module, ConditionalFlow)
        return module

    def _decay(self, n_averaged: int) -> float:
        return min(self.config.average_decay, (n_averaged + 1) / (n_averaged + 10))

    def _polyak(
        self, averaged: torch.Tensor, current: torch.Tensor, n_averaged: torch.Tensor | int
    ) -> torch.Tensor:
        return averaged + (1 - self._decay(int(n_averaged))) * (current - averaged)

    @torch.no_grad()
    def _update_average(self) -> None:
        """``self._average.update_parameters(self.flow)`` in one foreach call per step
        (AveragedModel's own walks the modules and steps parameter by parameter)."""
        n_averaged = int(self._average.n_averaged)
        if n_averaged == 0:
            torch._foreach_copy_(self._averaged_parameters, self._parameters)
        else:
            weight = 1 - self._decay(n_averaged)
            torch._foreach_lerp_(self._averaged_parameters, self._parameters, weight)
        self._average.n_averaged += 1

    @property
    def buffered(self) -> int:
        """Events waiting in the buffer."""
        return self._fill

    @property
    def buffer_nbytes(self) -> int:
        return self._x.nbytes + self._mjj.nbytes + self._index.nbytes + self._uses_left.nbytes

    def offer(self, x: np.ndarray, mjj_gev: np.ndarray, *, deadline_s: float = math.inf) -> int:
        """Offer events once; train while the budget lasts. Returns how many were not learned
        (subsampled away because the buffer was full when the budget ran out)."""
        n = len(x)
        first = self.stats.offered
        self.stats.offered += n
        pos = 0
        while pos < n:
            take = min(self.config.buffer_size - self._fill, n - pos)
            rows = slice(self._fill, self._fill + take)
            self._x[rows] = x[pos : pos + take]
            self._mjj[rows] = mjj_gev[pos : pos + take]
            self._index[rows] = np.arange(first + pos, first + pos + take)
            self._uses_left[rows] = self.config.replay
            self._fill += take
            pos += take
            while self._fill >= self.config.batch_size and self._clock() < deadline_s:
                self._step(self.config.batch_size)
            if pos < n and self._fill == self.config.buffer_size:
                break
        missed = n - pos
        if missed:
            # Full buffer, no time left: a uniform subsample of this call's events is learned.
            self._subsample_into_buffer(x, mjj_gev, first, pos)
        self.stats.not_learned += missed
        return missed

    def flush(self) -> None:
        """Train on everything still buffered (the last minibatch may be smaller)."""
        while self._fill > 0:
            self._step(min(self.config.batch_size, self._fill))

    def _subsample_into_buffer(
        self, x: np.ndarray, mjj_gev: np.ndarray, first: int, pos: int
    ) -> None:
        """Swap buffered events of this call for a uniform choice among all of them, so that
        what is learned is an unbiased subsample rather than the head of the batch."""
        n = len(x)
        # Only events not yet trained on are swapped (all of this call's, at full replay).
        mine = np.flatnonzero(
            (self._index[: self._fill] >= first)
            & (self._uses_left[: self._fill] == self.config.replay)
        )
        pool = np.concatenate([self._index[mine] - first, np.arange(pos, n)])
        chosen = self._rng.choice(pool, size=mine.size, replace=False)
        self._x[mine] = x[chosen]
        self._mjj[mine] = mjj_gev[chosen]
        self._index[mine] = first + chosen

    def _step(self, size: int) -> None:
        t0 = time.perf_counter()
        pick = self._rng.choice(self._fill, size=size, replace=False)
        x, mjj = self._x[pick].copy(), self._mjj[pick].copy()
        if self._on_step is not None:
            self._on_step(self._index[pick].copy())
        self._uses_left[pick] -= 1
        done = pick[self._uses_left[pick] == 0]
        first_use = self._uses_left[pick] == self.config.replay - 1
        keep = np.ones(self._fill, bool)
        keep[done] = False
        kept = np.flatnonzero(keep)
        for column in (self._x, self._mjj, self._index, self._uses_left):
            column[: kept.size] = column[kept]
        self._fill = kept.size
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.learning_rate_at(self.stats.steps)
        self.flow.train()
        # the flow's loss (ConditionalFlow.loss) and its clipped gradients: one call of the
        # fused flow kernel when it is available (models.flow_kernel), else autograd
        pre = self.flow.pre
        z, _ = pre.forward(torch.from_numpy(x))
        loss, _ = self.flow.maf.nll_backward(z, pre.context(mjj), max_norm=self.config.grad_clip)
        self.optimizer.step()
        self._update_average()
        value = float(loss.detach()) / self.config.n_members
        stats = self.stats
        stats.loss_ema = (
            value if math.isnan(stats.loss_ema) else 0.98 * stats.loss_ema + 0.02 * value
        )
        stats.steps += 1
        stats.learned += int(done.size)
        mjj = mjj[first_use]  # each event counts once in the mjj record
        if mjj.size:
            stats.mjj_min_gev = min(stats.mjj_min_gev, float(mjj.min()))
            stats.mjj_max_gev = max(stats.mjj_max_gev, float(mjj.max()))
        # Under- and overflow go to the first and last bins, so the histogram counts all.
        inside = np.clip(mjj, MJJ_EDGES_GEV[0], np.nextafter(MJJ_EDGES_GEV[-1], 0))
        stats.mjj_hist += np.histogram(inside, MJJ_EDGES_GEV)[0]
        stats.train_s += time.perf_counter() - t0


def flow_roles(config: OnlineConfig) -> tuple[str, ...]:
    """The flows an OnlineFlow with ``config`` trains: all-data, sideband, signal region."""
    folds = fold_roles(config.signal_region_folds) if config.signal_region_replay else ()
    return ("all", "sideband", *folds)


#: The flows a learner with the default settings publishes.
ROLES = flow_roles(OnlineConfig())


class OnlineFlow:
    """The all-data and sideband flows trained side by side from one stream.

    ``learn(features)`` takes the schema's ``features`` column (N, 8). Until the
    preprocessing is fixed, events are held for calibration (at most
    ``calibration_events``); then every event goes to the all-data trainer, every
    sideband event to the sideband trainer and every signal-region event to the
    signal-region trainer of its ``fold`` (if ``signal_region_replay`` > 0). ``agree``
    (optional) maps the calibrated preprocessing to the one to use, e.g. one agreed with
    other nodes that average their flows with this one's.

    Example:
        >>> import numpy as np
        >>> cfg = OnlineConfig(n_transforms=1, buffer_size=64, batch_size=32, calibration_events=64)
        >>> online = OnlineFlow(cfg)
        >>> x = np.random.default_rng(0).uniform(0.1, 1.0, (200, 8)).astype("f4")
        >>> x[:, 0] = np.linspace(3000, 4000, 200)
        >>> online.learn(x)
        0
        >>> online.finish(); online.trainers["all"].stats.learned
        200
    """

    def __init__(
        self,
        config: OnlineConfig,
        *,
        clock: Callable[[], float] = time.perf_counter,
        on_step: Callable[[str, np.ndarray], None] | None = None,
        agree: Callable[[dict[str, Preprocessing]], dict[str, Preprocessing]] | None = None,
    ) -> None:
        self.config = config
        self.trainers: dict[str, StreamTrainer] = {}
        self._agree = agree
        self._clock = clock
        self._on_step = on_step
        self._pending: list[np.ndarray] = []
        self._pending_n = 0
        if config.bounds_lower:
            pre = Preprocessing.from_bounds(
                config.bounds_lower,
                config.bounds_upper,
                mjj_shift_gev=config.mjj_shift_gev,
                mjj_scale_gev=config.mjj_scale_gev,
            )
            self._start({role: pre for role in self.roles})

    @property
    def calibrated(self) -> bool:
        return bool(self.trainers)

    @property
    def roles(self) -> tuple[str, ...]:
        """The flows this OnlineFlow trains."""
        return flow_roles(self.config)

    def in_signal_region(self, mjj_gev: np.ndarray) -> np.ndarray:
        low, high = self.config.signal_region_gev
        return (mjj_gev >= low) & (mjj_gev < high)

    def learn(self, features: np.ndarray) -> int:
        """Offer events (N, 8 features); returns how many the all-data flow did not learn."""
        features = np.asarray(features, dtype=np.float32)
        if not self.calibrated:
            self._pending.append(features.copy())
            self._pending_n += len(features)
            if self._pending_n < self.config.calibration_events:
                return 0
            features = np.concatenate(self._pending)
            self._pending, self._pending_n = [], 0
            self._start(self._agreed(self._calibrate(features)))
        deadline = math.inf
        if self.config.budget_s_per_event > 0:
            deadline = self._clock() + self.config.budget_s_per_event * len(features)
        return self._offer(features, deadline)

    def _offer(self, features: np.ndarray, deadline_s: float = math.inf) -> int:
        """Each trainer its share of the events; how many the all-data flow did not learn."""
        x, mjj = features[:, FEATURE_INDICES], features[:, MJJ_INDEX]
        missed = self.trainers["all"].offer(x, mjj, deadline_s=deadline_s)
        inside = self.in_signal_region(mjj)
        self.trainers["sideband"].offer(x[~inside], mjj[~inside], deadline_s=deadline_s)
        n_folds = self.config.signal_region_folds
        if self.config.signal_region_replay:
            folds = fold(features[inside], n_folds)
            x, mjj = x[inside], mjj[inside]
            for k, role in enumerate(fold_roles(n_folds)):
                rows = folds != held_out_fold(k, n_folds)
                self.trainers[role].offer(x[rows], mjj[rows], deadline_s=deadline_s)
        return missed

    def finish(self) -> None:
        """Calibrate on what is held if needed, then train on every buffered event."""
        if not self.calibrated and self._pending_n >= 2:
            features = np.concatenate(self._pending)
            self._pending, self._pending_n = [], 0
            self._start(self._agreed(self._calibrate(features)))
            self._offer(features)
        for trainer in self.trainers.values():
            trainer.flush()

    @property
    def pending(self) -> int:
        """Events held for calibration (not yet offered to a trainer)."""
        return self._pending_n

    def report(self) -> dict[str, Any]:
        return {
            role: {
                "offered": t.stats.offered,
                "learned": t.stats.learned,
                "not_learned_total": t.stats.not_learned,
                "buffered": t.buffered,
                "steps": t.stats.steps,
                "loss": t.stats.loss_ema,
                "train_s": t.stats.train_s,
            }
            for role, t in self.trainers.items()
        }

    def _calibrate(self, features: np.ndarray) -> dict[str, Preprocessing]:
        """Preprocessing per flow. The signal-region flows take the all-data flow's: the
        signal region's first events are few, and on the million-event LHCO-like stream
        its own calibration lowered ANODE's max SIC (3.3-3.9 against 3.9-4.2, 2 seeds)."""
        cfg = self.config
        x, mjj = features[:, FEATURE_INDICES], features[:, MJJ_INDEX]
        side = ~self.in_signal_region(mjj)
        out = {}
        for role, rows in (("all", slice(None)), ("sideband", side)):
            sample = x[rows] if len(x[rows]) >= 2 else x
            out[role] = Preprocessing.calibrate(
                sample, mjj_shift_gev=cfg.mjj_shift_gev, mjj_scale_gev=cfg.mjj_scale_gev
            )
        for role in self.roles[2:]:
            out[role] = out["all"]
        return out

    def _agreed(self, preprocessing: dict[str, Preprocessing]) -> dict[str, Preprocessing]:
        """The preprocessing shared with other learners (``agree``), or this one's own."""
        return preprocessing if self._agree is None else self._agree(preprocessing)

    def _start(self, preprocessing: dict[str, Preprocessing]) -> None:
        # The flows start from the same weights: their modelling errors then correlate,
        # and cancel in the density ratios that ANODE and CATHODE rely on.
        for role in self.roles:
            on_step = None
            if self._on_step is not None:
                on_step = _tagged(self._on_step, role)
            config = self.config
            if role.startswith(FOLD_ROLE_PREFIX):
                config = dataclasses.replace(config, replay=config.signal_region_replay)
            self.trainers[role] = StreamTrainer(
                config,
                preprocessing[role],
                seed=self.config.seed,
                clock=self._clock,
                on_step=on_step,
            )


def _tagged(callback: Callable[[str, np.ndarray], None], role: str) -> Callable[[np.ndarray], None]:
    return lambda indices: callback(role, indices)
