"""OnlineFlow training speed: the shipped trainer against the nflows-based trainer it replaced.

Both learn the all-data and the sideband flow from the same LHCO R&D background stream
(bkg01-06, shuffled once), single pass, on one torch thread, and are timed over training
alone (both flows together). Events/s per core are from the training thread's CPU time
(``time.thread_time``), so that a busy machine does not count against a run; wall-clock
figures are reported beside them. The shipped trainer computes each step in the fused flow
kernel (``models.flow_kernel``); it is also run without it, by autograd with the fused
spline kernel (``models.spline_kernel``, the trainer before the flow kernel) and by
autograd alone (the torch spline, the fallback of both), alternating on the same events,
so that the ratios between the three are measured side by side on a shared machine.

The reference is the trainer as it was before models.maf: an ensemble of nflows MAFs
(``models.flows.build_maf``) stepped one after the other on minibatches of 16, Adam,
per-member gradient clipping, the same learning-rate schedule and the Polyak average.
Quality is the mean test NLL (physical units) of each flow on held-out background
(bkg09-10; the sideband flow on its sideband events), lower is better.

    python -m benchmarks.online_flow_speed [--events 55000] [--reference-events 20000]
        [--compile] [--steps-only] [--repeats 3]
    python -m benchmarks.online_flow_speed --sr-folds 2 3 4 [--events 55000] [--repeats 3]

``--sr-folds`` times only the shipped trainer with each number K of signal-region flows
(each signal-region event trains K - 1 of them), alternating on the same events.

It first times one optimizer step of one 5-member flow at minibatches 16, 256 and 1024
(CPU ms): the nflows members in turn, ``MAFEnsemble`` by autograd with the torch spline and
with the spline kernel, by the flow kernel, and with ``--compile`` ``MAFEnsemble`` (torch
spline) under ``torch.compile`` (compilation excluded, reported apart). It reports the
kernels' cold build time (g++, into an empty cache folder).

The reference is slow (~110 events/s): ``--reference-events`` bounds its share; the
shipped trainer is also scored on exactly those first events, so the NLL comparison is
at equal events.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from nflows.flows import Flow
from torch.optim.swa_utils import AveragedModel

from analysis.data import Events
from benchmarks.ephemeral_lhco import DATA, SR, lhco_dataset
from models import flow_kernel, spline_kernel
from models.flows import FEATURE_INDICES, MJJ_INDEX, ConditionalFlow, Preprocessing, build_maf
from models.online import OnlineConfig, OnlineFlow
from simulator.replay import read_features

REFERENCE = {"batch_size": 16, "learning_rate": 2e-3, "decay_start_steps": 1200,
             "average_decay": 0.995, "replay": 1}  # fmt: skip


class NflowsTrainer:
    """The pre-models.maf single-pass trainer of one flow, kept here as the baseline."""

    def __init__(self, config: OnlineConfig, preprocessing: Preprocessing) -> None:
        torch.manual_seed(config.seed)
        self.config, self.preprocessing = config, preprocessing
        self.mafs = torch.nn.ModuleList(
            build_maf(config.flow_config()) for _ in range(config.n_members)
        )
        self.optimizer = torch.optim.Adam(self.mafs.parameters(), lr=config.learning_rate)
        self.average = AveragedModel(self.mafs, avg_fn=self._polyak)
        self.steps = 0

    def _polyak(self, averaged: torch.Tensor, current: torch.Tensor, n: torch.Tensor | int):
        decay = min(self.config.average_decay, (int(n) + 1) / (int(n) + 10))
        return averaged + (1 - decay) * (current - averaged)

    def train(self, x: np.ndarray, mjj: np.ndarray, rng: np.random.Generator) -> None:
        order = rng.permutation(len(x))
        for start in range(0, len(x), self.config.batch_size):
            rows = order[start : start + self.config.batch_size]
            z, _ = self.preprocessing.forward(torch.from_numpy(x[rows]))
            context = self.preprocessing.context(mjj[rows])
            for group in self.optimizer.param_groups:
                group["lr"] = self.config.learning_rate_at(self.steps)
            loss = -torch.stack([m.log_prob(z, context=context).mean() for m in self.mafs]).sum()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for maf in self.mafs:
                torch.nn.utils.clip_grad_norm_(maf.parameters(), self.config.grad_clip)
            self.optimizer.step()
            self.average.update_parameters(self.mafs)
            self.steps += 1

    def estimate(self) -> ConditionalFlow:
        flow = ConditionalFlow(self.config.flow_config(), self.preprocessing)
        module = self.average.module
        assert isinstance(module, torch.nn.ModuleList)
        flow.load_parameter_arrays(
            {k: v.detach().numpy().copy() for k, v in module.named_parameters()}
        )
        return flow


def step_ms(
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None],
    params: list[torch.nn.Parameter],
    batch: int,
    repeats: int,
    *,
    fused: bool = False,
) -> tuple[float, float]:
    """Mean CPU ms per Adam step (forward, backward, update) and the first step's CPU
    seconds. ``loss`` returns the loss to backpropagate, or None when it has set the
    gradients itself."""
    optimizer = torch.optim.Adam(params, lr=1e-3, fused=fused or None)
    z, context = torch.randn(batch, 4), torch.randn(batch, 1)
    t0 = time.thread_time()
    for i in range(repeats + 3):
        if i == 1:
            first_s = time.thread_time() - t0
        if i == 3:
            t0 = time.thread_time()
        optimizer.zero_grad()
        value = loss(z, context)
        if value is not None:
            value.backward()
        optimizer.step()
    return (time.thread_time() - t0) / repeats * 1e3, first_s


def nflows_loss(mafs: torch.nn.ModuleList) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return lambda z, c: -torch.stack([m.log_prob(z, context=c).mean() for m in mafs]).sum()


def ensemble_loss(flow: ConditionalFlow) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return lambda z, c: -flow.maf.log_prob(z, c).mean(1).sum()


def kernel_gradients(flow: ConditionalFlow) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """The shipped step's gradients (flow kernel, per-member clipping included)."""

    def gradients(z: torch.Tensor, context: torch.Tensor) -> None:
        flow.maf.nll_backward(z, context, max_norm=5.0)

    return gradients


def step_times(compile_too: bool) -> dict[str, dict[str, float]]:
    """One flow of 5 members, 4 transforms of 2×16 hidden, 8 bins: ms per step."""
    config = OnlineConfig().flow_config()
    out: dict[str, dict[str, float]] = {}
    for batch in (16, 256, 1024):
        repeats = max(5, 4000 // batch)
        mafs = torch.nn.ModuleList(build_maf(config) for _ in range(config.n_members))
        row = {"nflows": step_ms(nflows_loss(mafs), list(mafs.parameters()), batch, repeats)[0]}
        flow = ConditionalFlow(config, Preprocessing.from_bounds([0] * 4, [1] * 4))
        ours, params = ensemble_loss(flow), list(flow.parameters())
        with spline_kernel.disabled():
            row["maf_ensemble_torch_spline"] = step_ms(ours, params, batch, repeats, fused=True)[0]
        row["maf_ensemble_kernel"] = step_ms(ours, params, batch, repeats, fused=True)[0]
        if flow_kernel.kernel() is not None:
            gradients = kernel_gradients(flow)
            row["maf_ensemble_flow_kernel"] = step_ms(
                gradients, params, batch, repeats, fused=True
            )[0]
        if compile_too:
            compiled = torch.compile(ours, dynamic=False)
            with spline_kernel.disabled():
                ms, first_s = step_ms(compiled, params, batch, repeats, fused=True)
            row["maf_ensemble_torch_spline_compiled"], row["compile_s"] = ms, first_s
        out[str(batch)] = row
        print(f"minibatch {batch}: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items()))
    return out


def in_sr(mjj: np.ndarray) -> np.ndarray:
    return (mjj >= SR[0]) & (mjj < SR[1])


def test_nll(flows: dict[str, ConditionalFlow], test: Events) -> dict[str, float]:
    """Mean NLL of held-out background: all-data flow on all, sideband flow on sideband."""
    x, mjj = test.features[:, FEATURE_INDICES], test.features[:, MJJ_INDEX]
    out = {}
    for role, rows in (("all", slice(None)), ("sideband", ~in_sr(mjj))):
        log_p = flows[role].log_prob(x[rows], mjj[rows])
        out[role] = float(-log_p[np.isfinite(log_p)].mean())
    return out


def kernel_build_s() -> float | None:
    """Seconds for a cold build of the kernels (g++ into an empty cache folder)."""
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        try:
            spline_kernel.build(Path(cache))
        except RuntimeError as exc:
            print(f"spline kernel: no build ({exc})")
            return None
        return time.perf_counter() - t0


VARIANTS: dict[str, Callable[[], contextlib.AbstractContextManager[None]]] = {
    "flow_kernel": contextlib.nullcontext,  # shipped
    "spline_kernel": flow_kernel.disabled,  # autograd, spline kernel: the trainer before
    "torch_spline": spline_kernel.disabled,  # autograd alone: the fallback of both
}


def run_shipped_variants(
    config: OnlineConfig, stream: np.ndarray, repeats: int
) -> tuple[dict[str, OnlineFlow], dict[str, list[float]], dict[str, list[float]]]:
    """The shipped trainer with the flow kernel, with the spline kernel only and with
    neither, alternating runs on the same events; the flows of each one's last run and
    every run's events/s per core (CPU time) and by wall clock."""
    flows: dict[str, OnlineFlow] = {}
    rates: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    rates_wall: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    for _ in range(repeats):
        for variant, context in VARIANTS.items():
            with context():
                online, cpu_s, wall_s = run_shipped(config, stream)
            flows[variant] = online
            rates[variant].append(len(stream) / cpu_s)
            rates_wall[variant].append(len(stream) / wall_s)
    return flows, rates, rates_wall


def run_shipped(config: OnlineConfig, stream: np.ndarray) -> tuple[OnlineFlow, float, float]:
    """A trained OnlineFlow, the training thread's CPU seconds and the wall seconds."""
    online = OnlineFlow(config)
    t0, c0 = time.perf_counter(), time.thread_time()
    for start in range(0, len(stream), 1000):
        online.learn(stream[start : start + 1000])
    online.finish()
    return online, time.thread_time() - c0, time.perf_counter() - t0


def time_sr_folds(folds: list[int], events: int, repeats: int, seed: int) -> int:
    """Events/s per core (CPU time) of the shipped trainer with K signal-region flows,
    alternating the Ks on the same events; prints the figures and the final JSON line."""
    dataset = lhco_dataset(quick=False)
    background = read_features([dataset.stream_background])[0].astype(np.float32)
    stream = background[np.random.default_rng(seed).permutation(len(background))][:events]
    rates: dict[int, list[float]] = {k: [] for k in folds}
    for _ in range(repeats):
        for k in folds:
            config = replace(OnlineConfig(), seed=seed, signal_region_folds=k)
            _, cpu_s, _ = run_shipped(config, stream)
            rates[k].append(len(stream) / cpu_s)
    median = {k: statistics.median(v) for k, v in rates.items()}
    for k, values in rates.items():
        shown = ", ".join(f"{v:,.0f}" for v in values)
        print(f"K = {k}: {shown} events/s per core; median {median[k]:,.0f}, "
              f"{median[k] / median[folds[0]]:.2f}x K = {folds[0]}")  # fmt: skip
    final = {
        "benchmark": "online_flow_speed",
        "section": "sr_folds",
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, 1 torch thread",
        "timing": "events/s per core from the training thread's CPU time (time.thread_time)",
        "events": len(stream),
        "events_per_s_runs": rates,
        "events_per_s": median,
        "ratio_to_first": {k: median[k] / median[folds[0]] for k in folds},
        "seed": seed,
    }
    print(json.dumps(final))
    return 0


def run_reference(config: OnlineConfig, stream: np.ndarray) -> tuple[dict[str, Flow], float, float]:
    calibration = stream[: config.calibration_events]
    x, mjj = stream[:, FEATURE_INDICES], stream[:, MJJ_INDEX]
    side = ~in_sr(mjj)
    rng = np.random.default_rng(config.seed)
    trainers = {}
    samples = {"all": calibration, "sideband": calibration[~in_sr(calibration[:, MJJ_INDEX])]}
    for role, sample in samples.items():  # as OnlineFlow calibrates
        trainers[role] = NflowsTrainer(config, Preprocessing.calibrate(sample[:, FEATURE_INDICES]))
    t0, c0 = time.perf_counter(), time.thread_time()
    for start in range(0, len(stream), 1000):
        chunk = slice(start, start + 1000)
        trainers["all"].train(x[chunk], mjj[chunk], rng)
        keep = side[chunk]
        trainers["sideband"].train(x[chunk][keep], mjj[chunk][keep], rng)
    cpu_s, wall_s = time.thread_time() - c0, time.perf_counter() - t0
    return {role: t.estimate() for role, t in trainers.items()}, cpu_s, wall_s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=55_000, help="stream length (≤ 60k)")
    parser.add_argument("--reference-events", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument("--steps-only", action="store_true", help="only the step timing")
    parser.add_argument(
        "--repeats", type=int, default=3, help="alternating runs of the three variants"
    )
    parser.add_argument(
        "--sr-folds", type=int, nargs="+", help="only time these numbers of SR flows"
    )
    args = parser.parse_args(argv)
    if not DATA.exists():
        print(f"no data at {DATA} (see ../shared/data/README.md)")
        return 1
    torch.set_num_threads(1)
    if args.sr_folds:
        return time_sr_folds(args.sr_folds, args.events, args.repeats, args.seed)
    build_s = kernel_build_s()
    kernel = spline_kernel.kernel()
    fused = flow_kernel.kernel()
    print(f"kernels: {kernel.library if kernel else 'unavailable'}, cold build {build_s} s")
    steps = step_times(args.compile)
    if args.steps_only:
        print(json.dumps({"benchmark": "online_flow_speed", "ms_per_step_one_flow": steps}))
        return 0
    dataset = lhco_dataset(quick=False)
    background = read_features([dataset.stream_background])[0].astype(np.float32)
    stream = background[np.random.default_rng(args.seed).permutation(len(background))]
    stream = stream[: args.events]
    test = Events(*read_features(list(dataset.test)))
    assert test.is_signal is not None
    test = test.select(~test.is_signal)
    shipped = replace(OnlineConfig(), seed=args.seed)
    print(f"shipped: {shipped}")

    n_ref = min(args.reference_events, len(stream))
    onlines, rates, rates_wall = run_shipped_variants(shipped, stream[:n_ref], args.repeats)
    median = {variant: statistics.median(values) for variant, values in rates.items()}
    median_wall = {variant: statistics.median(v) for variant, v in rates_wall.items()}
    for variant, values in rates.items():
        shown = ", ".join(f"{v:,.0f}" for v in values)
        walls = ", ".join(f"{v:,.0f}" for v in rates_wall[variant])
        print(f"shipped trainer ({variant}), first {n_ref} events: {shown} events/s per core "
              f"(CPU time; wall clock {walls})")  # fmt: skip
    reference_flows, ref_cpu_s, ref_wall_s = run_reference(
        replace(shipped, **REFERENCE), stream[:n_ref]
    )
    ref_rate, ref_rate_wall = n_ref / ref_cpu_s, n_ref / ref_wall_s
    print(f"nflows trainer,  first {n_ref} events: {ref_rate:,.0f} events/s per core "
          f"(CPU time; wall clock {ref_rate_wall:,.0f})")  # fmt: skip
    nll = {
        variant: test_nll({role: t.estimate for role, t in online.trainers.items()}, test)
        for variant, online in onlines.items()
    }
    nll_reference = test_nll(reference_flows, test)
    print(f"test NLL at {n_ref} events: shipped {nll}, nflows trainer {nll_reference}")

    online_full, full_cpu_s, full_wall_s = run_shipped(shipped, stream)
    full_rate, full_rate_wall = len(stream) / full_cpu_s, len(stream) / full_wall_s
    nll_full = test_nll({r: t.estimate for r, t in online_full.trainers.items()}, test)
    print(f"shipped trainer, {len(stream)} events: {full_rate:,.0f} events/s per core "
          f"(CPU time; wall clock {full_rate_wall:,.0f}), NLL {nll_full}")  # fmt: skip
    rate = median["flow_kernel"]
    print(f"ratio vs the nflows trainer: {rate / ref_rate:.1f}x")
    print(f"ratio vs autograd with the spline kernel: {rate / median['spline_kernel']:.2f}x")
    print(f"ratio vs autograd with the torch spline: {rate / median['torch_spline']:.2f}x")
    final = {
        "benchmark": "online_flow_speed",
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, 1 torch thread",
        "timing": "events/s per core from the training thread's CPU time (time.thread_time)",
        "events": len(stream),
        "reference_events": n_ref,
        "events_per_s": full_rate,
        "events_per_s_wall": full_rate_wall,
        "events_per_s_same_events": rate,
        "events_per_s_spline_kernel": median["spline_kernel"],
        "events_per_s_torch_spline": median["torch_spline"],
        "events_per_s_runs": rates,
        "events_per_s_runs_wall": rates_wall,
        "events_per_s_same_events_wall": median_wall,
        "events_per_s_nflows_trainer": ref_rate,
        "events_per_s_nflows_trainer_wall": ref_rate_wall,
        "ratio_vs_nflows_trainer": rate / ref_rate,
        "ratio_vs_spline_kernel": rate / median["spline_kernel"],
        "ratio_vs_torch_spline": rate / median["torch_spline"],
        "flow_kernel": fused is not None,
        "spline_kernel": kernel is not None,
        "kernels_cold_build_s": build_s,
        "test_nll_same_events": nll["flow_kernel"],
        "test_nll_spline_kernel": nll["spline_kernel"],
        "test_nll_torch_spline": nll["torch_spline"],
        "test_nll_nflows_trainer": nll_reference,
        "test_nll_full_stream": nll_full,
        "seed": args.seed,
        "ms_per_step_one_flow": steps,
    }
    print(json.dumps(final))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
